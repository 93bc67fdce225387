"""Shared by the benchmark scripts: machine description, alternating A/B timing, medians, markdown."""

from __future__ import annotations

import datetime as dt
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def apply_threads(threads: int | None) -> None:
    """Pin intra-op threads for this process and its children (OMP_NUM_THREADS); None keeps torch's default.

    On a busy machine the default (one thread per core) can spin at OpenMP barriers while another
    process holds a core, which slows every run several-fold and swamps the comparison; one thread
    per process keeps each run's cost its own."""
    if threads is None:
        return
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)


def shared_dir() -> Path:
    """$NORA_SHARED, else ../shared next to the repo (the layout tests/conftest.py uses)."""
    path = Path(os.environ.get("NORA_SHARED", REPO.parent / "shared"))
    if not (path / "data").is_dir():
        raise SystemExit(f"shared data folder not found at {path}; set NORA_SHARED")
    return path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def machine() -> dict[str, Any]:
    import torch

    flags = cpu_flags()
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "isa": isa,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


def machine_md(info: dict[str, Any], load_after: Sequence[float] | None = None) -> str:
    after = f"; after: {', '.join(f'{x:.2f}' for x in load_after)}" if load_after else ""
    return (
        f"- date: {info['date']}\n"
        f"- machine: {info['nproc']} CPUs, {info['cpu']} ({', '.join(info['isa']) or 'no AVX2'}), "
        f"torch {info['torch']} ({info['torch_threads']} threads), Python {info['python']}\n"
        f"- load average (1/5/15 min) before: {', '.join(f'{x:.2f}' for x in info['loadavg'])}{after} "
        f"— the machine is shared; every figure below is a ratio of runs alternated in the same session\n"
    )


def alternate(arms: dict[str, Callable[[], float]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Run every arm once per round, the order reversed on odd rounds (A B C, C B A, …); warm-up rounds
    are run and discarded. Returns each arm's measurements."""
    names = list(arms)
    for _ in range(warmup):
        for name in names:
            arms[name]()
    out: dict[str, list[float]] = {name: [] for name in names}
    for rnd in range(rounds):
        for name in names if rnd % 2 == 0 else names[::-1]:
            out[name].append(arms[name]())
    return out


def pair_ratios(a: Sequence[float], b: Sequence[float]) -> list[float]:
    return [x / y for x, y in zip(a, b, strict=True)]


def spread(values: Sequence[float], fmt: str = ".3g") -> str:
    """'median (min–max)'"""
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}–{max(values):{fmt}})"


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_measured(cmd: list[str], env: dict[str, str] | None = None, log: Path | None = None) -> dict[str, float]:
    """Run a command to completion; its wall seconds and peak RSS (this child alone, from wait4)."""
    start = time.perf_counter()
    with open(log or os.devnull, "w") as sink:
        proc = subprocess.Popen(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = log.read_text()[-3000:] if log else ""
        raise RuntimeError(f"{' '.join(cmd[:6])} … exited {proc.returncode}\n{tail}")
    return {"wall_s": time.perf_counter() - start, "peak_rss_mb": usage.ru_maxrss / 1024,
            "cpu_s": usage.ru_utime + usage.ru_stime}


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"wrote {path}")
