"""Tokenize once (the on-disk feature cache) and streaming: identical features, cache hits and invalidation,
seeded stream order, and resume at the exact example."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from itertools import islice
from pathlib import Path

import pytest
import yaml

from nora_cli.config.data import DataConfig
from nora_cli.config.schema import Recipe, TrainConfig
from nora_cli.data import build_datasets, load_records, normalize_records, tokenize
from nora_cli.data.cache import prepare_text_data, tokenizer_fingerprint
from nora_cli.data.stream import prepare_stream
from nora_cli.errors import NoraError


@pytest.fixture(scope="module")
def tok(smollm2_dir: Path):
    from nora_cli.models import ModelSource, load_tokenizer

    return load_tokenizer(ModelSource(str(smollm2_dir), "smollm2-135m"))


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("NORA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "data"


def _records(n: int) -> list[dict]:
    """Alpaca records of varied length; every 9th prompt is too long for cutoff 64 (nothing to learn)."""
    words = ["red", "blue", "green", "gold", "gray", "pink", "teal", "plum"]
    rows = []
    for i in range(n):
        a, b = words[i % 8], words[(i * 3 + 1) % 8]
        instruction = f"Join the colors {a} and {b}." + (" Again and again." * 30 if i % 9 == 4 else "")
        rows.append({"instruction": instruction, "input": f"case {i}" if i % 2 else "", "output": f"{a}-{b} " * (1 + i % 5)})
    return rows


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _dcfg(path: Path, **overrides: object) -> DataConfig:
    return DataConfig(**{"path": str(path), "cutoff_len": 64, "val_set_size": 6, "train_on_inputs": False,
                         **overrides})


def _prepare(dcfg: DataConfig, tok, seed: int = 1):
    def load_examples():
        return normalize_records(load_records(dcfg.path), dcfg.format)

    return prepare_text_data(dcfg, tok, seed=seed, load_examples=load_examples)


def _reference(dcfg: DataConfig, tok, seed: int = 1):
    """Today's in-memory path."""
    return build_datasets(load_records(dcfg.path), tok, fmt=dcfg.format, template=dcfg.template,
                          cutoff_len=dcfg.cutoff_len, train_on_inputs=dcfg.train_on_inputs, add_eos=dcfg.add_eos,
                          val_set_size=dcfg.val_set_size, seed=seed, max_samples=dcfg.max_samples,
                          shuffle=dcfg.shuffle)


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_cache_equals_the_in_memory_path_and_a_second_run_does_not_tokenize(tmp_path, tok, cache, monkeypatch):
    dcfg = _dcfg(_write(tmp_path / "d.jsonl", _records(90)))
    train, val = _reference(dcfg, tok)
    assert len(train) < 84  # some examples were dropped as unlearnable: the cache must drop the same ones

    first = _prepare(dcfg, tok)
    assert first.hit is False and first.path is not None and first.path.parent == cache
    assert list(first.train) == train and list(first.val) == val
    assert first.lengths == [len(f["input_ids"]) for f in train]
    assert first.train[-1] == train[-1] and first.train[1:4] == train[1:4]
    with pytest.raises(IndexError):
        first.train[len(train)]
    stamps = _mtimes(first.path)

    calls = {"tokenize": 0, "load": 0}
    real = tokenize._tokenize_many

    def counting(*args, **kwargs):
        calls["tokenize"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(tokenize, "_tokenize_many", counting)

    def load_examples():
        calls["load"] += 1
        return normalize_records(load_records(dcfg.path), dcfg.format)

    second = prepare_text_data(dcfg, tok, seed=1, load_examples=load_examples)
    assert second.hit is True and second.path == first.path
    assert calls == {"tokenize": 0, "load": 0}  # neither read nor tokenized the records again
    assert _mtimes(second.path) == stamps  # nothing rewritten
    assert list(second.train) == train and list(second.val) == val

    uncached = _prepare(dcfg.model_copy(update={"cache": False}), tok)  # data.cache: false is today's path
    assert uncached.hit is None and uncached.train == train and uncached.val == val and calls["tokenize"] == 1
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == [first.path.name]


def test_parallel_build_equals_the_in_memory_path(tmp_path, tok):
    dcfg = _dcfg(_write(tmp_path / "d.jsonl", _records(2300)), num_proc=2, val_set_size=100)
    train, val = _reference(dcfg, tok, seed=4)
    data = _prepare(dcfg, tok, seed=4)
    meta = json.loads((data.path / "meta.json").read_text())
    assert len(meta["files"]) == 2  # two worker processes wrote one shard each
    assert list(data.train) == train and list(data.val) == val


@pytest.mark.parametrize("change", ["data file", "template", "cutoff_len", "train_on_inputs", "seed",
                                    "val_set_size", "max_samples"])
def test_cache_is_invalidated_by_what_changes_the_features(tmp_path, tok, change):
    path = _write(tmp_path / "d.jsonl", _records(40))
    dcfg, seed = _dcfg(path), 1
    first = _prepare(dcfg, tok)
    assert _prepare(dcfg.model_copy(update={"num_proc": 3, "shuffle_buffer": 7}), tok).hit is True
    if change == "data file":
        _write(path, _records(41))
    elif change == "seed":
        seed = 2
    else:
        new = {"template": "none", "cutoff_len": 48, "train_on_inputs": True, "val_set_size": 3,
               "max_samples": 30}[change]
        dcfg = dcfg.model_copy(update={change: new})
    again = _prepare(dcfg, tok, seed=seed)
    assert again.hit is False and again.path != first.path
    train, val = _reference(dcfg, tok, seed=seed)
    assert list(again.train) == train and list(again.val) == val


def test_a_damaged_cache_is_rebuilt(tmp_path, tok):
    dcfg = _dcfg(_write(tmp_path / "d.jsonl", _records(40)))
    first = _prepare(dcfg, tok)
    table = first.path / json.loads((first.path / "meta.json").read_text())["files"][0]
    del first
    table.write_bytes(table.read_bytes()[:100])
    again = _prepare(dcfg, tok)
    assert again.hit is False
    train, val = _reference(dcfg, tok)
    assert list(again.train) == train and list(again.val) == val


def test_tokenizer_fingerprint_is_its_content_not_its_path(tmp_path, tok, smollm2_dir):
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path / "copy")
    assert tokenizer_fingerprint(AutoTokenizer.from_pretrained(tmp_path / "copy")) == tokenizer_fingerprint(tok)
    with_eos = AutoTokenizer.from_pretrained(smollm2_dir, add_bos_token=True, add_eos_token=True)
    assert tokenizer_fingerprint(with_eos) != tokenizer_fingerprint(tok)
    other_template = AutoTokenizer.from_pretrained(smollm2_dir)
    other_template.chat_template = "{{ messages[0]['content'] }}"
    assert tokenizer_fingerprint(other_template) != tokenizer_fingerprint(tok)


