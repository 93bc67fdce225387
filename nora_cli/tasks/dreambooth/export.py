"""DreamBooth adapter files: PEFT adapters per component, a diffusers LoRA file, a fused pipeline.

Layout written by `save_adapter` (and read by everything else here):

    out/unet/adapter_config.json + adapter_model.safetensors          PEFT, keeps r and alpha as trained
    out/text_encoder/...                                               same, only with train_text_encoder
    out/pytorch_lora_weights.safetensors                               diffusers `pipe.load_lora_weights(out)`

The diffusers file FOLDS the LoRA scale into lora_B (B' = s·B, s = alpha/r or alpha/sqrt(r)) and stores
no alpha. Loaders that find no alpha use alpha = r, i.e. scale 1 (diffusers' `get_peft_kwargs`, kohya
converters, older diffusers without `lora_adapter_metadata`), so every loader applies the trained
update at full strength, whatever alpha, rsLoRA or per-module alpha the run used.
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nora_cli.errors import NoraError
from nora_cli.run_dir import DIFFUSERS_LORA_FILE, MARKER, RunInfo, recorded_base

if TYPE_CHECKING:
    import torch

PEFT_PREFIX = "base_model.model."
#: subfolder -> keyword of StableDiffusionPipeline.save_lora_weights
COMPONENTS = {"unet": "unet_lora_layers", "text_encoder": "text_encoder_lora_layers"}


def save_peft_adapter(module: Any, directory: Path, base: str, adapter_name: str = "default") -> Path:
    """adapter_config.json + adapter_model.safetensors exactly as `PeftModel.save_pretrained` writes them,
    for a model that got its LoRA through diffusers'/transformers' `add_adapter`."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    config = copy.deepcopy(module.peft_config[adapter_name])
    config.base_model_name_or_path = base
    config.init_lora_weights = True  # the init is in the weights; loading must not re-run it
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(directory))
    state = get_peft_model_state_dict(module, adapter_name=adapter_name)
    tensors = {PEFT_PREFIX + key: value.detach().to("cpu").contiguous() for key, value in state.items()}
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    return directory


def save_adapter(unet: Any, text_encoder: Any | None, out_dir: Path, base: str) -> None:
    """The DreamBooth output: PEFT adapter(s) in component subfolders + the folded diffusers file."""
    out_dir = Path(out_dir)
    save_peft_adapter(unet, out_dir / "unet", base)
    if text_encoder is not None:
        save_peft_adapter(text_encoder, out_dir / "text_encoder", base)
    export_diffusers_lora(out_dir, out_dir)


def _component_dirs(adapter_dir: Path) -> dict[str, Path]:
    """{component: PEFT adapter folder}; a bare PEFT adapter folder counts as the UNet's."""
    found = {name: adapter_dir / name for name in COMPONENTS if (adapter_dir / name / "adapter_config.json").is_file()}
    if not found and (adapter_dir / "adapter_config.json").is_file():
        found["unet"] = adapter_dir
    if not found:
        raise NoraError(f"{adapter_dir} holds no DreamBooth adapter (expected unet/adapter_config.json)")
    return found


def folded_state_dict(peft_dir: Path) -> dict[str, torch.Tensor]:
    """A PEFT LoRA adapter's weights with keys relative to the model and B scaled by its module's
    alpha/r, resolved exactly as PEFT does (rank_pattern / alpha_pattern, rsLoRA)."""
    from peft.utils.other import get_pattern_key
    from safetensors.torch import load_file

    config = json.loads((peft_dir / "adapter_config.json").read_text())
    if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora") or config.get("lora_bias"):
        raise NoraError(f"{peft_dir}: only plain LoRA adapters export to diffusers (no DoRA, no LoRA bias)")
    weights = peft_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise NoraError(f"{weights} is missing")
    state = {key.removeprefix(PEFT_PREFIX): value for key, value in load_file(str(weights)).items()}
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    folded = {}
    for key, value in state.items():
        if ".lora_B." in key:
            module = key.split(".lora_B.")[0]
            r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), config["r"])
            alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), config["lora_alpha"])
            value = value * (alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r)
        folded[key] = value.contiguous()
    return folded


