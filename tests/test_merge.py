"""`nora merge`: streamed merge == base + adapter, clean PEFT export, PiSSA conversion, refusals, memory."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from nora_cli.export.convert import save_converted_adapter
from nora_cli.merge import merge_adapter
from nora_cli.models import load_causal_lm, resolve_source
from nora_cli.tasks.causal_lm.verify import verify_merge

SMOL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = torch.tensor([[1, 17, 42, 7, 99, 3, 64]])


def run_cli(args: list, capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """`nora ARGS` through the real entry point (error table + exit codes), in-process."""
    from nora_cli import cli

    capsys.readouterr()  # drop what the test printed before (progress bars)
    code = 0
    with mock.patch.object(sys, "argv", ["nora", *map(str, args)]):
        try:
            cli.main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def randomize(peft_model, std: float = 0.02, seed: int = 0) -> None:
    """Non-zero factors: a stand-in for a trained adapter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                param.add_(torch.randn(param.shape, generator=gen) * std)


def write_adapter(peft_model, path: Path, base: str, **nora) -> Path:
    peft_model.save_pretrained(path)
    (path / "nora.json").write_text(json.dumps({"task": "causal-lm", "base_model": base, **nora}))
    return path


def logits(model, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids).logits.double()


def tiny_base(path: Path, config=None, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    config = config or LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def snapshot(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


# ---------------------------------------------------------------- SmolLM2-135M (real model)


@pytest.fixture(scope="module")
def smol_adapter(tmp_path_factory) -> Path:
    """Rank-8 adapter with random factors on all 7 projections of SmolLM2-135M (nora.json names the alias)."""
    model, tokenizer = load_causal_lm("smollm2-135m")
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=SMOL_TARGETS,
                                                  task_type="CAUSAL_LM"))
    randomize(peft_model)
    adapter = write_adapter(peft_model, tmp_path_factory.mktemp("smol") / "adapter", "smollm2-135m")
    tokenizer.model_max_length = 1234  # training saves its (possibly changed) tokenizer with the adapter
    tokenizer.save_pretrained(adapter)
    return adapter


@pytest.mark.slow
def test_smollm2_merge_verify_and_reload_match(smol_adapter, tmp_path, capsys):
    out = tmp_path / "merged"
    code, stdout, stderr = run_cli(["merge", "--adapter", smol_adapter, "--out", out, "--verify"], capsys)
    assert code == 0, stderr
    assert "streaming safetensors merge; 210 weights changed" in stdout
    assert "peak RSS" in stdout and ": OK" in stdout
    assert {"config.json", "generation_config.json", "tokenizer.json", "model.safetensors"} <= set(os.listdir(out))
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 1234  # the adapter's

    effect = float(re.search(r"adapter effect ([0-9.e+-]+)", stdout).group(1))
    assert effect > 0.5  # the adapter matters, so a missed layer would show

    # fp64 on both sides isolates the merge (its fp32 rounding) from fp32 evaluation noise (~5e-5 here)
    base_dir = resolve_source("smollm2-135m").name_or_path
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float64),
                                          smol_adapter).eval()
    ref = logits(reference)
    del reference
    merged = logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64).eval())
    assert (merged - ref).abs().max() < 1e-4


