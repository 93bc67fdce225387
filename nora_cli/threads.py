"""CPU threads that stay fast when the machine is shared.

torch's CPU wheels run their intra-op pool, oneDNN and MKL on GNU OpenMP (libgomp), one thread per core,
and libgomp's threads spin at each barrier (300,000 iterations) before they sleep. Alone on the machine
that is the fastest setting. With another busy process on it, a thread that spins waits for a partner the
kernel has descheduled, and a training step slows 4-6× instead of ~2× (benchmarks/results/under_load.md).
Sleeping at barriers instead (OMP_WAIT_POLICY=PASSIVE) fixes the loaded case but costs ~28% when idle:
the step has thousands of small parallel regions, each now paying a futex wake-up.

So nora keeps libgomp's spinning and changes the thread count instead: it starts with the CPUs this process
may use (affinity mask, capped by the cgroup CPU quota, shared among the ranks on one machine), and on CPU a
`ThreadGovernor` watches how many OTHER tasks are runnable (/proc/stat procs_running minus this process's
own running threads, smoothed over ~1 s) and, between optimizer steps, uses only the CPUs left free (at
least 1): one thread has no barriers to spin at. When the other work ends, the threads come back.

Any explicit choice turns all of this off: `train.threads` / `--threads`, or OMP_NUM_THREADS. Thread count
changes the float summation order of some reductions, so a run that must be bitwise reproducible across
different machine loads (kill and resume on a busy box) should pin it. nora.json ("threads") and every
metrics.jsonl row ("threads") record what was used.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any


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


def others_running(proc: Path = Path("/proc")) -> int | None:
    """Runnable tasks on the machine that are not this process's threads, right now; None without /proc."""
    try:
        running = next(int(line.split()[1]) for line in (proc / "stat").read_text().splitlines()
                       if line.startswith("procs_running"))
        ours = 0
        for task in (proc / "self" / "task").iterdir():
            try:
                stat = (task / "stat").read_text()
            except OSError:  # the thread ended while we looked
                continue
            ours += stat[stat.rindex(")") + 2] == "R"  # the state follows "(comm) "
    except (OSError, StopIteration, ValueError):
        return None
    return max(0, running - ours)


class ThreadGovernor:
    """Between optimizer steps, use only the CPUs other work leaves free (at least 1, at most `base`).

    A daemon thread samples `others_running` every `interval` seconds into an exponential average (~1 s);
    `poll` (called by the training loop in the main thread, where changing torch's pool is safe) applies it."""

    def __init__(self, base: int, cpus: int, interval: float = 0.2, smoothing: float = 0.2) -> None:
        self.base, self.cpus, self.interval, self.smoothing = base, cpus, interval, smoothing
        self.others = 0.0
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, name="nora-thread-governor", daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            now = others_running()
            if now is not None:
                self.others += self.smoothing * (now - self.others)

    def target(self) -> int:
        return max(1, min(self.base, self.cpus - round(self.others)))

    def poll(self) -> None:
        import torch

        count = self.target()
        if torch.get_num_threads() != count:
            torch.set_num_threads(count)

    def close(self) -> None:
        self._stop.set()
        self._sampler.join(timeout=1)


def apply(threads: int | None) -> tuple[dict[str, Any], ThreadGovernor | None]:
    """Set torch's intra-op threads and say what the run uses (nora.json "threads"): `threads` when given,
    else OMP_NUM_THREADS when the user set it, else the available CPUs shared among this machine's ranks,
    then adapted to other work by a `ThreadGovernor` (returned; None when the count is pinned, on a GPU
    machine, or without /proc)."""
    import torch

    cpus = available_cpus()
    if threads is not None:
        count, source = threads, "train.threads"
    elif os.environ.get("OMP_NUM_THREADS"):
        count, source = torch.get_num_threads(), "OMP_NUM_THREADS"
    else:
        local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or 1))
        count, source = max(1, cpus // local_ranks), "available CPUs"
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    governor = None
    if source == "available CPUs" and not torch.cuda.is_available() and others_running() is not None:
        governor = ThreadGovernor(count, cpus)
    info = {"count": torch.get_num_threads(), "source": source, "adaptive": governor is not None,
            "available_cpus": cpus, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
            "gomp_spincount": os.environ.get("GOMP_SPINCOUNT", "unset")}
    return info, governor


@contextlib.contextmanager
def cpu_threads(threads: int | None) -> Iterator[tuple[dict[str, Any], ThreadGovernor | None]]:
    """`apply` for the length of a run: the governor's sampler stops when the run ends."""
    info, governor = apply(threads)
    try:
        yield info, governor
    finally:
        if governor is not None:
            governor.close()
