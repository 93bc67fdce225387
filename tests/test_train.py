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

from nora_cli.config.load import load_recipe
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
    assert meta["fast_paths"] == ["gather", "onednn", "split"]  # fp32 on CPU, no dropout
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
    # each step logs the lr it used: 1 warmup step from 0 (1/2 of lr), then linear decay to 0 over 5 steps
    assert [r["lr"] for r in train_rows] == pytest.approx([5e-3, 1e-2, 8e-3, 6e-3, 4e-3, 2e-3], rel=1e-12)


def test_thread_choice_is_recorded_in_nora_json_and_metrics(tmp_path: Path, tiny_llama_dir: Path) -> None:
    recipe = _recipe(tmp_path, tiny_llama_dir, **{"train.max_steps": 2, "train.save_steps": None,
                                                 "train.eval_steps": None, "train.warmup_steps": 0})
    env = {k: v for k, v in ENV.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")}
    proc = _nora("train", str(recipe), "--threads", "1", env=env)
    assert proc.returncode == 0, proc.stderr
    info = json.loads((tmp_path / "out" / "nora.json").read_text())["threads"]
    assert info["count"] == 1 and info["source"] == "train.threads" and info["adaptive"] is False
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["threads"] for r in steps] == [1, 1] and all(r["step_s"] > 0 for r in steps)


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
    assert "resuming from" in proc.stderr and "(step 4/6)" in proc.stderr
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


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in _metrics(out) if "loss" in r]


def _train(tmp: Path, model_dir: Path, **overrides: object) -> Path:
    """One in-process run in its own folder; returns the output dir."""
    tmp.mkdir()
    recipe = load_recipe(str(_recipe(tmp, model_dir, **{"train.save_steps": None, **overrides})))
    train_recipe(recipe, tmp / "out")
    return tmp / "out"


