"""`nora train`: check cheaply, build the task's Job, then run the one shared loop.

Everything bad input can break is checked before anything is written or the weights load (`preflight`):
the output dir (nora run marker, emptiness, writability), the model source, the adapter against the
architecture read from config.json on the meta device (target modules exist, 0 < r ≤ min(in, out),
safetensors weights), the data (files exist, records parse), and on --resume the recipe and checkpoint.
Then the output dir is locked. Disk space is checked once the job is built (exact trainable size), before
the first step. `--overwrite` moves the previous run aside (`.nora-overwritten-PID/` inside the run dir),
puts it back if building the job fails, and deletes it only when the new run completes: a bad recipe never
costs the user their old results, not even one that only fails while training (a NaN stop, a crash).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nora_cli import run_dir as rundir
from nora_cli.errors import NoraError

if TYPE_CHECKING:
    from nora_cli.config.schema import Recipe
    from nora_cli.loop.job import Job


def _lm_job(recipe: Recipe, device: Any, out_dir: Path) -> Job:
    from nora_cli.tasks.causal_lm.job import build_lm_job

    return build_lm_job(recipe, device, out_dir)


def _dreambooth_job(recipe: Recipe, device: Any, out_dir: Path) -> Job:
    from nora_cli.tasks.dreambooth.job import build_dreambooth_job

    return build_dreambooth_job(recipe, device, out_dir)


#: recipe.task -> job builder
TASKS: dict[str, Callable[[Recipe, Any, Path], Job]] = {"causal-lm": _lm_job, "dreambooth": _dreambooth_job}

# --- output directory ---------------------------------------------------------------------------------


def check_output_dir(out_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Read-only checks, safe on every rank and before anything heavy: fail now, not after the model loads.

    Only a directory nora's run marker identifies (see rundir.py) is continued or replaced; anything else
    that is not empty is refused untouched."""
    from nora_cli.run_dir import MARKER, is_nora_run
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
    Returns `finish(ok)`: on success, on --resume, it sets damaged checkpoints aside and removes what a killed
    run left half-written and its metrics past the last checkpoint; on failure it puts everything back.
    Call it after `check_output_dir` (in `preflight`) passed, holding the output lock."""
    from nora_cli.run_dir import is_nora_run, write_marker

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
            if resume:
                from nora_cli.loop import checkpoint as ckpt

                ckpt.set_aside_damaged(out_dir)
                ckpt.clean_stale(out_dir)
                ckpt.rewind_metrics(out_dir)
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


def check_model_exists(source: str, gguf_file: str | None = None) -> str:
    """A local model source (alias, .gguf, folder) exists; a hub id is left to the loader. No weights load."""
    from nora_cli.models import ALIASES, alias_gguf_path

    if source in ALIASES:
        return f"model alias {source} ({alias_gguf_path(source)})"
    path = Path(source).expanduser()
    if path.suffix == ".gguf" or gguf_file is not None:
        gguf = path if path.suffix == ".gguf" else path / str(gguf_file)
        if not gguf.is_file():
            raise NoraError(f"GGUF file not found: {gguf}")
        return f"model {gguf}"
    if path.exists():
        if not path.is_dir() or not any((path / f).is_file() for f in ("config.json", "model_index.json")):
            raise NoraError(f"{path} is not a model directory (no config.json or model_index.json)")
        return f"model {path}"
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise NoraError(f"model path not found: {source}")
    return f"model {source} (hub id: checked when it loads)"


def preflight(recipe: Recipe, out_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Everything cheap, before anything is written or loaded: output dir, model source, adapter vs
    architecture (config only), data, and on --resume the recipe and the checkpoint to continue from."""
    from nora_cli.data.check import check_data

    check_output_dir(out_dir, resume=resume, overwrite=overwrite)
    check_precision(recipe)
    check_model_exists(recipe.model.source, recipe.model.gguf_file)
    if recipe.task in PREFLIGHT:
        PREFLIGHT[recipe.task](recipe)
    check_data(recipe)
    if resume and out_dir.is_dir() and any(out_dir.iterdir()):
        from nora_cli.loop import checkpoint as ckpt
        from nora_cli.run_dir import check_resume_recipe

        check_resume_recipe(out_dir, recipe)
        ckpt.newest_usable(out_dir)  # none usable: exit 2 naming the file, before the model loads


