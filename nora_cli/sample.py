"""`nora sample`: images from a Stable Diffusion base (+ DreamBooth LoRA), or text from a causal LM (+ LoRA).

What to sample is read from the inputs, never asked: an adapter's nora.json `task` decides (its
`Task.sample_kind`); without one, a diffusers LoRA file means images and a PEFT adapter_config.json means
text; with no adapter, a `--model` that is a diffusers pipeline (model_index.json) means images, anything
else a causal LM. The sampling itself is the task's (`Task.sample`, in nora_cli/tasks/*/sample.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nora_cli.errors import NoraError
from nora_cli.tasks import TASKS, SampleKind

Kind = SampleKind


def run(kind: Kind, request: Any) -> Any:
    """Sample with the task that produces `kind`, given that task's request (ImageRequest, TextRequest)."""
    return next(task for task in TASKS.values() if task.sample_kind == kind).sample(request)


def detect_kind(model: str | None, adapter: Path | None) -> Kind:
    """images or text, from the adapter (`run_dir.recorded_task`) or else from the base model."""
    from nora_cli.run_dir import DIFFUSERS_LORA_FILE, RunInfo, recorded_task
    from nora_cli.tasks.dreambooth.pipeline import is_pipeline_dir

    if adapter is not None:
        if not adapter.is_dir():
            raise NoraError(f"adapter directory not found: {adapter}")
        task = recorded_task(adapter)
        if task is None:
            raise NoraError(f"{adapter} is not an adapter directory (no nora.json, adapter_config.json or "
                            f"{DIFFUSERS_LORA_FILE})")
        if task not in TASKS:
            if RunInfo.read(adapter).task is not None:
                raise NoraError(f"{adapter}/nora.json has unknown task {task!r}")
            return "text"  # a PEFT adapter of another task_type: its base model decides (as before)
        return TASKS[task].sample_kind
    if model is None:
        raise NoraError("give --model, --adapter, or both")
    return "images" if is_pipeline_dir(model) else "text"


def base_model(model: str | None, adapter: Path | None) -> str:
    """--model if given, else the base recorded with the adapter (nora.json, else adapter_config.json)."""
    from nora_cli.tasks.dreambooth.export import adapter_base

    if model is not None:
        return model
    if adapter is None:
        raise NoraError("give --model, --adapter, or both")
    return adapter_base(adapter)
