"""`nora sweep RECIPE`: train and evaluate every (method, seed) pair, then write a Table-4-style summary.

Validates flags, calls `nora_cli.sweep` (imported lazily: it pulls in torch through training), prints
the markdown table to stdout. Progress and per-run status go to stderr.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from nora_cli.options import LimitOption, ProtocolOption, SetOption


def sweep(
    recipe: Annotated[str, typer.Argument(help="Recipe YAML path or shipped recipe name (causal-lm).")],
    methods: Annotated[
        str,
        typer.Option("--methods", help="Comma-separated: lora, nora, lora-p, nora+, base (the untrained model, "
                     "evaluated only), and LoRA with another init: "
                     "pissa, pissa_niter_K, olora, gaussian. Per-method knobs: nora@sigma=0.02@side=input "
                     "(sigma, side, init, r, alpha, lr, damping, precondition, normalize, or a dotted recipe key)."),
    ] = "lora,nora",
    seeds: Annotated[str, typer.Option("--seeds", help="Comma-separated seeds, e.g. 0,1,2.")] = "0,1,2",
    eval_: Annotated[
        str | None,
        typer.Option("--eval", help="Tasks scored after each run: TASK[=TEST_FILE],... Default: the recipe's "
                     "eval.tasks (and eval.data); none means losses only."),
    ] = None,
    set_: SetOption = None,
    output_dir: Annotated[
        Path | None, typer.Option("--output-dir", "-o", help="Sweep tree root. Default: <recipe output.dir>-sweep.")
    ] = None,
    protocol: ProtocolOption = None,
    limit: LimitOption = None,
) -> None:
    from nora_cli import sweep as lib
    from nora_cli.loop.loop import TrainingStopped
    from nora_cli.sweep_report import table_markdown

    spec = lib.plan_sweep(
        recipe, methods, seeds, overrides=list(set_ or []), output_dir=output_dir,
        eval_tasks=lib.parse_eval(eval_), protocol=protocol.value if protocol else None, limit=limit,
    )
    try:
        table = lib.run_sweep(spec)
    except TrainingStopped as stop:
        print(f"{stop}\nsweep interrupted: re-run the same command to resume", file=sys.stderr)
        raise SystemExit(stop.exit_code) from None
    print(table_markdown(table), end="")
    print(f"wrote {spec.output_dir / 'table.md'}, table.json and loss_curves.png")
