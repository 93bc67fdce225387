"""Faults during `nora train`: signals, NaN/inf, a crash mid-checkpoint, bad output dirs, a full disk.

Each fault runs the real CLI in a subprocess on the tiny Llama (each start costs ~5 s of imports, so
faults are chained where one run can set up the next); resumed runs are compared bitwise with an
uninterrupted run of the same recipe (fixed seed, one CPU thread: the CPU kernels are deterministic).
SIGKILL right after a checkpoint: tests/test_train.py::test_kill_and_resume_is_bitwise_identical.
A failed --overwrite keeping the old run: tests/test_bad_input.py (every case checks nothing changed).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from nora_cli.config.load import load_recipe
from nora_cli.errors import NoraError

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
for _fault in ("NORA_FAULT_KILL_AT_STEP", "NORA_FAULT_NAN_AT_STEP", "NORA_FAULT_KILL_IN_CHECKPOINT"):
    ENV.pop(_fault, None)


def _write_recipe(folder: Path, model_dir: Path, **overrides: object) -> Path:
    """6 steps of NoRA+ with dropout (so RNG state matters), checkpoints every 2 steps."""
    folder.mkdir(parents=True, exist_ok=True)
    words = ["red", "blue", "green", "gold", "gray", "pink", "teal", "plum"]
    rows = [{"instruction": f"Join the colors {words[i % 8]} and {words[(i * 3 + 1) % 8]}.", "input": "",
             "output": f"{words[i % 8]}-{words[(i * 3 + 1) % 8]}"} for i in range(48)]
    (folder / "data.json").write_text(json.dumps(rows))
    recipe: dict = {
        "method": "nora+",
        "seed": 3,
        "model": {"source": str(model_dir)},
        "adapter": {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj", "up_proj"]},
        "optimizer": {"lr": 1e-2},
        "data": {"path": "data.json", "cutoff_len": 64},
        "train": {"max_steps": 6, "batch_size": 4, "micro_batch_size": 2, "save_steps": 2, "keep_last": 2,
                  "warmup_steps": 1},
        "output": {"dir": str(folder / "out")},
    }
    for key, value in overrides.items():
        section, _, field = key.partition(".")
        recipe[section][field] = value
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _nora(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nora_cli", *args], capture_output=True, text=True,
                          env=env or ENV, timeout=300)


def _error_line(stderr: str) -> str:
    """The CLI's one-line error: the last stderr line, and the only one starting with `error:`."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    assert sum(line.startswith("error:") for line in lines) == 1, stderr
    assert lines[-1].startswith("error:"), stderr
    return lines[-1]


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter_model.safetensors"))


def _assert_same_adapter(a: Path, b: Path) -> None:
    ta, tb = _adapter(a), _adapter(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key


def _train_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Path:
    """Output dir of one uninterrupted 6-step run: what every interrupted-and-resumed run must reproduce."""
    recipe = _write_recipe(tmp_path_factory.mktemp("reference"), tiny_llama_dir)
    proc = _nora("train", str(recipe))
    assert proc.returncode == 0, proc.stderr
    return recipe.parent / "out"


# --- signals -------------------------------------------------------------------------------------------


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.is_file() else 0


def _signal_after_next_step(args: list[str], metrics: Path, signum: int, logs: Path) -> tuple[int, str]:
    """Start `nora train`, wait until it logs one more step (so it is inside the loop), send `signum`."""
    before = _lines(metrics)
    with open(logs / "stdout", "w") as out, open(logs / "stderr", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "nora_cli", *args], stdout=out, stderr=err, env=ENV)
        deadline = time.monotonic() + 240
        while _lines(metrics) <= before and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, (logs / "stderr").read_text()
        proc.send_signal(signum)
        rc = proc.wait(timeout=240)
    return rc, (logs / "stderr").read_text()


