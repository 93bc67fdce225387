"""`nora train`: build the task's Job, then run the one shared loop."""

from __future__ import annotations

import shutil
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


def prepare_output_dir(out_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Never clobber a previous run unless asked: resume continues it, overwrite replaces it."""
    if out_dir.exists() and not out_dir.is_dir():
        raise NoraError(f"output path {out_dir} exists and is not a directory")
    used = out_dir.is_dir() and any(out_dir.iterdir())
    if used and not (resume or overwrite):
        raise NoraError(f"output directory {out_dir} is not empty; pass --resume to continue it or --overwrite")
    if used and overwrite and not resume:
        if not any((out_dir / m).exists() for m in _RUN_MARKERS):
            raise NoraError(f"refusing to --overwrite {out_dir}: it does not look like a nora run directory")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)


def make_accelerator(recipe: Any) -> Any:
    import torch
    from accelerate import Accelerator

    cpu = not torch.cuda.is_available()
    return Accelerator(mixed_precision=recipe.train.mixed_precision, cpu=cpu)


def train_recipe(recipe: Any, out_dir: Path, *, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Run a full training job; returns a small summary (steps, final loss, output dir)."""
    from accelerate.utils import set_seed

    from nora_cli import __version__
    from nora_cli.recipe import recipe_to_yaml
    from nora_cli.train import loop

    accelerator = make_accelerator(recipe)
    if accelerator.is_main_process:
        prepare_output_dir(out_dir, resume=resume, overwrite=overwrite)
    accelerator.wait_for_everyone()
    set_seed(recipe.seed)
    job = TASKS[recipe.task](recipe, accelerator.device, out_dir)
    if accelerator.is_main_process:
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