def test_stream_is_seeded_and_resumes_at_the_exact_example(tmp_path, tok):
    records = _records(100)
    dcfg = _dcfg(_write(tmp_path / "d.jsonl", records), streaming=True, shuffle_buffer=16, val_set_size=4)
    one = prepare_stream(dcfg, tok, seed=1)
    head = list(islice(one.stream(0), 250))  # more than two passes: the stream wraps around
    assert head == list(islice(prepare_stream(dcfg, tok, seed=1).stream(0), 250))
    assert head != list(islice(prepare_stream(dcfg, tok, seed=2).stream(0), 250))
    assert list(islice(one.stream(37), 100)) == head[37:137]  # --resume skips exactly the used examples

    # each pass is a reshuffled permutation of the learnable training records; val is the first 4 records
    plain = dict(shuffle=False, val_set_size=0)
    expected, _ = build_datasets(records[4:], tok, fmt="alpaca", template="alpaca", cutoff_len=64,
                                 train_on_inputs=False, add_eos=True, seed=0, **plain)
    val, _ = build_datasets(records[:4], tok, fmt="alpaca", template="alpaca", cutoff_len=64,
                            train_on_inputs=False, add_eos=True, seed=0, **plain)
    assert one.val == val
    n = len(expected)
    key = lambda f: json.dumps(f, sort_keys=True)  # noqa: E731
    assert sorted(map(key, head[:n])) == sorted(map(key, expected)) == sorted(map(key, head[n:2 * n]))
    assert head[:n] != expected and head[:n] != head[n:2 * n]
    unshuffled = prepare_stream(dcfg.model_copy(update={"shuffle": False}), tok, seed=1)
    assert list(islice(unshuffled.stream(0), n)) == expected


def test_streaming_needs_max_steps():
    from nora_cli.loop.loop import plan_schedule

    with pytest.raises(ValueError, match="max_steps"):
        Recipe(data={"streaming": True})
    assert Recipe(data={"streaming": True}, train={"max_steps": 5}).data.streaming
    with pytest.raises(NoraError, match="max_steps"):
        plan_schedule(None, TrainConfig(), 1)
    sched = plan_schedule(None, TrainConfig(max_steps=5, batch_size=4, micro_batch_size=2), 1)
    assert (sched.total_steps, sched.steps_per_epoch) == (5, 5)


def _train(tmp: Path, model_dir: Path, data: Path, env: dict | None = None, *args: str):
    recipe = {
        "method": "nora+", "seed": 3, "model": {"source": str(model_dir)},
        "adapter": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "optimizer": {"lr": 1e-2},
        "data": {"path": str(data), "cutoff_len": 64, "streaming": True, "shuffle_buffer": 8, "val_set_size": 4},
        "train": {"max_steps": 4, "batch_size": 4, "micro_batch_size": 2, "save_steps": 2, "eval_steps": 4},
        "output": {"dir": str(tmp / "out")},
    }
    (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "nora_cli", "train", str(tmp / "recipe.yaml"), *args],
                          capture_output=True, text=True, env=env, timeout=600)


def test_streamed_training_resumes_bitwise(tmp_path, tiny_llama_dir):
    import torch
    from safetensors.torch import load_file

    data = _write(tmp_path / "d.jsonl", _records(16))  # 10 learnable after 4 val: 16 examples wrap around
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert (proc := _train(tmp_path / "a", tiny_llama_dir, data)).returncode == 0, proc.stderr
    killed = _train(tmp_path / "b", tiny_llama_dir, data, {"NORA_FAULT_KILL_AT_STEP": "2"})
    assert killed.returncode == -9, killed.stderr
    resumed = _train(tmp_path / "b", tiny_llama_dir, data, None, "--resume")
    assert resumed.returncode == 0 and "(step 2/4)" in resumed.stderr, resumed.stderr
    a = load_file(str(tmp_path / "a" / "out" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "out" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in (tmp_path / "a" / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4] and any("val_loss" in r for r in rows)
