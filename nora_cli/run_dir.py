"""What makes a directory a nora run, who may write it, and what `--resume` may change.

- Marker: `nora.json` with `"kind": "nora-run"`, written into the output dir before anything else. Runs
  made before the marker existed are recognised by the `nora_version` their nora.json always had. Only a
  marked directory is ever continued (`--resume`) or replaced (`--overwrite`): a folder that merely holds a
  `checkpoints/` or a `metrics.jsonl` may be someone's thesis.
- Lock: an exclusive, non-blocking `flock` on the output directory itself (no lock file to leave behind;
  the OS drops it when the process dies, even by SIGKILL). `--overwrite` moves the old run's entries aside
  inside the same directory, so the locked inode stays the run's for its whole life.
- Resume: the new resolved recipe must equal the checkpoint's, except for the keys in `RESUME_MAY_CHANGE`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from nora_cli.errors import NoraError

MARKER = "nora.json"
RUN_KIND = "nora-run"
#: env var by which `nora train --num-processes N` tells its ranks that it holds the output dir's lock
LOCK_ENV = "NORA_OUTPUT_LOCK_HELD"

#: recipe keys (or whole sections, ending in ".") that `--resume` may change: they decide how long the run
#: goes on, how often it logs/validates/saves, where results go and how evaluation runs afterwards, but not
#: what a step computes. A new max_steps/epochs also re-plans the lr schedule's length.
RESUME_MAY_CHANGE = (
    "train.max_steps", "train.epochs", "train.save_steps", "train.eval_steps", "train.log_steps",
    "train.keep_last", "train.save_best", "train.nan_policy", "model.allow_pickle", "eval.", "output.",
)


# --- marker ----------------------------------------------------------------------------------------------


def read_marker(out_dir: Path) -> dict[str, Any] | None:
    """nora.json as a dict if it marks a nora run (this version's kind, or an older run's nora_version)."""
    try:
        meta = json.loads((out_dir / MARKER).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if isinstance(meta, dict) and (meta.get("kind") == RUN_KIND or "nora_version" in meta):
        return meta
    return None


def is_nora_run(out_dir: Path) -> bool:
    return read_marker(out_dir) is not None


def marker_meta() -> dict[str, Any]:
    from nora_cli import __version__

    return {"kind": RUN_KIND, "nora_version": __version__}


def write_marker(out_dir: Path) -> None:
    """The first file of a fresh run; `write_run_info` later extends it with the run's details."""
    from nora_cli.safety import atomic_write

    atomic_write(out_dir / MARKER, (json.dumps(marker_meta(), indent=2) + "\n").encode())


# --- lock ------------------------------------------------------------------------------------------------

_HELD: dict[Path, int] = {}  # resolved dir -> fd, for re-entry within one process (sweeps, tests)