def export_diffusers_lora(adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Write `out_dir/pytorch_lora_weights.safetensors` (alpha folded, diffusers key format) from a nora
    DreamBooth adapter; `StableDiffusionPipeline.load_lora_weights(out_dir)` loads it."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    layers = {COMPONENTS[name]: convert_state_dict_to_diffusers(folded_state_dict(path))
              for name, path in _component_dirs(adapter_dir).items()}
    StableDiffusionPipeline.save_lora_weights(out_dir, **layers, weight_name=DIFFUSERS_LORA_FILE)
    if adapter_dir.resolve() != out_dir.resolve() and (adapter_dir / MARKER).is_file():
        RunInfo.read(adapter_dir).write(out_dir)
    return out_dir / DIFFUSERS_LORA_FILE


def load_lora(pipe: Any, adapter_dir: Path, adapter_name: str = "nora") -> None:
    """Load a DreamBooth adapter into a diffusers pipeline as `adapter_name`: its diffusers LoRA file, exported
    into a temporary dir first when only the PEFT adapters are there. A file diffusers refuses is one line."""
    from diffusers.utils import logging as diffusers_logging

    with tempfile.TemporaryDirectory() as tmp:
        lora_dir = adapter_dir
        if not (adapter_dir / DIFFUSERS_LORA_FILE).is_file():
            lora_dir = Path(tmp)
            export_diffusers_lora(adapter_dir, lora_dir)
        verbosity = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()  # "no LoRA keys for CLIPTextModel" is the normal case
        try:
            pipe.load_lora_weights(str(lora_dir), weight_name=DIFFUSERS_LORA_FILE, adapter_name=adapter_name)
        except (ValueError, KeyError, OSError) as err:
            raise NoraError(f"cannot load LoRA from {adapter_dir}: {str(err).splitlines()[0]}") from err
        finally:
            diffusers_logging.set_verbosity(verbosity)


def adapter_base(adapter_dir: str | Path) -> str:
    """The base an adapter was trained on (`run_dir.recorded_base`), or one line saying to name it."""
    base = recorded_base(Path(adapter_dir))
    if base is None:
        _component_dirs(Path(adapter_dir))  # no adapter at all says so first
        raise NoraError(f"cannot tell the base model of {adapter_dir}; pass it explicitly (--model / --base)")
    return base


def export_merged_pipeline(adapter_dir: str | Path, out_dir: str | Path, base: str | None = None,
                           dtype: str = "fp32") -> Path:
    """A full diffusers pipeline directory with the LoRA fused into the UNet (and text encoder)."""
    from nora_cli.tasks.dreambooth.pipeline import load_pipeline

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    pipe = load_pipeline(base or adapter_base(adapter_dir), dtype=dtype)
    load_lora(pipe, adapter_dir)
    pipe.fuse_lora(lora_scale=1.0, adapter_names=["nora"])
    pipe.unload_lora_weights()
    pipe.save_pretrained(str(out_dir))
    return out_dir


# --- `nora merge` exporters: (ExportJob, staging dir) -> MergeReport -------------------------------------


def _report(job: Any, staging: Path, method: str, base: str | None, dtype: str) -> Any:
    from nora_cli.export.job import MergeReport

    weights = sorted(str(p.relative_to(staging)) for p in staging.rglob("*")
                     if p.suffix in (".safetensors", ".bin") and p.is_file())
    adapted = sum(1 for path in _component_dirs(job.adapter_dir).values()
                  for key in folded_state_dict(path) if ".lora_A." in key)
    return MergeReport(
        out_dir=job.out_dir, fmt=job.fmt, method=method, adapter_dir=job.adapter_dir, base=base, dtype=dtype,
        files=weights, total_bytes=sum((staging / f).stat().st_size for f in weights), lora_weights=adapted,
    )


def diffusers_exporter(job: Any, staging: Path) -> Any:
    """`nora merge --format diffusers`: the folded pytorch_lora_weights.safetensors (+ nora.json)."""
    if job.dtype not in (None, "fp32"):
        raise NoraError("--format diffusers keeps the adapter's fp32 weights; drop --dtype")
    export_diffusers_lora(job.adapter_dir, staging)
    return _report(job, staging, "alpha-folded diffusers LoRA", None, "fp32")


def merged_pipeline_exporter(job: Any, staging: Path) -> Any:
    """`nora merge --format merged` for DreamBooth: a full pipeline with the LoRA fused into its weights."""
    base = job.base or adapter_base(job.adapter_dir)
    export_merged_pipeline(job.adapter_dir, staging, base=base, dtype=job.dtype or "fp32")
    return _report(job, staging, "load_lora_weights+fuse_lora", base, job.dtype or "fp32")
