"""An unreachable (or switched-off) hub: one line and exit 2 in seconds, or the cached copy, never retries.

Each test runs the installed `nora` console script with HF_ENDPOINT pointed at a closed local port and an
empty HF cache, so the hub really is unreachable; huggingface_hub's backoff alone would take ~23 s per file.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

NORA = Path(sys.executable).with_name("nora")
SECONDS = 20  # imports on a loaded 2-core machine take ~10 s; the old retries alone took 23 s (LM) and minutes (SD)


def _closed_port() -> int:
    """A local port nobody listens on: connecting is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(hf_home: Path, *, offline: bool = False) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_CACHE")}
    env.update(HF_HOME=str(hf_home), HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}", OMP_NUM_THREADS="1")
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return env


def _run(args: list[str], env: dict[str, str], cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    proc = subprocess.run([str(NORA), *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)
    return proc, time.monotonic() - start


def _assert_one_line_fast(proc: subprocess.CompletedProcess, seconds: float, repo: str, reason: str) -> None:
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert reason in lines[0] and repo in lines[0] and "--set model.source=" in lines[0]
    assert seconds < SECONDS, f"took {seconds:.1f} s"


@pytest.mark.parametrize("offline", [False, True], ids=["unreachable", "HF_HUB_OFFLINE"])
def test_lm_hub_id_fails_fast_with_one_line(tmp_path: Path, offline: bool) -> None:
    proc, seconds = _run(["train", "smollm2-135m-demo", "--set", "model.source=HuggingFaceTB/SmolLM2-135M",
                          "-o", str(tmp_path / "out")], _env(tmp_path / "hf", offline=offline), tmp_path)
    _assert_one_line_fast(proc, seconds, "HuggingFaceTB/SmolLM2-135M",
                          "HF_HUB_OFFLINE is set" if offline else "cannot reach http://127.0.0.1:")
    assert not (tmp_path / "out").exists()


def test_dreambooth_hub_id_fails_fast_with_one_line(tmp_path: Path, shared: Path) -> None:
    dog = shared / "data" / "dreambooth" / "dog"
    proc, seconds = _run(["train", "sd14-dreambooth-dog", "--set", f"dreambooth.instance_data_dir={dog}",
                          "--set", "train.mixed_precision=no",  # the recipe's fp16 needs CUDA
                          "-o", str(tmp_path / "out")], _env(tmp_path / "hf"), tmp_path)
    _assert_one_line_fast(proc, seconds, "CompVis/stable-diffusion-v1-4", "cannot reach http://127.0.0.1:")


def test_unreachable_hub_trains_from_the_cached_snapshot(tmp_path: Path, tiny_llama_dir: Path) -> None:
    """A hub id already in the HF cache trains with the hub down, without a single retry."""
    repo = tmp_path / "hf" / "hub" / "models--nora-test--tiny"
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    for file in tiny_llama_dir.iterdir():
        (snapshot / file.name).symlink_to(file)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    rows = [{"instruction": f"Say {w}.", "input": "", "output": w} for w in ["red", "blue", "gold", "teal"] * 2]
    (tmp_path / "data.json").write_text(json.dumps(rows))
    recipe = {"method": "nora", "model": {"source": "nora-test/tiny"},
              "adapter": {"r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]},
              "data": {"path": "data.json", "cutoff_len": 32},
              "train": {"max_steps": 2, "batch_size": 2, "micro_batch_size": 2}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    proc, _ = _run(["train", str(tmp_path / "recipe.yaml"), "-o", str(tmp_path / "out")], _env(tmp_path / "hf"),
                   tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Retrying" not in proc.stderr and "error" not in proc.stderr
    meta = json.loads((tmp_path / "out" / "nora.json").read_text())
    assert "nora-test/tiny" in json.dumps(meta) and (tmp_path / "out" / "adapter_model.safetensors").is_file()
