"""What an evaluation leaves behind: the progress bar, the Table-4-style table, results.json and predictions.jsonl."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.progress import Progress
    from rich.table import Table


def progress_bar(enabled: bool = True) -> Progress:
    """A stderr progress bar with items/s, so stdout stays clean for the table."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class ItemsPerSecond(ProgressColumn):
        def render(self, task: Any) -> Text:
            # completed/elapsed, not rich's windowed speed: batches finish seconds apart
            elapsed = task.finished_time if task.finished else task.elapsed
            speed = task.completed / elapsed if elapsed else None
            return Text(f"{speed:.2f} items/s" if speed else "- items/s", style="progress.data.speed")

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        ItemsPerSecond(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
    )


def summarize(predictions: list[dict[str, Any]], loglikelihood: bool) -> dict[str, Any]:
    """accuracy = mean per-item correctness; invalid = items whose answer could not be parsed."""
    n = len(predictions)
    metrics: dict[str, Any] = {
        "accuracy": sum(p["correct"] for p in predictions) / n if n else 0.0,
        "n": n,
        "invalid": sum(p["pred"] is None for p in predictions),
    }
    if loglikelihood:
        metrics["acc_norm"] = sum(p["correct_norm"] for p in predictions) / n if n else 0.0
    return metrics


def average(tasks: dict[str, dict[str, Any]]) -> float:
    """Unweighted mean over tasks, as the paper's "Avg." column."""
    return sum(m["accuracy"] for m in tasks.values()) / len(tasks) if tasks else 0.0


def results_table(results: dict[str, Any]) -> Table:
    """Tasks as columns plus Avg (paper Table 4 layout); accuracy rows in percent."""
    from rich.table import Table

    tasks = results["tasks"]
    label = results.get("adapter") or results.get("model") or "model"
    table = Table(title=f"nora evaluate · {results['protocol']}", title_justify="left")
    table.add_column("")
    for name in tasks:
        table.add_column(name, justify="right")
    table.add_column("Avg", justify="right", style="bold")
    table.add_row(f"{label} (acc %)", *(f"{100 * m['accuracy']:.1f}" for m in tasks.values()),
                  f"{100 * results['average']:.1f}")
    if all("acc_norm" in m for m in tasks.values()):
        norms = [m["acc_norm"] for m in tasks.values()]
        table.add_row("acc_norm %", *(f"{100 * v:.1f}" for v in norms), f"{100 * sum(norms) / len(norms):.1f}")
    table.add_row("n", *(str(m["n"]) for m in tasks.values()), str(sum(m["n"] for m in tasks.values())))
    table.add_row("invalid", *(str(m["invalid"]) for m in tasks.values()),
                  str(sum(m["invalid"] for m in tasks.values())))
    return table


def write_outputs(results: dict[str, Any], predictions: list[dict[str, Any]], output: Path) -> Path:
    """results.json at `output`, predictions.jsonl beside it; returns the predictions path."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    preds = output.with_name("predictions.jsonl")
    with preds.open("w", encoding="utf-8") as f:
        for p in predictions:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")
    return preds
