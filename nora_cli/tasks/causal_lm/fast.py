"""The causal-LM training forward and the CPU fast paths it switches on (each measured; exact up to float
summation order, or distribution-preserving (dropout), except `eager`, which changes bf16 rounding;
benchmarks/results/throughput.md has the speed numbers). nora.json records which ones a run took.

`TrainForward(model)(model, batch)` is the Job's loss: summed next-token cross-entropy over label tokens.
Around the model call it turns on, only for that call:

  gather       the LM head sees only positions whose next token is a label (a forward pre-hook on the
               output embedding); padding never reaches the vocab-wide matmul and softmax. Same sum.
  low_precision  under autocast on CPU, frozen fp32 Linear weights are swapped for cached copies in the
               autocast dtype, so autocast stops re-casting ~all base weights every forward. Bitwise the
               same matmul inputs autocast would have made (round-to-nearest of the same fp32 weights).
  onednn       fp32 without autocast on CPU: frozen Linear layers run through oneDNN instead of MKL sgemm
               (MKL takes a slow path on AMD CPUs: 2.3× slower here). Same fp32 math, other summation order.
  eager        bf16 autocast on CPU with sequences ≤ 512 tokens: eager attention instead of PyTorch's CPU
               flash kernel, whose bf16 backward is slow at these lengths; memory grows with T², hence the cap.
               Not exact: eager rounds the scores QKᵀ to bf16 before the softmax, where the flash kernel keeps
               them in fp32. Measured on SmolLM2-135M (ARC-Easy batch of 2 × 96 tokens, r = 32, all but
               o/gate_proj): vs SDPA, loss 1.6e-3 and LoRA gradient 8.8e-2 relative (‖Δg‖/‖g‖), the size of
               bf16 autocast's own error (SDPA bf16 vs fp32: 1.5e-3 and 8.6e-2). Tiny test model: 1.5e-5
               and 5.6e-3.
               Off under gradient checkpointing, whose recompute runs outside this context (with SDPA).
  split        on CPU, a right-padded micro-batch of mixed lengths runs as a few length-sorted sub-batches
               (cut where the padded tokens saved outweigh a per-call cost), their losses summed into one
               graph. Rows are independent in a causal LM, so this is the same sum over the same tokens;
               on the throughput benchmark's ARC-Easy batches padding falls from 30% to ~9%.
               Off with `data.packing`: packed rows are (nearly) all `cutoff_len` long, nothing to split.

and, at model build time, `use_sparse_dropout` swaps PEFT's LoRA dropout for `SparseDropout`: iid
Bernoulli(p) masks as before, drawn from ~n·p geometric gaps instead of n serial draws (torch's CPU
bernoulli_ is single-threaded and was 15% of a bf16 step); another random stream, so the same seed gives
other masks of the same distribution.

NORA_DISABLE_FAST_PATHS=gather,low_precision,onednn,eager,split,dropout (or "all") turns any of them off.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nora_cli.cpu_kernels import onednn_available, onednn_linear
from nora_cli.data.packing import flatten_rows
from nora_cli.loop.job import LossOutput

FAST_PATHS = ("gather", "low_precision", "onednn", "eager", "split", "dropout")
EAGER_MAX_LEN = 512  # eager attention stores B·heads·T² scores per layer; above this, keep SDPA
SPLIT_CALL_TOKENS = 64  # one more forward/backward call costs about this many padded tokens on CPU
SPARSE_DROPOUT_MAX_P = 0.25  # above this, n·p geometric draws stop being cheaper than n Bernoulli draws


def enabled_fast_paths() -> frozenset[str]:
    """FAST_PATHS minus those listed in $NORA_DISABLE_FAST_PATHS (comma-separated, or "all")."""
    off = {name.strip() for name in os.environ.get("NORA_DISABLE_FAST_PATHS", "").split(",") if name.strip()}
    return frozenset() if "all" in off else frozenset(FAST_PATHS) - off


# ---------------------------------------------------------------------------------------------------
# dropout


def drop_positions(n: int, p: float, device: torch.device | None = None) -> torch.Tensor:
    """Flat indices of an iid Bernoulli(p) mask over n elements, from geometric gaps between drops.

    Gap ~ Geometric(p) = floor(log U / log(1-p)) + 1 with U uniform on (0, 1]: ~n·p draws instead of n.
    Draws in float64 so U's resolution does not bias the tail of the gap distribution.
    """
    log_keep = math.log1p(-p)
    mean = n * p
    chunk = int(mean + 6 * math.sqrt(mean) + 16)  # almost always enough in one go; loop otherwise
    parts, last = [], -1
    while last < n - 1:
        u = 1.0 - torch.rand(chunk, dtype=torch.float64, device=device)
        gaps = torch.floor(torch.log(u) / log_keep).long() + 1
        pos = torch.cumsum(gaps, 0) + last
        parts.append(pos)
        last = int(pos[-1])
    pos = torch.cat(parts)
    return pos[pos < n]


class _SparseDropoutFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, p: float) -> torch.Tensor:
        idx = drop_positions(x.numel(), p, x.device)
        out = torch.mul(x, 1.0 / (1.0 - p)).contiguous()
        out.view(-1).index_fill_(0, idx, 0)
        ctx.save_for_backward(idx)
        ctx.p = p
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (idx,) = ctx.saved_tensors
        grad = torch.mul(grad, 1.0 / (1.0 - ctx.p)).contiguous()
        grad.view(-1).index_fill_(0, idx, 0)
        return grad, None


class SparseDropout(nn.Dropout):
    """nn.Dropout with the mask drawn sparsely on CPU (same distribution, other random stream)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and 0 < self.p <= SPARSE_DROPOUT_MAX_P and x.device.type == "cpu" and not self.inplace:
            return _SparseDropoutFn.apply(x, self.p)
        return super().forward(x)


