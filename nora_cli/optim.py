"""NoRA+ / LoRA-P: ScaledGD preconditioning of LoRA gradients, plus the optimizer factory.

With W = W0 + s·B·A (B = lora_B, out×r; A = lora_A, r×in), ScaledGD (paper eqs. 6a–6b, Alg. 2)
rescales each factor's gradient by the inverse Gram matrix of its partner:

    g_A ← P_B·g_A / ‖P_B‖_F,  P_B = (BᵀB + λI_r)⁻¹        g_B ← g_B·P_A / ‖P_A‖_F,  P_A = (A·Aᵀ + λI_r)⁻¹

The Frobenius normalization (App. A.3) is what lets one λ = 1e-6 work everywhere; `normalize=False` is
LoRA-P (Zhang & Pilanci 2024). With Nyström init (B0 = W0·Ω, A0 = 0), `normalize=False`, λ = 0 and SGD at
lr = 1/s² (the paper's η = 1 for a sum-reduced ½‖·‖² loss) this is the modified ScaledGD of Thm 3, which
solves whitened linear LoRA in one step.

How this differs from PEFT's `peft.optimizers.create_riemannian_optimizer` (same r×r preconditioner):
  * Normalization: we divide by ‖P‖_F (NoRA+, Alg. 2); PEFT never normalizes (that is our `normalize=False`).
  * Damping: default λ = 1e-6 (the paper's, usable thanks to the normalization) vs PEFT's `reg=1e-2`.
  * Zero partner: when a partner factor is exactly zero (step 0 after `lora`/`nystrom` init), we leave the
    gradient alone, as Alg. 2 does for t = 0; PEFT's pinv(0 + reg·I) multiplies it by 1/reg instead.
  * When: PEFT preconditions inside `optimizer.step()`, i.e. after gradient clipping. We run `.apply()`
    once per optimizer step, after accumulation/unscaling and before clipping, so clipping bounds the
    update actually taken, and k accumulated micro-batches give the same update as one big batch.
  * Any base optimizer: we rewrite `.grad` in place and leave the optimizer object untouched (plain
    AdamW/SGD/8-bit…, its state_dict unchanged); PEFT subclasses the optimizer class.
  * Pairing walks the modules (peft `LoraLayer`: `lora_A[adapter]`/`lora_B[adapter]`, also Conv and
    Embedding LoRA) per adapter, instead of renaming parameters; one batched `eigh` per rank replaces one
    `pinv` per factor, so the 210 layers of all-linear SmolLM2 cost one decomposition call.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from nora_cli.errors import NoraError

SHARDED_ERROR = "NoRA+ preconditioning is not supported with FSDP/ZeRO-3 sharding; use DDP or method nora"
PRECONDITIONERS = ("scaled-gd", "none")


def _is_sharded(param: torch.Tensor) -> bool:
    """FSDP2 factors are DTensors (each rank holds a slice); ZeRO-3 leaves empty tensors tagged `ds_id`."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return hasattr(param, "ds_id")
    return isinstance(param, DTensor) or hasattr(param, "ds_id")


def _factors(layer: nn.Module, adapter: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The (A, B) weights of `adapter` in one peft LoraLayer, read fresh (wrappers may swap parameters)."""
    if adapter in layer.lora_A and adapter in layer.lora_B:
        return layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    emb_a, emb_b = getattr(layer, "lora_embedding_A", {}), getattr(layer, "lora_embedding_B", {})
    if adapter in emb_a and adapter in emb_b:  # Embedding LoRA: A is r×num_embeddings, B is dim×r
        return emb_a[adapter], emb_b[adapter]
    return None


def _as_matrices(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Conv LoRA is A: r×in×k×k and B: out×r×1×1; the math only needs A as r×(in·k·k), B as out×r."""
    return a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)


def lora_pairs(model: nn.Module, adapter_name: str = "default") -> list[tuple[str, nn.Module]]:
    """(name, LoraLayer) for every module holding both factors of `adapter_name`.

    Pairing is by module, never by parameter order or name: A and B of the same layer and adapter always meet.
    """
    from peft.tuners.lora import LoraLayer

    pairs = []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or (ab := _factors(module, adapter_name)) is None:
            continue
        if _is_sharded(ab[0]) or _is_sharded(ab[1]):
            raise NoraError(SHARDED_ERROR)
        a, b = _as_matrices(*ab)
        if b.shape[1] != a.shape[0]:
            raise NoraError(
                f"LoRA layer {name!r} has factors {tuple(ab[0].shape)} and {tuple(ab[1].shape)} that do not "
                "multiply (grouped conv?); NoRA+ needs plain low-rank factors: use method nora"
            )
        if ab[0].requires_grad or ab[1].requires_grad:
            pairs.append((name, module))
    return pairs


