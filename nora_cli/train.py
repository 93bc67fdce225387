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
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nora_cli import run_dir as rundir
from nora_cli.errors import NoraError
from nora_cli.models import check_model_exists
from nora_cli.run_dir import OVERWRITTEN, check_output_dir, prepare_output_dir
from nora_cli.tasks import TASKS

if TYPE_CHECKING:
    from nora_cli.config.schema import Recipe

# --- cheap checks (nothing written, nothing loaded) ------------------------------------------------------


def preflight(recipe: Recipe, out_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Everything cheap, before anything is written or loaded: output dir, model source, adapter vs
    architecture (config only), data, and on --resume the recipe and the checkpoint to continue from."""
    check_output_dir(out_dir, resume=resume, overwrite=overwrite)
    check_precision(recipe)
    check_model_exists(recipe.model.source, recipe.model.gguf_file)
    task = TASKS[recipe.task]
    if task.preflight is not None:
        task.preflight(recipe)
    task.check_data(recipe)
    if resume and out_dir.is_dir() and any(out_dir.iterdir()):
        from nora_cli.loop import checkpoint as ckpt
        from nora_cli.run_dir import check_resume_recipe

        check_resume_recipe(out_dir, recipe)
        ckpt.newest_usable(out_dir)  # none usable: exit 2 naming the file, before the model loads


def check_precision(recipe: Recipe) -> None:
    """fp16 needs CUDA: on CPU accelerate drops fp16 autocast and its GradScaler without a word and the run
    trains in fp32. Checked before anything loads."""
    import torch

    if recipe.train.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise NoraError("train.mixed_precision=fp16 needs a CUDA GPU (on CPU it would silently train in "
                        "fp32); use bf16 or no")


# --- the run ------------------------------------------------------------------------------------------


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
    from nora_cli.threads import cpu_threads as thread_policy

    # CPU threads for this run (and, on CPU, a governor that gives cores back to other busy work)
    with thread_policy(recipe.train.threads) as (cpu_threads, governor):
        accelerator = make_accelerator(recipe)
        main = accelerator.is_main_process
        finish = prepare_output_dir(out_dir, resume=resume, overwrite=overwrite) if main else None
        accelerator.wait_for_everyone()
        try:
            set_seed(recipe.seed)
            job = TASKS[recipe.task].build_job(recipe, accelerator.device, out_dir)
            n_examples = None if job.train_stream is not None else len(job.train_data)
            sched = loop.plan_schedule(n_examples, recipe.train, accelerator.num_processes)
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
            if resume:  # set damaged checkpoints aside, drop what a killed run half-wrote and its metrics past the last
                from nora_cli.loop import checkpoint as ckpt

                ckpt.set_aside_damaged(out_dir)
                ckpt.clean_stale(out_dir)
                ckpt.rewind_metrics(out_dir)
        if main:
            # recipe.yaml + nora.json go in before training, so even a crashed run is self-describing
            loop.write_recipe(out_dir, recipe_to_yaml(recipe))
            rundir.RunInfo.for_run(recipe, num_processes=accelerator.num_processes, task_meta=job.meta,
                                   threads=cpu_threads).write(out_dir)
        accelerator.wait_for_everyone()  # damaged checkpoints are set aside before any rank looks for the latest
        try:
            summary = loop.run(job, recipe, sched, accelerator, out_dir, resume=resume,
                               between_steps=governor.poll if governor else None)
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


def make_accelerator(recipe: Recipe) -> Any:
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # AcceleratorState is a process-wide singleton that refuses a second mixed_precision; several runs in
    # one process (nora sweep, tests) each bring their own. The distributed PartialState is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    cpu = not torch.cuda.is_available()
    return Accelerator(mixed_precision=recipe.train.mixed_precision, cpu=cpu)


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
