"""No user file is ever lost: run marker, validation before any write, the output-dir lock, resume rules,
damaged checkpoints, SIGTERM in evaluate/merge, and which checkpoints a finished run keeps.

Everything runs the installed `nora` console script in a subprocess on the tiny Llama. Where the rule is
"touch nothing", every file under the directory is hashed before and after.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

NORA = str(Path(sys.executable).with_name("nora"))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
for _fault in ("NORA_FAULT_KILL_AT_STEP", "NORA_FAULT_NAN_AT_STEP", "NORA_FAULT_KILL_IN_CHECKPOINT"):
    ENV.pop(_fault, None)


def _nora(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([NORA, *args], capture_output=True, text=True, env=ENV, timeout=timeout)


def _recipe(folder: Path, model_dir: Path, **train: object) -> Path:
    """A tiny NoRA+ recipe: 6 steps of 4 examples, checkpoints every 2 steps."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"instruction": f"Repeat the word {w}.", "input": "", "output": w}
            for w in ["red", "blue", "green", "gold", "gray", "pink", "teal", "plum"] * 4]
    (folder / "data.json").write_text(json.dumps(rows))
    tree = {
        "method": "nora+", "seed": 3, "model": {"source": str(model_dir)},
        "adapter": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "optimizer": {"lr": 1e-2},
        "data": {"path": "data.json", "cutoff_len": 48},
        "train": {"max_steps": 6, "batch_size": 4, "micro_batch_size": 4, "save_steps": 2, "keep_last": 2, **train},
        "output": {"dir": str(folder / "out")},
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def _hashes(root: Path) -> dict[str, str]:
    """Every path under root -> content hash ("dir" for folders, so added/removed folders show too)."""
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def _one_error(proc: subprocess.CompletedProcess, *needles: str, alone: bool = True) -> str:
    """Exit 2 and one `error: ...` line containing every needle, last on stderr (with `alone`, the only
    line: nothing was loaded, so no library printed anything); no traceback."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and lines[-1].startswith("error: "), proc.stderr
    assert sum(line.startswith("error:") for line in lines) == 1 and (len(lines) == 1 or not alone), proc.stderr
    for needle in needles:
        assert needle in lines[-1], lines[-1]
    return lines[-1]


def _checkpoints(out: Path) -> list[str]:
    root = out / "checkpoints"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Path:
    """The recipe of a completed 6-step run (save_steps 2: checkpoints step-2 and step-4 are kept)."""
    recipe = _recipe(tmp_path_factory.mktemp("finished"), tiny_llama_dir)
    proc = _nora("train", str(recipe))
    assert proc.returncode == 0, proc.stderr
    return recipe


def _copy_run(recipe: Path, dest: Path) -> Path:
    """A private copy of a finished run's folder (recipe, data, out) whose recipe points at the copy."""
    shutil.copytree(recipe.parent, dest)
    tree = yaml.safe_load((dest / "recipe.yaml").read_text())
    tree["output"]["dir"] = str(dest / "out")
    tree["data"]["path"] = str(recipe.parent / "data.json")  # the run's data, not a copy: same recipe
    (dest / "recipe.yaml").write_text(yaml.safe_dump(tree))
    return dest / "recipe.yaml"


# --- 1. only a marked nora run is continued or replaced ----------------------------------------------------


def test_resume_refuses_a_directory_that_is_not_a_nora_run(tmp_path: Path, tiny_llama_dir: Path) -> None:
    recipe = _recipe(tmp_path / "r", tiny_llama_dir)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "README.md").write_text("my notes")
    (foreign / "recipe.yaml").write_text("mine: true\n")
    (foreign / "metrics.jsonl").write_text('{"step": 99, "loss": 1.0}\n')
    (foreign / ".tmp-draft").write_text("half a thought")
    (foreign / "nora.json").write_text('{"author": "me"}')  # a nora.json that is not nora's marker
    before = _hashes(foreign)
    proc = _nora("train", str(recipe), "-o", str(foreign), "--resume")
    _one_error(proc, "refusing to --resume", "not a nora run directory")
    assert _hashes(foreign) == before


def test_overwrite_refuses_foreign_files_beside_checkpoints(tmp_path: Path, tiny_llama_dir: Path) -> None:
    recipe = _recipe(tmp_path / "r", tiny_llama_dir)
    thesis = tmp_path / "thesis"
    (thesis / "checkpoints" / "step-000002").mkdir(parents=True)
    (thesis / "checkpoints" / "step-000002" / "state.json").write_text('{"step": 2}')
    (thesis / "thesis.tex").write_text(r"\documentclass{article}")
    (thesis / "metrics.jsonl").write_text("{}\n")
    before = _hashes(thesis)
    proc = _nora("train", str(recipe), "-o", str(thesis), "--overwrite")
    _one_error(proc, "refusing to --overwrite", "not a nora run directory")
    assert _hashes(thesis) == before


