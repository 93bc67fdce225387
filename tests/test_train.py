"""`nora train` end to end: outputs, pinned losses, kill-and-resume, 2-process DDP, real SmolLM2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from nora_cli.recipe import load_recipe
from nora_cli.train import train_recipe

# One intra-op thread: MKL/OpenMP may otherwise pick the thread count per call from the machine's
# load, which changes float reduction order; NoRA+'s normalized (AAᵀ+λI)⁻¹ then amplifies those
# last-bit differences. At a fixed thread count the CPU kernels here are deterministic.
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
       "MKL_NUM_THREADS": "1"}


def _write_data(path: Path, n: int = 48) -> Path:
    """Alpaca-format records with a learnable pattern (the answer is a function of the question)."""
    words = ["red", "blue", "green", "gold", "gray", "pink", "teal", "plum"]
    rows = []
    for i in range(n):
        a, b = words[i % 8], words[(i * 3 + 1) % 8]
        rows.append({"instruction": f"Join the colors {a} and {b}.", "input": "", "output": f"{a}-{b}"})
    path.write_text(json.dumps(rows))
    return path


def _recipe(tmp: Path, model_dir: Path, **overrides: object) -> Path:
    recipe = {
        "method": "nora+",
        "seed": 3,
        "model": {"source": str(model_dir)},
        "adapter": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "up_proj"]},
        "optimizer": {"lr": 1e-2},
        "data": {"path": str(_write_data(tmp / "data.json")), "cutoff_len": 64, "val_set_size": 8},
        "train": {"max_steps": 6, "batch_size": 4, "micro_batch_size": 2, "save_steps": 2, "keep_last": 2,
                  "eval_steps": 3, "warmup_steps": 1},
        "output": {"dir": str(tmp / "out")},
    }
    for key, value in overrides.items():
        section, _, field = key.partition(".")
        recipe.setdefault(section, {})[field] = value
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _nora(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nora_cli", *args], capture_output=True, text=True,
                          env=env or ENV, timeout=timeout)


def test_tiny_end_to_end_outputs_and_pinned_losses(tmp_path: Path, tiny_llama_dir: Path) -> None:
    recipe = _recipe(tmp_path, tiny_llama_dir)
    proc = _nora("train", str(recipe))
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True and config["r"] == 4 and config["lora_alpha"] == 8
    assert set(config["target_modules"]) == {"q_proj", "v_proj", "up_proj"}
    assert (out / "adapter_model.safetensors").is_file() and (out / "loss.png").stat().st_size > 1000
    meta = json.loads((out / "nora.json").read_text())
    assert meta["method"] == "nora+" and meta["init"] == {"name": "nystrom", "sigma": 0.1, "side": "output", "seed": 3}
    assert meta["precondition"]["kind"] == "scaled-gd" and meta["precondition"]["normalize"] is True
    assert "torch" in meta["versions"]
    assert load_recipe(str(out / "recipe.yaml")).adapter.r == 4  # the resolved recipe reloads
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
    for key in ("epoch", "lr", "grad_norm", "tokens_per_s", "peak_mem_mb"):
        assert key in train_rows[0]
    assert [r["step"] for r in rows if "val_loss" in r] == [3, 6]
    # keep_last=2 with save_steps=2 over 6 steps: only step 2 and 4 are checkpoints (6 is final)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    # Pinned losses of this exact run (torch 2.13 CPU, fp32). A change here means the math changed.
    losses = [r["loss"] for r in train_rows]
    assert losses == pytest.approx(PINNED_LOSSES, abs=2e-4), losses


PINNED_LOSSES = [10.806291, 10.819923, 10.776739, 10.730551, 10.696571, 10.676927]


def _final_adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter_model.safetensors"))


def test_kill_and_resume_is_bitwise_identical(tmp_path: Path, tiny_llama_dir: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    ref = _recipe(tmp_path / "a", tiny_llama_dir, **{"adapter.dropout": 0.1})
    assert _nora("train", str(ref)).returncode == 0
    crashed = _recipe(tmp_path / "b", tiny_llama_dir, **{"adapter.dropout": 0.1})
    proc = _nora("train", str(crashed), env={**ENV, "NORA_FAULT_KILL_AT_STEP": "4"})
    assert proc.returncode == -9  # SIGKILL right after the step-4 checkpoint
    out = tmp_path / "b" / "out"
    assert not (out / "adapter_model.safetensors").exists()
    assert (out / "checkpoints" / "step-000004" / "state.json").is_file()
    # a half-written checkpoint must be ignored by --resume
    (out / "checkpoints" / ".tmp-step-000005").mkdir()
    proc = _nora("train", str(crashed), "--resume")
    assert proc.returncode == 0, proc.stderr
    assert "resuming from" in proc.stdout and "step 4/6" in proc.stdout
    a, b = _final_adapter(tmp_path / "a" / "out"), _final_adapter(out)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_existing_output_dir_is_refused_and_untouched(tmp_path: Path, tiny_llama_dir: Path) -> None:
    recipe = _recipe(tmp_path, tiny_llama_dir)
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    proc = _nora("train", str(recipe))
    assert proc.returncode == 2
    assert "not empty" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert (out / "precious.txt").read_text() == "keep me"
    proc = _nora("train", str(recipe), "--overwrite")  # not a nora run dir: still refused
    assert proc.returncode == 2 and (out / "precious.txt").exists()


def test_two_processes_match_one_process(tmp_path: Path, tiny_llama_dir: Path) -> None:
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one = _recipe(tmp_path / "one", tiny_llama_dir, **{"train.max_steps": 3, "train.save_steps": None,
                                                      "train.eval_steps": None})
    two = _recipe(tmp_path / "two", tiny_llama_dir, **{"train.max_steps": 3, "train.save_steps": None,
                                                      "train.eval_steps": None, "train.micro_batch_size": 1})
    assert _nora("train", str(one)).returncode == 0
    proc = _nora("train", str(two), "--num-processes", "2", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out2 = tmp_path / "two" / "out"
    assert json.loads((out2 / "nora.json").read_text())["num_processes"] == 2
    rows = [json.loads(line) for line in (out2 / "metrics.jsonl").read_text().splitlines()]
    sums = next(r["rank_param_checksums"] for r in rows if "rank_param_checksums" in r)
    assert len(sums) == 2 and sums[0] == sums[1]  # both ranks hold the same adapter
    a, b = _final_adapter(tmp_path / "one" / "out"), _final_adapter(out2)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0)
    # and training really moved the adapter (B starts at W0·Ω, A at 0)
    assert any(k.endswith("lora_A.weight") and a[k].abs().max() > 0 for k in a)


def test_real_smollm2_adapter_loads_with_vanilla_peft(tmp_path: Path, smollm2_dir: Path, shared: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    recipe = load_recipe(
        "smollm2-135m-commonsense",
        [f"data.path={shared / 'data/commonsense/ARC-Easy/train.json'}", "data.max_samples=16", "data.cutoff_len=64",
         "train.max_steps=2", "train.warmup_steps=0", "train.batch_size=4", "train.micro_batch_size=4", "train.save_steps=null",
         "train.eval_steps=null", "data.val_set_size=0", "adapter.r=4", "adapter.dropout=0.0",
         f"output.dir={tmp_path / 'out'}"],
    )
    summary = train_recipe(recipe, tmp_path / "out")
    trained = summary["model"].eval()
    out = tmp_path / "out"
    assert json.loads((out / "nora.json").read_text())["base_model"] == "smollm2-135m"
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, out).eval()
    ids = torch.tensor([[1, 504, 3458, 314, 253, 1233, 30, 2]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, trained(ids).logits, atol=1e-5, rtol=0)
        # the adapter is not a no-op: it changes the logits relative to the base
        with loaded.disable_adapter():
            assert (loaded(ids).logits - trained(ids).logits).abs().max() > 1e-4
