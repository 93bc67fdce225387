"""Causal-LM exporters: `merged` (a plain transformers model) and `peft` (a clean vanilla adapter)."""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

from nora_cli.errors import NoraError
from nora_cli.export.adapter import (
    Adapter,
    Base,
    collect_updates,
    open_adapter,
    read_adapter,
    refuse_mutated_init,
    resolve_base,
)
from nora_cli.export.job import ExportJob, MergeReport
from nora_cli.export.streaming import read_headers, stream_merge, tied_embedding_keys

#: files copied from the base dir next to the merged weights (config, generation config, tokenizer, code)
SUPPORT_PATTERNS = ("*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken", "*.py")
NOT_COPIED = {"adapter_config.json", "nora.json"}  # and every *.index.json (weight indexes)
TOKENIZER_FILES = {"special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt",
                   "spiece.model", "chat_template.jinja", "chat_template.json"}
DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
PROVENANCE_FILE = "nora_merge.json"


def _is_tokenizer_file(name: str) -> bool:
    return name.startswith("tokenizer") or name in TOKENIZER_FILES


def _base_config(base: Base) -> dict[str, Any]:
    file = base.local_dir / "config.json" if base.local_dir else None
    return json.loads(file.read_text()) if file and file.is_file() else {}


def write_support_files(base: Base, adapter_dir: Path, out: Path, config_patch: dict[str, Any]) -> None:
    """Config, generation config, tokenizer and custom code next to the weights.

    The tokenizer comes from the adapter dir when training saved one there (it may carry an added pad
    token or chat template), else from the base.
    """
    own_tokenizer = (adapter_dir / "tokenizer_config.json").is_file()
    if base.local_dir is not None:
        for src in sorted(p for pattern in SUPPORT_PATTERNS for p in base.local_dir.glob(pattern)):
            skip = src.name in NOT_COPIED or src.name.endswith(".index.json")
            skip = skip or (own_tokenizer and _is_tokenizer_file(src.name))
            if src.is_file() and not skip and not (out / src.name).exists():
                shutil.copyfile(src, out / src.name)  # follows hub-cache symlinks
    if own_tokenizer:
        for src in adapter_dir.iterdir():
            if src.is_file() and _is_tokenizer_file(src.name):
                shutil.copyfile(src, out / src.name)
    elif base.local_dir is None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(base.name_or_path).save_pretrained(out)
    config_file = out / "config.json"
    if config_patch and config_file.is_file():
        config = json.loads(config_file.read_text())
        for key, value in config_patch.items():
            config[key] = value
            nested = config.get("text_config")
            if isinstance(nested, dict) and key in nested:
                nested[key] = value
        if "dtype" in config_patch and "torch_dtype" in config:  # transformers < 5 spelling
            config["torch_dtype"] = config_patch["dtype"]
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _quantization_note(adapter: Adapter, base: Base) -> list[str]:
    quant = adapter.nora.quantization
    if not quant:
        return []
    return [f"trained on a {quant}-quantized base (QLoRA): merged into the full-precision weights of "
            f"{base.display}; the merged model is not quantized"]


def export_merged(job: ExportJob, staging: Path) -> MergeReport:
    """W = W0 + s·B·A into a copy of the base: streamed from safetensors, else via PEFT merge_and_unload."""
    from nora_cli.models import torch_dtype

    adapter = read_adapter(job.adapter_dir, job.allow_pickle)
    refuse_mutated_init(adapter)
    base = resolve_base(job.adapter_dir, job.base)
    job.refuse_inside(base.local_dir, "base model")
    if _base_config(base).get("quantization_config"):
        raise NoraError(f"base {base.display} is a quantized checkpoint; merging needs the full-precision "
                        "weights: pass --base with the unquantized model")
    notes = _quantization_note(adapter, base)
    headers = read_headers(base.local_dir) if base.local_dir else None
    updates, reason = collect_updates(adapter)
    if headers is None or reason is not None:
        why = reason and f"the adapter can't be merged tensor by tensor ({reason})"
        notes.append(f"{why or f'base {base.display} is not a safetensors checkpoint'}: merged by loading the "
                     "whole model and PEFT merge_and_unload (needs memory for the full model)")
        return _load_merge(job, staging, adapter, base, notes)

    result = stream_merge(
        headers, updates, staging, tied=tied_embedding_keys(base.local_dir),
        dtype=torch_dtype(job.dtype) if job.dtype else None, max_shard_size=job.max_shard_size,
        base_name=base.display,
    )
    patch: dict[str, Any] = {}
    if result.untied:
        patch["tie_word_embeddings"] = False
        notes.append("the adapter changes only one side of the tied input/output embeddings: "
                     "wrote them untied (tie_word_embeddings=false)")
    if job.dtype:
        patch["dtype"] = str(torch_dtype(job.dtype)).removeprefix("torch.")
    write_support_files(base, adapter.path, staging, patch)
    report = MergeReport(
        out_dir=job.out_dir, fmt=job.fmt, method="streaming safetensors merge", adapter_dir=adapter.path,
        base=base.display, dtype=job.dtype or _stored_dtype(headers), files=result.files, total_bytes=result.total_bytes,
        lora_weights=result.merged_tensors, notes=notes,
    )
    _write_provenance(staging, report, adapter, base)
    return report


