"""Load the parts of a Stable Diffusion 1.x pipeline.

Training needs the parts separately (the UNet gets LoRA, the VAE and text encoder stay
frozen, the noise scheduler is the DDPM training one), so `load_sd_parts` reads each
subfolder rather than a whole `StableDiffusionPipeline` (which would also load the
safety checker). `build_tiny_sd_pipeline` writes a random-weight SD pipeline of a few
hundred kB with the REAL CLIP BPE tokenizer, so tests exercise the same tokenization,
save/load and LoRA export paths as SD 1.4 without any hub download.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nora_cli.errors import NoraError
from nora_cli.models import ModelSource, hub_source, hub_unreachable, torch_dtype

if TYPE_CHECKING:
    import torch

@dataclass
class SDParts:
    """The five components of an SD 1.x pipeline plus where they came from."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any  # DDPMScheduler with the pipeline's betas / prediction_type
    source: ModelSource


def resolve_pipeline_source(source: str) -> ModelSource:
    """A local diffusers directory (must hold model_index.json) or a hub id, as `from_pretrained` reads it."""
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise NoraError(f"{path} is not a diffusers pipeline directory (no model_index.json)")
        return ModelSource(str(path.resolve()), source)
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise NoraError(f"pipeline path not found: {source}")
    return hub_source(source, "model_index.json")


def is_pipeline_dir(source: str) -> bool:
    """True when `source` names a diffusers pipeline: a local dir or a cached hub repo with model_index.json."""
    path = Path(source).expanduser()
    if path.exists():
        return (path / "model_index.json").is_file()
    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        return False
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    if hub_unreachable() is not None:  # no retries against a hub that is down: the cache decides
        return isinstance(try_to_load_from_cache(source, "model_index.json"), str)
    try:
        hf_hub_download(source, "model_index.json")
    except Exception:  # offline, missing repo, or no such file: not something we can load as a pipeline
        return False
    return True


def dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """diffusers renamed `torch_dtype` to `dtype` in 0.42: the old name warns there, older versions ignore the new."""
    import diffusers
    from packaging.version import Version

    return {"dtype" if Version(diffusers.__version__) >= Version("0.42.0.dev0") else "torch_dtype": dtype}


def load_error(src: ModelSource, err: Exception, allow_pickle: bool) -> NoraError:
    """One line; a pipeline that only ships pickled weights gets told how to opt in."""
    first = str(err).strip().splitlines()[0].rstrip(".") if str(err).strip() else type(err).__name__
    hint = ""
    if not allow_pickle and "safetensors" in first:
        hint = ("; if it ships only pickled (.bin) weights, which can run code when loaded, convert them to "
                "safetensors or pass --allow-pickle (recipe: model.allow_pickle: true) to load them with "
                "torch.load(weights_only=True)")
    return NoraError(f"cannot load Stable Diffusion pipeline {src.display!r}: {first}{hint}")


def load_sd_parts(source: str, dtype: str = "fp32", device: str | torch.device = "cpu",
                  allow_pickle: bool = False) -> SDParts:
    """Load UNet, VAE, text encoder, tokenizer and the DDPM training scheduler of an SD 1.x pipeline.

    Weights come from safetensors only unless `allow_pickle` (unpickling .bin files can run code)."""
    src = resolve_pipeline_source(source)  # before the heavy imports: an unreachable hub fails in seconds
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    weights = torch_dtype(dtype)
    safe = {"use_safetensors": None if allow_pickle else True}
    try:
        tokenizer = CLIPTokenizer.from_pretrained(src.name_or_path, subfolder="tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(src.name_or_path, subfolder="text_encoder", dtype=weights,
                                                     **safe)
        vae = AutoencoderKL.from_pretrained(src.name_or_path, subfolder="vae", **dtype_kwarg(weights), **safe)
        unet = UNet2DConditionModel.from_pretrained(src.name_or_path, subfolder="unet", **dtype_kwarg(weights),
                                                    **safe)
        noise_scheduler = DDPMScheduler.from_pretrained(src.name_or_path, subfolder="scheduler")
    except (OSError, ValueError) as err:
        raise load_error(src, err, allow_pickle) from err
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
        module.to(device)
    vae.eval()
    text_encoder.eval()
    return SDParts(unet, vae, text_encoder, tokenizer, noise_scheduler, src)


def load_pipeline(source: str, dtype: str = "fp32", device: str | torch.device = "cpu",
                  allow_pickle: bool = False) -> Any:
    """The full `StableDiffusionPipeline` (with whatever safety checker the base ships) for sampling."""
    from diffusers import StableDiffusionPipeline

    src = resolve_pipeline_source(source)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(src.name_or_path, **dtype_kwarg(torch_dtype(dtype)),
                                                       use_safetensors=None if allow_pickle else True)
    except (OSError, ValueError) as err:
        raise load_error(src, err, allow_pickle) from err
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def pipeline_from_parts(parts: SDParts, unet: Any = None, text_encoder: Any = None) -> Any:
    """An inference pipeline sharing the (possibly LoRA-wrapped) training modules: no copy, no reload."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=parts.vae,
        text_encoder=text_encoder if text_encoder is not None else parts.text_encoder,
        tokenizer=parts.tokenizer,
        unet=unet if unet is not None else parts.unet,
        # DPM-Solver++ gives usable previews in 25 steps (the diffusers DreamBooth script's choice)
        scheduler=DPMSolverMultistepScheduler.from_config(parts.noise_scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --- the tiny offline pipeline ---------------------------------------------------------------------------
