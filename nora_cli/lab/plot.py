"""Figures of the matrix-factorization lab (`nora factorize --plot`, benchmarks/factorize_figures.py).

Apart from lab/factorize.py so the numerics stay free of matplotlib; it is imported only when plotting.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from nora_cli.errors import NoraError

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def write_plot(result: dict, path: Path) -> None:
    """`nora factorize --plot PATH`: the figure as a PNG (parent folders created)."""
    fig = plot_figure(result)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    except OSError as err:
        raise NoraError(f"--plot {path}: cannot write ({err.strerror or err})") from None


def plot_figure(result: dict) -> Figure:
    """Log-scale curves like Figs. 1/4: dotted lines for perturbed Nyström; a second panel for weak optimality."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    weak = any("weak_errors" in r for r in result["runs"])
    fig = Figure(figsize=(11 if weak else 6, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2 if weak else 1, squeeze=False)[0]
    sym = result["problem"] == "symmetric"
    # mathtext, so that _F is a subscript (plain text showed a literal "_F")
    panels = [("errors", r"$\|XX^\top - A\|_F$" if sym else r"$\|XY^\top - A\|_F$")]
    if weak:
        panels.append(("weak_errors", r"$\|X^\top A^\dagger X - I\|_F$" if sym else r"$\|Y^\top A^\dagger X - I\|_F$"))
    colors: dict[tuple, str] = {}  # a perturbed run shares its clean twin's color, dotted (as in the paper)
    for r in result["runs"]:
        colors.setdefault((r["algorithm"], r["lr"], r["xi"]), f"C{len(colors)}")
    for ax, (key, ylabel) in zip(axes, panels, strict=True):
        for r in result["runs"]:
            if key not in r:
                continue
            ys = [math.nan if e is None or e <= 0 else e for e in r[key]]
            ax.semilogy(range(len(ys)), ys, ":" if r["init"] == "nystrom-perturbed" else "-", label=r["label"],
                        color=colors[(r["algorithm"], r["lr"], r["xi"])], marker="." if len(ys) < 30 else None)
        ax.set_xlabel("iteration t")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{result['problem']}, $r$={result['rank']}, $r_A$={result['rank_A']}", fontsize=10)
    return fig
