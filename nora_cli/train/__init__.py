"""`nora train`: check cheaply, build the task's Job, then run the one shared loop.

Everything bad input can break is checked before the weights load: the output dir (kind, emptiness,
writability), then the adapter against the architecture read from config.json on the meta device
(target modules exist, 0 < r ≤ min(in, out), safetensors weights). Disk space is checked once the
job is built (exact trainable size), before the first step. `--overwrite` only deletes the previous
run after the new job was built, so a bad recipe never costs the user their old results.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nora_cli.errors import NoraError


def _lm_job(recipe: Any, device: Any, out_dir: Path) -> Any:
    from nora_cli.train.lm import build_lm_job

    return build_lm_job(recipe, device, out_dir)


def _dreambooth_job(recipe: Any, device: Any, out_dir: Path) -> Any:
    from nora_cli.diffusion.dreambooth import build_dreambooth_job

    return build_dreambooth_job(recipe, device, out_dir)


#: recipe.task -> job builder
TASKS: dict[str, Callable[[Any, Any, Path], Any]] = {"causal-lm": _lm_job, "dreambooth": _dreambooth_job}

#: files whose presence marks a directory as a previous run's output
_RUN_MARKERS = ("nora.json", "adapter_config.json", "checkpoints", "metrics.jsonl")


# --- output directory ---------------------------------------------------------------------------------


def _probe_writable(folder: Path, out_dir: Path) -> None:
    """Create and remove a temp dir: permission bits lie to root and about read-only mounts."""
    try:
        tempfile.TemporaryDirectory(dir=folder, prefix=".nora-probe-").cleanup()
    except OSError as err:
        raise NoraError(f"output directory {out_dir} is not writable ({folder}: {err.strerror})") from None


def check_output_dir(out_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Read-only checks, safe on every rank and before anything heavy: fail now, not after the model loads."""
    if resume and overwrite:
        raise NoraError("--resume and --overwrite exclude each other")
    if out_dir.exists() and not out_dir.is_dir():
        raise NoraError(f"output path {out_dir} exists and is not a directory")
    used = out_dir.is_dir() and any(out_dir.iterdir())
    if used and not (resume or overwrite):
        raise NoraError(f"output directory {out_dir} is not empty; pass --resume to continue it or --overwrite")
    if used and overwrite and not any((out_dir / m).exists() for m in _RUN_MARKERS):
        raise NoraError(f"refusing to --overwrite {out_dir}: it does not look like a nora run directory")
    existing = out_dir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise NoraError(f"output directory {out_dir} cannot be created: {existing} is not a directory")
    _probe_writable(existing, out_dir)
    if used and overwrite:  # the old run is moved aside next to it
        _probe_writable(out_dir.parent, out_dir)


def prepare_output_dir(out_dir: Path, *, resume: bool, overwrite: bool) -> Callable[[bool], None]:
    """Create the output dir; an --overwrite'd run is only moved aside. Returns `finish(ok)`: on success it
    deletes the old run (or, on --resume, what a killed run left half-written and its metrics past the last
    checkpoint); on failure it puts everything back as it was (and removes a dir it created)."""
    check_output_dir(out_dir, resume=resume, overwrite=overwrite)
    created = not out_dir.exists()
    aside: Path | None = None
    if overwrite and not created and any(out_dir.iterdir()):
        aside = out_dir.with_name(f".{out_dir.name}.overwritten-{os.getpid()}")
        os.replace(out_dir, aside)
    out_dir.mkdir(parents=True, exist_ok=True)

    def finish(ok: bool) -> None:
        if ok:
            if aside is not None:
                shutil.rmtree(aside, ignore_errors=True)
            if resume:
                from nora_cli.train import checkpoint as ckpt

                ckpt.clean_stale(out_dir)
                ckpt.rewind_metrics(out_dir)
            return
        if created or aside is not None:
            shutil.rmtree(out_dir, ignore_errors=True)
        if aside is not None:
            os.replace(aside, out_dir)

    return finish


# --- adapter vs architecture (before the weights load) -------------------------------------------------


def check_lm_adapter(recipe: Any) -> None:
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
PREFLIGHT: dict[str, Callable[[Any], None]] = {"causal-lm": check_lm_adapter}


# --- disk space ---------------------------------------------------------------------------------------

_MARGIN = 64 * 2**20  # tokenizer, metrics, loss.png, nora.json, filesystem slack