def _stopped_checkpoint(stderr: str, name: str) -> tuple[int, Path]:
    line = next(line for line in stderr.splitlines() if line.startswith(f"stopped by {name}"))
    step = int(line.split(" at step ")[1].split("/")[0])
    path = Path(line.split("checkpoint saved: ")[1].split(" (")[0])
    return step, path


def test_sigint_and_sigterm_save_checkpoint_exit_130_143_and_resume(tmp_path: Path, tiny_llama_dir: Path) -> None:
    recipe = _write_recipe(tmp_path, tiny_llama_dir, **{"train.max_steps": 40, "train.batch_size": 2,
                                                        "train.save_steps": None})
    out = tmp_path / "out"
    metrics = out / "metrics.jsonl"

    rc, stderr = _signal_after_next_step(["train", str(recipe)], metrics, signal.SIGINT, tmp_path)
    assert rc == 130, stderr
    first, path = _stopped_checkpoint(stderr, "SIGINT")
    assert 1 <= first < 40 and path == out / "checkpoints" / f"step-{first:06d}"
    assert json.loads((path / "state.json").read_text())["step"] == first
    assert not (out / "adapter_model.safetensors").exists()

    rc, stderr = _signal_after_next_step(["train", str(recipe), "--resume"], metrics, signal.SIGTERM, tmp_path)
    assert rc == 143, stderr
    second, path = _stopped_checkpoint(stderr, "SIGTERM")
    assert first < second < 40 and (path / "state.json").is_file()

    proc = _nora("train", str(recipe), "--resume")
    assert proc.returncode == 0, proc.stderr
    assert f"(step {second}/40)" in proc.stderr  # the resume line, not a progress line
    assert _train_steps(out) == list(range(1, 41))
    assert not (out / "checkpoints").exists()  # save_steps null: the signal checkpoints were only for resuming
    adapter = _adapter(out)
    assert adapter and all(torch.isfinite(t).all() for t in adapter.values())


# --- NaN / inf -----------------------------------------------------------------------------------------


def test_nan_skip_leaves_weights_unchanged_and_finishes(tmp_path: Path, tiny_llama_dir: Path) -> None:
    recipe = _write_recipe(tmp_path, tiny_llama_dir, **{"train.nan_policy": "skip", "train.save_steps": 1,
                                                         "train.keep_last": None})
    proc = _nora("train", str(recipe), env={**ENV, "NORA_FAULT_NAN_AT_STEP": "3"})
    assert proc.returncode == 0, proc.stderr
    assert "skipped step 3: non-finite loss" in proc.stderr
    ckpts = tmp_path / "out" / "checkpoints"
    weights = {s: load_file(str(ckpts / f"step-{s:06d}" / "trainable.safetensors")) for s in (2, 3, 4)}
    for key in weights[2]:
        assert torch.equal(weights[2][key], weights[3][key]), key  # step 3 was skipped
    assert any(not torch.equal(weights[3][k], weights[4][k]) for k in weights[3])  # step 4 trained again
    adapter = _adapter(tmp_path / "out")
    assert adapter and all(torch.isfinite(t).all() for t in adapter.values())


# --- atomic checkpoints + NaN stop, resumed twice: still bitwise the uninterrupted run -------------------


