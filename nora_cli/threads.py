"""CPU threads that stay fast when the machine is shared.

torch's CPU wheels run their intra-op pool, oneDNN and MKL on GNU OpenMP (libgomp). libgomp threads
spin at each barrier before they sleep (OMP_WAIT_POLICY unset: ~300k spins), one thread per core. With
another busy process on the machine, a spinning thread burns the time slice that the thread it waits
for needs, and a training step slows many-fold instead of ~2× (benchmarks/results/under_load.md). So
nora, before torch loads:

- sets OMP_WAIT_POLICY=PASSIVE (threads sleep at barriers) unless the user chose a wait behaviour
  (OMP_WAIT_POLICY or GOMP_SPINCOUNT set), and
- uses as many threads as CPUs are really available to this process: its affinity mask and its cgroup
  CPU quota (a container limited to 2 CPUs on a 64-core host gets 2 threads, not 64),

unless `train.threads` / `--threads` (or OMP_NUM_THREADS) says otherwise. The choice is recorded in
nora.json ("threads") and in every metrics.jsonl row.
Both environment variables are read by libgomp when it loads, so `prepare_environment` runs first thing
in `nora` (cli.main) and is inherited by launched ranks; `apply` then sets torch's own thread count.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any

WAIT_POLICY = "PASSIVE"


def cgroup_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs allowed by the cgroup's CFS quota (v2 cpu.max, v1 cpu.cfs_quota_us), None when unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def available_cpus() -> int:
    """CPUs this process may run on: the affinity mask, capped by the cgroup quota (rounded up)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = cgroup_quota()
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def prepare_environment() -> None:
    """Before torch loads: a passive OpenMP wait policy unless the user chose a wait behaviour."""
    if "torch" not in sys.modules and not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & set(os.environ):
        os.environ["OMP_WAIT_POLICY"] = WAIT_POLICY


def apply(threads: int | None) -> dict[str, Any]:
    """Set torch's intra-op threads and say what the run uses (nora.json "threads"): `threads` when given,
    else OMP_NUM_THREADS when the user set it, else the available CPUs shared among this machine's ranks."""
    import torch

    if threads is not None:
        count, source = threads, "train.threads"
    elif os.environ.get("OMP_NUM_THREADS"):
        count, source = torch.get_num_threads(), "OMP_NUM_THREADS"
    else:
        local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or 1))
        count, source = max(1, available_cpus() // local_ranks), "available CPUs"
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    return {"count": torch.get_num_threads(), "source": source, "available_cpus": available_cpus(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
            "gomp_spincount": os.environ.get("GOMP_SPINCOUNT", "unset")}
