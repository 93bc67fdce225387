"""The contract between the shared training loop and a task (causal LM, DreamBooth).

A task builds a `Job`: the PEFT-wrapped module, its examples, how to batch them, how
to compute the loss, and how to write its final artifacts. The loop in `loop.py`
owns everything else (accelerate, precision, accumulation, preconditioner, clipping,
schedule, logging, checkpoints, resume, signals), so there is exactly one loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn


@dataclass
class LossOutput:
    """Summed loss over the micro-batch and the number of units it sums over.

    The loop divides by the total count over all micro-batches of an optimizer step
    (tokens for LMs, images for diffusion), so accumulation equals one big batch.
    """

    loss_sum: torch.Tensor
    count: torch.Tensor  # scalar int/float tensor on the same device


@dataclass
class Job:
    model: nn.Module  # PEFT model (or a module holding one); only LoRA params require grad
    train_data: Sequence[Any]  # indexable examples; the loop picks indices, `collate` batches them
    collate: Callable[[list[Any]], dict[str, Any]]
    loss: Callable[[nn.Module, dict[str, Any]], LossOutput]
    save_final: Callable[[nn.Module, Path], None]  # write adapter + task artifacts into a directory
    val_data: Sequence[Any] | None = None
    #: optional periodic hook (e.g. diffusion validation images): (model, step, total_steps, out_dir) -> None
    on_validate: Callable[[nn.Module, int, int, Path], Any] | None = None
    #: extra info written into nora.json
    meta: dict[str, Any] = field(default_factory=dict)
    #: tokens (LM) or images (diffusion) per example, for throughput logging; None = count from batch
    unit: str = "tokens"
    #: per-example size (LM: tokens); the loop groups each step's examples by it into micro-batches
    lengths: Sequence[int] | None = None
    #: streaming data (train_data then unused): `train_stream(skip)` yields the examples in training order from
    #: example `skip` on, without end; the loop takes the next batch_size of them per optimizer step
    train_stream: Callable[[int], Iterator[Any]] | None = None