@pytest.mark.slow
def test_streaming_peak_rss_stays_below_model_size(smol_adapter, tmp_path):
    """0.54 GB fp32 model in 100 MB shards: the merge subprocess needs far less than the model above imports."""
    model, tokenizer = load_causal_lm("smollm2-135m")
    base = tmp_path / "base"
    model.save_pretrained(base, max_shard_size="100MB")
    tokenizer.save_pretrained(base)
    del model
    size = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    assert len(list(base.glob("*.safetensors"))) >= 5 and size > 5e8
    child = (
        "import json, resource, sys, peft, transformers, torch\n"
        "from nora_cli.merge import merge_adapter\n"
        "r0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "merge_adapter(sys.argv[1], sys.argv[2], base=sys.argv[3], max_shard_size='100MB')\n"
        "print(json.dumps({'imports_kib': r0}))\n"
    )
    # Linux copies the spawning process's peak RSS into a child's ru_maxrss at exec, and this pytest
    # process holds SmolLM2: a small launcher spawns the merge and reports getrusage(RUSAGE_CHILDREN).
    launcher = (
        "import json, resource, subprocess, sys\n"
        "proc = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "print(json.dumps({'rc': proc.returncode, 'out': proc.stdout, 'err': proc.stderr[-2000:],\n"
        "                  'children_kib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))\n"
    )
    out = tmp_path / "merged"
    argv = [sys.executable, "-c", launcher, sys.executable, "-c", child, str(smol_adapter), str(out), str(base)]
    result = json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)
    assert result["rc"] == 0, result["err"]
    imports_kib = json.loads(result["out"].strip().splitlines()[-1])["imports_kib"]
    above = (result["children_kib"] - imports_kib) * 1024
    assert imports_kib < 1.5 * 2**20  # the child's baseline is its own (torch + transformers + peft), not ours
    assert above < 0.5 * size, f"merge used {above / 2**20:.0f} MiB above imports for a {size / 2**20:.0f} MiB model"
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= 5 and (out / "model.safetensors.index.json").is_file()
    assert all(f.stat().st_size < 125e6 for f in shards)  # 100 MB, or one tensor (the 113 MB embedding)


def test_wrong_base_is_refused_before_writing(smol_adapter, tmp_path, capsys):
    other = tiny_base(tmp_path / "tiny-llama")
    out = tmp_path / "merged"
    code, _, stderr = run_cli(["merge", "--adapter", smol_adapter, "--base", other, "--out", out], capsys)
    assert code == 2
    assert stderr.startswith("error: adapter does not fit base") and stderr.count("\n") == 1
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["tiny-llama"]  # no staging dir left

    narrow = tiny_base(tmp_path / "narrow", LlamaConfig(hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(other), LoraConfig(r=4, target_modules=["o_proj"]))
    adapter = write_adapter(peft_model, tmp_path / "adapter", str(narrow))
    code, _, stderr = run_cli(["merge", "--adapter", adapter, "--out", out], capsys)
    assert code == 2 and "2 weight shapes differ" in stderr and "base has (32, 32)" in stderr
    assert not out.exists()


def test_existing_out_dir_is_refused_and_untouched(smol_adapter, tmp_path, capsys):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    before = snapshot(out)
    code, _, stderr = run_cli(["merge", "--adapter", smol_adapter, "--out", out], capsys)
    assert code == 2 and "pass --overwrite" in stderr
    assert snapshot(out) == before and sorted(os.listdir(tmp_path)) == ["merged"]


# ---------------------------------------------------------------- tiny models (fast, exotic layouts)


@pytest.mark.parametrize(
    "case",
    [
        # tied embeddings, LoRA on both sides of the tie (+ PEFT saving the embedding base layers)
        dict(config=dict(tie_word_embeddings=True), lora=dict(target_modules=["q_proj", "embed_tokens", "lm_head"]),
             untied=True),
        # rsLoRA with rank/alpha patterns, plus full modules_to_save weights
        dict(config={}, lora=dict(target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True,
                                  rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3.0},
                                  modules_to_save=["norm"])),
        # GPT-2 Conv1D layers (fan_in_fan_out) with tied embeddings
        dict(gpt2=True, lora=dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
    ],
    ids=["tied-embeddings", "rslora-patterns-modules-to-save", "gpt2-conv1d"],
)
def test_tiny_streaming_merge_matches_peft(case, tmp_path):
    if case.get("gpt2"):
        config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=32)
    else:
        config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=128, **case["config"])
    base = tiny_base(tmp_path / "base", config)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                                LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **case["lora"]))
    randomize(peft_model, std=0.1)
    adapter = write_adapter(peft_model, tmp_path / "adapter", str(base))
    ref = logits(peft_model.eval())

    report = merge_adapter(adapter, tmp_path / "out", max_shard_size="40KB")
    merged_dir = tmp_path / "out"
    merged = logits(AutoModelForCausalLM.from_pretrained(merged_dir).eval())
    assert report.method.startswith("streaming") and len(report.files) > 1
    assert (merged - ref).abs().max() < 1e-5
    assert (ref - logits(AutoModelForCausalLM.from_pretrained(base).eval())).abs().max() > 0.01
    index = json.loads((merged_dir / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == report.files
    tied = json.loads((merged_dir / "config.json").read_text())["tie_word_embeddings"]
    assert tied is (config.tie_word_embeddings and not case.get("untied", False))
    assert any("untied" in note for note in report.notes) == case.get("untied", False)


def test_dora_falls_back_to_peft_merge(tmp_path):
    base = tiny_base(tmp_path / "base")
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                                LoraConfig(r=4, target_modules=["q_proj", "up_proj"], use_dora=True))
    randomize(peft_model, std=0.1)
    adapter = write_adapter(peft_model, tmp_path / "adapter", str(base))
    report = merge_adapter(adapter, tmp_path / "out", dtype="bf16")
    assert report.method == "load + PEFT merge_and_unload" and "DoRA" in report.notes[0]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert merged.dtype == torch.bfloat16
    assert (logits(merged.float().eval()) - logits(peft_model.eval())).abs().max() < 0.05


def test_bf16_export_and_quantized_training_note(tmp_path):
    base = tiny_base(tmp_path / "base")
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                                LoraConfig(r=4, target_modules=["q_proj", "o_proj"], init_lora_weights=False))
    adapter = write_adapter(peft_model, tmp_path / "adapter", str(base), quantization="4bit")
    (tmp_path / "out").mkdir()  # an empty --out is fine without --overwrite
    report = merge_adapter(adapter, tmp_path / "out", dtype="bf16", verify=True)
    assert report.dtype == "bf16" and report.verify is not None and report.verify.passed
    assert any("4bit-quantized base" in note and "full-precision" in note for note in report.notes)
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.offset_keys()} == {"BF16"}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"