def test_torn_checkpoint_then_nan_stop_then_resume_is_bitwise(tmp_path: Path, tiny_llama_dir: Path,
                                                             reference: Path) -> None:
    recipe = _write_recipe(tmp_path, tiny_llama_dir)
    out, ckpts = tmp_path / "out", tmp_path / "out" / "checkpoints"
    # 1. SIGKILL halfway through writing the step-4 checkpoint
    proc = _nora("train", str(recipe), env={**ENV, "NORA_FAULT_KILL_IN_CHECKPOINT": "4"})
    assert proc.returncode == -signal.SIGKILL
    partial = ckpts / ".tmp-step-000004"
    assert (partial / "trainable.safetensors").is_file() and not (partial / "state.json").exists()
    assert sorted(p.name for p in ckpts.iterdir() if not p.name.startswith(".")) == ["step-000002"]
    assert _train_steps(out) == [1, 2, 3, 4]  # the log ran ahead of the last complete checkpoint

    # 2. resume picks the previous checkpoint; then step 5's loss is NaN under nan_policy=stop
    proc = _nora("train", str(recipe), "--resume", env={**ENV, "NORA_FAULT_NAN_AT_STEP": "5"})
    assert proc.returncode == 1, proc.stderr
    assert f"resuming from {ckpts / 'step-000002'} (step 2/6)" in proc.stderr
    assert not partial.exists()  # the torn write was cleaned up
    line = _error_line(proc.stderr)
    assert "non-finite loss at step 5" in line and f"last good checkpoint {ckpts / 'step-000004'} is kept" in line
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000002", "step-000004"]
    assert not (out / "adapter_model.safetensors").exists()

    # 3. resume again: finishes, each step logged once, and the adapter equals the uninterrupted run's
    proc = _nora("train", str(recipe), "--resume")
    assert proc.returncode == 0, proc.stderr
    assert "resuming from" in proc.stderr and "(step 4/6)" in proc.stderr
    assert _train_steps(out) == [1, 2, 3, 4, 5, 6]
    _assert_same_adapter(reference, out)
    assert sorted(os.listdir(ckpts)) == sorted(os.listdir(reference / "checkpoints"))  # same as uninterrupted


# --- output dir checks before any heavy work ---------------------------------------------------------


@pytest.mark.parametrize(
    ("where", "message"),
    [("/proc/nora-cannot-write-here/run", "is not writable"),
     ("{tmp}/a-file/run", "cannot be created: {tmp}/a-file is not a directory")],
)
def test_unusable_output_dir_exits_2_before_loading(tmp_path: Path, where: str, message: str) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    recipe = _write_recipe(tmp_path, tmp_path / "no-model-here")  # would fail later, if it got that far
    started = time.monotonic()
    proc = _nora("train", str(recipe), "--output-dir", where.format(tmp=tmp_path))
    assert proc.returncode == 2
    assert message.format(tmp=tmp_path) in _error_line(proc.stderr)
    assert time.monotonic() - started < 30  # no torch/transformers work happened
    assert (tmp_path / "a-file").read_text() == "not a folder"


def test_not_enough_disk_exits_before_training(tmp_path: Path, tiny_llama_dir: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from nora_cli import train

    recipe = load_recipe(str(_write_recipe(tmp_path, tiny_llama_dir)))
    real = shutil.disk_usage
    monkeypatch.setattr(train.shutil, "disk_usage", lambda p: real(p)._replace(free=10 * 2**20))
    out = tmp_path / "out"
    with pytest.raises(NoraError, match=r"not enough disk space in .*: 10 MiB free, .* need about 64 MiB") as err:
        train.train_recipe(recipe, out)
    assert err.value.exit_code == 2
    assert not out.exists()  # created for this run, removed again: nothing trained, nothing left


def test_disk_estimate_counts_weights_moments_and_kept_checkpoints(tmp_path: Path) -> None:
    from nora_cli.train import _MARGIN, checkpoint_bytes_needed

    model = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.Linear(10, 3))
    model[1].requires_grad_(False)  # frozen: not checkpointed
    weights = 110 * 4
    path = _write_recipe(tmp_path, tmp_path)  # keep_last 2, save every 2 of 6 steps
    # AdamW: weights + 2 moments, 2 kept + 1 being written, + the final adapter
    assert checkpoint_bytes_needed(model, load_recipe(str(path)), 6) == weights * 3 * 3 + weights + _MARGIN
    sgd = load_recipe(str(path), ["optimizer.name=sgd", "train.keep_last=null", "train.save_steps=1"])
    assert checkpoint_bytes_needed(model, sgd, 6) == weights * 1 * 7 + weights + _MARGIN
