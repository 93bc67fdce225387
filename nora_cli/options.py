"""Flags that several commands share, declared once: same names, metavar, help and checks everywhere.

Commands annotate a parameter with one of these (`set_: SetOption = None`). A flag whose meaning differs
per command (`--output-dir`, `--overwrite`, `--dtype`) stays in that command.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer

from nora_cli.config.names import PROTOCOLS

#: `--protocol` choices: the recipe's eval.protocol values, from the one list of protocol names
ProtocolName = Enum("ProtocolName", {name: name for name in PROTOCOLS}, type=str)  # type: ignore[misc]


RecipeArg = Annotated[
    str, typer.Argument(help="Recipe YAML path, or a shipped recipe name (see `nora recipes list`).")
]
SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-s",
        metavar="KEY=VALUE",
        help="Override a recipe key, e.g. --set train.max_steps=10 --set method=nora+ "
        "--set adapter.target_modules=[q_proj,v_proj] (value parsed as YAML; repeatable).",
    ),
]
ProtocolOption = Annotated[
    ProtocolName | None,
    typer.Option("--protocol", help="llm-adapters: generate and extract the answer (paper numbers); "
                 "loglikelihood: score the candidates. Default: the recipe's eval.protocol, else llm-adapters."),
]
LimitOption = Annotated[
    int | None,
    typer.Option("--limit", min=1, help="Only the first N items per task. Default: the recipe's eval.limit "
                 "(all items)."),
]
AllowPickleOption = Annotated[
    bool, typer.Option("--allow-pickle", help="Also load pickled .bin/.pt weights (weights_only=True).")
]