# --- adapter vs architecture (before the weights load) -------------------------------------------------


def check_lm_adapter(recipe: Recipe) -> None:
    """Target modules that match nothing and ranks outside 0 < r ≤ min(in, out) fail here, from config.json
    alone, with the names that would have worked. Matching follows PEFT: exact name or `.name` suffix."""
    from nora_cli.models import check_weight_format, linear_layers, model_skeleton, resolve_source

    mcfg, acfg = recipe.model, recipe.adapter
    source = resolve_source(mcfg.source, mcfg.gguf_file)
    check_weight_format(source, mcfg.allow_pickle)
    skeleton = model_skeleton(source, mcfg.trust_remote_code)
    layers = linear_layers(skeleton)
    head = skeleton.get_output_embeddings()
    head_name = next((n for n, m in skeleton.named_modules() if head is not None and m is head), None)
    available = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in layers if n != head_name))
    if acfg.target_modules == "all-linear":
        targeted = {n: s for n, s in layers.items() if n != head_name}
    else:
        targeted = {}
        for target in acfg.target_modules:
            hits = {n: s for n, s in layers.items() if n == target or n.endswith(f".{target}")}
            if not hits:
                raise NoraError(
                    f"adapter.target_modules: {target!r} matches no Linear layer of {mcfg.source}; "
                    f"available: {', '.join(available)}"
                )
            targeted.update(hits)
    if not targeted:
        raise NoraError(f"{mcfg.source} has no Linear layers for adapter.target_modules=all-linear")
    name, (fan_in, fan_out) = min(targeted.items(), key=lambda item: min(item[1]))
    if acfg.r > min(fan_in, fan_out):
        raise NoraError(
            f"adapter.r={acfg.r} exceeds min(in, out)={min(fan_in, fan_out)} of {name} ({fan_in}→{fan_out}); "
            f"use r ≤ {min(fan_in, fan_out)} or drop {name.rsplit('.', 1)[-1]} from adapter.target_modules"
        )


#: recipe.task -> cheap pre-load check of the adapter against the base architecture
PREFLIGHT: dict[str, Callable[[Recipe], None]] = {"causal-lm": check_lm_adapter}


# --- disk space ---------------------------------------------------------------------------------------

_MARGIN = 64 * 2**20  # tokenizer, metrics, loss.png, nora.json, filesystem slack


def checkpoint_bytes_needed(model: Any, recipe: Recipe, total_steps: int, *, modifies_base: bool = False) -> int:
    """Peak bytes the run writes: (kept + 1 staging) checkpoints of weights + optimizer state, the final
    adapter (+ best copy, + the initial adapter when the init `modifies_base`), and a margin. AdamW keeps 2
    moments per parameter, SGD ≤ 1."""
    tcfg = recipe.train
    weights = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    moments = 2 if recipe.optimizer.name == "adamw" else int(recipe.optimizer.momentum > 0)
    saves = total_steps // tcfg.save_steps if tcfg.save_steps else 0
    kept = min(saves, tcfg.keep_last) if tcfg.keep_last else saves
    finals = 1 + int(tcfg.save_best) + int(modifies_base)
    return weights * (1 + moments) * (kept + 1) + weights * finals + _MARGIN


def check_disk_space(out_dir: Path, need: int) -> None:
    from nora_cli.loop import checkpoint as ckpt

    root = out_dir / ckpt.CKPT_DIR  # on --resume, existing checkpoints get rotated out: their space counts
    have = shutil.disk_usage(out_dir).free
    have += sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) if root.is_dir() else 0
    if have < need:
        raise NoraError(
            f"not enough disk space in {out_dir}: {have / 2**20:.0f} MiB free, checkpoints and the adapter need "
            f"about {need / 2**20:.0f} MiB; free some space, lower train.keep_last or pick another --output-dir"
        )