def test_4bit_validation_does_not_change_training(tmp_path: Path, tiny_llama_dir: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """On AVX512-BF16 CPUs bitsandbytes repacks Linear4bit weights for inference on the first eval-mode,
    no-grad forward, i.e. at validation; training must go on exactly as without validation. This AMD CPU
    lacks the instructions, so make bnb believe it has them (it checks once, building each Linear4bit)."""
    monkeypatch.setattr("bitsandbytes.nn.modules.has_avx512bf16", lambda: True)
    common = {"model.quantization": "4bit", "train.max_steps": 3, "train.eval_steps": None}
    plain = _train(tmp_path / "plain", tiny_llama_dir, **common)
    validated = _train(tmp_path / "val", tiny_llama_dir, **{**common, "train.eval_steps": 1})
    assert [r["step"] for r in _metrics(validated) if "val_loss" in r] == [1, 2, 3]
    losses = [_losses(out) for out in (plain, validated)]
    assert losses[0] == losses[1]
    a, b = _final_adapter(plain), _final_adapter(validated)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_gradient_checkpointing_matches_the_plain_run(tmp_path: Path, tiny_llama_dir: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Checkpointing recomputes each layer outside the fast paths' context, so the forward must not differ
    from the recompute (eager attention did, and torch.utils.checkpoint refused). Recompute is exact, so the
    run equals a plain one with SDPA attention; with the eager fast path, bf16 scores shift it slightly."""
    common = {"train.mixed_precision": "bf16", "train.max_steps": 3, "train.eval_steps": None,
              "adapter.dropout": 0.1}  # dropout: the recompute must replay the same masks
    eager = _train(tmp_path / "eager", tiny_llama_dir, **common)
    checkpointed = _train(tmp_path / "ckpt", tiny_llama_dir,
                          **{**common, "model.gradient_checkpointing": True})
    monkeypatch.setenv("NORA_DISABLE_FAST_PATHS", "eager")
    sdpa = _train(tmp_path / "sdpa", tiny_llama_dir, **common)
    losses = {out.parent.name: _losses(out) for out in (eager, checkpointed, sdpa)}
    assert len(losses["ckpt"]) == 3 and losses["ckpt"] == losses["sdpa"]
    assert losses["ckpt"] == pytest.approx(losses["eager"], rel=1e-4)
    a, b = _final_adapter(checkpointed), _final_adapter(sdpa)
    assert all(torch.equal(a[k], b[k]) for k in a)
    paths = {out.parent.name: json.loads((out / "nora.json").read_text())["fast_paths"]
             for out in (eager, checkpointed, sdpa)}
    assert paths == {"eager": ["gather", "low_precision", "eager", "split", "dropout"],
                     "ckpt": ["gather", "split", "dropout"],
                     "sdpa": ["gather", "low_precision", "split", "dropout"]}


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is refused only without CUDA")
def test_fp16_on_cpu_is_refused_before_loading(tmp_path: Path) -> None:
    """accelerate drops fp16 on CPU and trains in fp32 without a word: refuse it, before the model loads
    (the model folder here has no weights, so a load would fail with another message)."""
    model = tmp_path / "model"
    model.mkdir()
    config = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
              "intermediate_size": 128, "vocab_size": 100}
    (model / "config.json").write_text(json.dumps(config))
    recipe = _recipe(tmp_path, model, **{"train.mixed_precision": "fp16"})
    nora = Path(sys.executable).with_name("nora")
    proc = subprocess.run([str(nora), "train", str(recipe)], capture_output=True, text=True, env=ENV,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    expected = ("error: train.mixed_precision=fp16 needs a CUDA GPU "
                "(on CPU it would silently train in fp32); use bf16 or no")
    assert proc.stderr.strip().splitlines() == [expected]
    assert not (tmp_path / "out").exists()


def _cpu_fp16_scaler_accelerator(recipe: object) -> object:
    """accelerate's fp16 path (autocast + GradScaler) on CPU, where accelerate itself would not turn it on:
    torch's GradScaler works on CPU, so the loop's scaler branch runs here as it does on CUDA."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(mixed_precision="fp16", cpu=True)
    accelerator.native_amp = True
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    return accelerator


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_fp16_scaler_skips_a_gradient_the_preconditioner_made_non_finite(
        tmp_path: Path, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
        policy: str) -> None:
    """GradScaler checks the gradients when they are unscaled, before NoRA+ preconditions them; with λ = 0 a
    singular Gram matrix turns finite gradients into inf after that check. The loop must catch it."""
    from nora_cli.loop.loop import NonFiniteLoss
    from nora_cli.optim import Preconditioner

    real_apply = Preconditioner.apply

    def apply_then_inf_at_step_2(self: Preconditioner) -> None:
        real_apply(self)
        if self.step == 2:
            grad = next(p.grad for p in self.model.parameters() if p.grad is not None)
            grad.view(-1)[0] = torch.inf

    monkeypatch.setattr("nora_cli.train.make_accelerator", _cpu_fp16_scaler_accelerator)
    monkeypatch.setattr(Preconditioner, "apply", apply_then_inf_at_step_2)
    overrides = {"train.max_steps": 3, "train.eval_steps": None, "train.nan_policy": policy}
    if policy == "stop":
        with pytest.raises(NonFiniteLoss, match="non-finite gradient norm at step 2"):
            _train(tmp_path / "run", tiny_llama_dir, **overrides)
        return
    out = _train(tmp_path / "run", tiny_llama_dir, **overrides)
    assert "skipped step 2: non-finite gradient norm" in capsys.readouterr().err
    assert len(_losses(out)) == 3
    assert all(torch.isfinite(v).all() for v in _final_adapter(out).values())


def test_four_micro_batches_equal_one_batch_four_times_larger(tmp_path: Path, tiny_llama_dir: Path) -> None:
    """Gradient accumulation through the real loop: the loss is normalized by the step's token count and
    NoRA+'s preconditioner runs once per optimizer step, so 4 × 2 examples train like 1 × 8. Applying the
    preconditioner per micro-batch compounds it (moves the adapter by ~5e-2 here); fp32 summation order
    moves it by ~1e-6."""
    common = {"train.max_steps": 4, "train.eval_steps": None, "train.batch_size": 8, "adapter.dropout": 0.0}
    accumulated = _train(tmp_path / "accum", tiny_llama_dir, **{**common, "train.micro_batch_size": 2})
    one_batch = _train(tmp_path / "big", tiny_llama_dir, **{**common, "train.micro_batch_size": 8})
    assert _losses(accumulated) == pytest.approx(_losses(one_batch), abs=1e-5)
    a, b = _final_adapter(accumulated), _final_adapter(one_batch)
    assert any(k.endswith("lora_A.weight") and a[k].abs().max() > 1e-2 for k in a)  # training moved A from 0
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=5e-6, rtol=0)
