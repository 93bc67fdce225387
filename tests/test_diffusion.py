"""DreamBooth LoRA: images, Nyström init on the UNet, training through the shared loop, diffusers export.

Everything runs on a tiny random-weight SD pipeline (64-px native, trained at 32 px) with the real
CLIP tokenizer, and the 5 real dog photos from the shared folder. One 50-step `nora train` run through
the CLI is shared by the training, export and sampling tests. Torch runs single-threaded here: these
models are so small that a second OpenMP thread only adds synchronization, which costs 10x on a
loaded 2-core CI machine.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from pydantic import ValidationError
from tiny_sd import build_tiny_sd_pipeline

from nora_cli.config.schema import Recipe
from nora_cli.data.images import ImageFolder, ensure_class_images, load_image
from nora_cli.errors import NoraError
from nora_cli.tasks.dreambooth.export import (
    DIFFUSERS_LORA_FILE,
    export_diffusers_lora,
    export_merged_pipeline,
)
from nora_cli.tasks.dreambooth.job import DreamBoothConfig, build_dreambooth_job, validation_due

REPO = Path(__file__).resolve().parents[1]
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


DreamBoothRecipe = Recipe  # the dreambooth section is part of the schema


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread: None) -> None:
    """Small models: one thread (see conftest.one_thread)."""


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> Path:
    return build_tiny_sd_pipeline(tmp_path_factory.mktemp("tiny-sd") / "pipe")


def make_recipe(tiny_sd: Path, shared: Path, out: Path, **overrides: Any) -> DreamBoothRecipe:
    return DreamBoothRecipe.model_validate(recipe_tree(tiny_sd, shared, out, **overrides))


def recipe_tree(tiny_sd: Path, shared: Path, out: Path, **overrides: Any) -> dict[str, Any]:
    dreambooth = {"instance_data_dir": str(shared / "data/dreambooth/dog"), "instance_prompt": "a photo of sks dog",
                  "resolution": 32, **overrides.pop("dreambooth", {})}
    return {
        "task": "dreambooth", "method": "nora", "seed": 0,
        "model": {"source": str(tiny_sd)},
        "adapter": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": UNET_TARGETS, "sigma": 0.1},
        "optimizer": {"lr": 1e-2},
        "train": {"max_steps": 8, "batch_size": 1, "micro_batch_size": 1, "lr_schedule": "constant"},
        "output": {"dir": str(out)},
        "dreambooth": dreambooth,
        **overrides,
    }


def unet_inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, 4, 16, 16, generator=gen), torch.tensor([500]), torch.randn(1, 77, 32, generator=gen)


def fixed_seed_loss(job: Any, model: torch.nn.Module, seeds: range = range(4)) -> float:
    """Mean loss over all dog images with the noise/timesteps of fixed seeds (comparable across models)."""
    model.eval()
    total = 0.0
    with torch.no_grad():
        for seed in seeds:
            torch.manual_seed(seed)
            out = job.loss(model, job.collate([job.train_data[i] for i in range(len(job.train_data))]))
            total += (out.loss_sum / out.count).item()
    return total / len(seeds)


# --- tiny pipeline ------------------------------------------------------------------------------------------


def test_tiny_pipeline_has_the_real_clip_tokenizer(tiny_sd: Path) -> None:
    from transformers import CLIPTextConfig, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd / "tokenizer")
    # openai/clip-vit-large-patch14 ids: <|startoftext|> a photo of a dog <|endoftext|>
    assert tokenizer("a photo of a dog").input_ids == [49406, 320, 1125, 539, 320, 1929, 49407]
    assert len(tokenizer) == 49408 == CLIPTextConfig.from_pretrained(tiny_sd / "text_encoder").vocab_size
    assert json.loads((tiny_sd / "model_index.json").read_text())["unet"] == ["diffusers", "UNet2DConditionModel"]


# --- images -------------------------------------------------------------------------------------------------


def test_load_image_applies_exif_orientation_and_rgb(tmp_path: Path) -> None:
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 20))  # left red, right blue
    exif = Image.Exif()
    exif[274] = 6  # "rotate 90° clockwise to display": left edge goes to the top
    image.save(tmp_path / "rotated.png", exif=exif.tobytes())
    upright = load_image(tmp_path / "rotated.png")
    assert upright.size == (20, 40)
    assert upright.getpixel((10, 5)) == (255, 0, 0) and upright.getpixel((10, 35)) == (0, 0, 255)

    Image.new("L", (8, 8), 128).save(tmp_path / "gray.png")
    Image.new("RGBA", (8, 8), (10, 20, 30, 0)).save(tmp_path / "alpha.webp", lossless=True)
    for name in ("gray.png", "alpha.webp"):
        assert load_image(tmp_path / name).mode == "RGB"
    assert load_image(tmp_path / "gray.png").getpixel((0, 0)) == (128, 128, 128)


def test_dog_images_are_cropped_squares_in_range(shared: Path) -> None:
    folder = ImageFolder(shared / "data/dreambooth/dog", resolution=64)
    assert [p.name for p in folder.paths] == ["00.jpg", "01.jpg", "02.jpg", "03.jpg", "04.jpg"]
    for i in range(len(folder)):
        x = folder[i]
        assert x.shape == (3, 64, 64) and x.dtype == torch.float32
        assert -1.0 <= x.min() < -0.5 and 0.5 < x.max() <= 1.0  # a real photo spans most of [-1, 1]
    # pixel p maps to p/127.5 - 1: compare with the PIL image the tensor came from (center crop of a square)
    expected = np.asarray(folder.images[0], dtype=np.float32)[:64, :64] / 127.5 - 1.0
    np.testing.assert_allclose(folder[0].permute(1, 2, 0).numpy(), expected, atol=1e-6)


def test_center_crop_random_crop_and_flip(tmp_path: Path) -> None:
    stripes = Image.new("RGB", (64, 32), (0, 0, 0))
    stripes.paste((255, 255, 255), (12, 0, 52, 32))  # white middle, black edges
    stripes.save(tmp_path / "wide.png")
    assert ImageFolder(tmp_path, resolution=16)[0].min() > 0.9  # center crop: only the white middle
    random_crops = ImageFolder(tmp_path, resolution=16, center_crop=False)
    torch.manual_seed(0)
    assert min(random_crops[0].min().item() for _ in range(10)) < -0.9  # some crop reaches a black edge

    half = Image.new("RGB", (16, 16), (0, 0, 0))
    half.paste((255, 255, 255), (8, 0, 16, 16))
    (tmp_path / "wide.png").unlink()
    half.save(tmp_path / "half.png")
    plain = ImageFolder(tmp_path, resolution=16)[0]
    flips = ImageFolder(tmp_path, resolution=16, random_flip=True)

    def flipped(seed: int) -> list[bool]:
        torch.manual_seed(seed)
        draws = [flips[0] for _ in range(20)]
        assert all(torch.equal(x, plain) or torch.equal(x, plain.flip(-1)) for x in draws)
        return [torch.equal(x, plain.flip(-1)) for x in draws]

    assert set(flipped(0)) == {True, False}  # both orientations occur
    assert flipped(0) == flipped(0) != flipped(1)  # and the global seed fixes which


def test_bad_image_folders_name_the_problem(tmp_path: Path, shared: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "good.png")
    (tmp_path / "broken.jpg").write_bytes(b"definitely not a jpeg")
    with pytest.raises(NoraError, match="broken.jpg"):
        ImageFolder(tmp_path, resolution=8)
    (tmp_path / "broken.jpg").unlink()
    (tmp_path / "truncated.jpg").write_bytes((shared / "data/dreambooth/dog/00.jpg").read_bytes()[:5000])
    with pytest.raises(NoraError, match="truncated.jpg"):
        ImageFolder(tmp_path, resolution=8)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(NoraError, match="no images"):
        ImageFolder(empty, resolution=8)
    with pytest.raises(NoraError, match="not found"):
        ImageFolder(tmp_path / "missing", resolution=8)


def test_class_images_fill_up_with_fresh_seeds(tmp_path: Path) -> None:
    calls = []

    def generate(first: int, n: int) -> list[Image.Image]:
        calls.append((first, n))
        return [Image.new("RGB", (8, 8), (first + i, 0, 0)) for i in range(n)]

    assert ensure_class_images(tmp_path, 5, generate, batch_size=2) == 5
    assert calls == [(0, 2), (2, 2), (4, 1)]
    assert ensure_class_images(tmp_path, 5, generate) == 0  # already full: nothing regenerated
    assert ensure_class_images(tmp_path, 6, generate) == 1 and calls[-1] == (5, 1)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 6 and all(re.fullmatch(r"\d{4}-[0-9a-f]{12}\.jpg", n) for n in names)


def test_config_rejects_bad_sections() -> None:
    base = {"instance_data_dir": "dog", "instance_prompt": "a photo of sks dog"}
    assert DreamBoothConfig(**base).resolution == 512
    with pytest.raises(ValidationError, match="extra"):
        DreamBoothConfig(**base, instance_dir="typo")
    with pytest.raises(ValidationError, match="class_prompt and class_data_dir"):
        DreamBoothConfig(**base, with_prior_preservation=True)
    with pytest.raises(ValidationError, match="multiple of 8"):
        DreamBoothConfig(**base, resolution=100)
    assert all(field.description for field in DreamBoothConfig.model_fields.values())


# --- model, init, loss --------------------------------------------------------------------------------------


def test_nystrom_init_reaches_the_unet_lora_layers(tiny_sd: Path, shared: Path, tmp_path: Path) -> None:
    from diffusers import UNet2DConditionModel

    from nora_cli.lora import gaussian_sketch, lora_layers
    from nora_cli.optim import Preconditioner

    recipe = make_recipe(tiny_sd, shared, tmp_path)
    job = build_dreambooth_job(recipe, torch.device("cpu"), tmp_path)
    layers = lora_layers(job.model)
    assert len(layers) == 32  # 4 transformer blocks x 2 attentions x (to_q, to_k, to_v, to_out.0)
    assert {name.rsplit(".", 1)[-1] for name, _ in layers} == {"to_q", "to_k", "to_v", "0"}
    for name, layer in layers:
        w0 = layer.get_base_layer().weight
        omega = gaussian_sketch(0, name, (w0.shape[1], 4))
        expected = (0.1 / layer.scaling["default"]) * w0 @ omega  # B0 = (σ/s)·W0·Ω, s = 8/4
        torch.testing.assert_close(layer.lora_B["default"].weight, expected, rtol=1e-5, atol=1e-6)
        assert not layer.lora_A["default"].weight.any()
    trainable = {n for n, p in job.model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert all(n.startswith("unet.") for n in trainable)  # VAE and text encoder frozen
    assert len(Preconditioner(job.model).pairs) == 32  # NoRA+ finds them too

    base = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet").eval()
    job.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(job.model.unet(*unet_inputs()).sample, base(*unet_inputs()).sample,
                                   rtol=0, atol=1e-6)  # A0 = 0: the UNet is unchanged at init


def test_nystrom_b0_lies_in_the_column_space_of_w0(tiny_sd: Path, shared: Path, tmp_path: Path) -> None:
    """B0 = (σ/s)·W0·Ω lies in col(W0) (paper eq. 5), checked with an SVD of each UNet layer's W0. Where W0 has
    full row rank that is trivially true, so the test plants rank-2 weights in every self-attention to_q, and the
    real cross-attention to_k/to_v (64x32) span only half of R^64."""
    from nora_cli.lora import lora_layers
    from nora_cli.tasks.dreambooth.job import build_model
    from nora_cli.tasks.dreambooth.pipeline import load_sd_parts

    parts = load_sd_parts(str(tiny_sd))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, module in parts.unet.named_modules():
            if name.endswith("attn1.to_q"):
                out_f, in_f = module.weight.shape
                module.weight.copy_(torch.randn(out_f, 2, generator=gen) @ torch.randn(2, in_f, generator=gen))
    model = build_model(parts, make_recipe(tiny_sd, shared, tmp_path))
    shapes: dict[str, set[tuple[int, int]]] = {}  # module kind -> {(rank of W0, rows of W0)}
    layers = lora_layers(model.unet)
    for name, layer in layers:
        w0, b0 = layer.get_base_layer().weight.double(), layer.lora_B["default"].weight.detach().double()
        u, s, _ = torch.linalg.svd(w0, full_matrices=False)
        u = u[:, : int((s > 1e-6 * s[0]).sum())]  # orthonormal basis of col(W0)
        assert b0.abs().max() > 0 and outside_fraction(u, b0) < 1e-5, name
        if u.shape[1] < w0.shape[0]:  # a proper subspace: a random B would be far outside it
            assert outside_fraction(u, torch.randn(b0.shape, generator=gen, dtype=torch.float64)) > 0.5
        shapes.setdefault(name.split("transformer_blocks.0.")[-1], set()).add((u.shape[1], w0.shape[0]))
    assert len(layers) == 32
    full = {(64, 64)}
    assert shapes == {"attn1.to_q": {(2, 64)}, "attn1.to_k": full, "attn1.to_v": full, "attn1.to_out.0": full,
                      "attn2.to_q": full, "attn2.to_k": {(32, 64)}, "attn2.to_v": {(32, 64)}, "attn2.to_out.0": full}


def outside_fraction(u: torch.Tensor, m: torch.Tensor) -> float:
    """‖(I − UUᵀ)M‖_F / ‖M‖_F for orthonormal columns U."""
    return float(torch.linalg.norm(m - u @ (u.T @ m)) / torch.linalg.norm(m))


def test_prior_preservation_cached_latents_and_min_snr(tiny_sd: Path, shared: Path, tmp_path: Path) -> None:
    recipe = make_recipe(tiny_sd, shared, tmp_path, dreambooth={
        "with_prior_preservation": True, "class_prompt": "a photo of dog", "class_data_dir": str(tmp_path / "class"),
        "num_class_images": 2, "cache_latents": True, "validation_inference_steps": 2,
    })
    job = build_dreambooth_job(recipe, torch.device("cpu"), tmp_path)
    assert len(list((tmp_path / "class").glob("*.jpg"))) == 2  # generated by the base pipeline
    assert len(job.train_data) == 5  # max(instance, class): instances pair with class images cyclically
    batch = job.collate([job.train_data[0], job.train_data[1]])
    assert batch["latent_params"].shape == (4, 8, 16, 16)  # 2 instance + 2 class rows; mean ‖ logvar
    assert batch["is_prior"].tolist() == [False, False, True, True] and batch["num_units"] == 2

    def loss_at(weight: float) -> tuple[float, int]:
        job.model.prior_loss_weight = weight
        torch.manual_seed(3)
        with torch.no_grad():
            out = job.loss(job.model, batch)
        return out.loss_sum.item(), int(out.count)

    (l0, count), (l1, _), (l2, _) = loss_at(0.0), loss_at(1.0), loss_at(2.0)
    assert count == 2  # the loop divides by instance images
    assert l1 - l0 > 0 and l2 - l1 == pytest.approx(l1 - l0, rel=1e-5)  # loss = instance + w·prior

    alphas = job.model.noise_scheduler.alphas_cumprod
    t = torch.tensor([10, 999])
    snr = alphas[t] / (1 - alphas[t])
    job.model.snr_gamma = 5.0
    torch.testing.assert_close(job.model.min_snr_weights(t), torch.minimum(snr, torch.tensor(5.0)) / snr)
    assert job.model.min_snr_weights(t)[0] < 0.1 and job.model.min_snr_weights(t)[1] == 1.0


# --- training through the CLI and the shared loop, then export ------------------------------------------

TRAIN_STEPS, VALIDATION_STEPS = 50, 25


@pytest.fixture(scope="module")
def trained(tiny_sd: Path, shared: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """`nora train dog.yaml`: 50 NoRA+ steps on all 5 photos per step (batch 5 averages 5 random timesteps,
    so the logged loss is smooth enough to compare), UNet + text-encoder LoRA with alpha 8 != r 4, validation
    grids every 25 steps. lr 2e-2: over seeds 0-4 mean(last 10 losses) / mean(first 10) was 0.89-0.93."""
    from typer.testing import CliRunner

    from nora_cli.cli import app

    root = tmp_path_factory.mktemp("dreambooth")
    out = root / "run"
    tree = recipe_tree(tiny_sd, shared, out, method="nora+", optimizer={"lr": 2e-2}, train={
        "max_steps": TRAIN_STEPS, "batch_size": 5, "micro_batch_size": 5, "lr_schedule": "constant",
    }, dreambooth={"validation_prompts": ["a sks dog"], "validation_steps": VALIDATION_STEPS,
                   "num_validation_images": 2, "validation_inference_steps": 2, "train_text_encoder": True})
    (root / "dog.yaml").write_text(yaml.safe_dump(tree))
    result = CliRunner().invoke(app, ["train", str(root / "dog.yaml")])
    assert result.exit_code == 0, result.output
    return {"out": out, "recipe": DreamBoothRecipe.model_validate(tree), "stdout": result.stdout}


@pytest.fixture(scope="module")
def reloaded(trained: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The recipe's job (the step-0 model) with the PEFT adapters `nora train` saved loaded into it."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    job = build_dreambooth_job(trained["recipe"], torch.device("cpu"), tmp_path_factory.mktemp("reloaded"))
    for component in ("unet", "text_encoder"):
        saved = load_file(trained["out"] / component / "adapter_model.safetensors")
        state = {key.removeprefix("base_model.model."): value for key, value in saved.items()}
        result = set_peft_model_state_dict(getattr(job.model, component), state)
        assert not result.unexpected_keys and not [k for k in result.missing_keys if "lora_" in k]
    return job


def logged_losses(out: Path) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def test_cli_training_writes_the_dreambooth_layout(trained: dict[str, Any], tiny_sd: Path) -> None:
    out = trained["out"]
    assert f"done: {TRAIN_STEPS} steps" in trained["stdout"]
    meta = json.loads((out / "nora.json").read_text())
    assert meta["task"] == "dreambooth" and meta["method"] == "nora+"
    assert meta["base_model_resolved"] == str(tiny_sd) and meta["init"]["name"] == "nystrom"
    config = json.loads((out / "unet/adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (4, 8, str(tiny_sd))
    assert sorted(config["target_modules"]) == sorted(UNET_TARGETS)
    assert (out / "unet/adapter_model.safetensors").is_file() and (out / DIFFUSERS_LORA_FILE).is_file()
    text_config = json.loads((out / "text_encoder/adapter_config.json").read_text())
    assert sorted(text_config["target_modules"]) == ["k_proj", "out_proj", "q_proj", "v_proj"]
    assert (out / "recipe.yaml").is_file() and (out / "loss.png").is_file()
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step_0025.png", "step_0050.png"]
    for name in ("step_0025.png", "step_0050.png"):
        with Image.open(out / "validation" / name) as grid:
            assert grid.size == (64, 32)  # 1 prompt x 2 images of 32 px
    first, last = (np.asarray(Image.open(out / "validation" / name)) for name in ("step_0025.png", "step_0050.png"))
    assert np.abs(first.astype(int) - last).max() > 0  # same seed, different weights: the LoRA keeps changing


def test_cli_training_lowers_the_logged_loss(trained: dict[str, Any]) -> None:
    losses = logged_losses(trained["out"])
    assert len(losses) == TRAIN_STEPS and all(np.isfinite(losses))
    first, last = float(np.mean(losses[:10])), float(np.mean(losses[-10:]))
    assert last < 0.97 * first, (first, last)


def test_validation_schedule() -> None:
    assert [s for s in range(1, 51) if validation_due(s, VALIDATION_STEPS, 50)] == [25, 50]
    assert [s for s in range(1, 11) if validation_due(s, 3, 10)] == [3, 6, 9, 10]  # the last step always
    assert [s for s in range(1, 8) if validation_due(s, None, 7)] == [7]  # no interval: only the result


def test_saved_adapter_reduces_the_loss_on_the_dog_images(trained: dict[str, Any], reloaded: Any,
                                                          tmp_path: Path) -> None:
    initial = build_dreambooth_job(trained["recipe"], torch.device("cpu"), tmp_path)  # same seed: the step-0 model
    before = fixed_seed_loss(initial, initial.model)
    after = fixed_seed_loss(initial, reloaded.model)
    assert after < before - 1e-2, (before, after)


def test_diffusers_lora_file_reproduces_the_trained_unet(trained: dict[str, Any], reloaded: Any,
                                                         tiny_sd: Path) -> None:
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import PeftModel

    model = reloaded.model.eval()
    ids = torch.tensor([[49406, 320, 1125, 539, 320, 1929, 49407]])  # "a photo of a dog"
    with torch.no_grad():
        reference, text_reference = model.unet(*unet_inputs()).sample, model.text_encoder(ids)[0]
        pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
        base, text_base = pipe.unet(*unet_inputs()).sample, pipe.text_encoder(ids)[0]
        pipe.load_lora_weights(trained["out"])  # plain diffusers, no nora code
        loaded, text_loaded = pipe.unet(*unet_inputs()).sample, pipe.text_encoder(ids)[0]
        peft_unet = PeftModel.from_pretrained(UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet"),
                                              trained["out"] / "unet").eval()
        from_peft = peft_unet(*unet_inputs()).sample
    change = (reference - base).abs().max()
    assert change > 1e-3  # the adapter matters, so the checks below have teeth
    # alpha/r = 2 folded into lora_B: full strength (an unfolded file would be off by change/2)
    assert (loaded - reference).abs().max() < 1e-3 * change
    assert (text_reference - text_base).abs().max() > 1e-3
    assert (text_loaded - text_reference).abs().max() < 1e-5  # text-encoder LoRA too
    assert (from_peft - reference).abs().max() < 1e-5

    again = export_diffusers_lora(trained["out"], trained["out"].parent / "lora-only")
    from safetensors.torch import load_file

    first, second = load_file(trained["out"] / DIFFUSERS_LORA_FILE), load_file(again)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_nora_sample_and_merged_pipeline_match_plain_diffusers(trained: dict[str, Any], reloaded: Any,
                                                               tiny_sd: Path, tmp_path: Path) -> None:
    """Same seed, steps, guidance and (the pipeline's own PNDM) scheduler: `nora sample`, plain diffusers
    `load_lora_weights(out)`, the fused pipeline and the trained PEFT modules (which apply alpha/r = 2 themselves)
    give the same picture, within 1/255; half the LoRA strength is far off, so the strength is right."""
    from diffusers import StableDiffusionPipeline
    from typer.testing import CliRunner

    from nora_cli.cli import app

    merged_dir = export_merged_pipeline(trained["out"], tmp_path / "merged")
    assert (merged_dir / "model_index.json").is_file()

    def image(pipe: Any) -> np.ndarray:
        pipe.set_progress_bar_config(disable=True)
        return pipe("a sks dog", num_inference_steps=3, guidance_scale=7.5, height=32, width=32, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images[0]

    base = StableDiffusionPipeline.from_pretrained(tiny_sd)
    plain = image(base)
    base.load_lora_weights(trained["out"])
    with_lora = image(base)
    half = base("a sks dog", num_inference_steps=3, guidance_scale=7.5, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(0), cross_attention_kwargs={"scale": 0.5}).images[0]
    merged = image(StableDiffusionPipeline.from_pretrained(merged_dir))
    peft = image(StableDiffusionPipeline.from_pretrained(tiny_sd, unet=reloaded.model.unet.eval(),
                                                         text_encoder=reloaded.model.text_encoder.eval()))
    assert np.abs(with_lora - plain).max() > 20 / 255  # the trained LoRA changes the picture
    assert np.abs(with_lora - half).max() > 10 / 255  # so a wrong strength would show
    assert np.abs(peft - with_lora).max() <= 1 / 255
    assert np.abs(merged - with_lora).max() < 1e-4  # fused W0 + s·B·A vs. unfused: fp32 rounding only

    result = CliRunner().invoke(app, [
        "sample", "--adapter", str(trained["out"]), "--prompt", "a sks dog", "--num-images", "1", "--seed", "0",
        "--steps", "3", "--guidance", "7.5", "--height", "32", "--width", "32", "--out", str(tmp_path / "cli"),
    ])
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "cli/000.png") as png:
        sampled = np.asarray(png.convert("RGB"), dtype=np.float64) / 255
    assert np.abs(sampled - with_lora).max() <= 1 / 255 + 1e-9


# --- the shipped recipe -------------------------------------------------------------------------------------


def test_shipped_recipe_matches_the_paper(shared: Path) -> None:
    path = REPO / "recipes/sd14-dreambooth-dog.yaml"
    assert path.read_text().splitlines()[0] == "# nora train sd14-dreambooth-dog"
    tree = yaml.safe_load(path.read_text())
    images = (path.parent / tree["dreambooth"]["instance_data_dir"]).resolve()
    assert images == (shared / "data/dreambooth/dog").resolve() and len(ImageFolder(images, 64)) == 5
    recipe = DreamBoothRecipe.model_validate(tree)
    assert (recipe.task, recipe.method, recipe.model.source) == ("dreambooth", "nora+", "CompVis/stable-diffusion-v1-4")
    assert (recipe.adapter.r, recipe.adapter.alpha, recipe.adapter.sigma, recipe.adapter.init) == (4, 4, 0.1, "nystrom")
    assert recipe.adapter.target_modules == UNET_TARGETS
    assert (recipe.optimizer.name, recipe.optimizer.lr, recipe.optimizer.weight_decay) == ("adamw", 1e-4, 0.01)
    assert (recipe.train.max_steps, recipe.train.batch_size, recipe.train.mixed_precision) == (500, 1, "fp16")
    assert recipe.dreambooth.instance_prompt == "a photo of sks dog"
    assert recipe.dreambooth.validation_prompts == ["a sks dog eating nachos"]
    assert recipe.dreambooth.resolution == 512


def test_pissa_is_refused_for_dreambooth(tiny_sd: Path, shared: Path, tmp_path: Path) -> None:
    recipe = make_recipe(tiny_sd, shared, tmp_path, adapter={"r": 4, "alpha": 4, "init": "pissa",
                                                             "target_modules": UNET_TARGETS})
    with pytest.raises(NoraError, match="rewrites the base weights"):
        build_dreambooth_job(recipe, torch.device("cpu"), tmp_path)
    lm_targets = make_recipe(tiny_sd, shared, tmp_path, adapter={"target_modules": ["q_proj", "v_proj"]})
    with pytest.raises(NoraError, match="to_q"):
        build_dreambooth_job(lm_targets, torch.device("cpu"), tmp_path)
