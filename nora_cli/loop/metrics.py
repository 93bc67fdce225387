"""metrics.jsonl, the rich progress bar (stderr) and loss.png — main process only."""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory on GPU, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class MetricsLog:
    def __init__(self, path: Path, *, enabled: bool, append: bool) -> None:
        self.path, self.enabled = path, enabled
        self.last_loss: float | None = None
        self._bar: Any = None
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            if not append:
                path.write_text("")

    def write(self, record: dict[str, Any]) -> None:
        if "loss" in record:
            self.last_loss = record["loss"]
        if self.enabled:
            clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
            with open(self.path, "a") as fh:
                fh.write(json.dumps(clean, allow_nan=False) + "\n")  # strict JSON: NaN/inf become null

    def warn(self, message: str) -> None:
        if self.enabled:
            print(f"warning: {message}", file=sys.stderr)

    def notice(self, message: str) -> None:
        """One stderr line, safe inside a signal handler; printed above the bar while one is live."""
        if not self.enabled:
            return
        if self._bar is not None and self._bar.live:
            try:
                self._bar.live.console.print(message, markup=False, highlight=False)
                return
            except RuntimeError:  # the handler interrupted a write to stderr: reentrant buffered I/O
                pass
        os.write(sys.stderr.fileno(), f"{message}\n".encode())

    @contextmanager
    def progress(self, total: int, start: int, unit: str = "tokens") -> Iterator[_Progress]:
        self._bar = _Progress(total, start, self.enabled, unit)
        try:
            yield self._bar
        finally:
            self._bar.close()
            self._bar = None

    def plot(self, path: Path) -> None:
        rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
        val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
        if not train:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        ax.plot(*zip(*train, strict=True), label="train loss", lw=1.2)
        if val:
            ax.plot(*zip(*val, strict=True), "o-", label="val loss", lw=1.2)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)


class _Progress:
    """step/total, loss, lr, throughput and ETA on stderr; silent on non-main ranks.

    A terminal gets a live rich bar. Anything else (a pipe, a log file under nohup, Docker, Slurm or CI)
    would see that bar only at the end, so it gets a plain line every `every` steps and at least every
    `seconds` (NORA_PROGRESS_SECONDS), plus the first and last step."""

    def __init__(self, total: int, start: int, enabled: bool, unit: str = "tokens") -> None:
        self.live: Any = None  # the rich Progress while a terminal shows it
        self._total, self._start, self._unit, self._enabled = total, start, unit, enabled
        self.every = max(1, math.ceil(total / 20))  # about 20 lines per run from the step rule
        self.seconds = float(os.environ.get("NORA_PROGRESS_SECONDS", 30))
        self._t0 = self._last = time.monotonic()
        if not enabled:
            return
        from rich.console import Console

        console = Console(stderr=True)
        if not console.is_terminal:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.live = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(), console=console, transient=False,
        )
        self._task = self.live.add_task("train", total=total, completed=start, info="")
        self.live.start()

    def update(self, step: int, record: dict[str, Any]) -> None:
        if not self._enabled:
            return
        rate = record.get(f"{self._unit}_per_s")
        speed = f"{rate:,.0f} {self._unit}/s" if rate is not None else ""
        info = f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  {speed}"
        if self.live is not None:
            self.live.update(self._task, completed=step, info=info)
            return
        now = time.monotonic()
        if step % self.every and step not in (self._start + 1, self._total) and now - self._last < self.seconds:
            return
        self._last = now
        eta = (now - self._t0) / (step - self._start) * (self._total - step)
        print(f"step {step}/{self._total}  {info}  ETA {_clock(eta)}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None


def _clock(seconds: float) -> str:
    minutes, sec = divmod(int(seconds + 0.5), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{sec:02d}"