def use_sparse_dropout(model: nn.Module) -> int:
    """Swap every plain nn.Dropout in PEFT's `lora_dropout` dicts for SparseDropout; returns how many."""
    swapped = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, nn.ModuleDict):
            continue
        for key, drop in dropouts.items():
            if type(drop) is nn.Dropout:
                dropouts[key] = SparseDropout(drop.p)
                swapped += 1
    return swapped


# ---------------------------------------------------------------------------------------------------
# frozen Linear layers through oneDNN (fp32, CPU)


class _OneDNNLinear(torch.autograd.Function):
    """y = x·Wᵀ + b for a frozen W: backward returns dx = dy·W only (no weight or bias gradient)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return onednn_linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        (weight,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return onednn_linear(grad.contiguous(), weight.t(), None), None, None


# ---------------------------------------------------------------------------------------------------
# the training forward


class TrainForward:
    """The causal-LM Job loss with the fast paths above; `model` is the PEFT model it will be called with."""

    def __init__(self, model: nn.Module, *, gradient_checkpointing: bool = False,
                 paths: frozenset[str] | None = None, packed: bool = False) -> None:
        self.paths = enabled_fast_paths() if paths is None else paths
        if packed:  # rows of cutoff_len tokens: no mixed lengths to split
            self.paths = self.paths - {"split"}
        if gradient_checkpointing:  # recompute runs outside our context: nothing there may differ from it
            self.paths = self.paths - {"low_precision", "onednn", "eager"}
        root = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.config = getattr(root, "config", None)
        self.frozen = [m for m in model.modules() if type(m) is nn.Linear and _frozen_fp32(m)]
        self._low: dict[torch.dtype, list[tuple[nn.Parameter, nn.Parameter | None]]] = {}
        self._keep: torch.Tensor | None = None
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self._gathering = "gather" in self.paths and isinstance(head, nn.Module)
        if self._gathering:
            head.register_forward_pre_hook(self._gather_hook)
        self._sparse_dropout = any(type(m) is SparseDropout and 0 < m.p <= SPARSE_DROPOUT_MAX_P
                                   for m in model.modules())

    def active(self, device: torch.device, mixed_precision: str) -> list[str]:
        """The fast paths a run on `device` under `mixed_precision` takes (nora.json records them), so a
        result can be traced to the kernels behind it. eager: only for batches ≤ EAGER_MAX_LEN tokens."""
        cpu = device.type == "cpu"
        autocast = mixed_precision in ("bf16", "fp16")
        applies = {
            "gather": self._gathering,
            "low_precision": cpu and autocast and bool(self.frozen),
            "onednn": cpu and not autocast and bool(self.frozen) and onednn_available(),
            "eager": cpu and mixed_precision == "bf16" and self.config is not None,
            "split": cpu,
            "dropout": cpu and self._sparse_dropout,
        }
        return [name for name in FAST_PATHS if name in self.paths and applies[name]]

    def __call__(self, model: nn.Module, batch: dict[str, Any]) -> LossOutput:
        if "position_ids" in batch:  # packed rows (data/packing.py)
            if self.config is not None and "flash" in str(getattr(self.config, "_attn_implementation", "")):
                batch = flatten_rows(batch)  # flash's variable-length path reads position_ids of one row only
            return self._loss(model, batch)
        rows = batch["input_ids"].device.type == "cpu" and "split" in self.paths and length_groups(batch)
        if not rows:
            return self._loss(model, batch)
        outs = [self._loss(model, _sub_batch(batch, idx)) for idx in rows]
        return LossOutput(torch.stack([o.loss_sum for o in outs]).sum(), torch.stack([o.count for o in outs]).sum())

    def _loss(self, model: nn.Module, batch: dict[str, Any]) -> LossOutput:
        ids = batch["input_ids"]
        labels = batch["labels"][:, 1:]
        keep = labels != -100
        if "position_ids" in batch:  # no 2-D mask, no cache: transformers builds the per-example mask from these
            inputs = {"position_ids": batch["position_ids"], "attention_mask": None, "use_cache": False}
        else:
            inputs = {"attention_mask": batch["attention_mask"]}
        with self._fast(ids, keep):
            logits = model(input_ids=ids, **inputs).logits
        if logits.dim() == 2:  # the head saw only the kept positions
            loss = F.cross_entropy(logits.float(), labels[keep], reduction="sum")
        else:
            logits = logits[:, :-1]
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1),
                                   ignore_index=-100, reduction="sum")
        return LossOutput(loss, keep.sum())

    @contextmanager
    def _fast(self, ids: torch.Tensor, keep: torch.Tensor) -> Iterator[None]:
        cpu = ids.device.type == "cpu"
        autocast = torch.is_autocast_enabled(ids.device.type)
        with ExitStack() as stack:
            if "gather" in self.paths:
                self._keep = keep
                stack.callback(setattr, self, "_keep", None)
            if cpu and autocast and "low_precision" in self.paths and self.frozen:
                stack.enter_context(self._low_precision(torch.get_autocast_dtype("cpu")))
            if cpu and not autocast and "onednn" in self.paths and self.frozen and onednn_available():
                stack.enter_context(self._onednn())
            if (cpu and autocast and torch.get_autocast_dtype("cpu") == torch.bfloat16 and "eager" in self.paths
                    and ids.shape[1] <= EAGER_MAX_LEN and self.config is not None):
                stack.enter_context(self._attention("eager"))
            yield

    def _gather_hook(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        """(B, T, H) hidden states -> (n, H) rows whose next token is a label; anything else passes."""
        keep = self._keep
        if keep is None or not args or not isinstance(args[0], torch.Tensor):
            return None
        hidden = args[0]
        if hidden.dim() != 3 or hidden.shape[0] != keep.shape[0] or hidden.shape[1] != keep.shape[1] + 1:
            return None
        return (hidden[:, :-1][keep], *args[1:])

    @contextmanager
    def _low_precision(self, dtype: torch.dtype) -> Iterator[None]:
        if dtype not in self._low:  # frozen: one copy for the whole run
            self._low[dtype] = [(_like(m.weight, dtype), None if m.bias is None else _like(m.bias, dtype))
                                for m in self.frozen]
        originals = [(m.weight, m.bias) for m in self.frozen]
        try:
            for m, (w, b) in zip(self.frozen, self._low[dtype], strict=True):
                m._parameters["weight"] = w
                if b is not None:
                    m._parameters["bias"] = b
            yield
        finally:
            for m, (w, b) in zip(self.frozen, originals, strict=True):
                m._parameters["weight"] = w
                if b is not None:
                    m._parameters["bias"] = b

    @contextmanager
    def _onednn(self) -> Iterator[None]:
        patched = [m for m in self.frozen if "forward" not in m.__dict__]  # leave hooked modules alone
        try:
            for m in patched:
                m.forward = _onednn_forward(m)
            yield
        finally:
            for m in patched:
                del m.forward

    @contextmanager
    def _attention(self, name: str) -> Iterator[None]:
        previous = self.config._attn_implementation
        try:
            self.config._attn_implementation = name
            yield
        finally:
            self.config._attn_implementation = previous


def length_groups(batch: dict[str, Any], call_tokens: int | None = None) -> list[torch.Tensor] | None:
    """Row indices of length-sorted sub-batches minimising padded tokens + call_tokens per sub-batch
    (an exact DP over the sorted lengths), or None when one batch is best or the batch is not right-padded."""
    mask = batch["attention_mask"]
    if mask.dim() != 2:
        return None
    lengths = mask.sum(1)
    if not torch.equal(mask.bool(), torch.arange(mask.shape[1], device=mask.device) < lengths[:, None]):
        return None
    call = SPLIT_CALL_TOKENS if call_tokens is None else call_tokens
    order = torch.argsort(lengths, stable=True)
    sorted_len = lengths[order].tolist()
    n = len(sorted_len)
    best, cut = [0.0] + [math.inf] * n, [0] * (n + 1)
    for j in range(1, n + 1):  # best[j]: cheapest split of the j shortest rows; a group ends at its longest
        for i in range(j):
            cost = best[i] + sorted_len[j - 1] * (j - i) + call
            if cost < best[j]:
                best[j], cut[j] = cost, i
    bounds, j = [], n
    while j > 0:
        bounds.append((cut[j], j))
        j = cut[j]
    if len(bounds) == 1:
        return None
    return [order[i:j] for i, j in reversed(bounds)]


def _sub_batch(batch: dict[str, Any], rows: torch.Tensor) -> dict[str, Any]:
    """Those rows, trimmed to their longest real length."""
    width = int(batch["attention_mask"][rows].sum(1).max())
    return {key: batch[key][rows, :width] for key in ("input_ids", "attention_mask", "labels")}


def _frozen_fp32(module: nn.Linear) -> bool:
    params = [module.weight] + ([module.bias] if module.bias is not None else [])
    return all(p.dtype == torch.float32 and not p.requires_grad and not p.is_meta for p in params)


def _like(param: nn.Parameter, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(param.detach().to(dtype), requires_grad=False)


def _onednn_forward(module: nn.Linear) -> Any:
    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
            return F.linear(x, module.weight, module.bias)
        return _OneDNNLinear.apply(x, module.weight, module.bias)

    return forward