def test_run_marker_recognises_this_and_the_previous_version(tmp_path: Path) -> None:
    from nora_cli.run_dir import is_nora_run, write_marker

    cases = {"new": None, "old": '{"nora_version": "0.1.0", "method": "nora"}', "foreign": '{"method": "x"}',
             "list": "[1, 2]", "garbage": "\x00not json", "binary": None}
    for name, text in cases.items():
        (tmp_path / name).mkdir()
        if text is not None:
            (tmp_path / name / "nora.json").write_text(text)
    write_marker(tmp_path / "new")
    (tmp_path / "binary" / "nora.json").write_bytes(b"\xff\xfe\x00")
    assert {n for n in cases if is_nora_run(tmp_path / n)} == {"new", "old"}


def test_run_info_read_then_write_keeps_every_key(tmp_path: Path) -> None:
    from nora_cli.run_dir import RunInfo

    legacy = {"nora_version": "0.1.0", "task": "causal-lm", "quantization": None, "base_model": "smollm2-135m",
              "prompt_template": "alpaca", "someday": {"x": 1}}
    (tmp_path / "nora.json").write_text(json.dumps(legacy))
    info = RunInfo.read(tmp_path)
    assert info.is_run and info.task == "causal-lm" and info.meta == {"prompt_template": "alpaca", "someday": {"x": 1}}
    info.write(tmp_path / "copy")
    assert json.loads((tmp_path / "copy" / "nora.json").read_text()) == legacy
    assert RunInfo.read(tmp_path / "absent").to_dict() == {}


# --- 2./3. cheap checks first; a late failure puts the old run back --------------------------------------------


def test_missing_data_fails_before_the_model_loads_and_before_spawning(tmp_path: Path, tiny_llama_dir: Path) -> None:
    # a model whose weights cannot load: reaching the weights would give a different error
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_llama_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors at all")
    recipe = _recipe(tmp_path / "r", broken)
    (recipe.parent / "data.json").unlink()
    for extra in ([], ["--num-processes", "2"]):
        proc = _nora("train", str(recipe), *extra)
        _one_error(proc, "dataset file not found", str(recipe.parent / "data.json"))
        assert "ChildFailedError" not in proc.stderr
        assert not (recipe.parent / "out").exists()
    # the same cheap check in `recipes validate`, without loading anything
    proc = _nora("recipes", "validate", str(recipe))
    _one_error(proc, "dataset file not found")
    (recipe.parent / "data.json").write_text('[{"instruction": "hi", "input": ""}]')  # no "output"
    proc = _nora("recipes", "validate", str(recipe))
    _one_error(proc, "record 0 is missing key 'output'")


