"""Data sources and formats: every file type, save_to_disk folders, hub-style folders with a config, split
slices, column and role mapping, mixing several datasets, and the check that runs before any model loads.

Everything is generated in the test; HF_HUB_OFFLINE=1 (conftest), so nothing downloads.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, get_args

import pytest
import yaml

from nora_cli.config.data import DataConfig, FormatName
from nora_cli.data.check import check_text_data
from nora_cli.data.example import Example
from nora_cli.data.formats import FORMATS, apply_mapping, normalize_records
from nora_cli.data.mixture import take, training_records
from nora_cli.data.sources import load_records
from nora_cli.errors import NoraError

ROWS = [{"instruction": f"Say {w}.", "input": "", "output": w} for w in
        ("red", "blue", "green", "gold", "pink", "gray", "teal", "navy", "plum", "rust")]


def _chat(*turns: tuple[str, str]) -> tuple[dict[str, str], ...]:
    return tuple({"role": r, "content": c} for r, c in turns)


# --- formats -----------------------------------------------------------------------------------

#: format -> (record, Example it normalizes to); one per format the schema offers
FORMAT_CASES: dict[str, tuple[dict[str, Any], Example]] = {
    "alpaca": ({"instruction": "I", "input": "X", "output": "O"}, Example(instruction="I", input="X", output="O")),
    "chat": ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                           {"role": "assistant", "content": "call"}, {"role": "tool", "content": "42"},
                           {"role": "assistant", "content": "a"}]},
             Example(messages=_chat(("system", "s"), ("user", "u"), ("assistant", "call"), ("tool", "42"),
                                    ("assistant", "a")))),
    "sharegpt": ({"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "25 + 49?"},
                                    {"from": "gpt", "value": "25 + 49 = 74."}, {"from": "human", "value": "x2?"},
                                    {"from": "function_call", "value": "mul(74, 2)"},
                                    {"from": "observation", "value": "148"}, {"from": "gpt", "value": "148."}]},
                 Example(messages=_chat(("system", "s"), ("user", "25 + 49?"), ("assistant", "25 + 49 = 74."),
                                        ("user", "x2?"), ("assistant", "mul(74, 2)"), ("tool", "148"),
                                        ("assistant", "148.")))),
    "text": ({"text": "T"}, Example(output="T")),
    "gsm8k": ({"question": "Q", "answer": "R\n#### 72"}, Example(instruction="Q", output="R\n#### 72", answer="72")),
    "sst2": ({"sentence": "fine", "label": 1}, Example(output="fine It was great")),
}


def test_schema_formats_are_the_registered_ones() -> None:
    assert set(get_args(FormatName)) == set(FORMAT_CASES) == set(FORMATS) - {"normalized"}


@pytest.mark.parametrize("fmt", sorted(FORMAT_CASES))
def test_each_format_from_a_recipe_file(tmp_path: Path, fmt: str) -> None:
    record, expected = FORMAT_CASES[fmt]
    (tmp_path / "d.jsonl").write_text(json.dumps(record) + "\n")
    records, got_fmt = training_records(DataConfig(path=str(tmp_path / "d.jsonl"), format=fmt), seed=0)
    assert got_fmt == fmt and normalize_records(records, fmt) == [expected]


def test_sharegpt_roles_are_configurable() -> None:
    record = {"conversations": [{"from": "person", "value": "hi"}, {"from": "bot", "value": "hello"}]}
    with pytest.raises(NoraError, match=r"record 0: unknown from 'person'.*data\.roles"):
        normalize_records([record], "sharegpt")
    mapped = apply_mapping([record], "sharegpt", roles={"person": "user", "bot": "assistant"})
    assert normalize_records(mapped, "sharegpt") == [Example(messages=_chat(("user", "hi"), ("assistant", "hello")))]
    assert record["conversations"][0]["from"] == "person"  # the caller's records are not changed
    chat = {"messages": [{"role": "human", "content": "hi"}, {"role": "gpt", "content": "hello"}]}
    assert normalize_records(apply_mapping([chat], "chat", roles={"human": "user", "gpt": "assistant"}), "chat") == \
        [Example(messages=_chat(("user", "hi"), ("assistant", "hello")))]
    with pytest.raises(NoraError, match="data.roles applies to the chat and sharegpt formats"):
        apply_mapping([{"text": "t"}], "text", roles={"a": "b"})
    with pytest.raises(NoraError, match=r"format 'sharegpt': record 0 is missing key 'conversations'"):
        normalize_records([{"messages": []}], "sharegpt")
    with pytest.raises(NoraError, match="last message must be the assistant"):
        normalize_records([{"conversations": [{"from": "human", "value": "hi"}]}], "sharegpt")


def test_columns_map_user_names_onto_format_keys(tmp_path: Path) -> None:
    rows = [{"question": "What is 2+2?", "answer": "4", "id": 1}]
    (tmp_path / "q.json").write_text(json.dumps(rows))
    dcfg = DataConfig(path=str(tmp_path / "q.json"), columns={"instruction": "question", "output": "answer"})
    records, fmt = training_records(dcfg, seed=0)
    assert records == [{"id": 1, "instruction": "What is 2+2?", "output": "4"}]  # 'answer' is renamed, not kept
    assert normalize_records(records, fmt) == [Example(instruction="What is 2+2?", output="4")]
    # one column may feed two keys; a column a record lacks is one error naming the mapping
    both = apply_mapping(rows, "alpaca", columns={"instruction": "question", "input": "question", "output": "answer"})
    assert both[0]["instruction"] == both[0]["input"] == "What is 2+2?"
    with pytest.raises(NoraError, match=r"record 0 has no column 'prompt' \(data\.columns maps 'instruction' to it"):
        apply_mapping(rows, "alpaca", columns={"instruction": "prompt"})


# --- sources -----------------------------------------------------------------------------------


def _write_all(folder: Path, rows: list[dict]) -> dict[str, Path]:
    """The same rows as every file type nora reads."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = {suffix: folder / f"d.{suffix}" for suffix in ("json", "jsonl", "csv", "tsv", "parquet", "arrow")}
    files["json"].write_text(json.dumps(rows))
    files["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    for suffix, sep in (("csv", ","), ("tsv", "\t")):
        datasets.Dataset.from_list(rows).to_csv(str(files[suffix]), sep=sep, index=False)
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, files["parquet"])
    with pa.OSFile(str(files["arrow"]), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return files


def test_every_file_type_reads_the_same_records(tmp_path: Path) -> None:
    for suffix, path in _write_all(tmp_path, ROWS).items():
        assert load_records(str(path)) == ROWS, suffix
        assert load_records(path.name, base_dir=tmp_path) == ROWS, suffix


def test_csv_cells_stay_text(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_text("instruction,input,output\nZip?,,007\nNA?,NA,1.50\n")
    assert load_records(str(tmp_path / "d.csv")) == [
        {"instruction": "Zip?", "input": "", "output": "007"}, {"instruction": "NA?", "input": "NA", "output": "1.50"}]
    (tmp_path / "wide.csv").write_text("instruction,output\na,b,c\n")
    with pytest.raises(NoraError, match="row 1 has more values than the header has columns"):
        load_records(str(tmp_path / "wide.csv"))


def test_csv_in_a_recipe_folder_is_found_from_anywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The issue's "dataset not found" for an existing CSV: a recipe elsewhere naming `data/train.csv`."""
    from nora_cli.config.load import load_recipe

    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "data" / "train.csv").write_text("instruction,input,output\nSay hi.,,hi\n")
    (project / "r.yaml").write_text(yaml.safe_dump({"data": {"path": "data/train.csv"}}))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    recipe = load_recipe(str(project / "r.yaml"))
    assert check_text_data(recipe.data) == f"data {project / 'data' / 'train.csv'}: 1 records, format alpaca"
    recipe = load_recipe(str(project / "r.yaml"), [f"data.path={project / 'data' / 'train.tsv'}"])
    with pytest.raises(NoraError, match=r"dataset file not found: .*train\.tsv"):
        check_text_data(recipe.data)


def test_save_to_disk_dataset_and_dataset_dict(tmp_path: Path) -> None:
    import datasets

    train, test = datasets.Dataset.from_list(ROWS[:6]), datasets.Dataset.from_list(ROWS[6:])
    train.save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "dd"))
    assert load_records(str(tmp_path / "ds")) == ROWS[:6]
    assert load_records(str(tmp_path / "ds"), split="train[:2]") == ROWS[:2]
    assert load_records(str(tmp_path / "dd")) == ROWS[:6]
    assert load_records(str(tmp_path / "dd"), split="test") == ROWS[6:]
    assert load_records(str(tmp_path / "dd"), split="train[:50%]+test[-1:]") == ROWS[:3] + ROWS[-1:]
    with pytest.raises(NoraError, match=r"saved dataset .*dd has no split 'validation'; it has train, test"):
        load_records(str(tmp_path / "dd"), split="validation")
    assert check_text_data(DataConfig(path=str(tmp_path / "ds"))).endswith("6 records, format alpaca")


