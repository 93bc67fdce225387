"""`nora sample`: reproducible images from a DreamBooth adapter, text from SmolLM2 (+ adapter), exit codes.

Torch runs single-threaded here: for models this small a second OpenMP thread only adds synchronization,
which costs up to 10x on a loaded 2-core CI machine.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_sd import build_tiny_sd_pipeline
from typer.testing import CliRunner

from nora_cli.cli import app
from nora_cli.config.schema import Recipe
from nora_cli.tasks.dreambooth.job import build_dreambooth_job

runner = CliRunner()
IMAGE_ARGS = ["--prompt", "a sks dog", "--steps", "3", "--height", "32", "--width", "32", "--scheduler", "ddim"]


DreamBoothRecipe = Recipe  # the dreambooth section is part of the schema


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread: None) -> None:
    """Small models: one thread (see conftest.one_thread)."""


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> Path:
    return build_tiny_sd_pipeline(tmp_path_factory.mktemp("tiny-sd") / "pipe")


@pytest.fixture(scope="module")
def trained(tiny_sd: Path, shared: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """A DreamBooth adapter as `nora train` leaves it (alpha 8 != r 4), with random A so the LoRA visibly changes
    images, and the in-memory model it was saved from."""
    out = tmp_path_factory.mktemp("adapter")
    recipe = DreamBoothRecipe.model_validate({
        "task": "dreambooth", "method": "nora", "model": {"source": str(tiny_sd)},
        "adapter": {"r": 4, "alpha": 8, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"], "sigma": 1.0},
        "dreambooth": {"instance_data_dir": str(shared / "data/dreambooth/dog"),
                       "instance_prompt": "a photo of sks dog", "resolution": 32},
    })
    job = build_dreambooth_job(recipe, torch.device("cpu"), out)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in job.model.named_parameters():
            if ".lora_A." in name:
                param.normal_(std=1.0)
    job.save_final(job.model, out)
    (out / "nora.json").write_text(json.dumps({"task": "dreambooth", "base_model": str(tiny_sd), **job.meta}))
    return out, job.model.eval()


@pytest.fixture(scope="module")
def adapter(trained: tuple[Path, Any]) -> Path:
    return trained[0]


@pytest.fixture(scope="module")
def sampled(adapter: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`nora sample --num-images 2 --seed 7` with the adapter: images 000 (seed 7) and 001 (seed 8)."""
    return run_sample(tmp_path_factory.mktemp("first"), "--adapter", str(adapter), "--num-images", "2",
                      "--seed", "7")


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def run_sample(out: Path, *args: str) -> Path:
    result = runner.invoke(app, ["sample", *args, *IMAGE_ARGS, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert str(out / "grid.png") in result.stdout  # written paths go to stdout
    return out


def test_images_are_written_reproducible_and_scaled(sampled: Path, adapter: Path, tiny_sd: Path,
                                                    tmp_path: Path) -> None:
    first = sampled
    second = run_sample(tmp_path / "second", "--adapter", str(adapter), "--num-images", "2", "--seed", "7")
    assert sorted(p.name for p in first.iterdir()) == ["000.png", "001.png", "grid.png", "samples.json"]
    records = json.loads((first / "samples.json").read_text())
    assert [(r["file"], r["seed"], r["prompt"], r["steps"]) for r in records] == [
        ("000.png", 7, "a sks dog", 3), ("001.png", 8, "a sks dog", 3)]
    assert all(r["adapter"] == str(adapter) and r["guidance"] == 7.5 and r["scheduler"] == "DDIMScheduler"
               for r in records)
    assert pixels(first / "000.png").shape == (32, 32, 3) and pixels(first / "grid.png").shape == (32, 64, 3)
    for name in ("000.png", "001.png", "grid.png"):
        assert np.array_equal(pixels(first / name), pixels(second / name))  # same seed, same pixels
    assert not np.array_equal(pixels(first / "000.png"), pixels(first / "001.png"))  # seed 7 vs 8

    base = pixels(run_sample(tmp_path / "base", "--model", str(tiny_sd), "--num-images", "1", "--seed", "7")
                  / "000.png")
    off = run_sample(tmp_path / "off", "--adapter", str(adapter), "--lora-scale", "0", "--num-images", "1",
                     "--seed", "7")
    assert np.array_equal(pixels(off / "000.png"), base)  # scale 0: exactly the base model
    assert np.abs(pixels(first / "000.png") - base).max() > 10  # scale 1: the adapter changes the picture


def test_images_match_plain_diffusers_and_the_trained_model(sampled: Path, trained: tuple[Path, Any],
                                                            tiny_sd: Path) -> None:
    """Plain diffusers `load_lora_weights(adapter)` with the same seeds, steps, guidance and scheduler draws the
    same pixels as `nora sample` (within 1/255), and so does the in-memory PEFT model the adapter was saved from,
    which applies alpha/r = 2 itself: the saved file has the trained strength."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    adapter, model = trained

    def draw(pipe: Any, **kwargs: Any) -> np.ndarray:
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        images = pipe(["a sks dog"] * 2, num_inference_steps=3, guidance_scale=7.5, height=32, width=32,
                      generator=[torch.Generator().manual_seed(s) for s in (7, 8)], output_type="np",
                      **kwargs).images
        return np.round(images * 255)

    cli = np.stack([pixels(sampled / name) for name in ("000.png", "001.png")])
    plain = StableDiffusionPipeline.from_pretrained(tiny_sd)
    plain.load_lora_weights(adapter)  # no nora code, default adapter name and weight
    assert np.abs(draw(plain) - cli).max() <= 1
    assert np.abs(draw(plain, cross_attention_kwargs={"scale": 0.5}) - cli).max() > 10  # strength matters
    in_memory = StableDiffusionPipeline.from_pretrained(tiny_sd, unet=model.unet)
    assert np.abs(draw(in_memory) - cli).max() <= 1


def test_allow_pickle_opts_in_to_pickled_base_weights(tiny_sd: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.from_pretrained(tiny_sd).save_pretrained(tmp_path / "pickled", safe_serialization=False)
    unet_files = [f.name for f in (tmp_path / "pickled/unet").iterdir()]  # (transformers 5 always writes safetensors)
    assert "diffusion_pytorch_model.bin" in unet_files and not [f for f in unet_files if f.endswith(".safetensors")]
    refused = runner.invoke(app, ["sample", "--model", str(tmp_path / "pickled"), *IMAGE_ARGS,
                                  "--out", str(tmp_path / "refused")])
    assert refused.exit_code == 2 and "--allow-pickle" in refused.stderr
    assert not (tmp_path / "refused").exists()
    args = ("--num-images", "1", "--seed", "3")
    pickled = run_sample(tmp_path / "from-pickle", "--model", str(tmp_path / "pickled"), "--allow-pickle", *args)
    safe = run_sample(tmp_path / "from-safetensors", "--model", str(tiny_sd), *args)
    assert np.array_equal(pixels(pickled / "000.png"), pixels(safe / "000.png"))


def test_bad_inputs_exit_2(adapter: Path, tmp_path: Path) -> None:
    cases = [
        (["--adapter", str(tmp_path / "missing"), "--prompt", "x"], "adapter directory not found"),
        (["--adapter", str(tmp_path), "--prompt", "x"], "not an adapter directory"),
        (["--adapter", str(adapter), "--prompt", "x", "--scheduler", "lms"], "unknown --scheduler"),
        (["--adapter", str(adapter), "--prompt", "x", "--max-new-tokens", "5"], "does not apply to images"),
        (["--adapter", str(adapter)], "at least one --prompt"),
        (["--adapter", str(adapter), "--prompt", "x", "--height", "30"], "multiple of 8"),
    ]
    for args, message in cases:
        result = runner.invoke(app, ["sample", *args])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.stderr


@pytest.fixture(scope="module")
def smollm2() -> tuple[Any, Any]:
    from nora_cli.models import load_causal_lm

    return load_causal_lm("smollm2-135m")


def test_text_from_smollm2_is_greedy_and_streamed(smollm2: tuple[Any, Any]) -> None:
    result = runner.invoke(app, ["sample", "--model", "smollm2-135m", "--prompt", "What is 2+2?",
                                 "--max-new-tokens", "8"])
    assert result.exit_code == 0, result.output
    model, tokenizer = smollm2
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], tokenize=False,
                                           add_generation_prompt=True)  # default: the model's chat template
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    greedy = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    expected = tokenizer.decode(greedy[0, ids.shape[1]:], skip_special_tokens=True)
    assert expected.strip() and result.stdout.strip() == expected.strip()


def test_text_from_a_causal_lm_adapter_uses_its_template(smollm2: tuple[Any, Any], tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    from nora_cli.data.templates import alpaca_prompt

    model, tokenizer = smollm2
    ids = tokenizer(alpaca_prompt("Name a color."), return_tensors="pt").input_ids
    base = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))  # B = 0: same outputs
    peft_model.save_pretrained(tmp_path)
    peft_model.unload()  # give the shared fixture its plain model back
    (tmp_path / "nora.json").write_text(json.dumps({"task": "causal-lm", "base_model": "smollm2-135m",
                                                    "prompt_template": "alpaca"}))
    result = runner.invoke(app, ["sample", "--adapter", str(tmp_path), "--prompt", "Name a color.",
                                 "--max-new-tokens", "6"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == tokenizer.decode(base[0, ids.shape[1]:], skip_special_tokens=True).strip()
    bad = runner.invoke(app, ["sample", "--adapter", str(tmp_path), "--prompt", "x", "--lora-scale", "2"])
    assert bad.exit_code == 2 and "does not apply to text" in bad.stderr