def _stored_dtype(headers: dict) -> str:
    """The base's stored dtype: the floating dtype holding most of the checkpoint's elements."""
    codes = {"F32": "fp32", "BF16": "bf16", "F16": "fp16"}
    counts: Counter = Counter()
    for info in headers.values():
        if info.dtype in codes:
            counts[codes[info.dtype]] += math.prod(info.shape)
    return counts.most_common(1)[0][0] if counts else "fp32"


def _load_merge(job: ExportJob, staging: Path, adapter: Adapter, base: Base, notes: list[str]) -> MergeReport:
    """The fallback: the whole model in fp32, PEFT's merge, cast, save_pretrained."""
    import torch
    from transformers import AutoConfig

    from nora_cli.models import ModelSource, torch_dtype

    try:
        stored = getattr(AutoConfig.from_pretrained(base.name_or_path), "dtype", None) or torch.float32
    except OSError as err:
        raise NoraError(f"cannot load base model {base.display!r}: {str(err).splitlines()[0]}") from None
    stored = getattr(torch, stored) if isinstance(stored, str) else stored
    peft_model = open_adapter(adapter, ModelSource(base.name_or_path, base.display), allow_pickle=job.allow_pickle,
                              check_fit=False).model
    changed = sum(1 for name, _ in peft_model.named_parameters() if "lora_B" in name or "lora_embedding_B" in name)
    merged = peft_model.merge_and_unload()
    out_dtype = torch_dtype(job.dtype) if job.dtype else stored
    merged.to(out_dtype)
    merged.save_pretrained(staging, max_shard_size=job.max_shard_size)
    write_support_files(base, adapter.path, staging, {})
    files = sorted(p.name for p in staging.glob("*.safetensors"))
    report = MergeReport(
        out_dir=job.out_dir, fmt=job.fmt, method="load + PEFT merge_and_unload", adapter_dir=adapter.path,
        base=base.display, dtype=DTYPE_NAMES.get(str(out_dtype).removeprefix("torch."), str(out_dtype)),
        files=files, total_bytes=sum((staging / f).stat().st_size for f in files), lora_weights=changed, notes=notes,
    )
    _write_provenance(staging, report, adapter, base)
    return report


def _write_provenance(staging: Path, report: MergeReport, adapter: Adapter, base: Base) -> None:
    """Which adapter + base made this model, and the training metadata (prompt template, ...) for evaluate."""
    info = {"adapter": str(adapter.path.resolve()), "base_model": base.display, "base_model_resolved":
            base.name_or_path, "format": report.fmt, "dtype": report.dtype, "method": report.method,
            "nora": adapter.nora.to_dict()}
    (staging / PROVENANCE_FILE).write_text(json.dumps(info, indent=2) + "\n")


def export_peft(job: ExportJob, staging: Path) -> MergeReport:
    """A vanilla PEFT adapter: known config fields only, init_lora_weights=true, optional dtype cast."""
    import dataclasses

    from peft import PeftConfig
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from safetensors.torch import save_file

    from nora_cli.models import resolve_source, torch_dtype

    adapter = read_adapter(job.adapter_dir, job.allow_pickle)
    refuse_mutated_init(adapter)
    peft_type = adapter.config.get("peft_type", "LORA")
    if peft_type not in PEFT_TYPE_TO_CONFIG_MAPPING:
        raise NoraError(f"{adapter.path}: unknown peft_type {peft_type!r} in adapter_config.json")
    known = {f.name for f in dataclasses.fields(PEFT_TYPE_TO_CONFIG_MAPPING[peft_type])}
    clean = {k: v for k, v in adapter.config.items() if k in known}
    dropped = sorted(set(adapter.config) - known)
    clean.update(init_lora_weights=True, inference_mode=True)
    if job.base is not None:
        clean["base_model_name_or_path"] = resolve_source(job.base).name_or_path
    PeftConfig.from_peft_type(**clean).save_pretrained(staging)

    state = adapter.state_dict()
    if job.dtype:
        dtype = torch_dtype(job.dtype)
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    save_file({k: v.contiguous() for k, v in state.items()}, staging / "adapter_model.safetensors",
              metadata={"format": "pt"})
    notes = [f"dropped adapter_config.json keys PEFT does not know: {', '.join(dropped)}"] if dropped else []
    floating = [v.dtype for v in state.values() if v.is_floating_point()]
    dtype_name = str(Counter(floating).most_common(1)[0][0]).removeprefix("torch.") if floating else "float32"
    return MergeReport(
        out_dir=job.out_dir, fmt=job.fmt, method="peft-export", adapter_dir=adapter.path,
        base=clean.get("base_model_name_or_path"), dtype=DTYPE_NAMES.get(dtype_name, dtype_name),
        files=["adapter_model.safetensors"], total_bytes=(staging / "adapter_model.safetensors").stat().st_size,
        lora_weights=len({k.rsplit(".lora_", 1)[0] for k in state if ".lora_" in k}), notes=notes,
    )
