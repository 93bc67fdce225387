"""`nora sweep`'s report: per-run numbers read back from each run's own files, mean ± std over seeds,
table.json / table.md, and loss-curve plots.

It works on run directories, not on a SweepSpec (nora_cli.sweep builds the spec and imports this module), so
the table is always rebuilt from what is on disk, whichever process produced it.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

FINAL_FRACTION = 0.1  # final train loss = mean over the last 10% of logged train steps (at least one)
RESULTS_FILE = "results.json"
TIMING_FILE = "sweep_timing.json"


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON file's object, or None when it is missing or torn (an interrupted run)."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


# --- the table -----------------------------------------------------------------------------------------


def read_metrics(path: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(train, val) as sorted (step, loss) pairs; a resumed run may log a step twice: the later row wins."""
    train: dict[int, float] = {}
    val: dict[int, float] = {}
    if not path.is_file():  # the base model's row: never trained
        return [], []
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            if "loss" in row:
                train[int(row["step"])] = float(row["loss"])
            if "val_loss" in row:
                val[int(row["step"])] = float(row["val_loss"])
    return sorted(train.items()), sorted(val.items())


def final_train_loss(losses: Sequence[float]) -> float:
    """Mean of the last ceil(10%) of the logged train losses: one step's loss is one noisy batch."""
    k = max(1, math.ceil(FINAL_FRACTION * len(losses)))
    return sum(losses[-k:]) / k


def run_metrics(run_dir: Path) -> dict[str, Any]:
    """One run's numbers, straight from its own metrics.jsonl and results.json."""
    train, val = read_metrics(run_dir / "metrics.jsonl")
    losses = [loss for _, loss in train]
    out: dict[str, Any] = {
        "steps": train[-1][0] if train else 0,
        "final_train_loss": final_train_loss(losses) if losses else None,
        "mean_train_loss": sum(losses) / len(losses) if losses else None,
        "val_loss": val[-1][1] if val else None,
        "accuracy": {},
        "average": None,
    }
    results = read_json(run_dir / RESULTS_FILE)
    if results:
        out["accuracy"] = {task: m["accuracy"] for task, m in results["tasks"].items()}
        out["average"] = results["average"]
    out.update(read_json(run_dir / TIMING_FILE) or {})
    return out


def stats(values: Sequence[float | None]) -> dict[str, Any] | None:
    """mean, sample std (n-1; 0 for one seed), min, max, n over the seeds that have the value."""
    xs = [v for v in values if v is not None]
    if not xs:
        return None
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
            "min": min(xs), "max": max(xs), "n": len(xs)}


def summarize(header: dict[str, Any], run_dirs: dict[str, dict[str, Path]], tasks: Sequence[str]) -> dict[str, Any]:
    """The table.json object: `header` (what was swept), then per-run metrics and per-method mean ± std.

    run_dirs: method name -> seed -> run directory, in table order."""
    runs: dict[str, dict[str, Any]] = {}
    summary: dict[str, Any] = {}
    for name, dirs in run_dirs.items():
        per_seed = {seed: run_metrics(path) for seed, path in dirs.items()}
        runs[name] = per_seed
        rows = list(per_seed.values())
        summary[name] = {
            key: stats([r[key] for r in rows]) for key in ("final_train_loss", "mean_train_loss", "val_loss", "average")
        }
        summary[name]["accuracy"] = {t: stats([r["accuracy"].get(t) for r in rows]) for t in tasks}
    return {
        **header,
        "definitions": {
            "final_train_loss": f"mean train loss over the last ceil({FINAL_FRACTION:g}·N) of the N logged steps",
            "mean_train_loss": "mean train loss over all logged steps (area under the curve: early progress)",
            "val_loss": "validation loss at the last logged validation step",
            "std": "sample standard deviation over seeds (n-1), 0 for a single seed",
        },
        "runs": runs,
        "summary": summary,
    }


def _cell(stat: dict[str, Any] | None, scale: float = 1.0, digits: int = 4) -> str:
    if stat is None:
        return "—"
    return f"{scale * stat['mean']:.{digits}f} ± {scale * stat['std']:.{digits}f}"


