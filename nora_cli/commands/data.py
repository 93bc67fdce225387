"""`nora data preview`: print what `nora_cli.data.preview` found (cli.py groups it under `nora data`)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated

import typer

from nora_cli.options import RecipeArg, SetOption

if TYPE_CHECKING:
    from nora_cli.data.preview import DataPreview


def preview(
    name: RecipeArg,
    n: Annotated[int, typer.Option("--n", min=1, help="How many training rows to show.")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (per row: text, token ids, "
                                          "0/1 label mask) instead of the rendering.")] = False,
    overrides: SetOption = None,
) -> None:
    """Show the first training rows exactly as the model sees them (template, tokenization, truncation,
    packing): learned tokens highlighted, masked ones dimmed; then counts and a length histogram.
    Loads the tokenizer only, never the model's weights."""
    from nora_cli.config.load import load_recipe
    from nora_cli.data.preview import preview as run_preview

    result = run_preview(load_recipe(name, overrides or []), n)
    if as_json:
        print(json.dumps(result.to_json()))
    else:
        _render(result)


def _render(p: DataPreview) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console(soft_wrap=True)
    for i, row in enumerate(p.rows):
        packed = f", {row.examples} examples packed" if p.packing else ""
        console.rule(f"row {i}: {len(row.input_ids)} tokens, {sum(row.label_mask)} learned{packed}")
        text = Text()
        for piece in row.pieces:
            if piece.new_example:
                text.append(" ┃ ", style="bold magenta")
            text.append(piece.text, style="bold green" if piece.learned else "dim")
        console.print(text)
    console.rule()
    console.print(Text.assemble(("learned", "bold green"), " / ", ("masked", "dim"),
                                *((" / ", ("┃ next packed example", "bold magenta")) if p.packing else ())))
    table = Table(show_header=False, title=f"{p.path} ({p.format}, template {p.template}, cutoff_len {p.cutoff_len})")
    for key, value in (
        ("records", p.records),
        ("training examples", f"{p.train_examples} (+{p.val_examples} validation)"),
        ("tokens", f"{p.tokens} ({p.learned_tokens} learned, {p.learned_tokens / max(p.tokens, 1):.0%})"),
        ("truncated", f"{p.truncated} reached cutoff_len"),
        ("padding efficiency", f"{p.padding_efficiency:.1%} real tokens" + ("" if p.packing else " (in use)")),
        ("packing efficiency", f"{p.packing_efficiency:.1%} in {p.packed_rows} rows"
         + (" (in use)" if p.packing else " (data.packing: true)")),
    ):
        table.add_row(key, str(value))
    console.print(table)
    most = max((count for _, _, count in p.histogram), default=0) or 1
    hist = Table(title="example lengths (tokens)", show_edge=False)
    for column in ("tokens", "examples", ""):
        hist.add_column(column, justify="right" if column else "left")
    for lo, hi, count in p.histogram:
        hist.add_row(f"{lo}-{hi}", str(count), "█" * round(30 * count / most))
    console.print(hist)
