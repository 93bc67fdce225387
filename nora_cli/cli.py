"""The `nora` command line: builds the Typer app and maps errors to exit codes.

Every command lives in `nora_cli/commands/<name>.py` as one function that validates
flags, calls one library function and prints. Those modules import torch & co. lazily,
so `nora --help` stays fast. This is the only module that imports Typer's app object.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Annotated

import typer

from nora_cli import __version__
from nora_cli.commands import evaluate, factorize, merge, recipes, sample, sweep, train
from nora_cli.errors import NoraError
from nora_cli.safety import exit_on_sigterm

app = typer.Typer(
    name="nora",
    help="Finetune LoRA adapters with NoRA (Nyström init) and NoRA+ (ScaledGD preconditioning).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain click help: Typer's rich panels label every flag `<bool>`, as if it took a value
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

app.command("train", help="Train a LoRA/NoRA/NoRA+ adapter from a recipe YAML.")(train.train)
app.command("evaluate", help="Evaluate a base model, adapter or merged model on commonsense/math tasks.")(
    evaluate.evaluate
)
app.command("sample", help="Generate images (diffusion adapter) or text (LM adapter).")(sample.sample)
app.command("merge", help="Export an adapter: merged model, clean PEFT adapter, or diffusers LoRA.")(merge.merge)
app.command("factorize", help="Matrix-factorization lab: GD/ScaledGD with small vs Nyström init.")(
    factorize.factorize
)
app.command("sweep", help="Train + evaluate every (method, seed) of a recipe; writes a Table-4-style summary.")(
    sweep.sweep
)
app.add_typer(recipes.app, name="recipes", help="List, show and validate shipped recipes; print the schema.")


def _version(value: bool) -> None:
    if value:
        print(f"nora {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks for errors.")] = False,
) -> None:
    if debug:
        os.environ["NORA_DEBUG"] = "1"


def main() -> None:
    """Run the app; user errors become one stderr line and exit code 2 (tracebacks only with --debug)."""
    debug = "--debug" in sys.argv or os.environ.get("NORA_DEBUG") == "1"
    # bitsandbytes' CPU backend warns on import that an optional hub-downloaded kernel is absent; we never
    # want that kernel (it would fetch from the hub), so keep the warning out of every command's output.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    exit_on_sigterm()  # SIGTERM unwinds (staging dirs are removed) and exits 143
    try:
        rc = app(standalone_mode=False)  # click returns (not raises) typer.Exit codes in this mode
        if isinstance(rc, int) and rc:
            sys.exit(rc)
    except NoraError as err:
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as err:  # click usage errors and friends
        import click

        if isinstance(err, click.exceptions.Abort):
            sys.exit(130)
        if isinstance(err, click.ClickException):
            if debug:
                raise
            err.show()
            sys.exit(err.exit_code)
        raise
