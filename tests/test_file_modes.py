"""Outputs get the modes the user's umask asks for, like files from any other tool: the atomic writers stage
in mkstemp/mkdtemp (0600/0700), and what they rename into place must not keep those private modes."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

NORA = Path(sys.executable).with_name("nora")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.mark.parametrize(("umask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_outputs_follow_the_umask(tmp_path: Path, tiny_llama_dir: Path, umask: int, file_mode: int,
                                  dir_mode: int) -> None:
    rows = [{"instruction": f"Say {w}.", "input": "", "output": w} for w in ["red", "blue", "gold", "teal"] * 2]
    (tmp_path / "data.json").write_text(json.dumps(rows))
    recipe = {"method": "nora+", "model": {"source": str(tiny_llama_dir)},
              "adapter": {"r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]},
              "data": {"path": "data.json", "cutoff_len": 32, "val_set_size": 2},
              "train": {"max_steps": 3, "batch_size": 2, "micro_batch_size": 2, "save_steps": 1, "keep_last": None,
                        "eval_steps": 1, "save_best": True}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    out, merged = tmp_path / "run" / "out", tmp_path / "merged"

    def nora(*args: str) -> None:
        proc = subprocess.run([str(NORA), *args], capture_output=True, text=True, env=ENV, timeout=600,
                              preexec_fn=lambda: os.umask(umask))
        assert proc.returncode == 0, proc.stderr

    nora("train", str(tmp_path / "recipe.yaml"), "-o", str(out))
    nora("merge", "--adapter", str(out), "--out", str(merged))
    paths = {f"out/{p.relative_to(out)}": p for p in [out, *out.rglob("*")]}
    paths.update({f"merged/{p.relative_to(merged)}": p for p in [merged, *merged.rglob("*")]})
    for name in ("out/nora.json", "out/recipe.yaml", "out/adapter_model.safetensors", "out/checkpoints/step-000002",
                 "out/checkpoints/step-000001/state.json", "out/best/adapter_model.safetensors", "merged/.",
                 "merged/model.safetensors", "merged/config.json"):
        assert name in paths, sorted(paths)
    modes = {name: oct(stat.S_IMODE(p.stat().st_mode)) for name, p in paths.items()}
    assert modes == {name: oct(dir_mode if p.is_dir() else file_mode) for name, p in paths.items()}