def table_markdown(table: dict[str, Any]) -> str:
    """Methods as rows, losses then accuracy (%) per task and Avg as columns (the paper's Table 4 layout)."""
    tasks = table["eval"]["tasks"] if table["eval"] else []
    head = ["Method", "Train loss (final)", "Train loss (mean)", "Val loss", *tasks]
    head += ["Avg"] if tasks else []
    lines = [f"Mean ± std over seeds {', '.join(map(str, table['seeds']))}; accuracy in %.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    for name, s in table["summary"].items():
        cells = [f"`{name}`", _cell(s["final_train_loss"]), _cell(s["mean_train_loss"]), _cell(s["val_loss"])]
        cells += [_cell(s["accuracy"][t], 100, 1) for t in tasks]
        cells += [_cell(s["average"], 100, 1)] if tasks else []
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Per run:", "", "| Method | seed | steps | Train loss (final) | Train loss (mean) | Val loss | "
              + " | ".join([*tasks, "Avg"] if tasks else []) + " |"]
    lines.append("|---|---:|" + "---:|" * (4 + (len(tasks) + 1 if tasks else 0)))
    for name, per_seed in table["runs"].items():
        for seed, r in per_seed.items():
            nums = [_num(r["final_train_loss"]), _num(r["mean_train_loss"]), _num(r["val_loss"])]
            nums += [_num(r["accuracy"].get(t), 100, 1) for t in tasks] + ([_num(r["average"], 100, 1)] if tasks else [])
            lines.append(f"| `{name}` | {seed} | {r['steps']} | " + " | ".join(nums) + " |")
    lines += ["", *(f"- {k}: {v}" for k, v in table["definitions"].items())]
    return "\n".join(lines) + "\n"


def _num(value: float | None, scale: float = 1.0, digits: int = 4) -> str:
    return "—" if value is None else f"{scale * value:.{digits}f}"


# --- loss curves -----------------------------------------------------------------------------------------


def _smooth(ys: list[float], window: int) -> list[float]:
    """Trailing moving average for plotting only (one step's loss is one noisy batch)."""
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y - (ys[i - window] if i >= window else 0.0)
        out.append(acc / min(i + 1, window))
    return out


def _curves(run_dirs: Sequence[Path]) -> tuple[list[int], list[list[float]]]:
    """Seeds' train losses on the steps every seed logged."""
    per_seed = [dict(read_metrics(d / "metrics.jsonl")[0]) for d in run_dirs]
    steps = sorted(set.intersection(*(set(c) for c in per_seed))) if per_seed else []
    return steps, [[c[s] for s in steps] for c in per_seed]


def plot_loss_curves(run_dirs: dict[str, dict[str, Path]], file_names: dict[str, str], out_dir: Path) -> list[Path]:
    """loss_curves.png (mean per method, min-max band; full run + first quarter) and loss_curves/<file>.png.

    run_dirs: trained method name -> seed -> run directory; file_names: method name -> its file's stem."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    curves = {name: _curves(list(dirs.values())) for name, dirs in run_dirs.items()}
    seeds = list(next(iter(run_dirs.values()), {}))
    longest = max((len(steps) for steps, _ in curves.values()), default=0)
    if longest == 0:
        return []
    window = max(1, longest // 25)
    written = []
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    full, early = fig.subplots(1, 2)
    for i, (name, (steps, ys)) in enumerate(curves.items()):
        smooth = [_smooth(y, window) for y in ys]
        mean = [statistics.fmean(col) for col in zip(*smooth, strict=True)]
        lo, hi = [min(col) for col in zip(*smooth, strict=True)], [max(col) for col in zip(*smooth, strict=True)]
        cut = max(2, len(steps) // 4)
        for ax, n in ((full, len(steps)), (early, cut)):
            ax.plot(steps[:n], mean[:n], color=f"C{i}", label=name, lw=1.4)
            ax.fill_between(steps[:n], lo[:n], hi[:n], color=f"C{i}", alpha=0.18, lw=0)
    for ax, title in ((full, "whole run"), (early, "first quarter")):
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("train loss")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    full.legend(fontsize=8)
    smoothing = f", moving average of {window} steps" if window > 1 else ""
    fig.suptitle(f"mean over seeds {', '.join(seeds)} (band: min–max){smoothing}", fontsize=9)
    fig.savefig(out_dir / "loss_curves.png", dpi=110)
    written.append(out_dir / "loss_curves.png")

    (out_dir / "loss_curves").mkdir(exist_ok=True)
    for i, (name, (steps, ys)) in enumerate(curves.items()):
        fig = Figure(figsize=(6, 3.8), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        for seed, y in zip(seeds, ys, strict=True):
            ax.plot(steps, _smooth(y, window), lw=0.9, alpha=0.6, label=f"seed {seed}")
        if ys:
            ax.plot(steps, [statistics.fmean(c) for c in zip(*(_smooth(y, window) for y in ys), strict=True)],
                    color=f"C{i}", lw=2, label="mean")
        ax.set(xlabel="optimizer step", ylabel="train loss", title=name + smoothing.replace(",", " ·"))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        path = out_dir / "loss_curves" / f"{file_names[name]}.png"
        fig.savefig(path, dpi=110)
        written.append(path)
    return written


def write_outputs(table: dict[str, Any], out_dir: Path) -> None:
    (out_dir / "table.json").write_text(json.dumps(table, indent=2) + "\n")
    (out_dir / "table.md").write_text(table_markdown(table))
