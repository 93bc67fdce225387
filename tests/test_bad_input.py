"""Bad input through the installed `nora` console script: one `error:` line on stderr, exit 2, no traceback,
and nothing on disk changed. The table covers every command; most cases fail before torch is imported.

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
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from nora_cli.errors import NoraError

REPO = Path(__file__).resolve().parents[1]
NORA = Path(sys.executable).with_name("nora")  # the console script pip installed (cli:main)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@dataclass
class Workspace:
    root: Path
    model: Path
    prev: Path  # an earlier run's output dir
    adapter: Path  # a valid PEFT adapter of `model` (r=4 on q_proj, v_proj)
    other_adapter: Path  # a valid PEFT adapter of another base (hidden size 32)

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


def _make_workspace(root: Path, model: Path, adapters: tuple[Path, Path] | None = None) -> Workspace:
    rows = [{"instruction": f"Say {w}.", "input": "", "output": w} for w in ("red", "blue", "green", "gold")]
    (root / "data.json").write_text(json.dumps(rows))
    prev = root / "prev"
    (prev / "checkpoints" / "step-000002").mkdir(parents=True)
    (prev / "checkpoints" / "step-000002" / "state.json").write_text('{"step": 2, "best_val": null}')
    (prev / "nora.json").write_text('{"kind": "nora-run", "method": "nora"}')  # nora's run marker
    (prev / "adapter_config.json").write_text('{"r": 4}')
    (prev / "adapter_model.safetensors").write_bytes(os.urandom(256))
    (prev / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    own, other = adapters or (root / "no-adapter", root / "no-adapter")
    for source, name in ((own, "adapter"), (other, "other-adapter")):
        if source.is_dir():
            shutil.copytree(source, root / name)
    return Workspace(root, model, prev, root / "adapter", root / "other-adapter")


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


def _bytes(ws: Workspace, name: str, data: bytes) -> Path:
    (ws.root / name).write_bytes(data)
    return ws.root / name


_BINARY = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe\x00\x01"


def _utf16(ws: Workspace, name: str, text: str) -> Path:
    return _bytes(ws, name, text.encode("utf-16"))


def _broken(ws: Workspace, how: str) -> str:
    """A copy of the workspace adapter, damaged one way."""
    folder = ws.root / f"adapter-{how}"
    shutil.copytree(ws.adapter, folder)
    weights, config = folder / "adapter_model.safetensors", folder / "adapter_config.json"
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif how == "corrupt":
        weights.write_bytes(b"\x20\x00\x00\x00\x00\x00\x00\x00" + b"{this is not a safetensors header}" + bytes(64))
    elif how == "bad-json":
        config.write_text(config.read_text()[:-20])
    elif how == "rank":
        config.write_text(json.dumps({**json.loads(config.read_text()), "r": 8}))
    elif how == "pickle":
        torch.save(load_file(str(weights)), folder / "adapter_model.bin")
        weights.unlink()
    return str(folder)


def _adapter_cmd(command: str, adapter: str, ws: Workspace, *extra: str) -> list[str]:
    """evaluate / sample / merge with the given adapter, as cheap as the command allows."""
    if command == "evaluate":
        return ["evaluate", "--adapter", adapter, "--task", "demo", "--limit", "1", *extra]
    if command == "sample":
        return ["sample", "--adapter", adapter, "--prompt", "hi", "--max-new-tokens", "1", *extra]
    return ["merge", "--adapter", adapter, "--out", str(ws.root / "merged"), *extra]


def _bomb(ws: Workspace) -> Path:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]")
    return _text(ws, "bomb.yaml", "\n".join([*lines, "data:", "  path: *i", ""]))


def _rows(ws: Workspace, name: str, *rows: dict) -> str:
    return _json_file(ws, name, list(rows))


_OK = {"instruction": "a", "input": "", "output": "b"}
_ADAPTER_ERRORS = {
    "truncated": r"adapter_model\.safetensors is not a valid safetensors file \(truncated or corrupt\?\)",
    "corrupt": r"adapter_model\.safetensors is not a valid safetensors file",
    "bad-json": r"adapter-bad-json/adapter_config\.json is not valid JSON: .*\(line \d+, column \d+\)",
    "rank": r"tensor .*lora_A\.weight has rank 4 but .*adapter-rank/adapter_config\.json says r=8",
    "pickle": r"adapter-pickle/adapter_model\.bin is a pickle.*pass --allow-pickle",
}

MORE_CASES: dict[str, tuple[Setup, str]] = {
    # --- §2 usage errors: typer's own exceptions, one line each ---
    "train-no-argument": (lambda ws: ["train"], r"^error: Missing argument 'recipe'\.$"),
    "train-bogus-flag": (lambda ws: ws.train("--bogus"), r"^error: No such option: --bogus$"),
    "train-no-such-flag": (lambda ws: ["train", "--no-such-flag"], r"No such option: --no-such-flag"),
    "train-set-needs-value": (lambda ws: [*ws.train(), "--set"], r"Option '--set' requires an argument"),
    "unknown-command": (lambda ws: ["no-such-command"], r"No such command 'no-such-command'"),
    "recipes-unknown-subcommand": (lambda ws: ["recipes", "nope"], r"No such command 'nope'"),
    "recipes-extra-argument": (lambda ws: ["recipes", "validate", "a.yaml", "b.yaml"],
                               r"Got unexpected extra argument\(s\) \(b\.yaml\)"),
    "evaluate-limit-0": (lambda ws: ["evaluate", "--limit", "0"], r"Invalid value for '--limit'.*greater than or equal to 1"),
    "evaluate-limit-0-task-demo": (lambda ws: ["evaluate", "--limit", "0", "--task", "demo"], r"'--limit'"),
    "evaluate-protocol-foo": (lambda ws: ["evaluate", "--protocol", "foo", "--task", "demo"],
                              r"Invalid value for '--protocol': 'foo' is not one of 'llm-adapters', 'loglikelihood'"),
    "evaluate-dtype-fp8": (lambda ws: ["evaluate", "--dtype", "fp8", "--task", "demo"], r"Invalid value for '--dtype'"),
    "evaluate-batch-size-0": (lambda ws: ["evaluate", "--batch-size", "0", "--task", "demo"], r"'--batch-size'"),
    "sample-seed-abc": (lambda ws: ["sample", "--seed", "abc"], r"Invalid value for '--seed'.*valid integer"),
    "merge-missing-adapter": (lambda ws: ["merge", "--out", "m"], r"^error: Missing option '--adapter'\.$"),
    "merge-missing-out": (lambda ws: ["merge", "--adapter", str(ws.adapter)], r"Missing option '--out'"),
    "sweep-no-argument": (lambda ws: ["sweep"], r"Missing argument 'RECIPE'|Missing argument 'recipe'"),
    "sweep-limit-0": (lambda ws: ["sweep", str(ws.recipe()), "--limit", "0"], r"'--limit'"),
    "factorize-lr-abc": (lambda ws: ["factorize", "--lr", "abc"], r"--lr 'abc': expected a number"),
    "factorize-bad-preset": (lambda ws: ["factorize", "--preset", "fig9"], r"unknown preset"),
    # --- §2 non-UTF-8 input names the file ---
    "recipe-utf16": (lambda ws: ws.train(recipe=_utf16(ws, "u16.yaml", "method: nora\n")),
                     r"recipe .*u16\.yaml is not UTF-8 text"),
    "recipe-binary": (lambda ws: ws.train(recipe=_bytes(ws, "bin.yaml", _BINARY)), r"recipe .*bin\.yaml is not UTF-8"),
    "recipe-nul-bytes": (lambda ws: ["recipes", "validate", str(_bytes(ws, "nul.yaml", b"method: nora\n\x00\x00"))],
                         r"recipe .*nul\.yaml is a binary file"),
    "recipe-is-safetensors": (lambda ws: ["train", str(ws.adapter / "adapter_model.safetensors")],
                              r"recipe .*adapter_model\.safetensors is not UTF-8 text"),
    "data-binary": (lambda ws: ws.train(**{"data.path": str(_bytes(ws, "bin.json", _BINARY))}),
                    r"dataset file .*bin\.json is not UTF-8 text"),
    "data-utf16-jsonl": (lambda ws: ws.train(**{"data.path": str(_utf16(ws, "u16.jsonl", json.dumps(_OK)))}),
                         r"dataset file .*u16\.jsonl is not UTF-8 text"),
    "eval-data-binary": (lambda ws: ["evaluate", "--model", str(ws.model), "--task", "demo", "--data",
                                     str(_bytes(ws, "test.json", _BINARY))], r"dataset file .*test\.json is not UTF-8"),
    "prompt-file-binary": (lambda ws: ["sample", "--model", str(ws.model), "--prompt-file",
                                       str(_bytes(ws, "p.txt", _BINARY))], r"prompt file .*p\.txt is not UTF-8 text"),
    "prompt-file-utf16": (lambda ws: ["sample", "--model", str(ws.model), "--prompt-file",
                                      str(_utf16(ws, "p16.txt", "hello\n"))], r"prompt file .*p16\.txt is not UTF-8"),
    # --- §2 broken adapters in evaluate / sample / merge ---
    **{f"{command}-adapter-{how}": ((lambda ws, c=command, h=how: _adapter_cmd(c, _broken(ws, h), ws)), message)
       for how, message in _ADAPTER_ERRORS.items() for command in ("evaluate", "sample", "merge")},
    "evaluate-adapter-other-base": (
        lambda ws: ["evaluate", "--adapter", str(ws.other_adapter), "--model", str(ws.model), "--task", "demo"],
        r"other-adapter does not fit base model .*: model\.layers\.0\.self_attn\.q_proj is \(in, out\) = "
        r"\(64, 64\) in the base but \(32, 32\) in the adapter"),
    "sample-adapter-other-base": (
        lambda ws: ["sample", "--adapter", str(ws.other_adapter), "--model", str(ws.model), "--prompt", "hi"],
        r"other-adapter does not fit base model .*\(64, 64\) in the base but \(32, 32\)"),
    "merge-adapter-other-base": (
        lambda ws: ["merge", "--adapter", str(ws.other_adapter), "--base", str(ws.model), "--out", "merged"],
        r"adapter does not fit base .*: 4 weight shapes differ"),
    # --- §2 the pickle rule is the same everywhere ---
    "evaluate-pickled-base": (lambda ws: ["evaluate", "--model", str(_pickle_only_model(ws)), "--task", "demo"],
                              r"only pickled weights \(pytorch_model\.bin\).*pass --allow-pickle"),
    "sample-pickled-base": (lambda ws: ["sample", "--model", str(_pickle_only_model(ws)), "--prompt", "hi"],
                            r"only pickled weights.*pass --allow-pickle"),
    "merge-pickled-base": (lambda ws: ["merge", "--adapter", str(ws.adapter), "--base", str(_pickle_only_model(ws)),
                                       "--out", "merged"], r"only pickled weights.*pass --allow-pickle"),
    # --- unwritable outputs ---
    "train-output-under-a-file": (lambda ws: ["train", str(ws.recipe()), "--output-dir", str(ws.root / "data.json" / "run")],
                                  r"data\.json"),
    "merge-out-under-a-file": (lambda ws: ["merge", "--adapter", str(ws.adapter), "--out", str(ws.root / "data.json" / "m")],
                               r"data\.json is not a directory"),
    "merge-out-is-a-file": (lambda ws: ["merge", "--adapter", str(ws.adapter), "--out", str(ws.root / "data.json")],
                            r"--out .*data\.json is a file"),
    # --- §3 the schema rejects nonsense ---
    "lr-inf": (lambda ws: ws.train("--set", "optimizer.lr=.inf"), r"optimizer\.lr: expected a finite number, got inf"),
    "lr-nan": (lambda ws: ws.train(**{"optimizer.lr": float("nan")}), r"optimizer\.lr: expected a finite number"),
    "alpha-inf": (lambda ws: ws.train(**{"adapter.alpha": float("inf")}), r"adapter\.alpha: expected a finite number"),
    "alpha-zero": (lambda ws: ws.train("--set", "adapter.alpha=0"), r"adapter\.alpha: expected a value greater than 0"),
    "epochs-inf": (lambda ws: ws.train("--set", "train.epochs=.inf"), r"train\.epochs: expected a finite number"),
    "max-steps-1e30": (lambda ws: ws.train(**{"train.max_steps": 1e30}), r"train\.max_steps: expected a valid integer"),
    "max-steps-1e30-set": (lambda ws: ws.train("--set", "train.max_steps=1e30"), r"train\.max_steps: expected a valid integer"),
    "max-steps-true": (lambda ws: ws.train("--set", "train.max_steps=true"),
                       r"train\.max_steps: expected a valid integer, got True"),
    "rank-yes": (lambda ws: ws.train("--set", "adapter.r=yes"), r"adapter\.r: expected a valid integer, got True"),
    "rank-float": (lambda ws: ws.train("--set", "adapter.r=4.5"), r"adapter\.r: expected a valid integer, got 4\.5"),
    "beta-one": (lambda ws: ws.train("--set", "optimizer.betas=[0.9,1.0]"), r"optimizer\.betas\[1\]: expected a value less than 1"),
    "beta-negative": (lambda ws: ws.train("--set", "optimizer.betas=[-0.1,0.9]"), r"optimizer\.betas\[0\]"),
    "seed-negative": (lambda ws: ws.train("--set", "seed=-1"), r"seed: expected a value greater than or equal to 0"),
    "seed-2-32": (lambda ws: ws.train("--set", "seed=4294967296"), r"seed: expected a value less than 4294967296"),
    "dropout-one": (lambda ws: ws.train("--set", "adapter.dropout=1"), r"adapter\.dropout: expected a value less than 1"),
    "warmup-over-steps": (lambda ws: ws.train("--set", "train.warmup_steps=5"), r"warmup_steps \(5\) exceeds max_steps \(1\)"),
    "lr-bool": (lambda ws: ws.train("--set", "optimizer.lr=yes"), r"optimizer\.lr: expected a number, got True"),
    "mixed-precision-yes": (lambda ws: ws.train("--set", "train.mixed_precision=yes"), r"train\.mixed_precision"),
    "duplicate-section": (lambda ws: ws.train(recipe=_text(ws, "dup.yaml", ws.recipe().read_text() + "optimizer:\n  lr: 0.1\noptimizer:\n  lr: 0.2\n")),
                          r"dup\.yaml:\d+: invalid YAML: duplicate key 'optimizer'"),
    "duplicate-nested-key": (lambda ws: ["recipes", "validate", str(_text(ws, "dup2.yaml", "train:\n  max_steps: 1\n  max_steps: 2\n"))],
                             r"dup2\.yaml:3: invalid YAML: duplicate key 'max_steps'"),
    "empty-recipe": (lambda ws: ["train", str(_text(ws, "empty.yaml", ""))], r"recipe .*empty\.yaml is empty"),
    "empty-recipe-overwrite": (lambda ws: ws.train(recipe=_text(ws, "blank.yaml", "\n# nothing\n")), r"blank\.yaml is empty"),
    "alias-bomb": (lambda ws: ws.train(recipe=_bomb(ws)), r"data\.path: expected a valid string, got \[\[\[.{0,90}$"),
    # --- §3 data ---
    "record-field-dict": (lambda ws: ws.train(**{"data.path": _rows(ws, "d1.json", _OK, {**_OK, "output": {"a": 1}})}),
                          r"record 1: field 'output' is a mapping, expected text"),
    "record-field-list": (lambda ws: ws.train(**{"data.path": _rows(ws, "d2.json", {**_OK, "instruction": ["x"]})}),
                          r"record 0: field 'instruction' is a list, expected text"),
    "all-outputs-empty": (lambda ws: ws.train(**{"data.path": _rows(ws, "d3.json", {**_OK, "output": ""}, {**_OK, "output": ""})}),
                          r"every record's output is empty \(records 0-1\)"),
    "csv-wrong-columns": (lambda ws: ws.train(**{"data.path": str(_text(ws, "d.csv", "question,answer\nq,a\n"))}),
                          r"record 0 is missing key 'instruction'"),
    "unsupported-data-format": (lambda ws: ws.train(**{"data.path": str(_text(ws, "d.xlsx", "a\tb\n"))}),
                                r"unsupported data file format '\.xlsx'"),
    "hub-data-while-offline": (lambda ws: ws.train(**{"data.path": "nora-tests/no-such-data", "data.name": "main"}),
                               r"cannot load dataset 'nora-tests/no-such-data' \(split 'train', config 'main'\)"),
    "bad-split-slice": (lambda ws: ws.train(**{"data.split": "train[:x]"}), r"bad split 'train\[:x\]' for .*data\.json"),
    "mixed-entry-wrong-fields": (
        lambda ws: ws.train(data={"cutoff_len": 32, "datasets": [
            {"path": "data.json"}, {"path": _json_file(ws, "q.json", [{"q": "a"}]), "format": "gsm8k"}]}),
        r"data\.datasets\[1\] \(.*q\.json\): format 'gsm8k': record 0 is missing key 'answer\|response'"),
    # --- other flags of every command ---
    "merge-negative-shard-size": (lambda ws: ["merge", "--adapter", str(ws.adapter), "--out", "m", "--max-shard-size", "-5GB"],
                                  r"--max-shard-size '-5GB': expected a positive size"),
    "merge-shard-size-words": (lambda ws: ["merge", "--adapter", str(ws.adapter), "--out", "m", "--max-shard-size", "big"],
                               r"--max-shard-size 'big'"),
    "merge-bad-dtype": (lambda ws: ["merge", "--adapter", str(ws.adapter), "--out", "m", "--dtype", "fp8"], r"--dtype 'fp8'"),
    "merge-bad-format": (lambda ws: ["merge", "--adapter", str(ws.adapter), "--out", "m", "--format", "gguf"], r"--format 'gguf'"),
    "sample-temperature-nan": (lambda ws: ["sample", "--model", str(ws.model), "--prompt", "hi", "--temperature", "nan"],
                               r"--temperature must be a finite number >= 0"),
    "sample-temperature-inf": (lambda ws: ["sample", "--model", str(ws.model), "--prompt", "hi", "--temperature", "inf"],
                               r"--temperature must be a finite number"),
    "sample-top-p-nan": (lambda ws: ["sample", "--model", str(ws.model), "--prompt", "hi", "--top-p", "nan"],
                         r"--top-p must be positive"),
    "sample-no-prompt": (lambda ws: ["sample", "--model", str(ws.model)], r"give at least one --prompt"),
    "sample-image-flag-for-text": (lambda ws: ["sample", "--model", str(ws.model), "--prompt", "hi", "--steps", "3"],
                                   r"--steps does not apply to text sampling"),
    "evaluate-unknown-task": (lambda ws: ["evaluate", "--model", str(ws.model), "--task", "nosuch"], r"nosuch"),
    "evaluate-no-task": (lambda ws: ["evaluate", "--model", str(ws.model)], r"pass --task"),
    "evaluate-adapter-not-a-dir": (lambda ws: ["evaluate", "--adapter", str(ws.root / "nope"), "--task", "demo"],
                                   r"nope has no adapter_config\.json"),
    "sweep-bad-method": (lambda ws: ["sweep", str(ws.recipe()), "--methods", "lora,bogus"], r"bogus"),
    "sweep-bad-seeds": (lambda ws: ["sweep", str(ws.recipe()), "--seeds", "0,x"], r"seed"),
    "sweep-lr-inf": (lambda ws: ["sweep", str(ws.recipe()), "--set", "optimizer.lr=.inf"], r"optimizer\.lr: expected a finite number"),
    "recipes-show-binary": (lambda ws: ["recipes", "show", str(_bytes(ws, "b.yaml", _BINARY))],
                            r"recipe .*b\.yaml is not UTF-8 text"),
    "recipes-show-unknown": (lambda ws: ["recipes", "show", "nope"], r"no recipe file or shipped recipe named 'nope'"),
    "recipes-validate-bad-value": (lambda ws: ["recipes", "validate", str(ws.recipe()), "--set", "adapter.r=yes"],
                                   r"adapter\.r: expected a valid integer"),
    "data-preview-missing-recipe": (lambda ws: ["data", "preview", "no-such-recipe.yaml"],
                                    r"no recipe file or shipped recipe named 'no-such-recipe\.yaml'"),
    "data-preview-n-0": (lambda ws: ["data", "preview", str(ws.recipe()), "--n", "0"],
                         r"Invalid value for '--n'.*greater than or equal to 1"),
    "factorize-negative-m": (lambda ws: ["factorize", "--m", "-3"], r"m, n and rank must be >= 1 \(got m=-3"),
}
CASES.update(MORE_CASES)


def _text(ws: Workspace, name: str, text: str) -> Path:
    (ws.root / name).write_text(text)
    return ws.root / name


def _empty_dir(ws: Workspace, name: str) -> Path:
    (ws.root / name).mkdir()
    return ws.root / name


@pytest.fixture(scope="session")
def tiny_adapters(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> tuple[Path, Path]:
    """A PEFT adapter of the tiny Llama (r=4 on q_proj, v_proj, nonzero B), and one of a narrower Llama."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    folders = []
    for name, hidden in (("own", 64), ("other", 32)):
        torch.manual_seed(0)
        if hidden == 64:
            base = LlamaForCausalLM.from_pretrained(tiny_llama_dir)
        else:
            base = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=64,
                                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                init_lora_weights="gaussian"))
        folder = tmp_path_factory.mktemp(f"adapter-{name}")
        model.save_pretrained(folder)
        folders.append(folder)
    return folders[0], folders[1]


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_changes_nothing(case: str, tmp_path: Path, tiny_llama_dir: Path,
                                                          tiny_adapters: tuple[Path, Path]) -> None:
    ws = _make_workspace(tmp_path, tiny_llama_dir, tiny_adapters)
    setup, message = CASES[case]
    args = setup(ws)
    before = _snapshot(tmp_path, tiny_llama_dir)
    proc = subprocess.run([str(NORA), *args], capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and lines and lines[-1].startswith("error: "), proc.stderr[-3000:]
    assert len(lines) <= 2 and sum(line.startswith("error:") for line in lines) == 1, proc.stderr
    assert re.search(message, lines[-1]), lines[-1]
    assert _snapshot(tmp_path, tiny_llama_dir) == before  # nothing written, created, moved or deleted


def test_the_table_covers_every_command_with_at_least_80_cases(tmp_path: Path, tiny_llama_dir: Path,
                                                                tiny_adapters: tuple[Path, Path]) -> None:
    assert len(CASES) >= 80 and len({message for _, message in CASES.values()}) >= 70
    used = {setup(_make_workspace(Path(tempfile.mkdtemp(dir=tmp_path)), tiny_llama_dir, tiny_adapters))[0]
            for setup, _ in CASES.values()}
    assert {"train", "evaluate", "sample", "merge", "sweep", "factorize", "recipes"} <= used


# --- API-level bad input owned by other modules -----------------------------------------------------------


def test_corrupt_image_is_named(tmp_path: Path) -> None:
    from PIL import Image

    from nora_cli.data.images import ImageFolder

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
    from nora_cli.loop.checkpoint import _load_pt

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
    from nora_cli.config.load import load_recipe

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


# --- unreadable files (we run as root: permissions are simulated in-process) and the error table -----------


def _run_main(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """`nora ARGS` through the console script's entry function, in-process; (exit code, stderr)."""
    from unittest import mock

    from nora_cli import cli

    capsys.readouterr()
    with mock.patch.object(sys, "argv", ["nora", *args]), pytest.raises(SystemExit) as exit_:
        cli.main()
    return exit_.value.code, capsys.readouterr().err


def test_unreadable_inputs_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture) -> None:
    denied = {"r.yaml", "p.txt", "data.json"}
    real = Path.read_bytes

    def read_bytes(self: Path) -> bytes:
        if self.name in denied:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    monkeypatch.chdir(tmp_path)
    for name in denied:
        (tmp_path / name).write_text("method: nora\n")
    cases = {
        ("recipes", "validate", "r.yaml"): r"^error: cannot read recipe r\.yaml: Permission denied\n$",
        ("train", "r.yaml"): r"^error: cannot read recipe r\.yaml: Permission denied\n$",
        ("sample", "--model", "m", "--prompt-file", "p.txt"): r"^error: cannot read prompt file p\.txt: Permission denied\n$",
    }
    for args, message in cases.items():
        code, err = _run_main(list(args), capsys)
        assert code == 2 and re.search(message, err), (args, err)
    from nora_cli.data.sources import load_records

    with pytest.raises(NoraError, match=r"cannot read dataset file .*data\.json: Permission denied"):
        load_records(str(tmp_path / "data.json"))


def test_error_table_maps_user_os_errors_and_keeps_bugs() -> None:
    from nora_cli.cli import one_line

    assert one_line(PermissionError(13, "Permission denied", "/data/x.json")) == "error: /data/x.json: Permission denied"
    assert one_line(IsADirectoryError(21, "Is a directory", "out")) == "error: out: Is a directory"
    assert one_line(NoraError("two\nlines")) == "error: two lines"  # never more than one line
    assert one_line(OSError(5, "Input/output error", "/dev/sda")) is None  # a disk failure keeps its traceback
    assert one_line(KeyError("bug")) is None and one_line(ZeroDivisionError()) is None


def test_cli_runner_and_console_script_share_the_table(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Usage errors are one line and exit 2 under CliRunner too; --debug adds the traceback, same exit code."""
    from typer.testing import CliRunner

    from nora_cli.cli import app

    for args, line in ((["train"], "error: Missing argument 'recipe'.\n"),
                       (["no-such-command"], "error: No such command 'no-such-command'.\n"),
                       (["recipes", "validate", str(tmp_path / "none.yaml")], "error: recipe file not found: ")):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2 and result.stderr.startswith(line) and result.stderr.count("\n") == 1, result.stderr
        assert result.stdout == ""
        assert _run_main(args, capsys) == (2, result.stderr)
    code, err = _run_main(["--debug", "train"], capsys)
    assert code == 2 and "Traceback" in err and err.splitlines()[-1] == "error: Missing argument 'recipe'."
    assert "NORA_DEBUG" not in os.environ  # --debug lasts one call: later in-process calls get one line again
    assert _run_main([], capsys)[0] == 0  # bare `nora` prints its help
