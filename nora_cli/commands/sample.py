"""`nora sample`: images from a DreamBooth adapter / SD pipeline, or text from a causal-LM (adapter).

Unset flags keep ImageRequest/TextRequest field defaults, the one home of those defaults (--help shows them)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer

from nora_cli.errors import NoraError, read_text
from nora_cli.options import AllowPickleOption
from nora_cli.tasks.causal_lm.sample import TextRequest
from nora_cli.tasks.dreambooth.sample import ImageRequest

#: flags that apply to one kind of output only
_IMAGE_ONLY = ("--num-images", "--steps", "--guidance", "--negative-prompt", "--scheduler", "--lora-scale",
               "--height", "--width", "--out")
_TEXT_ONLY = ("--template", "--temperature", "--top-p", "--max-new-tokens")


def sample(
    model: Annotated[str | None, typer.Option("--model", "-m", help="Base: SD pipeline dir/hub id, or causal LM "
                                              "(hub id, dir, .gguf, alias). Default: the adapter's base.")] = None,
    adapter: Annotated[Path | None, typer.Option("--adapter", "-a", help="Adapter directory written by "
                                                 "`nora train` (or `nora merge`).")] = None,
    prompt: Annotated[list[str] | None, typer.Option("--prompt", "-p", metavar="TEXT", help="Prompt (repeatable).")] = None,
    prompt_file: Annotated[Path | None, typer.Option("--prompt-file", help="File with one prompt per line.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed; image i uses seed+i (same seed, same image).")] = 0,
    num_images: Annotated[int | None, typer.Option("--num-images", "-n", help=f"Images per prompt (default: {ImageRequest.num_images}).")] = None,
    steps: Annotated[int | None, typer.Option("--steps", help=f"Denoising steps (default: {ImageRequest.steps}).")] = None,
    guidance: Annotated[float | None, typer.Option("--guidance", help="Classifier-free guidance scale "
                                                   f"(default: {ImageRequest.guidance}).")] = None,
    negative_prompt: Annotated[str | None, typer.Option("--negative-prompt", help="What to steer away from.")] = None,
    scheduler: Annotated[str | None, typer.Option("--scheduler", help="ddim, dpm, euler or pndm "
                                                  "(default: the pipeline's own).")] = None,
    lora_scale: Annotated[float | None, typer.Option("--lora-scale", help="Multiplier on the LoRA update "
                                                     f"(default: {ImageRequest.lora_scale}).")] = None,
    height: Annotated[int | None, typer.Option("--height", help="Image height in pixels (default: native).")] = None,
    width: Annotated[int | None, typer.Option("--width", help="Image width in pixels (default: native).")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output folder for images (default: samples).")] = None,
    template: Annotated[str | None, typer.Option("--template", help="Text prompt template: alpaca, chat, none, "
                                                 "chatml, llama3, gemma, mistral or a .jinja file (default: the "
                                                 "adapter's, else chat if available).")] = None,
    temperature: Annotated[float | None, typer.Option("--temperature", help="Text sampling temperature; 0 = greedy "
                                                      f"(default: {TextRequest.temperature:g}).")] = None,
    top_p: Annotated[float | None, typer.Option("--top-p", help=f"Nucleus sampling mass (default: {TextRequest.top_p}).")] = None,
    max_new_tokens: Annotated[int | None, typer.Option("--max-new-tokens", help="Tokens to generate per prompt "
                                                       f"(default: {TextRequest.max_new_tokens}).")] = None,
    allow_pickle: AllowPickleOption = False,
) -> None:
    given = {"--num-images": num_images, "--steps": steps, "--guidance": guidance, "--negative-prompt": negative_prompt,
             "--scheduler": scheduler, "--lora-scale": lora_scale, "--height": height, "--width": width, "--out": out,
             "--template": template, "--temperature": temperature, "--top-p": top_p,
             "--max-new-tokens": max_new_tokens}
    from nora_cli import sample as lib

    prompts = _prompts(prompt, prompt_file)
    kind = lib.detect_kind(model, adapter)
    _check_options(kind, given)
    base = lib.base_model(model, adapter)
    if kind == "images":
        _check_image_options(scheduler, lora_scale, guidance, adapter, num_images, steps, height, width)
        request = ImageRequest(
            model=base, adapter=adapter, prompts=prompts, out_dir=out or Path("samples"), seed=seed,
            allow_pickle=allow_pickle, **_given(num_images=num_images, steps=steps, guidance=guidance,
                                                negative_prompt=negative_prompt, scheduler=scheduler,
                                                lora_scale=lora_scale, height=height, width=width),
        )
        for record in lib.run(kind, request):
            print(request.out_dir / record.file)
        print(request.out_dir / "grid.png")
    else:
        _check_text_options(template, temperature, top_p, max_new_tokens)
        lib.run(kind, TextRequest(
            model=base, adapter=adapter, prompts=prompts, template=template, seed=seed, allow_pickle=allow_pickle,
            **_given(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p),
        ))


def _given(**values: object) -> dict[str, object]:
    """The flags the user gave; the others keep the request's own defaults (their one home)."""
    return {name: value for name, value in values.items() if value is not None}


