"""The `nora` command line: builds the Typer app and maps errors to exit codes.

Every command lives in `nora_cli/commands/<name>.py` as one function that validates
flags, calls one library function and prints. Those modules import torch & co. lazily,
so `nora --help` stays fast. This is the only module that imports Typer's app object.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Annotated, Any

import typer
from typer._click.exceptions import NoArgsIsHelpError
from typer.core import TyperGroup

from nora_cli import __version__
from nora_cli.commands import data, evaluate, factorize, merge, recipes, sample, sweep, train
from nora_cli.errors import NoraError
from nora_cli.safety import exit_on_sigterm


def _usage(err: typer.TyperException) -> str:
    """Click's usage errors, minus its usage banner and `Error:` prefix (one line, like every other error)."""
    return err.format_message().replace("Value error, ", "")


_USER_OS_ERRORS = (errno.EACCES, errno.EPERM, errno.ENOENT, errno.EISDIR, errno.ENOTDIR, errno.EROFS,
                   errno.ENOSPC, errno.EDQUOT, errno.ENAMETOOLONG, errno.ELOOP, errno.EEXIST)


def _os_error(err: OSError) -> str | None:
    """A file the user named cannot be read or written (permissions, missing, a folder, read-only disk)."""
    if err.errno not in _USER_OS_ERRORS or not err.filename:
        return None
    return f"{err.filename}: {err.strerror or err}"


def _not_utf8(err: UnicodeDecodeError) -> str:
    # read sites name the file themselves; this is the net under the ones that do not
    return f"an input file is not UTF-8 text (byte {err.start}: {err.reason})"


#: THE error table: exception type -> one-line message (None: not a user error, let it raise). Every user
#: error becomes `error: <message>` on stderr and exit code 2; `--debug` (or NORA_DEBUG=1) shows the traceback.
_ERROR_TABLE: tuple[tuple[type[BaseException], Callable[[Any], str | None]], ...] = (
    (NoraError, str),
    (typer.TyperException, _usage),  # typer 0.29's own usage errors (not click's classes)
    (UnicodeDecodeError, _not_utf8),
    (OSError, _os_error),
)


def one_line(err: BaseException) -> str | None:
    """The `error:` line for a user error, or None for a bug (which keeps its traceback)."""
    for kind, describe in _ERROR_TABLE:
        if isinstance(err, kind):
            message = describe(err)
            return None if message is None else "error: " + " ".join(str(message).split())
    return None


def _debug(args: Sequence[str]) -> bool:
    """--debug is looked for in the raw arguments: usage errors happen before the option is parsed."""
    return "--debug" in args or os.environ.get("NORA_DEBUG") == "1"


class _NoraGroup(TyperGroup):
    """Applies the error table in `main`, the entry that both the console script and CliRunner call."""

    def main(self, args: Sequence[str] | None = None, *more: Any, standalone_mode: bool = True,
             **extra: Any) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        prior_debug = os.environ.get("NORA_DEBUG")  # `--debug` sets it for launched ranks; never beyond this call
        try:
            return self._run(argv, more, standalone_mode, extra)
        finally:
            if prior_debug is None:
                os.environ.pop("NORA_DEBUG", None)
            else:
                os.environ["NORA_DEBUG"] = prior_debug

    def _run(self, argv: list[str], more: tuple[Any, ...], standalone_mode: bool, extra: dict[str, Any]) -> Any:
        try:
            rc = super().main(argv, *more, standalone_mode=False, **extra)  # returns typer.Exit codes
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)
        except typer.Abort:
            sys.exit(130)
        except NoArgsIsHelpError as err:  # bare `nora` / `nora recipes`: their help, on stdout
            print(err.ctx.get_help())
            sys.exit(0)
        except Exception as err:
            line = one_line(err)
            if line is None:
                raise
            if _debug(argv):
                traceback.print_exc()
            print(line, file=sys.stderr)
            sys.exit(err.exit_code if isinstance(err, NoraError) else 2)
        if not standalone_mode:
            return rc
        sys.exit(rc if isinstance(rc, int) else 0)


app = typer.Typer(
    name="nora",
    help="Finetune LoRA adapters with NoRA (Nyström init) and NoRA+ (ScaledGD preconditioning).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain click help: Typer's rich panels label every flag `<bool>`, as if it took a value
    add_completion=False,
    cls=_NoraGroup,
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
recipes_app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None)
recipes_app.command("list")(recipes.list_)
recipes_app.command("show")(recipes.show)
recipes_app.command("schema")(recipes.schema)
recipes_app.command("validate")(recipes.validate)
app.add_typer(recipes_app, name="recipes", help="List, show and validate shipped recipes; print the schema.")
data_app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None)
data_app.command("preview")(data.preview)
app.add_typer(data_app, name="data", help="See a recipe's training data as the model will: tokens, masks, counts.")


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
    """The console script: run the app; user errors become one stderr line and exit 2 (see `_NoraGroup`)."""
    # bitsandbytes' CPU backend warns on import that an optional hub-downloaded kernel is absent; we never
    # want that kernel (it would fetch from the hub), so keep the warning out of every command's output.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    exit_on_sigterm()  # SIGTERM unwinds (staging dirs are removed) and exits 143
    try:
        app()
    except BrokenPipeError:  # `nora ... | head`: the reader is gone; stop quietly, as `cat` does (128 + SIGPIPE)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error while flushing at exit
        sys.exit(141)
