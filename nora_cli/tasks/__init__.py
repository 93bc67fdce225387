"""Tasks: what differs between causal-LM finetuning and DreamBooth, each behind one `Task` record.

`TASKS` is the only place that maps a task name (a recipe's `task:`, nora.json's "task") to code: the
workflows (train, merge, sample, sweep) look everything task-specific up here and never name a task.
Importing this module stays cheap (`nora --help`): every entry point is `_Lazy`, importing its module
(and with it torch, transformers or diffusers) on the first call.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from nora_cli.export.job import Exporter

#: what `nora sample` produces for a task (it decides which sampling flags apply)
SampleKind = Literal["images", "text"]


@dataclass(frozen=True)
class _Lazy:
    """`module.name`, imported on the first call (tests/test_tasks.py checks that every target resolves)."""

    module: str
    name: str

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(self.module), self.name)(*args, **kwargs)


@dataclass(frozen=True)
class Task:
    """Everything code dispatches on for one task."""

    name: str
    #: (recipe, device, out_dir) -> loop.job.Job: the model, its data and its loss
    build_job: Callable[..., Any]
    #: cheap adapter-vs-architecture check from the config alone, before any weights load; None: none
    preflight: Callable[[Any], None] | None
    #: the data exists and parses (recipe -> a line saying what was checked); nothing loads
    check_data: Callable[[Any], str]
    #: `nora merge --format F` -> exporter (and its optional verification)
    exporters: Mapping[str, Exporter]
    #: the --format `nora merge` uses when none is given
    default_format: str
    #: what `nora sample` writes, and the function that does it (takes that kind's request)
    sample_kind: SampleKind
    sample: Callable[[Any], Any]
    #: `nora sweep` can train and score it (few-shot evaluation needs a causal LM)
    sweep: bool = False


_LM = "nora_cli.tasks.causal_lm"
_DB = "nora_cli.tasks.dreambooth"
_LM_VERIFY = _Lazy(f"{_LM}.verify", "verify_export")

TASKS: dict[str, Task] = {
    "causal-lm": Task(
        name="causal-lm",
        build_job=_Lazy(f"{_LM}.job", "build_lm_job"),
        preflight=_Lazy(f"{_LM}.preflight", "check_lm_adapter"),
        check_data=_Lazy(f"{_LM}.preflight", "check_data"),
        exporters={
            "merged": Exporter(_Lazy(f"{_LM}.export", "export_merged"), _LM_VERIFY),
            "peft": Exporter(_Lazy(f"{_LM}.export", "export_peft"), _LM_VERIFY),
        },
        default_format="merged",
        sample_kind="text",
        sample=_Lazy(f"{_LM}.sample", "sample_text"),
        sweep=True,
    ),
    "dreambooth": Task(
        name="dreambooth",
        build_job=_Lazy(f"{_DB}.job", "build_dreambooth_job"),
        preflight=None,
        check_data=_Lazy(f"{_DB}.preflight", "check_data"),
        exporters={
            "diffusers": Exporter(_Lazy(f"{_DB}.export", "diffusers_exporter")),
            "merged": Exporter(_Lazy(f"{_DB}.export", "merged_pipeline_exporter")),
        },
        default_format="diffusers",
        sample_kind="images",
        sample=_Lazy(f"{_DB}.sample", "sample_images"),
    ),
}