def test_validate_checks_dreambooth_images_without_loading_the_pipeline(tmp_path: Path, shared: Path) -> None:
    proc = _nora("recipes", "validate", "sd14-dreambooth-dog", "--set", f"dreambooth.instance_data_dir={tmp_path}")
    _one_error(proc, f"no images (.jpg, .jpeg, .png, .webp) in {tmp_path}")
    (tmp_path / "dog.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    proc = _nora("recipes", "validate", "sd14-dreambooth-dog", "--set", f"dreambooth.instance_data_dir={tmp_path}")
    _one_error(proc, f"cannot read image {tmp_path / 'dog.jpg'}")
    proc = _nora("recipes", "validate", "sd14-dreambooth-dog",
                 "--set", f"dreambooth.instance_data_dir={shared / 'data/dreambooth/dog'}")
    assert proc.returncode == 0 and "ok: images" in proc.stderr, proc.stderr


def test_overwrite_with_a_late_failure_restores_the_old_run(tmp_path: Path, finished: Path) -> None:
    recipe = _copy_run(finished, tmp_path / "run")
    out = recipe.parent / "out"
    before = _hashes(tmp_path)
    # passes every cheap check, fails after the model loaded and the old run was moved aside:
    # every response lies beyond cutoff_len, which only tokenization can tell
    proc = _nora("train", str(recipe), "--overwrite", "--set", "data.cutoff_len=4",
                 "--set", "data.train_on_inputs=false")
    _one_error(proc, "no training example has response tokens within cutoff_len=4", alone=False)
    assert _hashes(tmp_path) == before
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # nothing left aside


def test_overwrite_keeps_the_old_run_until_the_new_one_completes(tmp_path: Path, finished: Path) -> None:
    recipe = _copy_run(finished, tmp_path / "run")
    out = recipe.parent / "out"
    before = _hashes(out)
    proc = subprocess.run([NORA, "train", str(recipe), "--overwrite"], capture_output=True, text=True, timeout=300,
                          env={**ENV, "NORA_FAULT_NAN_AT_STEP": "3"})  # the new run fails while training
    assert proc.returncode == 1 and "non-finite loss at step 3" in proc.stderr, proc.stderr
    (aside,) = out.glob(".nora-overwritten-*")
    assert f"kept in {aside}" in proc.stderr
    assert _hashes(aside) == before  # every file of the old run, byte for byte
    proc = _nora("train", str(recipe), "--resume")  # the new run goes on from its step-2 checkpoint ...
    assert proc.returncode == 0, proc.stderr
    assert not list(out.glob(".nora-overwritten-*"))  # ... and once it completes, the old run goes


# --- 4. the lock -----------------------------------------------------------------------------------------


def test_second_nora_on_a_running_dir_is_refused_then_resume_works(tmp_path: Path, tiny_llama_dir: Path) -> None:
    recipe = _recipe(tmp_path / "r", tiny_llama_dir, max_steps=400, batch_size=2, micro_batch_size=2,
                     save_steps=None)
    out = recipe.parent / "out"
    with open(tmp_path / "stderr", "w") as err:
        first = subprocess.Popen([NORA, "train", str(recipe)], stdout=subprocess.DEVNULL, stderr=err, env=ENV)
        deadline = time.monotonic() + 240
        while not (out / "metrics.jsonl").is_file() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, (tmp_path / "stderr").read_text()
        for args in (["--resume"], ["--overwrite"]):
            proc = _nora("train", str(recipe), *args)
            _one_error(proc, f"output directory {out} is in use by another nora process")
        first.send_signal(signal.SIGTERM)  # checkpoints and exits 143: the lock goes with the process
        assert first.wait(timeout=240) == 143
    stopped = _checkpoints(out)
    assert len(stopped) == 1
    step = int(stopped[0].split("-")[1])
    # resume may lengthen or shorten the run: max_steps is on the allow-list
    proc = _nora("train", str(recipe), "--resume", "--set", f"train.max_steps={step + 1}")
    assert proc.returncode == 0, proc.stderr
    assert f"resuming from {out / 'checkpoints' / stopped[0]} (step {step}/{step + 1})" in proc.stderr
    # 8. a finished run keeps what its save_steps schedule keeps: with save_steps null, no checkpoints
    assert not (out / "checkpoints").exists()
    assert yaml.safe_load((out / "recipe.yaml").read_text())["train"]["max_steps"] == step + 1


def test_lock_is_released_when_its_holder_is_killed(tmp_path: Path) -> None:
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from nora_cli.run_dir import "
         "output_lock\nwith output_lock(Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(600)",
         str(out)], stdout=subprocess.PIPE, text=True, env=ENV)
    assert holder.stdout.readline().strip() == "locked"
    from nora_cli.errors import NoraError
    from nora_cli.run_dir import output_lock

    with pytest.raises(NoraError, match="in use by another nora process"), output_lock(out):
        pass
    holder.kill()
    holder.wait()
    with output_lock(out):  # the OS dropped the SIGKILLed holder's lock
        pass


# --- 5. resume: the recipe may not change the run ------------------------------------------------------------


def test_resume_with_a_changed_recipe_is_refused_untouched(tmp_path: Path, finished: Path) -> None:
    recipe = _copy_run(finished, tmp_path / "run")
    before = _hashes(tmp_path)
    proc = _nora("train", str(recipe), "--resume", "--set", "optimizer.lr=0.5", "--set", "seed=4")
    line = _one_error(proc, "--resume would change the run", "optimizer.lr: 0.01 → 0.5", "seed: 3 → 4",
                      "train.max_steps")
    assert "adapter." not in line.split(". Only")[0]  # only the keys that changed are named
    assert _hashes(tmp_path) == before