class Preconditioner:
    """Rewrites LoRA gradients in place with the (normalized) ScaledGD preconditioner.

    Call `.apply()` exactly once per optimizer step: after the last micro-batch's backward (and after
    `GradScaler.unscale_`), before gradient clipping and `optimizer.step()`. Each call uses the current,
    pre-update weights. Calling it per micro-batch would precondition the accumulated gradient k times.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        damping: float = 1e-6,
        normalize: bool = True,
        adapter_name: str = "default",
    ) -> None:
        if damping < 0:
            raise NoraError(f"damping must be >= 0, got {damping}")
        self.model, self.damping, self.normalize = model, float(damping), bool(normalize)
        self.adapter_name = adapter_name
        self.step = 0  # number of apply() calls, i.e. optimizer steps taken with preconditioning
        self.pairs = lora_pairs(model, adapter_name)
        if not self.pairs:
            raise NoraError(
                f"no trainable LoRA layers with adapter {adapter_name!r} found; NoRA+ preconditioning needs a "
                "peft LoRA model"
            )

    def _jobs(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, bool]]:
        """(grad, partner matrix, is_A) for every factor that has a gradient this step."""
        for _, layer in self.pairs:
            a_param, b_param = _factors(layer, self.adapter_name)
            if _is_sharded(a_param) or _is_sharded(b_param):
                raise NoraError(SHARDED_ERROR)
            a, b = _as_matrices(a_param.detach(), b_param.detach())
            if a_param.grad is not None:
                yield a_param.grad, b, True
            if b_param.grad is not None:
                yield b_param.grad, a, False

    @torch.no_grad()
    def apply(self) -> None:
        """Precondition every LoRA gradient once; factors whose partner is exactly zero are left as they are."""
        groups: dict[tuple, list[tuple[torch.Tensor, torch.Tensor, bool]]] = defaultdict(list)
        for grad, partner, is_a in self._jobs():
            dtype = torch.promote_types(partner.dtype, torch.float32)  # fp32 at least, fp64 stays fp64
            rank = partner.shape[1] if is_a else partner.shape[0]
            groups[(rank, partner.device, dtype)].append((grad, partner, is_a))
        for (rank, device, dtype), jobs in groups.items():
            self._apply_group(jobs, rank, device, dtype)
        self.step += 1

    def _apply_group(
        self,
        jobs: list[tuple[torch.Tensor, torch.Tensor, bool]],
        rank: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        """One batched eigh for all layers of one rank: P = V·diag(1/(μ+λ))·Vᵀ, ‖P‖_F = ‖1/(μ+λ)‖₂."""
        mats = [(p.to(dtype), is_a) for _, p, is_a in jobs]
        grams = torch.stack([m.mT @ m if is_a else m @ m.mT for m, is_a in mats])  # BᵀB or A·Aᵀ
        eye = torch.eye(rank, device=device, dtype=dtype)
        # trace(Gram) = ‖partner‖²_F: zero means the partner is zero, e.g. B0 = 0 or A0 = 0 at step 0.
        zero = grams.diagonal(dim1=-2, dim2=-1).sum(-1).eq(0)[:, None, None]
        evals, evecs = torch.linalg.eigh(torch.where(zero, eye, grams))
        inv = 1.0 / (evals.clamp_min(0) + self.damping)  # a Gram matrix is PSD; clamp rounding noise
        if self.normalize:
            inv = inv / torch.linalg.vector_norm(inv, dim=-1, keepdim=True)
        precond = torch.where(zero, eye, (evecs * inv[:, None, :]) @ evecs.mT)  # identity: leave as is
        for (grad, _, is_a), p in zip(jobs, precond, strict=True):
            g = grad.reshape(grad.shape[0], -1).to(dtype)
            grad.copy_((p @ g if is_a else g @ p).reshape(grad.shape))  # copy_ writes back in grad's dtype

    def state_dict(self) -> dict[str, Any]:
        """Config and step counter; the preconditioner itself is recomputed from the weights every step."""
        return {
            "step": self.step,
            "damping": self.damping,
            "normalize": self.normalize,
            "adapter_name": self.adapter_name,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        adapter = state.get("adapter_name", self.adapter_name)
        if adapter != self.adapter_name:
            self.pairs, self.adapter_name = lora_pairs(self.model, adapter), adapter
        self.damping, self.normalize = float(state["damping"]), bool(state["normalize"])
        self.step = int(state["step"])


def _adamw(params: list, lr: float, weight_decay: float, betas: tuple[float, float], momentum: float):
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)


def _sgd(params: list, lr: float, weight_decay: float, betas: tuple[float, float], momentum: float):
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {"adamw": _adamw, "sgd": _sgd}


def build_optimizer(
    model: nn.Module,
    *,
    name: str = "adamw",
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    momentum: float = 0.0,
    precondition: str = "scaled-gd",
    damping: float = 1e-6,
    normalize: bool = True,
) -> tuple[torch.optim.Optimizer, Preconditioner | None]:
    """The base optimizer over trainable parameters, and the preconditioner the loop must `.apply()` (or None).

    `precondition="scaled-gd"` with `normalize=True` is NoRA+ (with Nyström init) and with `normalize=False`
    LoRA-P; `"none"` is plain LoRA/NoRA.
    """
    if name not in OPTIMIZERS:
        raise NoraError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    if precondition not in PRECONDITIONERS:
        raise NoraError(f"unknown precondition {precondition!r}; choose one of {', '.join(PRECONDITIONERS)}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise NoraError("the model has no trainable parameters; was the LoRA adapter attached?")
    optimizer = OPTIMIZERS[name](params, lr, weight_decay, tuple(betas), momentum)
    if precondition == "none":
        return optimizer, None
    return optimizer, Preconditioner(model, damping=damping, normalize=normalize)
