"""Check an export against base + adapter run through PEFT, on a few fixed prompts.

Both sides run in fp32, so the only difference left is what the export changed: the merge's
rounding and the storage dtype. Tolerances are relative to the largest reference logit
(floored at 1; max |logit| ≈ 37 for SmolLM2 on these prompts):
- fp32 1e-4: merged x·(W0 + s·B·A)ᵀ vs. x·W0ᵀ + s·(x·Aᵀ)·Bᵀ only reorders fp32 sums; SmolLM2-135M
  with random rank-8 factors on all 7 projections differs by 3.4e-6 relative (1.3e-4 at |logit| 37),
  so 1e-4 leaves a ~30x margin.
- fp16 1e-2, bf16 5e-2: every stored weight is rounded once (unit roundoff 2^-11 / 2^-8) and the
  errors compound over the layers; the same model differs by 1.3e-3 (fp16) and 6.7e-3 (bf16)
  relative (benchmarks/results/merge_memory.md), so the bounds keep a ~7x margin.
A wrong merge (a missed layer, a wrong scale) moves logits by the adapter's whole effect, which
the report prints next to the difference so a check that cannot see it says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from nora_cli.export.adapter import open_adapter, resolve_base
from nora_cli.export.job import ExportJob, MergeReport, VerifyReport
from nora_cli.models import inference_device

if TYPE_CHECKING:
    import torch

PROMPTS = (
    "The capital of France is",
    "Below is an instruction that describes a task.\n\n### Instruction:\nAdd 17 and 25.\n\n### Response:\n",
    "def fibonacci(n):\n    ",
)
RTOL = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2}


def _prompt_batch(sources: list[str | Path]) -> dict[str, torch.Tensor]:
    """PROMPTS as one right-padded batch, with the first tokenizer that loads (fixed ids if none does)."""
    import torch
    from transformers import AutoTokenizer

    prompts = [list(range(1, 17)), list(range(17, 41))]
    for source in sources:
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError, TypeError):
            continue
        prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
        break
    width = max(map(len, prompts))
    mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in prompts])
    return {"input_ids": torch.tensor([p + [0] * (width - len(p)) for p in prompts]), "attention_mask": mask}


def _logits(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """fp32 logits of the batch, zero at padding (one forward: the models here are weight-bandwidth bound)."""
    import torch

    device = next(model.parameters()).device
    with torch.inference_mode():
        out = model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()
    return out * batch["attention_mask"][..., None]


def _compare(ref: torch.Tensor, got: torch.Tensor, plain: torch.Tensor, dtype: str) -> VerifyReport:
    scale = max(1.0, float(ref.abs().max()))
    return VerifyReport(float((ref - got).abs().max()), RTOL.get(dtype, RTOL["bf16"]) * scale,
                        float((ref - plain).abs().max()), dtype, len(ref))


def _load(name_or_path: str | Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch.float32, use_safetensors=True).to(inference_device()).eval()


def verify_merge(
    adapter_dir: str | Path,
    export_dir: str | Path,
    *,
    base: str | None = None,
    fmt: str = "merged",
    dtype: str = "fp32",
    allow_pickle: bool = False,
) -> VerifyReport:
    """Max |logit difference| of an export vs. base + adapter (PeftModel); `dtype` picks the tolerance.

    fmt "merged": `export_dir` is a full model; fmt "peft": an adapter applied to the same base.
    One model is in memory at a time for "merged" (reference first, then the merged model).
    """
    from nora_cli.models import ModelSource

    adapter_dir, export_dir = Path(adapter_dir), Path(export_dir)
    base_info = resolve_base(adapter_dir, base)
    batch = _prompt_batch([export_dir, adapter_dir, base_info.name_or_path])
    model = open_adapter(adapter_dir, ModelSource(base_info.name_or_path, base_info.display), check_fit=False,
                         allow_pickle=allow_pickle, adapter_name="source").model.to(inference_device())
    ref = _logits(model, batch)
    with model.disable_adapter():
        plain = _logits(model, batch)
    if fmt == "peft":
        model.load_adapter(export_dir, adapter_name="export")
        model.set_adapter("export")
        got = _logits(model, batch)
    else:
        del model
        got = _logits(_load(export_dir), batch)
    return _compare(ref, got, plain, dtype)


def verify_export(job: ExportJob, staging: Path, report: MergeReport) -> VerifyReport:
    """Registry hook for the causal-LM formats: check the staged files before they are moved to --out."""
    return verify_merge(job.adapter_dir, staging, base=job.base, fmt=job.fmt, dtype=report.dtype,
                        allow_pickle=job.allow_pickle)
