"""`nora sample` for DreamBooth: images from a Stable Diffusion base (+ the trained LoRA).

Images are reproducible per image: image i is drawn from a CPU generator seeded with `seed + i`, so the
same command gives pixel-identical files on the same machine, and each record in samples.json names the
seed that reproduces it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

#: --scheduler name -> diffusers scheduler class (built from the pipeline's own scheduler config)
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "pndm": "PNDMScheduler",
}


@dataclass
class ImageRequest:
    model: str
    adapter: Path | None
    prompts: list[str]
    out_dir: Path
    num_images: int = 4  # per prompt
    seed: int = 0  # image i uses seed + i
    steps: int = 30  # denoising steps
    guidance: float = 7.5  # classifier-free guidance scale
    negative_prompt: str | None = None
    scheduler: str | None = None  # key of SCHEDULERS; None keeps the pipeline's own
    lora_scale: float = 1.0  # multiplier on the adapter's update
    height: int | None = None  # pixels; None: the UNet's native size
    width: int | None = None
    allow_pickle: bool = False  # also load pickled .bin base weights (torch.load(weights_only=True))


@dataclass
class ImageRecord:
    file: str
    prompt: str
    seed: int
    steps: int
    guidance: float
    negative_prompt: str | None
    scheduler: str
    lora_scale: float | None
    model: str
    adapter: str | None
    height: int
    width: int


def sample_images(req: ImageRequest) -> list[ImageRecord]:
    """Write one PNG per image, grid.png (a row per prompt) and samples.json into req.out_dir."""
    import diffusers
    import torch
    from diffusers.utils import make_image_grid

    from nora_cli.models import inference_device
    from nora_cli.tasks.dreambooth.export import load_lora
    from nora_cli.tasks.dreambooth.pipeline import load_pipeline

    device = inference_device()
    pipe = load_pipeline(req.model, dtype="fp16" if device == "cuda" else "fp32", device=device,
                         allow_pickle=req.allow_pickle)
    if req.scheduler is not None:
        pipe.scheduler = getattr(diffusers, SCHEDULERS[req.scheduler]).from_config(pipe.scheduler.config)
    if req.adapter is not None:
        load_lora(pipe, req.adapter, "nora")
        pipe.set_adapters(["nora"], adapter_weights=[req.lora_scale])
    height = req.height or pipe.unet.config.sample_size * pipe.vae_scale_factor
    width = req.width or pipe.unet.config.sample_size * pipe.vae_scale_factor
    req.out_dir.mkdir(parents=True, exist_ok=True)
    images: list[Image.Image] = []
    records: list[ImageRecord] = []
    for prompt in req.prompts:
        seeds = [req.seed + len(images) + k for k in range(req.num_images)]
        generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
        batch = pipe(
            [prompt] * req.num_images,
            negative_prompt=[req.negative_prompt] * req.num_images if req.negative_prompt else None,
            num_inference_steps=req.steps, guidance_scale=req.guidance, generator=generators,
            height=height, width=width,
        ).images
        for seed, image in zip(seeds, batch, strict=True):
            name = f"{len(images):03d}.png"
            image.save(req.out_dir / name)
            images.append(image)
            records.append(ImageRecord(
                file=name, prompt=prompt, seed=seed, steps=req.steps, guidance=req.guidance,
                negative_prompt=req.negative_prompt, scheduler=type(pipe.scheduler).__name__,
                lora_scale=req.lora_scale if req.adapter is not None else None, model=req.model,
                adapter=str(req.adapter) if req.adapter is not None else None, height=height, width=width,
            ))
    make_image_grid(images, rows=len(req.prompts), cols=req.num_images).save(req.out_dir / "grid.png")
    (req.out_dir / "samples.json").write_text(json.dumps([asdict(r) for r in records], indent=2) + "\n")
    return records