def test_overwrite_replaces_out_dir(tmp_path, capsys):
    base = tiny_base(tmp_path / "base")
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                                LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    adapter = write_adapter(peft_model, tmp_path / "adapter", str(base))
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old export")
    code, stdout, stderr = run_cli(["merge", "--adapter", adapter, "--out", out, "--overwrite"], capsys)
    assert code == 0, stderr
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(os.listdir(tmp_path)) == ["adapter", "base", "out"]  # no staging / old dirs left
    code, _, stderr = run_cli(["merge", "--adapter", adapter, "--out", adapter, "--overwrite"], capsys)
    assert code == 2 and "contains the adapter" in stderr and (adapter / "adapter_config.json").is_file()


def test_verify_catches_a_wrong_merge_and_exits_1(tmp_path, capsys, monkeypatch):
    import nora_cli.export.streaming as streaming

    base = tiny_base(tmp_path / "base")
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                                LoraConfig(r=4, target_modules=["v_proj"], init_lora_weights=False))
    randomize(peft_model, std=0.1)
    adapter = write_adapter(peft_model, tmp_path / "adapter", str(base))
    out = tmp_path / "out"
    out.mkdir()
    (out / "previous.txt").write_text("good export")
    drop_layer_1 = streaming.merged_tensor  # a merge bug: the last layer's delta gets lost

    def buggy(weight, upd, dtype):
        return drop_layer_1(weight, None if upd and ".1." in upd.key else upd, dtype)

    monkeypatch.setattr(streaming, "merged_tensor", buggy)
    code, _, stderr = run_cli(["merge", "--adapter", adapter, "--out", out, "--overwrite", "--verify"], capsys)
    assert code == 1 and "FAILED" in stderr and "was left unchanged" in stderr
    assert os.listdir(out) == ["previous.txt"] and sorted(os.listdir(tmp_path)) == ["adapter", "base", "out"]


def test_peft_format_is_clean_and_loads(tmp_path):
    base = tiny_base(tmp_path / "base")
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                                LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian"))
    randomize(peft_model, std=0.1)
    adapter = write_adapter(peft_model, tmp_path / "adapter", str(base))
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "nora_init": {"name": "nora"}}))

    report = merge_adapter(adapter, tmp_path / "peft", fmt="peft", dtype="bf16")
    clean = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert clean["init_lora_weights"] is True and "nora_init" not in clean
    assert sorted(os.listdir(tmp_path / "peft")) == ["adapter_config.json", "adapter_model.safetensors"]
    assert any("nora_init" in note for note in report.notes)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "peft")
    assert (logits(loaded.eval()) - logits(peft_model.eval())).abs().max() < 0.02  # bf16 factors
    check = verify_merge(adapter, tmp_path / "peft", fmt="peft", dtype="bf16")
    assert check.passed and check.max_abs_diff > 0  # the bf16 cast is visible, and within tolerance


