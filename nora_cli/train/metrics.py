"""metrics.jsonl, the rich progress bar (stderr) and loss.png — main process only."""

from __future__ import annotations

import json
import math
import resource
import sys
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

    @contextmanager
    def progress(self, total: int, start: int) -> Iterator[_Progress]:
        bar = _Progress(total, start, self.enabled)
        try:
            yield bar
        finally:
            bar.close()

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
    """step/total, loss, lr, throughput and ETA; silent on non-main ranks."""

    def __init__(self, total: int, start: int, enabled: bool) -> None:
        self._progress = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(), console=Console(stderr=True), transient=False,
        )
        self._task = self._progress.add_task("train", total=total, completed=start, info="")
        self._progress.start()

    def update(self, step: int, record: dict[str, Any]) -> None:
        if self._progress is None:
            return
        speed = next((f"{v:,.0f} {k.removesuffix('_per_s')}/s" for k, v in record.items() if k.endswith("_per_s")), "")
        info = f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  {speed}"
        self._progress.update(self._task, completed=step, info=info)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
