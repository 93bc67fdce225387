"""fp32 matmuls through oneDNN on CPU. MKL's sgemm takes a slow path on AMD CPUs (~100 vs ~230 GFLOP/s
per core on the EPYC this was measured on); oneDNN does the same fp32 math at full speed, in another
summation order. Used by the training forward (frozen Linear layers) and the Nyström sketch."""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x·weightᵀ + bias (torch's private mkldnn op; x any leading dims, weight out × in)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@lru_cache(maxsize=1)
def onednn_available() -> bool:
    """The private op exists in x86/ARM CPU builds; check it once against F.linear before trusting it."""
    try:
        gen = torch.Generator().manual_seed(0)
        x, w, b, g = (torch.randn(s, generator=gen) for s in ((3, 5, 16), (8, 16), (8,), (3, 5, 8)))
        return torch.allclose(onednn_linear(x, w, b), F.linear(x, w, b), atol=1e-5) and torch.allclose(
            onednn_linear(g, w.t(), None), g @ w, atol=1e-5)
    except (AttributeError, RuntimeError):
        return False


def matmul_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a·b for 2-D fp32 tensors: oneDNN on CPU when it is there, torch.matmul otherwise."""
    if a.device.type == "cpu" and a.dtype == b.dtype == torch.float32 and onednn_available():
        return onednn_linear(a, b.t(), None)
    return a @ b
