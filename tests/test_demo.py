"""The demo recipe as the README runs it: real SmolLM2-135M, built-in data, a clearly falling loss."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path


def test_demo_recipe_loss_falls(tmp_path: Path, smollm2_dir: Path) -> None:
    out = tmp_path / "demo"
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "nora_cli", "train", "smollm2-135m-demo", "--output-dir", str(out)],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=1500,
    )
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    k = max(1, len(losses) // 10)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    print(f"demo: {len(losses)} steps in {elapsed:.0f} s, loss {first:.3f} -> {last:.3f}")
    assert len(losses) == 30
    assert last <= 0.8 * first, (first, last)
    assert (out / "adapter_model.safetensors").is_file()
