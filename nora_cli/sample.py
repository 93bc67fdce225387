"""`nora sample`: images from a Stable Diffusion base (+ DreamBooth LoRA), or text from a causal LM (+ LoRA).

What to sample is read from the inputs, never asked: an adapter's nora.json `task` decides
(dreambooth -> images, causal-lm -> text); without one, a diffusers LoRA file means images
and a PEFT adapter_config.json means text; with no adapter, a `--model` that is a diffusers
pipeline (model_index.json) means images, anything else a causal LM.

Images are reproducible per image: image i is drawn from a CPU generator seeded with
`seed + i`, so the same command gives pixel-identical files on the same machine, and each
record in samples.json names the seed that reproduces it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from nora_cli.errors import NoraError

if TYPE_CHECKING:
    from PIL import Image

Kind = Literal["images", "text"]

#: --scheduler name -> diffusers scheduler class (built from the pipeline's own scheduler config)
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "pndm": "PNDMScheduler",
}
#: nora.json task -> what it samples
TASK_KINDS: dict[str, Kind] = {"dreambooth": "images", "causal-lm": "text"}


def detect_kind(model: str | None, adapter: Path | None) -> Kind:
    """images or text, from the adapter (`run_dir.recorded_task`) or else from the base model."""
    from nora_cli.run_dir import DIFFUSERS_LORA_FILE, RunInfo, recorded_task
    from nora_cli.tasks.dreambooth.pipeline import is_pipeline_dir

    if adapter is not None:
        if not adapter.is_dir():
            raise NoraError(f"adapter directory not found: {adapter}")
        task = recorded_task(adapter)
        if task is None:
            raise NoraError(f"{adapter} is not an adapter directory (no nora.json, adapter_config.json or "
                            f"{DIFFUSERS_LORA_FILE})")
        if task not in TASK_KINDS:
            if RunInfo.read(adapter).task is not None:
                raise NoraError(f"{adapter}/nora.json has unknown task {task!r}")
            return "text"  # a PEFT adapter of another task_type: its base model decides (as before)
        return TASK_KINDS[task]
    if model is None:
        raise NoraError("give --model, --adapter, or both")
    return "images" if is_pipeline_dir(model) else "text"


def base_model(model: str | None, adapter: Path | None) -> str:
    """--model if given, else the base recorded with the adapter (nora.json, else adapter_config.json)."""
    from nora_cli.tasks.dreambooth.export import adapter_base

    if model is not None:
        return model
    if adapter is None:
        raise NoraError("give --model, --adapter, or both")
    return adapter_base(adapter)


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# --- images ------------------------------------------------------------------------------------------------


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

    from nora_cli.tasks.dreambooth.export import load_lora
    from nora_cli.tasks.dreambooth.pipeline import load_pipeline

    device = _device()
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


# --- text --------------------------------------------------------------------------------------------------


@dataclass
class TextRequest:
    model: str
    adapter: Path | None
    prompts: list[str]
    template: str | None = None  # alpaca | chat | none; None: nora.json's, else chat if the tokenizer has one
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    allow_pickle: bool = False  # also load pickled .bin base weights (torch.load(weights_only=True))


def sample_text(req: TextRequest) -> list[str]:
    """Generate an answer per prompt, streaming tokens to stdout as they come (TextStreamer)."""
    from nora_cli.export.adapter import open_adapter, read_adapter

    # the adapter's files first: a broken one fails before torch is even imported
    checked = None if req.adapter is None else read_adapter(req.adapter, req.allow_pickle)
    import torch
    from transformers import TextStreamer

    from nora_cli.data.example import Example
    from nora_cli.data.templates import render_prompt
    from nora_cli.models import load_causal_lm, load_tokenizer

    device = _device()
    dtype = "bf16" if device == "cuda" else "fp32"
    if checked is not None:
        opened = open_adapter(checked, req.model, dtype=dtype, allow_pickle=req.allow_pickle)
        model, tokenizer = opened.model, load_tokenizer(opened.base)
    else:
        model, tokenizer = load_causal_lm(req.model, dtype=dtype, allow_pickle=req.allow_pickle)
    model.to(device).eval()
    recorded = checked.nora.meta.get("prompt_template") if checked is not None else None
    template = req.template or recorded or ("chat" if tokenizer.chat_template else "none")
    answers = []
    for i, prompt in enumerate(req.prompts):
        if len(req.prompts) > 1:
            print(f"{'' if i == 0 else chr(10)}>>> {prompt}", flush=True)
        text = render_prompt(template, Example(instruction=prompt), tokenizer)
        inputs = tokenizer(text, return_tensors="pt", add_special_tokens=template != "chat").to(device)
        torch.manual_seed(req.seed)
        sampling = {"do_sample": True, "temperature": req.temperature, "top_p": req.top_p} \
            if req.temperature > 0 else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        with torch.inference_mode():
            out = model.generate(
                **inputs, max_new_tokens=req.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True), **sampling,
            )
        answers.append(tokenizer.decode(out[0, inputs.input_ids.shape[1]:], skip_special_tokens=True))
    return answers