# --- the run ------------------------------------------------------------------------------------------


def check_precision(recipe: Recipe) -> None:
    """fp16 needs CUDA: on CPU accelerate drops fp16 autocast and its GradScaler without a word and the run
    trains in fp32. Checked before anything loads."""
    import torch

    if recipe.train.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise NoraError("train.mixed_precision=fp16 needs a CUDA GPU (on CPU it would silently train in "
                        "fp32); use bf16 or no")


def make_accelerator(recipe: Recipe) -> Any:
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # AcceleratorState is a process-wide singleton that refuses a second mixed_precision; several runs in
    # one process (nora sweep, tests) each bring their own. The distributed PartialState is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    cpu = not torch.cuda.is_available()
    return Accelerator(mixed_precision=recipe.train.mixed_precision, cpu=cpu)


def train_recipe(recipe: Recipe, out_dir: Path, *, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Run a full training job; returns a small summary (steps, final loss, output dir).

    Order: cheap checks (nothing written) → lock the output dir → move an old run aside → build the job
    (model, data; a failure puts the old run back) → train → on completion delete the old run. The ranks of
    `nora train --num-processes N` skip the checks: their launcher ran them once and holds the lock."""
    if not rundir.lock_held_by_launcher(out_dir):
        preflight(recipe, out_dir, resume=resume, overwrite=overwrite)
    # the main rank locks (unless `nora train --num-processes N` already holds the lock for its ranks)
    main = os.environ.get("RANK", "0") == "0"
    with rundir.output_lock(out_dir) if main else contextlib.nullcontext():
        return _train_locked(recipe, out_dir, resume=resume, overwrite=overwrite)


def _train_locked(recipe: Recipe, out_dir: Path, *, resume: bool, overwrite: bool) -> dict[str, Any]:
    from accelerate.utils import set_seed

    from nora_cli.config.load import recipe_to_yaml
    from nora_cli.loop import loop

    accelerator = make_accelerator(recipe)
    main = accelerator.is_main_process
    finish = prepare_output_dir(out_dir, resume=resume, overwrite=overwrite) if main else None
    accelerator.wait_for_everyone()
    try:
        set_seed(recipe.seed)
        job = TASKS[recipe.task](recipe, accelerator.device, out_dir)
        sched = loop.plan_schedule(len(job.train_data), recipe.train, accelerator.num_processes)
        if main:
            need = checkpoint_bytes_needed(job.model, recipe, sched.total_steps,
                                           modifies_base=bool(job.meta.get("modifies_base")))
            check_disk_space(out_dir, need)
    except BaseException:
        if finish is not None:
            finish(False)
        raise
    if finish is not None:
        finish(True)
    if main:
        # recipe.yaml + nora.json go in before training, so even a crashed run is self-describing
        loop.write_recipe(out_dir, recipe_to_yaml(recipe))
        rundir.RunInfo.for_run(recipe, num_processes=accelerator.num_processes, task_meta=job.meta).write(out_dir)
    accelerator.wait_for_everyone()  # damaged checkpoints are set aside before any rank looks for the latest
    try:
        summary = loop.run(job, recipe, sched, accelerator, out_dir, resume=resume)
    except BaseException:
        if main:
            for old in out_dir.glob(f"{OVERWRITTEN}*"):
                print(f"note: the run --overwrite replaced is kept in {old} until this run completes",
                      file=sys.stderr)
        raise
    if main:  # completed: the run it replaced (and any left by an interrupted --overwrite) can go
        for old in out_dir.glob(f"{OVERWRITTEN}*"):
            shutil.rmtree(old, ignore_errors=True)
    summary["output_dir"] = str(out_dir)
    summary["num_processes"] = accelerator.num_processes
    return summary
