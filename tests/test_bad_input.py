"""Bad input through the real `nora` CLI: one `error:` line on stderr, exit 2, and nothing on disk changed.

Every train case runs with `--output-dir PREV --overwrite`, PREV being an earlier run, so a bad recipe is
shown not to cost the user their old results even when told to overwrite them; the whole workspace
(recipe, data, previous run, model) is hashed before and after. Also: the security rules (safetensors
only unless --allow-pickle, weights_only everywhere, safe YAML, no shell, literal `$` in paths).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from nora_cli.errors import NoraError

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@dataclass
class Workspace:
    root: Path
    model: Path
    prev: Path  # an earlier run's output dir

    def recipe(self, name: str = "recipe", **overrides: object) -> Path:
        """A valid 1-step tiny recipe with `section.key` (or top-level `key`) overrides."""
        tree: dict = {
            "method": "nora",
            "model": {"source": str(self.model)},
            "adapter": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj"]},
            "data": {"path": "data.json", "cutoff_len": 32},
            "train": {"max_steps": 1, "batch_size": 2, "micro_batch_size": 2},
        }
        for key, value in overrides.items():
            section, _, field = key.partition(".")
            if field:
                tree.setdefault(section, {})[field] = value
            else:
                tree[section] = value
        path = self.root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(tree))
        return path

    def train(self, *extra: str, recipe: Path | None = None, **overrides: object) -> list[str]:
        path = recipe or self.recipe(**overrides)
        return ["train", str(path), "--output-dir", str(self.prev), "--overwrite", *extra]


def _make_workspace(root: Path, model: Path) -> Workspace:
    rows = [{"instruction": f"Say {w}.", "input": "", "output": w} for w in ("red", "blue", "green", "gold")]
    (root / "data.json").write_text(json.dumps(rows))
    prev = root / "prev"
    (prev / "checkpoints" / "step-000002").mkdir(parents=True)
    (prev / "checkpoints" / "step-000002" / "state.json").write_text('{"step": 2, "best_val": null}')
    (prev / "nora.json").write_text('{"kind": "nora-run", "method": "nora"}')  # nora's run marker
    (prev / "adapter_config.json").write_text('{"r": 4}')
    (prev / "adapter_model.safetensors").write_bytes(os.urandom(256))
    (prev / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    return Workspace(root, model, prev)


def _snapshot(*roots: Path) -> dict[str, str]:
    """Every path under the roots -> content hash (folders too, so a new empty output dir shows)."""
    return {str(p): hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for root in roots for p in sorted(root.rglob("*"))}


def _pickle_only_model(ws: Workspace) -> Path:
    """The tiny model with its weights as pytorch_model.bin (a pickle) instead of safetensors."""
    folder = ws.root / "pickled-model"
    shutil.copytree(ws.model, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(load_file(str(ws.model / "model.safetensors")), folder / "pytorch_model.bin")
    return folder


def _json_file(ws: Workspace, name: str, rows: object) -> str:
    (ws.root / name).write_text(json.dumps(rows))
    return name


Setup = Callable[[Workspace], list[str]]
_ALL_NAMES = "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"

#: id -> (command line for the workspace, regex the one error line must match)
CASES: dict[str, tuple[Setup, str]] = {
    "unknown-recipe-key": (lambda ws: ws.train(**{"adapter.alpah": 4}),
                           r"unknown key 'adapter\.alpah'; did you mean 'adapter\.alpha'\?"),
    "wrong-type": (lambda ws: ws.train(**{"train.max_steps": "lots"}),
                   r"train\.max_steps: expected a valid integer.*got 'lots'"),
    "zero-lr": (lambda ws: ws.train("--set", "optimizer.lr=0"),
                r"optimizer\.lr: expected a value greater than 0, got 0$"),
    "negative-lr": (lambda ws: ws.train(**{"optimizer.lr": -0.001}),
                    r"optimizer\.lr: expected a value greater than 0, got -0\.001$"),
    "zero-rank": (lambda ws: ws.train("--set", "adapter.r=0"), r"adapter\.r: expected a value greater than 0, got 0$"),
    "rank-above-min-in-out": (
        lambda ws: ws.train("--set", "adapter.r=40"),  # k_proj/v_proj: 64 -> 32 (2 kv heads of 16)
        r"adapter\.r=40 exceeds min\(in, out\)=32 of model\.layers\.0\.self_attn\.k_proj \(64→32\)"),
    "nonpositive-sigma": (lambda ws: ws.train(**{"adapter.sigma": -0.5}),
                          r"adapter\.sigma: expected a value greater than 0, got -0\.5$"),
    "unknown-method": (lambda ws: ws.train(method="nora++"),
                       r"method: expected 'lora', 'nora', 'lora-p' or 'nora\+', got 'nora\+\+'"),
    "targets-match-nothing": (
        lambda ws: ws.train(**{"adapter.target_modules": ["q_proj", "qkv_proj"]}),
        rf"adapter\.target_modules: 'qkv_proj' matches no Linear layer of .*; available: {_ALL_NAMES}$"),
    "missing-data-file": (lambda ws: ws.train(**{"data.path": "missing.json"}),
                          r"dataset file not found: .*/missing\.json$"),
    "empty-dataset": (lambda ws: ws.train(**{"data.path": _json_file(ws, "empty.json", [])}),
                      r"the dataset .*empty\.json is empty"),
    "json-wrong-fields": (
        lambda ws: ws.train(**{"data.path": _json_file(ws, "fields.json", [
            {"instruction": "a", "input": "", "output": "b"}, {"instruction": "c", "input": "", "output": "d"},
            {"instruction": "e", "answer": "f"}])}),
        r"record 2 is missing key 'output' \(it has: instruction, answer\)"),
    "set-without-value": (lambda ws: ws.train("--set", "train.max_steps"),
                          r"bad --set 'train\.max_steps': expected KEY=VALUE"),
    "set-into-a-value": (lambda ws: ws.train("--set", "train.max_steps.value=1"),
                         r"bad --set train\.max_steps\.value: train\.max_steps is a value \(1\), not a section"),
    "hub-id-while-offline": (lambda ws: ws.train(**{"model.source": "nora-tests/no-such-model"}),
                             r"HF_HUB_OFFLINE is set, and 'nora-tests/no-such-model' is not in the local Hugging "
                             r"Face cache .*--set model\.source=DIR"),
    "pickled-weights": (lambda ws: ws.train(**{"model.source": str(_pickle_only_model(ws))}),
                        r"has only pickled weights \(pytorch_model\.bin\).*pass --allow-pickle"),
    "recipe-not-found": (lambda ws: ["train", "no-such-recipe.yaml"],
                         r"no recipe file or shipped recipe named 'no-such-recipe\.yaml'"),
    "yaml-python-tag": (  # safe_load: the tag is an error, not a call (cwd is the workspace: no file appears)
        lambda ws: ws.train(recipe=_text(ws, "evil.yaml", "method: !!python/object/apply:os.system ['touch PWNED']\n")),
        r"evil\.yaml:1: invalid YAML"),
    "resume-and-overwrite": (lambda ws: ws.train("--resume"), r"--resume and --overwrite exclude each other"),
    "zero-processes": (lambda ws: ws.train("--num-processes", "0"), r"--num-processes must be ≥ 1, got 0"),
    "processes-not-a-number": (lambda ws: ws.train("--num-processes", "many"),
                               r"--num-processes expects a number or 'all', got 'many'"),
    "prompt-file-not-found": (lambda ws: ["sample", "--model", str(ws.model), "--prompt-file", "prompts.txt"],
                              r"cannot read prompt file prompts\.txt"),
    "adapter-files-missing": (
        lambda ws: ["merge", "--adapter", str(_empty_dir(ws, "not-an-adapter")), "--out", str(ws.root / "merged")],
        r"not-an-adapter has no adapter_config\.json"),
}


def _text(ws: Workspace, name: str, text: str) -> Path:
    (ws.root / name).write_text(text)
    return ws.root / name


def _empty_dir(ws: Workspace, name: str) -> Path:
    (ws.root / name).mkdir()
    return ws.root / name


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_changes_nothing(case: str, tmp_path: Path, tiny_llama_dir: Path) -> None:
    ws = _make_workspace(tmp_path, tiny_llama_dir)
    setup, message = CASES[case]
    args = setup(ws)
    before = _snapshot(tmp_path, tiny_llama_dir)
    proc = subprocess.run([sys.executable, "-m", "nora_cli", *args], capture_output=True, text=True, env=ENV,
                          cwd=tmp_path, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and lines and lines[-1].startswith("error: "), proc.stderr
    assert sum(line.startswith("error:") for line in lines) == 1, proc.stderr
    assert re.search(message, lines[-1]), lines[-1]
    assert _snapshot(tmp_path, tiny_llama_dir) == before  # nothing written, created, moved or deleted


def test_at_least_15_distinct_cases() -> None:
    assert len(CASES) >= 15 and len(set(CASES.values())) == len(CASES)


# --- API-level bad input owned by other modules -----------------------------------------------------------


def test_corrupt_image_is_named(tmp_path: Path) -> None:
    from PIL import Image

    from nora_cli.diffusion.data import ImageFolder

    Image.new("RGB", (16, 16), (200, 10, 10)).save(tmp_path / "good.png")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(NoraError, match=r"cannot read image .*broken\.jpg"):
        ImageFolder(tmp_path, resolution=8)


# --- security ---------------------------------------------------------------------------------------------


def test_pickled_weights_load_only_when_allowed_and_then_weights_only(tmp_path: Path, tiny_llama_dir: Path) -> None:
    from nora_cli.models import load_causal_lm

    ws = _make_workspace(tmp_path, tiny_llama_dir)
    folder = _pickle_only_model(ws)
    with pytest.raises(NoraError, match="only pickled weights"):
        load_causal_lm(str(folder))
    model, _ = load_causal_lm(str(folder), allow_pickle=True)
    expected = load_file(str(tiny_llama_dir / "model.safetensors"))
    for name, value in model.state_dict().items():
        if name in expected:
            assert torch.equal(value, expected[name]), name
    # even when allowed, a pickle that would run code is refused (torch.load(weights_only=True))
    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self) -> tuple:
            return (os.system, (f"touch {marker}",))

    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"model.embed_tokens.weight": Payload()}))
    with pytest.raises(NoraError, match="refusing to unpickle"):
        load_causal_lm(str(folder), allow_pickle=True)
    assert not marker.exists()


def test_tampered_checkpoint_is_refused(tmp_path: Path) -> None:
    from nora_cli.train.checkpoint import _load_pt

    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self) -> tuple:
            return (os.system, (f"touch {marker}",))

    (tmp_path / "optimizer.pt").write_bytes(pickle.dumps({"state": Payload()}))
    with pytest.raises(NoraError, match="refusing to load .*optimizer.pt"):
        _load_pt(tmp_path / "optimizer.pt")
    assert not marker.exists()
    torch.save({"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 0.1}]}, tmp_path / "ok.pt")
    assert _load_pt(tmp_path / "ok.pt")["param_groups"][0]["lr"] == 0.1


def test_recipe_paths_expand_tilde_but_never_env_vars(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nora_cli.recipe import load_recipe

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NORA_SECRET_DIR", "/etc")
    recipe = tmp_path / "recipes" / "r.yaml"
    recipe.parent.mkdir()
    recipe.write_text(yaml.safe_dump({"model": {"source": "~/models/tiny"}, "data": {"path": "$NORA_SECRET_DIR/x.json"},
                                      "output": {"dir": "runs/$USER"}}))
    loaded = load_recipe(str(recipe))
    assert loaded.model.source == str(tmp_path / "home" / "models" / "tiny")
    assert loaded.data.path == str(recipe.parent / "$NORA_SECRET_DIR" / "x.json")  # literal, under the recipe dir
    assert loaded.output.dir == str(Path.cwd() / "runs" / "$USER")


_UNSAFE = {
    r"yaml\.(?:unsafe_)?load\(": "yaml.safe_load only",
    r"shell\s*=\s*True|os\.system\(|os\.popen\(": "no shell",
    r"(?<![\w.])(?:eval|exec)\(": "no eval/exec",
    r"pickle\.loads?\(|weights_only\s*=\s*False": "no unrestricted unpickling",
    r"trust_remote_code\s*=\s*True": "remote code only when the user asks",
    r"expandvars\(": "no $VAR expansion of user paths",
}


def test_source_has_no_unsafe_calls() -> None:
    sources = sorted((REPO / "nora_cli").rglob("*.py"))
    assert len(sources) > 20
    for path in sources:
        text = path.read_text()
        for pattern, rule in _UNSAFE.items():
            hit = re.search(pattern, text)
            assert hit is None, f"{path.relative_to(REPO)}: {hit.group(0)!r} ({rule})"
        for call in re.finditer(r"torch\.load\(", text):  # every torch.load restricts unpickling
            assert "weights_only=True" in text[call.end(): text.find(")", call.end()) + 1], path
