"""What `nora train` tells a user while it runs: plain progress lines when stderr is not a terminal, and
what happens on the first and second Ctrl-C. Each test runs the installed `nora` script on the tiny Llama."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

NORA = Path(sys.executable).with_name("nora")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
LINE = re.compile(r"step (\d+)/(\d+)  loss (\d+\.\d{4})  lr (\S+)  ([\d,]+) tokens/s  ETA (\d+:\d\d:\d\d)")


def _recipe(folder: Path, model_dir: Path, *, steps: int, batch: int = 2, micro: int = 2, words: int = 4) -> Path:
    rows = [{"instruction": f"Repeat {' '.join(['red', 'blue', 'gold', 'teal'][i % 4] for _ in range(words))}.",
             "input": "", "output": f"item {i}"} for i in range(max(8, batch))]
    (folder / "data.json").write_text(json.dumps(rows))
    recipe = {"method": "nora+", "seed": 0, "model": {"source": str(model_dir)},
              "adapter": {"r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]},
              "data": {"path": "data.json", "cutoff_len": 256},
              "train": {"max_steps": steps, "batch_size": batch, "micro_batch_size": micro, "warmup_steps": 2}}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.parametrize(("seconds", "expected"), [
    ("1e9", [1, *range(2, 21, 2), 21]),  # 21 steps: every ceil(21/20) = 2 steps, plus the first and last
    ("0", list(range(1, 22))),  # the time rule alone: a line whenever NORA_PROGRESS_SECONDS have passed
])
def test_piped_stderr_gets_plain_progress_lines(tmp_path: Path, tiny_llama_dir: Path, seconds: str,
                                                expected: list[int]) -> None:
    recipe = _recipe(tmp_path, tiny_llama_dir, steps=21)
    proc = subprocess.run([str(NORA), "train", str(recipe), "-o", str(tmp_path / "out")], capture_output=True,
                          text=True, env={**ENV, "NORA_PROGRESS_SECONDS": seconds}, timeout=600)
    assert proc.returncode == 0, proc.stderr
    lines = [m for m in map(LINE.fullmatch, proc.stderr.splitlines()) if m]
    assert [int(m[1]) for m in lines] == expected, proc.stderr
    assert "━" not in proc.stderr and "\x1b[" not in proc.stderr  # no rich bar, no terminal escapes
    assert not LINE.search(proc.stdout)  # progress is for stderr; stdout keeps the results
    assert "Warning" not in proc.stderr  # e.g. transformers' `is_gradient_checkpointing` FutureWarning via PEFT
    logged = {r["step"]: r for r in map(json.loads, (tmp_path / "out" / "metrics.jsonl").read_text().splitlines())}
    for m in lines:
        row = logged[int(m[1])]
        assert m[2] == "21" and m[3] == f"{row['loss']:.4f}" and float(m[4]) == pytest.approx(row["lr"], rel=1e-2)
        assert int(m[5].replace(",", "")) == round(row["tokens_per_s"])
    assert lines[-1][6] == "0:00:00"


def _wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float = 240) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = path.read_text() if path.is_file() else ""
        if text in content:
            return content
        assert proc.poll() is None, content
        time.sleep(0.02)
    raise AssertionError(f"{text!r} never appeared in {path}")


def test_first_sigint_says_what_it_will_do_second_aborts_without_saving(tmp_path: Path,
                                                                         tiny_llama_dir: Path) -> None:
    # 16 micro-batches of long records per step: about a second per step, so a signal lands inside a step
    recipe = _recipe(tmp_path, tiny_llama_dir, steps=50, batch=16, micro=1, words=60)
    out, err = tmp_path / "out", tmp_path / "stderr"
    args = [str(NORA), "train", str(recipe), "-o", str(out)]

    # first Ctrl-C: announced at once (while the step still runs), then step k finishes and is saved
    with open(err, "w") as fh:
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=fh, env=ENV)
        _wait_for(err, "step 1/50", proc)
        proc.send_signal(signal.SIGINT)
        text = _wait_for(err, "SIGINT: finishing step", proc)
        assert proc.poll() is None and "stopped by" not in text  # said before the step ended
        rc = proc.wait(timeout=240)
    text = err.read_text()
    k = int(re.search(r"SIGINT: finishing step (\d+), then saving a checkpoint \(Ctrl-C again to abort "
                      r"without saving\)", text)[1])
    assert rc == 130 and k >= 2, text
    assert f"stopped by SIGINT at step {k}/50; checkpoint saved: {out / 'checkpoints' / f'step-{k:06d}'}" in text
    assert "Traceback" not in text

    # resumed, then Ctrl-C twice: stops inside step k+1, keeps checkpoint k and says so
    with open(err, "w") as fh:
        proc = subprocess.Popen([*args, "--resume"], stdout=subprocess.DEVNULL, stderr=fh, env=ENV)
        _wait_for(err, f"step {k + 1}/50", proc)  # step k+1 done: now inside step k+2
        proc.send_signal(signal.SIGINT)
        _wait_for(err, f"SIGINT: finishing step {k + 2}, then saving", proc)
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=240)
    text = err.read_text()
    assert rc == 130, text
    lines = text.splitlines()
    assert lines[-1] == (f"SIGINT again: aborted step {k + 2} without saving a checkpoint; the last checkpoint is "
                         f"{out / 'checkpoints' / f'step-{k:06d}'} (continue with --resume)"), text
    assert "Traceback" not in text and "stopped by" not in text
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"step-{k:06d}"]