# --- 6. damaged checkpoints ------------------------------------------------------------------------------------


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "truncated optimizer.pt": (lambda ck: _truncate(ck / "optimizer.pt"), "optimizer.pt"),
    "bad state.json": (lambda ck: (ck / "state.json").write_text('{"step": '), "state.json"),
    "missing weights": (lambda ck: (ck / "trainable.safetensors").unlink(), "trainable.safetensors is missing"),
    "truncated weights": (lambda ck: _truncate(ck / "trainable.safetensors"), "trainable.safetensors"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_each_kind_of_damage_is_detected(tmp_path: Path, finished: Path, kind: str) -> None:
    from nora_cli.loop import checkpoint as ckpt

    out = _copy_run(finished, tmp_path / "run").parent / "out"
    damage, names = DAMAGE[kind]
    damage(out / "checkpoints" / "step-000004")
    good, damaged = ckpt.newest_usable(out)
    assert good == out / "checkpoints" / "step-000002"
    assert [p.name for p, _ in damaged] == ["step-000004"] and names in damaged[0][1]


def test_resume_falls_back_past_a_damaged_checkpoint(tmp_path: Path, finished: Path) -> None:
    recipe = _copy_run(finished, tmp_path / "run")
    out = recipe.parent / "out"
    _truncate(out / "checkpoints" / "step-000004" / "optimizer.pt")
    proc = _nora("train", str(recipe), "--resume")
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning: checkpoint")]
    assert len(warnings) == 1 and "step-000004 is damaged (optimizer.pt:" in warnings[0]
    assert f"resuming from {out / 'checkpoints' / 'step-000002'} (step 2/6)" in proc.stderr
    assert "damaged-step-000004" in _checkpoints(out)  # kept for inspection, never resumed from


def test_resume_with_no_usable_checkpoint_exits_2_naming_the_file(tmp_path: Path, finished: Path) -> None:
    recipe = _copy_run(finished, tmp_path / "run")
    out = recipe.parent / "out"
    (out / "checkpoints" / "step-000004" / "state.json").write_text("garbage")
    _truncate(out / "checkpoints" / "step-000002" / "optimizer.pt")
    before = _hashes(tmp_path)
    proc = _nora("train", str(recipe), "--resume")
    _one_error(proc, "no usable checkpoint", str(out / "checkpoints" / "step-000004" / "state.json"))
    assert _hashes(tmp_path) == before


# --- 7. SIGTERM in merge / evaluate ------------------------------------------------------------------------------


def _sigterm_when(cmd: list[str], ready, logs: Path) -> tuple[int, str]:
    with open(logs, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=ENV)
        deadline = time.monotonic() + 240
        while not ready() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, logs.read_text()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=120)
    return rc, logs.read_text()


def test_sigterm_during_merge_exits_143_and_removes_staging(tmp_path: Path, smollm2_dir: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "adapter")
    work = tmp_path / "exports"
    work.mkdir()
    out = work / "merged"
    staging = lambda: [p for p in work.iterdir() if p.name.startswith(".merged.tmp-") and any(p.iterdir())]  # noqa: E731
    rc, stderr = _sigterm_when([NORA, "merge", "--adapter", str(tmp_path / "adapter"), "--out", str(out),
                                "--base", str(smollm2_dir), "--dtype", "fp32"], staging, tmp_path / "stderr")
    assert rc == 143, stderr
    assert "terminated by SIGTERM" in stderr and "Traceback" not in stderr
    assert list(work.iterdir()) == []  # no staging dir, no half-written --out


def test_sigterm_during_evaluate_exits_143(tmp_path: Path, tiny_llama_dir: Path) -> None:
    output = tmp_path / "eval" / "results.json"
    t0 = time.monotonic()
    # 400 items × 512 new tokens one at a time: minutes of work, stopped a few seconds in (loading or scoring)
    rc, stderr = _sigterm_when([NORA, "evaluate", "--model", str(tiny_llama_dir), "--task", "demo", "--limit",
                                "400", "--batch-size", "1", "--max-new-tokens", "512", "--output", str(output)],
                               lambda: time.monotonic() - t0 > 12, tmp_path / "stderr")
    assert rc == 143, stderr
    assert "terminated by SIGTERM" in stderr and "Traceback" not in stderr
    assert not output.exists()


def test_unwritable_outputs_fail_before_any_work(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("x")
    started = time.monotonic()
    proc = _nora("evaluate", "--model", str(tmp_path / "no-model"), "--task", "demo",
                 "--output", str(tmp_path / "a-file" / "results.json"))
    _one_error(proc, "--output", "cannot be created", "a-file is not a directory")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "task_type": "CAUSAL_LM"}')
    proc = _nora("merge", "--adapter", str(adapter), "--out", str(tmp_path / "a-file" / "merged"))
    _one_error(proc, "--out directory", "a-file is not a directory")
    assert time.monotonic() - started < 60


# --- 8. what a finished run keeps ----------------------------------------------------------------------------


def test_finished_run_keeps_its_save_steps_checkpoints(finished: Path) -> None:
    out = finished.parent / "out"
    # steps 2 and 4 (the last step is not checkpointed: the final adapter is the run's result)
    assert _checkpoints(out) == ["step-000002", "step-000004"]
    assert (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "nora.json").read_text())["kind"] == "nora-run"