def checkpoint_bytes_needed(model: Any, recipe: Any, total_steps: int) -> int:
    """Peak bytes the run writes: (kept + 1 staging) checkpoints of weights + optimizer state, the final
    adapter (+ best/initial copies), and a margin. AdamW keeps 2 moments per parameter, SGD ≤ 1."""
    tcfg = recipe.train
    weights = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    moments = 2 if recipe.optimizer.name == "adamw" else int(recipe.optimizer.momentum > 0)
    saves = total_steps // tcfg.save_steps if tcfg.save_steps else 0
    kept = min(saves, tcfg.keep_last) if tcfg.keep_last else saves
    finals = 1 + int(tcfg.save_best) + int(bool(getattr(model, "nora_modifies_base", False)))
    return weights * (1 + moments) * (kept + 1) + weights * finals + _MARGIN


def check_disk_space(out_dir: Path, need: int) -> None:
    from nora_cli.train import checkpoint as ckpt

    root = out_dir / ckpt.CKPT_DIR  # on --resume, existing checkpoints get rotated out: their space counts
    have = shutil.disk_usage(out_dir).free
    have += sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) if root.is_dir() else 0
    if have < need:
        raise NoraError(
            f"not enough disk space in {out_dir}: {have / 2**20:.0f} MiB free, checkpoints and the adapter need "
            f"about {need / 2**20:.0f} MiB; free some space, lower train.keep_last or pick another --output-dir"
        )


# --- the run ------------------------------------------------------------------------------------------


def check_precision(recipe: Any) -> None:
    """fp16 needs CUDA: on CPU accelerate drops fp16 autocast and its GradScaler without a word and the run
    trains in fp32. Checked before anything loads."""
    import torch

    if recipe.train.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise NoraError("train.mixed_precision=fp16 needs a CUDA GPU (on CPU it would silently train in "
                        "fp32); use bf16 or no")


def make_accelerator(recipe: Any) -> Any:
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # AcceleratorState is a process-wide singleton that refuses a second mixed_precision; several runs in
    # one process (nora sweep, tests) each bring their own. The distributed PartialState is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    cpu = not torch.cuda.is_available()
    return Accelerator(mixed_precision=recipe.train.mixed_precision, cpu=cpu)


def train_recipe(recipe: Any, out_dir: Path, *, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Run a full training job; returns a small summary (steps, final loss, output dir)."""
    check_output_dir(out_dir, resume=resume, overwrite=overwrite)
    check_precision(recipe)
    if recipe.task in PREFLIGHT:
        PREFLIGHT[recipe.task](recipe)

    from accelerate.utils import set_seed

    from nora_cli import __version__
    from nora_cli.recipe import recipe_to_yaml
    from nora_cli.train import loop

    accelerator = make_accelerator(recipe)
    main = accelerator.is_main_process
    finish = prepare_output_dir(out_dir, resume=resume, overwrite=overwrite) if main else None
    accelerator.wait_for_everyone()
    try:
        set_seed(recipe.seed)
        job = TASKS[recipe.task](recipe, accelerator.device, out_dir)
        sched = loop.plan_schedule(len(job.train_data), recipe.train, accelerator.num_processes)
        if main:
            check_disk_space(out_dir, checkpoint_bytes_needed(job.model, recipe, sched.total_steps))
    except BaseException:
        if finish is not None:
            finish(False)
        raise
    if finish is not None:
        finish(True)
    if main:
        meta = {
            "nora_version": __version__,
            "task": recipe.task,
            "method": recipe.method,
            "dtype": recipe.model.dtype,
            "quantization": recipe.model.quantization,
            "init": {"name": recipe.adapter.init, "sigma": recipe.adapter.sigma, "side": recipe.adapter.side,
                     "seed": recipe.seed},
            "precondition": {"kind": recipe.optimizer.precondition, "normalize": recipe.optimizer.normalize,
                             "damping": recipe.optimizer.damping},
            "lora": {"r": recipe.adapter.r, "alpha": recipe.adapter.alpha,
                     "target_modules": recipe.adapter.target_modules, "use_rslora": recipe.adapter.use_rslora},
            "num_processes": accelerator.num_processes,
            **job.meta,
            "versions": loop.library_versions(),
        }
        loop.write_run_info(out_dir, recipe_to_yaml(recipe), meta)
    summary = loop.run(job, recipe, accelerator, out_dir, resume=resume)
    summary["output_dir"] = str(out_dir)
    summary["num_processes"] = accelerator.num_processes
    return summary