def _prompts(prompt: list[str] | None, prompt_file: Path | None) -> list[str]:
    prompts = list(prompt or [])
    if prompt_file is not None:
        text = read_text(prompt_file, "prompt file")
        prompts += [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise NoraError("give at least one --prompt or a --prompt-file")
    return prompts


def _check_options(kind: str, given: dict[str, object]) -> None:
    """Refuse flags of the other output kind instead of silently ignoring them."""
    wrong = _TEXT_ONLY if kind == "images" else _IMAGE_ONLY
    used = [flag for flag in wrong if given[flag] is not None]
    if used:
        raise NoraError(f"{', '.join(used)} {'does' if len(used) == 1 else 'do'} not apply to {kind} sampling")


def _positive(**values: float | None) -> None:
    for name, value in values.items():
        if value is not None and not value > 0:  # nan too
            raise NoraError(f"--{name.replace('_', '-')} must be positive, got {value}")


def _check_image_options(scheduler: str | None, lora_scale: float | None, guidance: float | None,
                         adapter: Path | None, num_images: int | None, steps: int | None, height: int | None, width: int | None) -> None:
    from nora_cli.tasks.dreambooth.sample import SCHEDULERS

    if scheduler is not None and scheduler not in SCHEDULERS:
        raise NoraError(f"unknown --scheduler {scheduler!r}; expected {', '.join(SCHEDULERS)}")
    if lora_scale is not None and adapter is None:
        raise NoraError("--lora-scale needs --adapter")
    _positive(num_images=num_images, steps=steps, height=height, width=width)
    for flag, number in (("--guidance", guidance), ("--lora-scale", lora_scale)):
        if number is not None and not math.isfinite(number):
            raise NoraError(f"{flag} must be a finite number, got {number}")
    for flag, value in (("--height", height), ("--width", width)):
        if value is not None and value % 8:
            raise NoraError(f"{flag} must be a multiple of 8 (the VAE downsamples by 8), got {value}")


def _check_text_options(template: str | None, temperature: float | None, top_p: float | None,
                        max_new_tokens: int | None) -> None:
    from nora_cli.config.names import TEMPLATE_NAMES, is_template

    _positive(max_new_tokens=max_new_tokens, top_p=top_p)
    if top_p is not None and top_p > 1:
        raise NoraError(f"--top-p must be in (0, 1], got {top_p}")
    if temperature is not None and not 0 <= temperature < math.inf:
        raise NoraError(f"--temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if template is not None and not is_template(template):
        raise NoraError(f"unknown --template {template!r}; expected {', '.join(TEMPLATE_NAMES)} or a .jinja file")
