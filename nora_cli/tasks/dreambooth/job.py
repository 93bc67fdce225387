"""DreamBooth LoRA on Stable Diffusion 1.x as a `Job` for the shared training loop.

The job's model is `DreamBoothModel`: the LoRA-wrapped UNet (diffusers `add_adapter`, so
diffusers' own LoRA export applies), the frozen VAE and the text encoder (LoRA too with
`train_text_encoder`). Its `forward(batch)` is the whole DreamBooth loss, because under DDP
the loop's gradients only sync when the wrapped module's forward runs. nora's init and the
NoRA+ preconditioner walk `named_modules()`, so they reach the UNet's LoRA layers through it.

Loss (diffusers train_dreambooth_lora.py semantics): encode images to latents (or sample a
cached latent distribution), add DDPM noise at a uniform timestep, MSE of the UNet output
against the noise (epsilon) or the velocity (v_prediction); class images add
prior_loss_weight × their loss; min-SNR-γ reweights per image (Hang et al. 2023).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from nora_cli.config.schema import UNET_TARGET_MODULES, DreamBoothConfig, Recipe
from nora_cli.errors import NoraError
from nora_cli.loop.job import Job, LossOutput
from nora_cli.lora import base_preserving_inits, initialize, lora_config, modifies_base

if TYPE_CHECKING:
    from nora_cli.tasks.dreambooth.pipeline import SDParts

TEXT_ENCODER_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "out_proj"]
#: inits that leave W0 untouched, so the adapter is a plain diffusers LoRA on the unmodified base
SUPPORTED_INITS = base_preserving_inits()


# --- the model: forward(batch) is the loss ----------------------------------------------------------------


def _epsilon_target(scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return noise


def _velocity_target(scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return scheduler.get_velocity(latents, noise, t)


#: noise_scheduler.config.prediction_type -> (regression target, min-SNR denominator offset)
PREDICTION_TYPES = {"epsilon": (_epsilon_target, 0.0), "v_prediction": (_velocity_target, 1.0)}


class DreamBoothModel(nn.Module):
    """UNet (+LoRA), frozen VAE, text encoder (+LoRA if trained). `forward(batch) -> (loss_sum, images)`."""

    def __init__(self, parts: SDParts, cfg: DreamBoothConfig):
        super().__init__()
        self.unet, self.vae, self.text_encoder = parts.unet, parts.vae, parts.text_encoder
        self.noise_scheduler = parts.noise_scheduler
        self.prior_loss_weight, self.snr_gamma = cfg.prior_loss_weight, cfg.snr_gamma
        self.train_text_encoder = cfg.train_text_encoder
        prediction = self.noise_scheduler.config.prediction_type
        if prediction not in PREDICTION_TYPES:
            raise NoraError(f"unsupported prediction_type {prediction!r}; expected {', '.join(PREDICTION_TYPES)}")
        self.target_fn, self.snr_offset = PREDICTION_TYPES[prediction]

    def train(self, mode: bool = True) -> DreamBoothModel:
        """Frozen parts stay in eval mode whatever the loop asks."""
        super().train(mode)
        self.vae.eval()
        if not self.train_text_encoder:
            self.text_encoder.eval()
        return self

    def latents(self, batch: dict[str, Any]) -> torch.Tensor:
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        if "latent_params" in batch:
            dist = DiagonalGaussianDistribution(batch["latent_params"].to(self.vae.device))
        else:
            with torch.no_grad():
                dist = self.vae.encode(batch["pixel_values"].to(self.vae.device, self.vae.dtype)).latent_dist
        return dist.sample() * self.vae.config.scaling_factor

    def encode_prompt(self, input_ids: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(self.train_text_encoder and torch.is_grad_enabled()):
            return self.text_encoder(input_ids.to(self.text_encoder.device))[0]

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        latents = self.latents(batch).float()
        noise = torch.randn_like(latents)
        steps = self.noise_scheduler.config.num_train_timesteps
        t = torch.randint(0, steps, (latents.shape[0],), device=latents.device).long()
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        hidden = self.encode_prompt(batch["input_ids"])
        pred = self.unet(noisy.to(self.unet.dtype), t, hidden.to(self.unet.dtype)).sample
        target = self.target_fn(self.noise_scheduler, latents, noise, t)
        per_image = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if self.snr_gamma is not None:
            per_image = per_image * self.min_snr_weights(t)
        is_prior = batch["is_prior"].to(per_image.device)
        weights = torch.where(is_prior, torch.full_like(per_image, self.prior_loss_weight), torch.ones_like(per_image))
        return (per_image * weights).sum(), (~is_prior).sum()

    def min_snr_weights(self, t: torch.Tensor) -> torch.Tensor:
        """min(SNR, γ) / SNR for epsilon, / (SNR + 1) for v-prediction (diffusers' compute_snr)."""
        from diffusers.training_utils import compute_snr

        snr = compute_snr(self.noise_scheduler, t)
        return torch.clamp(snr, max=self.snr_gamma) / (snr + self.snr_offset)


def dreambooth_loss(model: nn.Module, batch: dict[str, Any]) -> LossOutput:
    """Calls the (possibly DDP-wrapped) model so gradient sync hooks run."""
    loss_sum, count = model(batch)
    return LossOutput(loss_sum, count)


# --- setup helpers ------------------------------------------------------------------------------------------


def add_lora(module: Any, config: Any, what: str) -> None:
    """Inject LoRA layers in place, with PEFT's errors turned into one line.

    The UNet goes through diffusers' `add_adapter` (which also keeps diffusers' adapter bookkeeping); the
    text encoder through PEFT's `inject_adapter_in_model`, i.e. transformers' `add_adapter` minus its
    version gate, which demands a newer PEFT than nora needs.
    """
    from diffusers import ModelMixin
    from peft import inject_adapter_in_model

    try:
        if isinstance(module, ModelMixin):
            module.add_adapter(config)
        else:
            inject_adapter_in_model(config, module)
    except ValueError as err:
        hint = f" (for SD UNets use adapter.target_modules: {UNET_TARGET_MODULES})" if what == "UNet" else ""
        raise NoraError(f"cannot add LoRA to the {what}: {str(err).splitlines()[0]}{hint}") from None


def build_model(parts: SDParts, recipe: Recipe) -> DreamBoothModel:
    """Attach LoRA (UNet, optionally text encoder), apply the recipe's init, keep LoRA weights in fp32."""
    from diffusers.training_utils import cast_training_params

    acfg, cfg = recipe.adapter, _section(recipe)
    if acfg.init is not None and modifies_base(acfg.init):
        raise NoraError(f"init {acfg.init!r} rewrites the base weights, which a diffusers LoRA cannot express; "
                        f"use one of {', '.join(SUPPORTED_INITS)} for dreambooth")
    if acfg.target_modules == "all-linear":
        raise NoraError(f"'all-linear' is for transformers models; list UNet modules, e.g. {UNET_TARGET_MODULES}")
    add_lora(parts.unet, lora_config(acfg), "UNet")
    if cfg.train_text_encoder:
        add_lora(parts.text_encoder, lora_config(acfg, TEXT_ENCODER_TARGET_MODULES), "text encoder")
    if recipe.model.gradient_checkpointing:
        parts.unet.enable_gradient_checkpointing()
    model = DreamBoothModel(parts, cfg)
    # fp16 base weights with fp32 LoRA factors: the GradScaler refuses fp16 grads (diffusers does the same)
    cast_training_params([parts.unet, parts.text_encoder], dtype=torch.float32)
    initialize(model, acfg.init, sigma=acfg.sigma, side=acfg.side, seed=recipe.seed)
    return model


def tokenize(tokenizer: Any, prompt: str) -> torch.Tensor:
    return tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids[0]


def make_collate(instance_ids: torch.Tensor, class_ids: torch.Tensor | None, key: str, device: Any) -> Any:
    """Instance rows first, then class rows (as in diffusers), on the training device."""

    def collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
        rows = [e["instance"] for e in examples]
        ids = [instance_ids] * len(examples)
        if class_ids is not None:
            rows += [e["prior"] for e in examples]
            ids += [class_ids] * len(examples)
        is_prior = torch.tensor([False] * len(examples) + [True] * (len(rows) - len(examples)))
        return {key: torch.stack(rows).to(device), "input_ids": torch.stack(ids).to(device),
                "is_prior": is_prior.to(device), "num_units": len(examples)}

    return collate


def cache_latents(examples: Any, vae: Any) -> list[dict[str, torch.Tensor]]:
    """Each example's images as VAE latent-distribution parameters (mean ‖ logvar), on CPU in fp32."""

    def encode(image: torch.Tensor) -> torch.Tensor:
        return vae.encode(image[None].to(vae.device, vae.dtype)).latent_dist.parameters[0].float().cpu()

    with torch.no_grad():
        return [{key: encode(image) for key, image in examples[i].items()} for i in range(len(examples))]


def generate_class_images(parts: SDParts, cfg: DreamBoothConfig) -> int:
    """Fill class_data_dir up to num_class_images with the (still LoRA-free) base model."""
    from nora_cli.data.images import ensure_class_images
    from nora_cli.tasks.dreambooth.pipeline import pipeline_from_parts

    pipe = pipeline_from_parts(parts)

    def generate(first: int, n: int) -> list[Any]:
        generator = torch.Generator(device="cpu").manual_seed(first)
        return pipe([cfg.class_prompt] * n, num_inference_steps=cfg.validation_inference_steps, generator=generator,
                    height=cfg.resolution, width=cfg.resolution).images

    return ensure_class_images(cfg.class_data_dir, cfg.num_class_images, generate)


def validation_due(step: int, every: int | None, last: int) -> bool:
    """Sample at every `every`-th optimizer step and always at the last one (the result users look at)."""
    return step == last or (every is not None and step % every == 0)


def validation_hook(parts: SDParts, cfg: DreamBoothConfig, every: int | None) -> Any:
    """`on_validate(model, step, total_steps, out_dir)`: one grid (row per prompt) in
    out_dir/validation/step_NNNN.png.

    The hook keeps its own schedule (`every` = dreambooth.validation_steps, else train.eval_steps, and the
    last step), so the loop may call it after any step; a call at a step that is not due does nothing."""

    def on_validate(model: nn.Module, step: int, total_steps: int, out_dir: Path) -> Path | None:
        if not validation_due(step, every, total_steps):
            return None
        path = Path(out_dir) / "validation" / f"step_{step:04d}.png"
        sample_validation_grid(model, parts, cfg).save(_mkparent(path))
        return path

    return on_validate


def _mkparent(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def sample_validation_grid(model: nn.Module, parts: SDParts, cfg: DreamBoothConfig) -> Any:
    from diffusers.utils import make_image_grid

    from nora_cli.tasks.dreambooth.pipeline import pipeline_from_parts

    inner = getattr(model, "module", model)  # DDP
    pipe = pipeline_from_parts(parts, unet=inner.unet, text_encoder=inner.text_encoder)
    was_training = inner.training
    inner.eval()
    images = []
    try:
        for prompt in cfg.validation_prompts:
            generator = torch.Generator(device="cpu").manual_seed(cfg.validation_seed)
            images += pipe(prompt, num_images_per_prompt=cfg.num_validation_images, generator=generator,
                           num_inference_steps=cfg.validation_inference_steps, height=cfg.resolution,
                           width=cfg.resolution).images
    finally:
        inner.train(was_training)
    return make_image_grid(images, rows=len(cfg.validation_prompts), cols=cfg.num_validation_images)


# --- the job ------------------------------------------------------------------------------------------------


def _section(recipe: Recipe) -> DreamBoothConfig:
    if recipe.dreambooth is None:
        raise NoraError("task 'dreambooth' needs a `dreambooth:` section")
    return recipe.dreambooth


def build_dreambooth_job(recipe: Recipe, device: torch.device, out_dir: Path | None = None) -> Job:
    """Load the SD pipeline parts, attach + initialize LoRA, read the images, and describe the run."""
    from nora_cli.data.images import DreamBoothExamples, ImageFolder
    from nora_cli.tasks.dreambooth.export import save_adapter
    from nora_cli.tasks.dreambooth.pipeline import load_sd_parts

    cfg = _section(recipe)
    instance = ImageFolder(cfg.instance_data_dir, cfg.resolution, cfg.center_crop, cfg.random_flip)
    parts = load_sd_parts(recipe.model.source, recipe.model.dtype, device,
                          allow_pickle=recipe.model.allow_pickle)
    prior = None
    if cfg.with_prior_preservation:
        generate_class_images(parts, cfg)
        prior = ImageFolder(cfg.class_data_dir, cfg.resolution, cfg.center_crop, cfg.random_flip,
                            limit=cfg.num_class_images)
    examples: Any = DreamBoothExamples(instance, prior)
    if cfg.cache_latents:
        examples = cache_latents(examples, parts.vae)
    model = build_model(parts, recipe)
    class_ids = tokenize(parts.tokenizer, cfg.class_prompt) if prior is not None else None
    collate = make_collate(tokenize(parts.tokenizer, cfg.instance_prompt), class_ids,
                           "latent_params" if cfg.cache_latents else "pixel_values", device)
    base = parts.source.name_or_path

    def save_final(model: nn.Module, target: Path) -> None:
        inner = getattr(model, "module", model)
        save_adapter(inner.unet, inner.text_encoder if cfg.train_text_encoder else None, target, base)

    return Job(
        model=model,
        train_data=examples,
        collate=collate,
        loss=dreambooth_loss,
        save_final=save_final,
        on_validate=(validation_hook(parts, cfg, cfg.validation_steps or recipe.train.eval_steps)
                     if cfg.validation_prompts else None),
        meta={
            "base_model": recipe.model.source,
            "base_model_resolved": base,
            "modifies_base": False,
            "dreambooth": {
                "instance_prompt": cfg.instance_prompt,
                "class_prompt": cfg.class_prompt if cfg.with_prior_preservation else None,
                "resolution": cfg.resolution,
                "train_text_encoder": cfg.train_text_encoder,
                "prediction_type": parts.noise_scheduler.config.prediction_type,
            },
            "files": {"diffusers_lora": "pytorch_lora_weights.safetensors", "unet_adapter": "unet",
                      "text_encoder_adapter": "text_encoder" if cfg.train_text_encoder else None},
        },
        unit="images",
    )