def test_missing_files_and_unknown_formats_exit_2(tmp_path, capsys):
    base = tiny_base(tmp_path / "base")
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, target_modules=["q_proj"]))
    adapter = write_adapter(peft_model, tmp_path / "adapter", str(base))
    cases = {
        "diffusers": (["--format", "diffusers"], "--format diffusers is not available for this adapter"),
        "dtype": (["--dtype", "fp8"], "--dtype 'fp8'"),
        "shard": (["--max-shard-size", "lots"], "--max-shard-size"),
    }
    for flags, message in cases.values():
        code, _, stderr = run_cli(["merge", "--adapter", adapter, "--out", tmp_path / "x", *flags], capsys)
        assert code == 2 and message in stderr, stderr
    (adapter / "nora.json").write_text(json.dumps({"task": "dreambooth", "base_model": str(base)}))
    code, _, stderr = run_cli(["merge", "--adapter", adapter, "--out", tmp_path / "x", "--format", "peft"], capsys)
    assert code == 2 and "not available for this adapter (task 'dreambooth')" in stderr
    code, _, stderr = run_cli(["merge", "--adapter", adapter, "--out", tmp_path / "x", "--verify"], capsys)
    assert code == 2 and "--verify is not available for --format diffusers (task 'dreambooth')" in stderr
    (adapter / "nora.json").unlink()
    (adapter / "adapter_model.safetensors").unlink()
    code, _, stderr = run_cli(["merge", "--adapter", adapter, "--out", tmp_path / "x"], capsys)
    assert code == 2 and "no adapter weights" in stderr
    (adapter / "adapter_config.json").unlink()
    code, _, stderr = run_cli(["merge", "--adapter", adapter, "--out", tmp_path / "x"], capsys)
    assert code == 2 and "no adapter_config.json" in stderr
    assert not (tmp_path / "x").exists()


def test_hub_id_base_resolves_to_offline_snapshot(tmp_path, monkeypatch, capsys):
    """A hub id base is read from the local HF cache (HF_HUB_OFFLINE=1 in tests), never downloaded."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    snap = cache / "models--nora-test--tiny" / "snapshots" / ("a" * 40)
    tiny_base(snap)
    (cache / "models--nora-test--tiny" / "refs").mkdir()
    (cache / "models--nora-test--tiny" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(snap),
                                LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    adapter = write_adapter(peft_model, tmp_path / "adapter", "nora-test/tiny")
    report = merge_adapter(adapter, tmp_path / "out")
    assert report.method.startswith("streaming") and report.base == "nora-test/tiny"
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert (logits(merged) - logits(peft_model.eval())).abs().max() < 1e-5
    code, _, stderr = run_cli(["merge", "--adapter", adapter, "--base", "nora-test/absent", "--out",
                               tmp_path / "out2"], capsys)
    assert code == 2 and "not in the local Hugging Face cache" in stderr


# ---------------------------------------------------------------- PiSSA -> plain LoRA conversion


def test_pissa_adapter_converts_to_lora_on_original_base(tmp_path, capsys):
    base = tiny_base(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights="pissa", modules_to_save=["lm_head"],
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                                        "embed_tokens"])
    peft_model = get_peft_model(model, config)
    initial = tmp_path / "initial_adapter"
    peft_model.save_pretrained(initial)  # right after get_peft_model, as training does
    initial_files = snapshot(initial)
    randomize(peft_model, std=0.05)  # "training"
    peft_model.train()
    trained = logits(peft_model.eval())
    peft_model.train()

    out = save_converted_adapter(peft_model, tmp_path / "adapter", initial)
    assert snapshot(initial) == initial_files  # PEFT would rewrite its adapter_config.json
    assert peft_model.training and list(peft_model.peft_config) == ["default"]
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["r"] == 8 and saved["lora_alpha"] == 16 and saved["init_lora_weights"] is True

    original = AutoModelForCausalLM.from_pretrained(base)  # the untouched base, not PiSSA's residual
    converted = PeftModel.from_pretrained(original, out).eval()
    assert (logits(converted) - trained).abs().max() < 1e-4
    assert (logits(AutoModelForCausalLM.from_pretrained(base).eval()) - trained).abs().max() > 0.01

    (out / "nora.json").write_text(json.dumps({"task": "causal-lm", "base_model": str(base)}))
    code, stdout, stderr = run_cli(["merge", "--adapter", out, "--out", tmp_path / "merged"], capsys)
    assert code == 0, stderr
    assert (logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()) - trained).abs().max() < 1e-4

    code, _, stderr = run_cli(["merge", "--adapter", initial, "--base", base, "--out", tmp_path / "bad"], capsys)
    assert code == 2 and "init_lora_weights='pissa'" in stderr  # unconverted: refused, not merged wrongly
