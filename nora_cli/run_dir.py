"""What makes a directory a nora run, what it records, who may write it, and what `--resume` may change.

- Record: `RunInfo`, the typed nora.json (`read`/`write` are its only reader and writer); `recorded_base`
  and `recorded_task` answer "which base model?" and "which task?" for any adapter dir, nora's or not.
- Marker: `nora.json` with `"kind": "nora-run"`, written into the output dir before anything else. Runs
  made before the marker existed are recognised by the `nora_version` their nora.json always had. Only a
  marked directory is ever continued (`--resume`) or replaced (`--overwrite`): a folder that merely holds a
  `checkpoints/` or a `metrics.jsonl` may be someone's thesis.
- Lock: an exclusive, non-blocking `flock` on the output directory itself (no lock file to leave behind;
  the OS drops it when the process dies, even by SIGKILL). `--overwrite` moves the old run's entries aside
  inside the same directory, so the locked inode stays the run's for its whole life.
- Resume: the new resolved recipe must equal the checkpoint's, except for the keys in `RESUME_MAY_CHANGE`.

Size (~400 lines): this module is the one owner of a run directory, so all of the above stays together.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from nora_cli.errors import NoraError, read_json

if TYPE_CHECKING:
    from nora_cli.config.schema import Recipe

MARKER = "nora.json"
RUN_KIND = "nora-run"
#: the DreamBooth layout: a diffusers LoRA file beside PEFT adapters in component subfolders
DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"
DIFFUSERS_COMPONENTS = ("unet", "text_encoder")
#: env var by which `nora train --num-processes N` tells its ranks that it holds the output dir's lock
LOCK_ENV = "NORA_OUTPUT_LOCK_HELD"


def lock_held_by_launcher(out_dir: Path) -> bool:
    """True in a rank of `nora train --num-processes N`: the launcher checked `out_dir` and holds its lock."""
    return os.environ.get(LOCK_ENV) == str(out_dir.resolve())


#: recipe keys (or whole sections, ending in ".") that `--resume` may change: they decide how long the run
#: goes on, how often it logs/validates/saves, where results go and how evaluation runs afterwards, but not
#: what a step computes. A new max_steps/epochs also re-plans the lr schedule's length.
RESUME_MAY_CHANGE = (
    "train.max_steps", "train.epochs", "train.save_steps", "train.eval_steps", "train.log_steps",
    "train.keep_last", "train.save_best", "train.nan_policy", "train.threads", "model.allow_pickle", "data.cache",
    "data.num_proc", "eval.",
    "output.",
)


# --- nora.json: the run's record --------------------------------------------------------------------------


class InitInfo(TypedDict, total=False):
    name: str
    sigma: float | None
    side: str
    seed: int


class PreconditionInfo(TypedDict, total=False):
    kind: str
    normalize: bool
    damping: float


class LoraInfo(TypedDict, total=False):
    r: int
    alpha: float
    target_modules: list[str] | str
    use_rslora: bool


#: nora.json keys with a typed field, in the order a run writes them (`meta` goes before "versions")
_FIELDS = ("kind", "nora_version", "task", "method", "dtype", "quantization", "init", "precondition", "lora",
           "num_processes", "base_model", "base_model_resolved")


@dataclass
class RunInfo:
    """The typed content of nora.json; `read` and `write` are nora's only reader and writer of that file.

    `meta` holds the task's own record (prompt_template, fast_paths, dreambooth, ...) and any key this
    version does not know, so a read-then-write loses nothing. A typed key present as null stays null."""

    kind: str | None = None  # RUN_KIND; runs older than the marker have only nora_version
    nora_version: str | None = None
    task: str | None = None
    method: str | None = None
    dtype: str | None = None
    quantization: str | None = None
    init: InitInfo | None = None
    precondition: PreconditionInfo | None = None
    lora: LoraInfo | None = None
    num_processes: int | None = None
    base_model: str | None = None  # as the user named it (alias, path, hub id)
    base_model_resolved: str | None = None  # what from_pretrained read
    meta: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] | None = None
    nulls: frozenset[str] = field(default=frozenset(), repr=False)  # typed keys written as null

    @property
    def is_run(self) -> bool:
        """A run marker: this version's kind, or the nora_version every older run's nora.json had."""
        return self.kind == RUN_KIND or self.nora_version is not None or "nora_version" in self.nulls

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunInfo:
        typed = {k: data[k] for k in (*_FIELDS, "versions") if k in data}
        meta = {k: v for k, v in data.items() if k not in typed}
        return cls(**typed, meta=meta, nulls=frozenset(k for k, v in typed.items() if v is None))

    def to_dict(self) -> dict[str, Any]:
        written = lambda key: getattr(self, key) is not None or key in self.nulls  # noqa: E731
        out = {key: getattr(self, key) for key in _FIELDS if written(key)}
        out.update(self.meta)
        if written("versions"):
            out["versions"] = self.versions
        return out

    @classmethod
    def marker(cls) -> RunInfo:
        """What a fresh run's nora.json holds before the job is built."""
        from nora_cli import __version__

        return cls(kind=RUN_KIND, nora_version=__version__)

    @classmethod
    def for_run(cls, recipe: Recipe, *, num_processes: int, task_meta: dict[str, Any],
                threads: dict[str, Any] | None = None) -> RunInfo:
        """The full record `nora train` writes once the job is built: recipe, task meta, library versions."""
        adapter, opt = recipe.adapter, recipe.optimizer
        return cls.from_dict({
            **cls.marker().to_dict(),
            "task": recipe.task,
            "method": recipe.method,
            "dtype": recipe.model.dtype,
            "quantization": recipe.model.quantization,
            "init": {"name": adapter.init, "sigma": adapter.sigma, "side": adapter.side, "seed": recipe.seed},
            "precondition": {"kind": opt.precondition, "normalize": opt.normalize, "damping": opt.damping},
            "lora": {"r": adapter.r, "alpha": adapter.alpha, "target_modules": adapter.target_modules,
                     "use_rslora": adapter.use_rslora},
            "num_processes": num_processes,
            **({"threads": threads} if threads is not None else {}),
            **task_meta,
            "versions": library_versions(),
        })

    @classmethod
    def read(cls, directory: Path) -> RunInfo:
        """`directory`/nora.json (an empty RunInfo when there is none); a broken one is a NoraError naming it."""
        file = Path(directory) / MARKER
        if not file.is_file():
            return cls()
        data = read_json(file, "adapter metadata")
        if not isinstance(data, dict):
            raise NoraError(f"{file} must hold a JSON object, got {type(data).__name__}")
        return cls.from_dict(data)

    def write(self, directory: Path) -> None:
        from nora_cli.safety import atomic_write

        atomic_write(Path(directory) / MARKER, (json.dumps(self.to_dict(), indent=2) + "\n").encode())


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("nora-cli", "torch", "transformers", "peft", "accelerate", "diffusers", "datasets", "bitsandbytes"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            continue
    out["python"] = ".".join(map(str, sys.version_info[:3]))
    return out


def read_marker(out_dir: Path) -> RunInfo | None:
    """nora.json if it marks a nora run (this version's kind, or an older run's nora_version)."""
    try:
        info = RunInfo.read(out_dir)
    except NoraError:
        return None
    return info if info.is_run else None


def is_nora_run(out_dir: Path) -> bool:
    return read_marker(out_dir) is not None


def write_marker(out_dir: Path) -> None:
    """The first file of a fresh run; `nora train` later rewrites it with the full `RunInfo.for_run`."""
    RunInfo.marker().write(out_dir)


# --- what an adapter directory says about itself ------------------------------------------------------------


def _peft_configs(directory: Path) -> list[dict[str, Any]]:
    """adapter_config.json of the dir itself, else of its DreamBooth components (unet/, text_encoder/)."""
    files = [directory / "adapter_config.json"]
    if not files[0].is_file():
        files = [directory / part / "adapter_config.json" for part in DIFFUSERS_COMPONENTS]
    configs = [read_json(f, "adapter config") for f in files if f.is_file()]
    return [c for c in configs if isinstance(c, dict)]


def recorded_base(directory: Path) -> str | None:
    """The base model an adapter was trained on: nora.json's base_model (as the user named it), else its
    base_model_resolved, else the PEFT adapter_config.json's base_model_name_or_path (the dir's own, or its
    DreamBooth components'). None when nothing records it; each caller says which flag to pass then."""
    info = RunInfo.read(directory)
    base = info.base_model or info.base_model_resolved
    if base:
        return str(base)
    return next((str(c["base_model_name_or_path"]) for c in _peft_configs(directory)
                 if c.get("base_model_name_or_path")), None)


def recorded_task(directory: Path) -> str | None:
    """The task an adapter belongs to: nora.json's task, else its layout (a diffusers LoRA file or a unet/
    adapter: dreambooth), else a PEFT adapter_config.json's task_type (absent or CAUSAL_LM: causal-lm).
    None for a directory that holds no adapter."""
    task = RunInfo.read(directory).task
    if task:
        return str(task)
    if (directory / DIFFUSERS_LORA_FILE).is_file() or (directory / "unet" / "adapter_config.json").is_file():
        return "dreambooth"
    config_file = directory / "adapter_config.json"
    if not config_file.is_file():
        return None
    config = read_json(config_file, "adapter config")
    task_type = config.get("task_type") if isinstance(config, dict) else None
    return "causal-lm" if task_type in (None, "CAUSAL_LM") else str(task_type).lower()


# --- lock ------------------------------------------------------------------------------------------------

_HELD: dict[Path, int] = {}  # resolved dir -> fd, for re-entry within one process (sweeps, tests)


@contextlib.contextmanager
def output_lock(out_dir: Path) -> Iterator[None]:
    """Hold the run's exclusive lock for the block; a second nora on the same dir gets one line, exit 2.

    Creates the directory if it is missing (and removes it again, if still empty, when the block fails).
    Under `nora train --num-processes N` the launcher holds the lock and says so in $NORA_OUTPUT_LOCK_HELD,
    so its ranks do not lock themselves out."""
    key = out_dir.resolve()
    if key in _HELD or lock_held_by_launcher(out_dir):
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


def check_resume_recipe(out_dir: Path, recipe: Recipe) -> None:
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
    checkpoints of a --resume'd run is the training loop's: see train.py.) Call it after `check_output_dir`
    (in `preflight`) passed, holding the output lock."""
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
