"""`nora data preview`: through the installed console script, with a model folder that has no weights (only
the tokenizer may load); the JSON rows are the training rows, and the mask marks exactly what is learned."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from nora_cli.data.preview import histogram, padding_efficiency

NORA = Path(sys.executable).with_name("nora")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
WORDS = ["red", "blue", "green", "gold", "gray", "pink"]


@pytest.fixture
def recipe(tmp_path: Path, tiny_llama_dir: Path) -> Path:
    """A recipe over 6 alpaca records whose model folder has a tokenizer and config but no weights."""
    model = tmp_path / "no-weights"
    shutil.copytree(tiny_llama_dir, model, ignore=shutil.ignore_patterns("*.safetensors"))
    rows = [{"instruction": f"Name color {i}.", "input": "", "output": w} for i, w in enumerate(WORDS)]
    (tmp_path / "data.json").write_text(json.dumps(rows))
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"model": {"source": str(model)}, "seed": 1, "train": {"batch_size": 2,
                                    "micro_batch_size": 1},
                                    "data": {"path": "data.json", "cutoff_len": 128, "train_on_inputs": False,
                                             "val_set_size": 1}}))
    return path


def _preview(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(NORA), "data", "preview", *args], capture_output=True, text=True, env=ENV,
                          timeout=300)


def _learned_text(tokenizer: object, row: dict) -> str:
    return tokenizer.decode([t for t, m in zip(row["input_ids"], row["label_mask"], strict=True) if m])


def test_json_rows_are_the_training_rows(recipe: Path, tiny_llama_dir: Path) -> None:
    from transformers import AutoTokenizer

    proc = _preview(str(recipe), "--n", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)  # one object, nothing else on stdout
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    assert out["records"] == 6 and out["train_examples"] == 5 and out["val_examples"] == 1
    assert len(out["rows"]) == 2 and out["truncated"] == 0 and out["packing"] is False
    eos = tokenizer.eos_token
    for row in out["rows"]:
        assert len(row["input_ids"]) == len(row["label_mask"]) and set(row["label_mask"]) == {0, 1}
        assert row["text"] == tokenizer.decode(row["input_ids"])
        assert "Below is an instruction" in row["text"] and "### Response:" in row["text"]
        # train_on_inputs false: exactly the response and EOS are learned, nothing of the prompt
        learned = _learned_text(tokenizer, row)
        assert learned.removesuffix(eos) in WORDS and learned.endswith(eos)
    assert out["learned_tokens"] >= 2 * 5 and sum(h["examples"] for h in out["histogram"]) == 5


def test_json_with_packing_shows_packed_rows(recipe: Path, tiny_llama_dir: Path) -> None:
    from transformers import AutoTokenizer

    proc = _preview(str(recipe), "--json", "--n", "10", "--set", "data.packing=true")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    assert out["packing"] is True and out["packed_rows"] == len(out["rows"]) < 5
    assert sum(row["examples"] for row in out["rows"]) == 5
    assert sum(sum(row["label_mask"]) for row in out["rows"]) == out["learned_tokens"]
    learned = "".join(_learned_text(tokenizer, row) for row in out["rows"])
    words = learned.split(tokenizer.eos_token)
    assert words[-1] == "" and len(set(words[:-1])) == 5 and set(words[:-1]) <= set(WORDS)
    assert out["padding_efficiency"] == 1.0 and 0 < out["packing_efficiency"] <= 1  # micro-batches of 1: no pad


def test_rendering_shows_rows_counts_and_histogram(recipe: Path) -> None:
    proc = _preview(str(recipe), "--n", "1")
    assert proc.returncode == 0, proc.stderr
    assert "row 0:" in proc.stdout and "row 1:" not in proc.stdout
    for word in ("records", "truncated", "padding efficiency", "packing efficiency", "example lengths"):
        assert word in proc.stdout, proc.stdout


def test_counts() -> None:
    assert padding_efficiency([1, 3, 1, 3], micro=2, batch=4) == 1.0  # sorted within the step: (1,1) (3,3)
    assert padding_efficiency([1, 3, 1, 3], micro=2, batch=2) == pytest.approx(8 / 12)  # (1,3) (1,3)
    assert histogram([1, 8, 9, 64], 64) == [(1, 8, 2), (9, 16, 1), *((i * 8 + 1, i * 8 + 8, 0) for i in range(2, 7)),
                                            (57, 64, 1)]