@contextlib.contextmanager
def output_lock(out_dir: Path) -> Iterator[None]:
    """Hold the run's exclusive lock for the block; a second nora on the same dir gets one line, exit 2.

    Creates the directory if it is missing (and removes it again, if still empty, when the block fails).
    Under `nora train --num-processes N` the launcher holds the lock and says so in $NORA_OUTPUT_LOCK_HELD,
    so its ranks do not lock themselves out."""
    key = out_dir.resolve()
    if key in _HELD or os.environ.get(LOCK_ENV) == str(key):
        yield
        return
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(out_dir, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise NoraError(f"output directory {out_dir} is in use by another nora process; wait for it to "
                            "finish (or stop it), then --resume") from None
        _HELD[key] = fd
        try:
            yield
        except BaseException:
            if created:
                with contextlib.suppress(OSError):
                    out_dir.rmdir()  # only ever an empty dir: never user content
            raise
    finally:
        _HELD.pop(key, None)
        os.close(fd)  # releases the flock


# --- resume: what may change -------------------------------------------------------------------------------


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def _short(value: Any) -> str:
    """At most ~40 characters; long strings (paths) keep their end, where they differ most often."""
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 40 else "..." + text[-37:]


def recipe_changes(old_yaml: str, new_yaml: str) -> list[str]:
    """`key: old → new` for every key of both resolved recipes that differs and may not change on resume.

    Keys present in only one of them (a recipe saved by another nora version) are not compared."""
    import yaml

    old, new = _flatten(yaml.safe_load(old_yaml) or {}), _flatten(yaml.safe_load(new_yaml) or {})
    allowed = lambda key: any(key == a or (a.endswith(".") and key.startswith(a)) for a in RESUME_MAY_CHANGE)  # noqa: E731
    return [f"{key}: {_short(old[key])} → {_short(new[key])}" for key in new
            if key in old and old[key] != new[key] and not allowed(key)]


def check_resume_recipe(out_dir: Path, recipe: Any) -> None:
    """Refuse a --resume whose recipe would change what the checkpointed run computes."""
    from nora_cli.config.load import recipe_to_yaml

    saved = out_dir / "recipe.yaml"
    if not saved.is_file():
        return
    try:
        old = saved.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise NoraError(f"cannot read {saved}: {err}") from None
    changes = recipe_changes(old, recipe_to_yaml(recipe))
    if changes:
        shown = "; ".join(changes[:6]) + (f"; and {len(changes) - 6} more" if len(changes) > 6 else "")
        raise NoraError(f"--resume would change the run in {out_dir}: {shown}. Only "
                        f"{', '.join(k.rstrip('.') for k in RESUME_MAY_CHANGE)} may change on resume; "
                        "start a new run with --overwrite or another --output-dir")


# --- output directory: checked before anything loads, prepared once locked -----------------------------


def check_output_dir(out_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Read-only checks, safe on every rank and before anything heavy: fail now, not after the model loads.

    Only a directory nora's run marker identifies (see above) is continued or replaced; anything else
    that is not empty is refused untouched."""
    from nora_cli.safety import check_writable

    if resume and overwrite:
        raise NoraError("--resume and --overwrite exclude each other")
    if out_dir.exists() and not out_dir.is_dir():
        raise NoraError(f"output path {out_dir} exists and is not a directory")
    used = out_dir.is_dir() and any(out_dir.iterdir())
    if used and not (resume or overwrite):
        raise NoraError(f"output directory {out_dir} is not empty; pass --resume to continue it or --overwrite")
    if used and not is_nora_run(out_dir):
        flag = "--resume" if resume else "--overwrite"
        raise NoraError(f"refusing to {flag} {out_dir}: it is not a nora run directory (no {MARKER} run marker); "
                        "nothing was changed")
    check_writable(out_dir, "output directory")


#: prefix of the hidden folder an --overwrite'd run waits in until the new run completes
OVERWRITTEN = ".nora-overwritten-"


def _entries(folder: Path, skip: Path | None = None) -> list[Path]:
    return [e for e in folder.iterdir() if e != skip]


def prepare_output_dir(out_dir: Path, *, resume: bool, overwrite: bool) -> Callable[[bool], None]:
    """Create the output dir and mark it as a nora run; an --overwrite'd run is only moved aside (into a
    hidden `OVERWRITTEN` folder inside the same, locked directory, deleted once the new run completes).
    Returns `finish(ok)`: on failure it removes what this run added and puts the old run back. (Tidying the
    checkpoints of a --resume'd run is the training loop's: see train.py.)"""
    check_output_dir(out_dir, resume=resume, overwrite=overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    before = {e.name for e in out_dir.iterdir()}
    aside: Path | None = None
    if overwrite and before:
        aside = out_dir / f"{OVERWRITTEN}{os.getpid()}"
        aside.mkdir()
        try:
            for entry in _entries(out_dir, aside):
                os.replace(entry, aside / entry.name)
        except OSError as err:
            for entry in _entries(aside):
                os.replace(entry, out_dir / entry.name)
            aside.rmdir()
            raise NoraError(f"cannot move the old run in {out_dir} aside: {err}") from None
    if not is_nora_run(out_dir):
        write_marker(out_dir)  # first: from here on the directory is recognisably nora's

    def finish(ok: bool) -> None:
        if ok:
            return
        for entry in _entries(out_dir, aside):  # only what this run added: the old entries are in `aside`
            if entry.name in before and aside is None:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        if aside is not None:
            for entry in _entries(aside):
                os.replace(entry, out_dir / entry.name)
            aside.rmdir()

    return finish