def _hub_style_folder(root: Path) -> Path:
    """A dataset repo as it sits on the hub: data files plus README metadata naming two configs."""
    folder = root / "gsm8k-like"
    for config in ("main", "socratic"):
        (folder / config).mkdir(parents=True)
        for split, rows in (("train", 4), ("test", 2)):
            lines = [json.dumps({"question": f"{config} q{i}", "answer": f"a\n#### {i}"}) for i in range(rows)]
            (folder / config / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    configs = [{"config_name": c, "data_files": [{"split": s, "path": f"{c}/{s}.jsonl"} for s in ("train", "test")]}
               for c in ("main", "socratic")]
    (folder / "README.md").write_text("---\n" + yaml.safe_dump({"configs": configs}) + "---\n# gsm8k-like\n")
    return folder


def test_hub_style_folder_with_a_config_name(tmp_path: Path) -> None:
    folder = _hub_style_folder(tmp_path)
    main = load_records(str(folder), name="main")
    assert [r["question"] for r in main] == ["main q0", "main q1", "main q2", "main q3"]
    assert [r["question"] for r in load_records(str(folder), name="socratic", split="test[:1]")] == ["socratic q0"]
    assert [r["question"] for r in load_records(str(folder), data_files={"train": "socratic/test.jsonl"})] == [
        "socratic q0", "socratic q1"]
    with pytest.raises(NoraError, match=r"cannot load dataset .*gsm8k-like.*config 'nope'"):
        load_records(str(folder), name="nope")
    dcfg = DataConfig(path=str(folder), name="main", format="gsm8k", split="train[:50%]")
    assert check_text_data(dcfg).endswith("2 records, format gsm8k")


def test_hub_ids_fail_in_the_check_while_offline(tmp_path: Path) -> None:
    with pytest.raises(NoraError, match=r"cannot load dataset 'nora-tests/no-such-data' \(split 'train', config 'x'\)"):
        check_text_data(DataConfig(path="nora-tests/no-such-data", name="x"))


@pytest.mark.parametrize(("split", "expected"), [
    ("train", ROWS), ("train[:3]", ROWS[:3]), ("train[-2:]", ROWS[-2:]), ("train[:10%]", ROWS[:1]),
    ("train[20%:40%]", ROWS[2:4]), ("train[:2]+train[-1:]", ROWS[:2] + ROWS[-1:]),
])
def test_split_slices_apply_to_local_files(tmp_path: Path, split: str, expected: list[dict]) -> None:
    files = _write_all(tmp_path, ROWS)
    for path in (files["json"], files["parquet"]):
        assert load_records(str(path), split=split) == expected


def test_split_slices_on_builtins_and_bad_splits(tmp_path: Path) -> None:
    from nora_cli.data.demo import demo_records

    assert load_records("builtin:demo", split="test[:5]") == demo_records("test")[:5]
    (tmp_path / "d.json").write_text(json.dumps(ROWS))
    with pytest.raises(NoraError, match=r"bad split 'train\[:x\]'"):
        load_records(str(tmp_path / "d.json"), split="train[:x]")


# --- mixing ------------------------------------------------------------------------------------


def test_take_counts_weights_and_caps() -> None:
    import random

    assert take(4, weight=None, max_samples=None, rng=random.Random(0)) == [0, 1, 2, 3]
    assert take(4, weight=2, max_samples=None, rng=random.Random(0)) == [0, 1, 2, 3] * 2
    half = take(10, weight=0.5, max_samples=None, rng=random.Random(0))
    assert len(half) == 5 == len(set(half)) and half == sorted(half)
    assert len(take(10, weight=1.5, max_samples=12, rng=random.Random(0))) == 12
    assert len(take(10, weight=None, max_samples=3, rng=random.Random(0))) == 3


def test_mixing_datasets_of_different_formats(tmp_path: Path) -> None:
    (tmp_path / "alpaca.json").write_text(json.dumps(ROWS))
    share = [{"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]}
             for i in range(4)]
    (tmp_path / "share.jsonl").write_text("".join(json.dumps(r) + "\n" for r in share))
    (tmp_path / "qa.csv").write_text("question,reply\n" + "".join(f"Q{i},R{i}\n" for i in range(6)))
    tree = {"format": "alpaca", "datasets": [
        {"path": str(tmp_path / "alpaca.json"), "weight": 0.5},
        {"path": str(tmp_path / "share.jsonl"), "format": "sharegpt", "weight": 2},
        {"path": str(tmp_path / "qa.csv"), "columns": {"instruction": "question", "output": "reply"},
         "max_samples": 3, "split": "train[:5]"},
    ]}
    dcfg = DataConfig.model_validate(tree)
    records, fmt = training_records(dcfg, seed=1)
    examples = normalize_records(records, fmt)
    assert fmt == "normalized" and len(examples) == 5 + 8 + 3
    assert sum(1 for e in examples if e.messages) == 8
    assert {e.instruction for e in examples[-3:]} <= {f"Q{i}" for i in range(5)}
    assert training_records(dcfg, seed=1) == (records, fmt)  # deterministic for a seed
    assert training_records(dcfg, seed=2)[0] != records  # another seed picks other halves
    assert check_text_data(dcfg) == "data: 3 datasets mixed, 16 examples"
    tree["datasets"][1]["format"] = "chat"
    with pytest.raises(NoraError, match=r"data\.datasets\[1\] \(.*share\.jsonl\): format 'chat': record 0 is missing"):
        check_text_data(DataConfig.model_validate(tree))


def test_mixing_schema_rules(tmp_path: Path) -> None:
    from nora_cli.config.load import validate_recipe

    with pytest.raises(NoraError, match=r"data\.path cannot be used with data\.datasets"):
        validate_recipe({"data": {"path": "a.json", "datasets": [{"path": "b.json"}]}})
    with pytest.raises(NoraError, match=r"data\.datasets\.0\.weight|data\.datasets\[0\]\.weight"):
        validate_recipe({"data": {"datasets": [{"path": "b.json", "weight": 0}]}})
    with pytest.raises(NoraError, match=r"unknown key 'data\.datasets\[0\]\.wieght'; did you mean .*weight"):
        validate_recipe({"data": {"datasets": [{"path": "b.json", "wieght": 1}]}})


def test_validate_reads_every_source_without_loading_a_model(tmp_path: Path) -> None:
    """`nora recipes validate` on a recipe mixing two relative files: both resolve against the recipe's
    folder, are read and parsed; neither torch nor transformers is imported."""
    (tmp_path / "a.json").write_text(json.dumps(ROWS))
    (tmp_path / "b.csv").write_text("instruction,input,output\nSay hi.,,hi\n")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"source": "model"}, "data": {"datasets": [
        {"path": "a.json", "max_samples": 2}, {"path": "b.csv"}]}}))
    code = ("import sys\nsys.argv = ['nora', 'recipes', 'validate', sys.argv[1]]\nfrom nora_cli.cli import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules, 'transformers' in sys.modules, file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code, str(recipe)], capture_output=True, text=True, cwd="/")
    assert "ok: data: 2 datasets mixed, 3 examples" in proc.stderr, proc.stderr
    assert proc.stderr.strip().endswith("False False"), proc.stderr


def test_readme_data_examples_are_valid_data_sections() -> None:
    import re

    from nora_cli.config.load import validate_recipe

    section = (Path(__file__).resolve().parents[1] / "README.md").read_text().split("## Your data", 1)[1]
    blocks = re.findall(r"```yaml\n(.*?)```", section.split("\n## ", 1)[0], flags=re.S)
    formats = set()
    for block in blocks:
        data = validate_recipe(yaml.safe_load(block)).data
        formats |= {data.format} | {d.format for d in data.datasets or () if d.format}
    assert formats == set(get_args(FormatName))
