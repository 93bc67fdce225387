"""`nora factorize`: replay the paper's matrix-factorization theory (Figs. 1 and 4, Thms 3-4).

Validates flags, calls `nora_cli.lab.factorize` (imported lazily: it pulls in torch), then prints a
table or exactly one JSON object, and optionally writes a log-scale error-vs-iteration PNG (lab/plot.py).
Numeric flags are parsed here rather than by Click so a bad value is a one-line NoraError.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from nora_cli.errors import NoraError

# Flags that define the problem or the single run; a preset already fixes all of them.
_RUN_FLAGS = ("--problem", "--m", "--n", "--rank", "--spectrum", "--algorithm", "--init", "--lr", "--xi",
              "--xi-noise", "--damping")


def _number(flag: str, text: str | None, kind: type = float) -> float | int | None:
    if text is None:
        return None
    try:
        value = kind(text)
    except ValueError:
        raise NoraError(f"{flag} {text!r}: expected {'an integer' if kind is int else 'a number'}") from None
    if not math.isfinite(value):
        raise NoraError(f"{flag} {text!r}: must be finite")
    return value


def factorize(
    preset: Annotated[
        str | None, typer.Option("--preset", help="fig1a | fig1b | fig1c | fig4 | thm3 | thm4 (App. E.1 setups).")
    ] = None,
    problem: Annotated[str | None, typer.Option("--problem", help="symmetric (½‖XXᵀ−A‖²) | asymmetric.")] = None,
    m: Annotated[str | None, typer.Option("--m", metavar="INT", help="Rows of A. [default: 1000]")] = None,
    n: Annotated[str | None, typer.Option("--n", metavar="INT", help="Columns of A (asymmetric). [default: m]")] = None,
    rank: Annotated[str | None, typer.Option("--rank", metavar="INT", help="Factor width r. [default: r_A]")] = None,
    spectrum: Annotated[
        str | None, typer.Option("--spectrum", help='Nonzero singular values "1,0.5,0.01" or fig1a | fig1c. [default: fig1a]')
    ] = None,
    algorithm: Annotated[
        str | None, typer.Option("--algorithm", help="gd | scaledgd | scaledgd-damped. [default: scaledgd]")
    ] = None,
    init: Annotated[
        str | None, typer.Option("--init", help="small | nystrom | nystrom-perturbed. [default: nystrom]")
    ] = None,
    lr: Annotated[str | None, typer.Option("--lr", metavar="FLOAT", help="Step size η. [default: 0.5]")] = None,
    xi: Annotated[
        str | None, typer.Option("--xi", metavar="FLOAT", help="Std ξ of Ω or of small init. [default: 1 | 1e-3]")
    ] = None,
    xi_noise: Annotated[
        str | None, typer.Option("--xi-noise", metavar="FLOAT", help="Std ξ_N of the perturbation. [default: 1e-6]")
    ] = None,
    damping: Annotated[
        str | None, typer.Option("--damping", metavar="FLOAT", help="λ of ScaledGD-(λ). [default: 0.01]")
    ] = None,
    iters: Annotated[
        str | None, typer.Option("--iters", metavar="INT", help="Iterations T. [default: 60, or the preset's]")
    ] = None,
    seed: Annotated[str, typer.Option("--seed", metavar="INT", help="Seed for A and the initializations.")] = "0",
    dtype: Annotated[str, typer.Option("--dtype", help="float64 | float32.")] = "float64",
    plot: Annotated[Path | None, typer.Option("--plot", help="Write a log-scale error-vs-iteration PNG here.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print exactly one JSON object (nulls = non-finite).")] = False,
) -> None:
    if plot is not None and plot.suffix.lower() != ".png":
        raise NoraError(f"--plot {plot}: the file name must end in .png")
    steps = _number("--iters", iters, int)
    if steps is not None and steps < 0:
        raise NoraError(f"--iters must be >= 0 (got {steps})")
    seed_ = _number("--seed", seed, int)
    if preset is not None:
        values = (problem, m, n, rank, spectrum, algorithm, init, lr, xi, xi_noise, damping)
        given = [flag for flag, value in zip(_RUN_FLAGS, values, strict=True) if value is not None]
        if given:
            raise NoraError(f"{', '.join(given)} cannot be combined with --preset {preset}: drop one or the other")
    knobs = {
        "problem": problem,
        "m": _number("--m", m, int),
        "n": _number("--n", n, int),
        "rank": _number("--rank", rank, int),
        "algorithm": algorithm,
        "init": init,
        "lr": _number("--lr", lr),
        "xi": _number("--xi", xi),
        "xi_noise": _number("--xi-noise", xi_noise),
        "damping": _number("--damping", damping),
        "iters": steps,
    }
    from nora_cli.lab import factorize as lab  # imports torch: only after the cheap checks

    if preset is not None:
        result = lab.run_preset(preset, seed_, steps, dtype)
    else:
        if spectrum is not None:
            knobs["spectrum"] = lab.parse_spectrum(spectrum)
        kwargs = {k: v for k, v in knobs.items() if v is not None}
        result = lab.run_custom(**kwargs, seed=seed_, dtype=dtype)

    if plot is not None:
        from nora_cli.lab.plot import write_plot

        write_plot(result, plot)
    if as_json:
        print(json.dumps(result, allow_nan=False))
        return
    _print_table(result, lab.iters_to_eps)
    if plot is not None:
        print(f"wrote {plot}")


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.3e}"


def _print_table(result: dict, iters_to_eps: Callable[[list, float], int | None]) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    norm = result["norm_A"]
    weak = any("weak_errors" in r for r in result["runs"])
    title = (f"{result['problem']} {result['m']}×{result['n']}, r={result['rank']}, r_A={result['rank_A']}, "
             f"‖A‖_F={norm:.4g}" + (f", rank-r optimum {result['min_error']:.4g}" if weak else ""))
    table = Table(title=title, box=box.SIMPLE_HEAD)
    for col in ("run", "algorithm", "init", "lr", "final error", "iters to 1e-10·‖A‖"):
        table.add_column(col, justify="left" if col in ("run", "algorithm", "init") else "right")
    if weak:
        table.add_column("final weak error", justify="right")
    for r in result["runs"]:
        hit = iters_to_eps(r["errors"], norm)
        row = [r["label"], r["algorithm"], r["init"], f"{r['lr']:g}", _fmt(r["errors"][-1]),
               "—" if hit is None else str(hit)]
        if weak:
            row.append(_fmt(r.get("weak_errors", [None])[-1]))
        table.add_row(*row)
    Console().print(table)
