"""Text data pipeline: templates (byte-exact vs LLM-Adapters), formats, loading, masking, splits, demo data."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from nora_cli.data import (
    FORMATS,
    Example,
    alpaca_eval_prompt,
    build_datasets,
    collate,
    demo_records,
    load_records,
    normalize_records,
    render,
    render_prompt,
    tokenize_example,
    write_demo,
)
from nora_cli.data.demo import GROUPS
from nora_cli.errors import NoraError


@pytest.fixture(scope="module")
def smol_path() -> str:
    from nora_cli.models import resolve_source

    return resolve_source("smollm2-135m").name_or_path


@pytest.fixture(scope="module")
def tok(smol_path):
    from nora_cli.models import ModelSource, load_tokenizer

    return load_tokenizer(ModelSource(smol_path, "smollm2-135m"))


@pytest.fixture(scope="module")
def bos_eos_tok(smol_path):
    """The same vocabulary, configured to add BOS *and* EOS (like Llama tokenizers with add_eos_token)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_path, add_bos_token=True, add_eos_token=True)


# --- templates -------------------------------------------------------------------------------

# Expected strings, written out from LLM-Adapters finetune.py / commonsense_evaluate.py `generate_prompt`
# (github.com/AGI-Edgerunners/LLM-Adapters @ 8166572, identical in github.com/BingcongLi/NoRA).
TRAIN_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request. \n"
    "\n"
    "                ### Instruction:\n"
    "                Sort the list.\n"
    "                \n"
    "                ### Input:\n"
    "                3, 1, 2\n"
    "                \n"
    "                ### Response:\n"
    "                1, 2, 3"
)
TRAIN_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.  \n"
    "\n"
    "                ### Instruction:\n"
    "                Name a color.\n"
    "                \n"
    "                ### Response:\n"
    "                red"
)
EVAL_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n"
    "\n"
    "                ### Instruction:\n"
    "                Sort the list.\n"
    "\n"
    "                ### Input:\n"
    "                3, 1, 2\n"
    "\n"
    "                ### Response:\n"
    "                "
)
EVAL_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request. \n"
    "\n"
    "                ### Instruction:\n"
    "                Name a color.\n"
    "\n"
    "                ### Response:\n"
    "                "
)


def test_alpaca_training_prompt_is_byte_exact():
    with_input = Example(instruction="Sort the list.", input="3, 1, 2", output="1, 2, 3")
    no_input = Example(instruction="Name a color.", output="red")
    assert render_prompt("alpaca", with_input, with_output=True) == TRAIN_WITH_INPUT
    assert render_prompt("alpaca", no_input, with_output=True) == TRAIN_NO_INPUT
    prompt, response = render("alpaca", with_input)
    assert (prompt, response) == (TRAIN_WITH_INPUT[: -len("1, 2, 3")], "1, 2, 3")
    assert render_prompt("alpaca", no_input) == TRAIN_NO_INPUT[: -len("red")]


def test_alpaca_eval_prompt_is_byte_exact():
    assert alpaca_eval_prompt("Sort the list.", "3, 1, 2") == EVAL_WITH_INPUT
    assert alpaca_eval_prompt("Name a color.", None) == EVAL_NO_INPUT
    assert alpaca_eval_prompt("Name a color.", "") == EVAL_NO_INPUT


def test_gsm8k_under_alpaca_maps_question_and_answer():
    ex = FORMATS["gsm8k"]({"question": "Name a color.", "answer": "red\n#### 7"})
    assert render("alpaca", ex) == (TRAIN_NO_INPUT[: -len("red")], "red\n#### 7")
    assert ex.answer == "7"


def test_none_template_concatenates():
    assert render("none", FORMATS["text"]({"text": "hello world"})) == ("", "hello world")
    ex = Example(instruction="Q?", input="ctx", output="A.")
    assert render("none", ex) == ("Q?\nctx\n", "A.")
    chat = FORMATS["chat"]({"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Yo."}]})
    assert render("none", chat) == ("Hi?\n", "Yo.") and render("alpaca", chat) == render("alpaca", Example("Hi?", output="Yo."))
    with pytest.raises(NoraError, match="alpaca"):
        render("alpaca", FORMATS["text"]({"text": "x"}))
    with pytest.raises(NoraError, match="unknown prompt template 'nope'"):
        render("nope", ex)


def test_chat_template_splits_at_generation_prompt(tok):
    messages = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]
    prompt, response = render("chat", FORMATS["chat"]({"messages": messages}), tok)
    assert prompt + response == tok.apply_chat_template(messages, tokenize=False)
    assert prompt == tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n") and response == "Hello.<|im_end|>\n"
    # An alpaca record becomes one user turn (instruction + input) and one assistant turn.
    prompt2, response2 = render("chat", Example(instruction="Hi?", output="Hello."), tok)
    assert (prompt2, response2) == (prompt, response)
    with pytest.raises(NoraError, match="tokenizer"):
        render("chat", Example(instruction="Hi?", output="Hello."))


# --- formats ---------------------------------------------------------------------------------

FORMAT_CASES = {
    "alpaca": ({"instruction": "I", "input": "X", "output": "O", "answer": "answer2"},
               Example(instruction="I", input="X", output="O", answer="answer2"), ["instruction", "output"]),
    "gsm8k": ({"query": "Q", "response": "R\n#### 1,234"},
              Example(instruction="Q", output="R\n#### 1,234", answer="1234"), ["question|query", "answer|response"]),
    "text": ({"text": "T"}, Example(output="T"), ["text"]),
    "chat": ({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]},
             Example(messages=({"role": "user", "content": "u"}, {"role": "assistant", "content": "a"})),
             ["messages"]),
}


@pytest.mark.parametrize("fmt", sorted(FORMAT_CASES))
def test_format_normalizes_and_names_missing_keys(fmt):
    record, expected, required = FORMAT_CASES[fmt]
    assert normalize_records([record], fmt) == [expected]
    for alternatives in required:
        broken = {k: v for k, v in record.items() if k not in alternatives.split("|")}
        with pytest.raises(NoraError) as err:
            normalize_records([record, record, broken], fmt)
        msg = str(err.value)
        assert f"'{fmt}'" in msg and "record 2" in msg and repr(alternatives) in msg, msg


def test_format_errors():
    with pytest.raises(NoraError, match="unknown data format"):
        normalize_records([], "csv")
    with pytest.raises(NoraError, match="record 0: the last message must be the assistant"):
        normalize_records([{"messages": [{"role": "user", "content": "u"}]}], "chat")
    assert FORMATS["gsm8k"]({"question": "q", "answer": "no final line"}).answer is None
    assert FORMATS["alpaca"]({"instruction": "i", "output": "o"}) == Example(instruction="i", output="o")


# --- loading ---------------------------------------------------------------------------------

RECORDS = [{"instruction": "a", "input": "", "output": "b"}, {"instruction": "c", "input": "d", "output": "e"}]


def test_load_json_jsonl_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "d.json").write_text(json.dumps(RECORDS))
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS) + "\n")
    pq.write_table(pa.Table.from_pylist(RECORDS), tmp_path / "d.parquet")
    for name in ("d.json", "d.jsonl", "d.parquet"):
        assert load_records(str(tmp_path / name)) == RECORDS
        assert load_records(name, base_dir=tmp_path) == RECORDS
    # A JSON-lines file saved as .json (datasets accepts those too).
    (tmp_path / "lines.json").write_text((tmp_path / "d.jsonl").read_text())
    assert load_records(str(tmp_path / "lines.json")) == RECORDS


def test_load_errors(tmp_path):
    with pytest.raises(NoraError, match=r"dataset file not found: .*missing\.json"):
        load_records(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text('[\n  {"a": 1},\n  {"b": }\n]')
    with pytest.raises(NoraError, match=r"bad\.json: invalid JSON at line 3, column 9"):
        load_records(str(tmp_path / "bad.json"))
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n{"a": 2\n')
    with pytest.raises(NoraError, match=r"bad\.jsonl: invalid JSON at line 2"):
        load_records(str(tmp_path / "bad.jsonl"))
    (tmp_path / "obj.json").write_text('{"a": 1}')
    with pytest.raises(NoraError, match="expected a JSON list of objects"):
        load_records(str(tmp_path / "obj.json"))
    with pytest.raises(NoraError, match="unknown built-in dataset"):
        load_records("builtin:nope")


def test_hub_names_go_to_datasets_lazily(monkeypatch):
    code = "import sys, nora_cli.data; print('datasets' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]

    import datasets

    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        if name == "nobody/missing":
            raise FileNotFoundError("Couldn't find dataset nobody/missing")
        return datasets.Dataset.from_list(RECORDS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_records("someone/alpaca", split="test") == RECORDS
    with pytest.raises(NoraError, match="cannot load dataset 'nobody/missing' .*Couldn't find"):
        load_records("nobody/missing")
    assert calls == [("someone/alpaca", "test"), ("nobody/missing", "train")]


# --- tokenization ----------------------------------------------------------------------------


def test_masks_exactly_the_prompt(tok):
    ex = Example(instruction="Name a color.", output="the correct answer is answer2")
    prompt, response = render("alpaca", ex)
    feat = tokenize_example(ex, tok, template="alpaca", cutoff_len=256, train_on_inputs=False, add_eos=True)
    n_prompt = len(tok(prompt)["input_ids"])
    assert feat["input_ids"][:n_prompt] == tok(prompt)["input_ids"]
    assert feat["labels"][:n_prompt] == [-100] * n_prompt
    assert all(label != -100 for label in feat["labels"][n_prompt:])
    assert tok.decode(feat["input_ids"][:n_prompt]) == prompt
    assert tok.decode(feat["labels"][n_prompt:]) == response + tok.eos_token
    assert feat["input_ids"].count(tok.eos_token_id) == 1 and feat["input_ids"][-1] == tok.eos_token_id
    # train_on_inputs keeps every label; add_eos=False appends nothing.
    full = tokenize_example(ex, tok, template="alpaca", cutoff_len=256, train_on_inputs=True, add_eos=False)
    assert full["labels"] == full["input_ids"] == feat["input_ids"][:-1]


def test_eos_once_and_truncation(tok):
    ex = Example(instruction="Q", output="one two three four five six")
    base = tokenize_example(ex, tok, template="none", cutoff_len=512, train_on_inputs=False, add_eos=True)
    n = len(base["input_ids"])
    # Exactly one free slot: EOS still fits. No free slot: truncated, and no EOS (as LLM-Adapters).
    fits = tokenize_example(ex, tok, template="none", cutoff_len=n, train_on_inputs=False, add_eos=True)
    assert fits == base
    cut = tokenize_example(ex, tok, template="none", cutoff_len=n - 2, train_on_inputs=False, add_eos=True)
    assert cut["input_ids"] == base["input_ids"][: n - 2] and tok.eos_token_id not in cut["input_ids"]
    assert len(cut["labels"]) == n - 2
    # A chat response already closes its turn with EOS (<|im_end|>): it is not added twice.
    chat = tokenize_example(ex, tok, template="chat", cutoff_len=512, train_on_inputs=False, add_eos=True)
    assert chat["input_ids"].count(tok.eos_token_id) == 3  # system, user, assistant turns
    assert tok.decode([t for t in chat["labels"] if t != -100]) == "one two three four five six<|im_end|>\n"


def test_bos_is_masked_and_eos_not_inside(bos_eos_tok):
    t = bos_eos_tok
    ex = Example(instruction="Q", output="A")
    feat = tokenize_example(ex, t, template="alpaca", cutoff_len=256, train_on_inputs=False, add_eos=True)
    assert feat["input_ids"][0] == t.bos_token_id and feat["input_ids"].count(t.bos_token_id) == 1
    assert feat["input_ids"].count(t.eos_token_id) == 1 and feat["input_ids"][-1] == t.eos_token_id
    assert t.decode([x for x in feat["labels"] if x != -100]) == "A" + t.eos_token
    assert feat["labels"][0] == -100


# --- datasets and collation ------------------------------------------------------------------


def _records(n: int) -> list[dict]:
    return [{"instruction": f"item {i}", "input": "", "output": f"out {i}"} for i in range(n)]


def _ids(features, tok) -> list[str]:
    return [re.search(r"item \d+", tok.decode(f["input_ids"])).group() for f in features]


def test_build_datasets_is_deterministic(tok):
    kw = dict(fmt="alpaca", template="alpaca", cutoff_len=128, train_on_inputs=False, add_eos=True)
    train, val = build_datasets(_records(50), tok, val_set_size=10, seed=1, **kw)
    again = build_datasets(_records(50), tok, val_set_size=10, seed=1, **kw)
    other = build_datasets(_records(50), tok, val_set_size=10, seed=2, **kw)
    assert (train, val) == again and (train, val) != other
    names, val_names = _ids(train, tok), _ids(val, tok)
    assert len(names) == 40 and len(val_names) == 10
    assert sorted(names + val_names) == sorted(f"item {i}" for i in range(50))
    assert names != sorted(names, key=lambda s: int(s.split()[1]))  # shuffled
    plain, _ = build_datasets(_records(50), tok, val_set_size=0, seed=1, shuffle=False, max_samples=5, **kw)
    assert _ids(plain, tok) == [f"item {i}" for i in range(5)]
    fraction, val_f = build_datasets(_records(50), tok, val_set_size=0.2, seed=1, **kw)
    assert len(val_f) == 10 and len(fraction) == 40
    with pytest.raises(NoraError, match="leaves no training data"):
        build_datasets(_records(5), tok, val_set_size=5, seed=1, **kw)


def test_build_datasets_drops_unlearnable(tok):
    records = _records(3) + [{"instruction": "word " * 300, "input": "", "output": "x"}]
    train, _ = build_datasets(records, tok, fmt="alpaca", template="alpaca", cutoff_len=64,
                              train_on_inputs=False, add_eos=True, val_set_size=0, seed=0)
    assert len(train) == 3
    train, _ = build_datasets(records, tok, fmt="alpaca", template="alpaca", cutoff_len=64,
                              train_on_inputs=True, add_eos=True, val_set_size=0, seed=0)
    assert len(train) == 4 and max(len(f["input_ids"]) for f in train) == 64


def test_collate_pads_right_and_counts_tokens():
    feats = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9], "labels": [-100, -100]},
             {"input_ids": [1, 2, 3, 4, 5], "labels": [1, 2, 3, 4, 5]}]
    batch = collate(feats, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0, 0], [8, 9, 0, 0, 0], [1, 2, 3, 4, 5]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, -100], [-100] * 5, [1, 2, 3, 4, 5]]
    assert batch["num_tokens"].dtype == torch.long and int(batch["num_tokens"]) == 2 + 0 + 4
    assert collate(feats, pad_token_id=0, pad_to_multiple_of=8)["input_ids"].shape == (3, 8)


# --- demo dataset ----------------------------------------------------------------------------


_DEMO = re.compile(r"Answer red if the word names an animal, blue if a food, green if a country, yellow if a job\."
                   r"\n\nWord: (\w+)\n\nAnswer format: red/blue/green/yellow")
_GROUP_OF = {w: g for g, (_, words) in GROUPS.items() for w in words}
_ANSWER = {"animal": "red", "food": "blue", "country": "green", "job": "yellow"}


def test_demo_answers_are_correct_and_splits_disjoint(tmp_path):
    """Every demo item's answer is its word's group (looked up here), all four groups are in both splits,
    and no test word occurs in train: the held-out accuracy measures the rule, not memorized items."""
    train, test = demo_records("train"), demo_records("test")
    assert len(train) == 2000 and 60 <= len(test) <= 80
    assert demo_records("train") == train and load_records("builtin:demo") == train
    assert load_records("builtin:demo-test") == test == load_records("builtin:demo", split="test")
    assert demo_records("train", n=50, seed=1) != train[:50] and demo_records("train", n=50) == train[:50]
    words = {}
    for split, records in (("train", train), ("test", test)):
        seen = []
        for r in records:
            m = _DEMO.fullmatch(r["instruction"])
            assert m, r["instruction"]
            expected = _ANSWER[_GROUP_OF[m.group(1)]]
            assert r["answer"] == expected and r["output"] == f"the correct answer is {expected}"
            assert r["input"] == ""
            seen.append(m.group(1))
        counts = Counter(_GROUP_OF[w] for w in set(seen))
        assert set(counts) == set(_ANSWER) and min(counts.values()) >= 10, counts
        words[split] = set(seen)
    assert len(words["test"]) == len(test)  # every test word once
    assert not words["train"] & words["test"]
    for seed in (1, 7):  # disjoint for any seed and size, not just the defaults
        assert not {_DEMO.fullmatch(r["instruction"]).group(1) for r in demo_records("train", 3000, seed)} & words["test"]
    path = write_demo(tmp_path / "demo.json", "test", n=20)
    assert load_records(str(path)) == test[:20]


# --- real data, real tokenizer ---------------------------------------------------------------


def test_arc_easy_with_smollm2(shared, tok):
    path = shared / "data/commonsense/ARC-Easy/train.json"
    records = load_records(str(path))
    assert len(records) == len(json.loads(Path(path).read_text())) > 1000
    examples = normalize_records(records[:64], "alpaca")
    for record, ex in zip(records[:64], examples, strict=True):
        feat = tokenize_example(ex, tok, template="alpaca", cutoff_len=256, train_on_inputs=False, add_eos=True)
        target = tok.decode([t for t in feat["labels"] if t != -100])
        assert target == f"the correct answer is {record['answer']}<|im_end|>"
        assert tok.decode(feat["input_ids"]).startswith(render_prompt("alpaca", ex))
    train, val = build_datasets(records[:300], tok, fmt="alpaca", template="alpaca", cutoff_len=256,
                                train_on_inputs=False, add_eos=True, val_set_size=20, seed=42)
    assert len(val) == 20 and len(train) == 280
    batch = collate(train[:8], pad_token_id=tok.pad_token_id, pad_to_multiple_of=8)
    assert batch["input_ids"].shape[1] % 8 == 0 and int(batch["num_tokens"]) == sum(
        sum(1 for t in f["labels"][1:] if t != -100) for f in train[:8])


def test_sst2_format_matches_the_fewshot_prompt() -> None:
    from nora_cli.data.formats import normalize_records
    from nora_cli.errors import NoraError

    examples = normalize_records([{"sentence": "a gripping film ", "label": 1}, {"sentence": "dull", "label": 0}], "sst2")
    assert [e.output for e in examples] == ["a gripping film It was great", "dull It was terrible"]
    with pytest.raises(NoraError, match="sst2 label"):
        normalize_records([{"sentence": "x", "label": 7}], "sst2")


@pytest.mark.parametrize(("records", "message"), [
    ([{"instruction": "a", "input": "", "output": "b"}, {"instruction": {"x": 1}, "input": "", "output": "c"}],
     r"record 1: field 'instruction' is a mapping, expected text"),
    ([{"instruction": "a", "input": ["x"], "output": "b"}], r"record 0: field 'input' is a list, expected text"),
    ([{"instruction": "a", "input": "", "output": ""}, {"instruction": "b", "input": "", "output": " "}],
     r"every record's output is empty \(records 0-1\)"),
])
def test_nested_fields_and_all_empty_outputs_are_errors(records: list, message: str) -> None:
    with pytest.raises(NoraError, match=message):
        normalize_records(records, "alpaca")


def test_csv_loads_and_unknown_formats_say_unsupported(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_text('instruction,input,output\n"Say ""hi"", please",,hi\nCount,1 2,3\n')
    assert load_records(str(tmp_path / "d.csv")) == [
        {"instruction": 'Say "hi", please', "input": "", "output": "hi"},
        {"instruction": "Count", "input": "1 2", "output": "3"}]
    (tmp_path / "d.xlsx").write_text("a\tb\n")
    with pytest.raises(NoraError, match=r"unsupported data file format '\.xlsx'.*expected \.json, \.jsonl"):
        load_records(str(tmp_path / "d.xlsx"))
    (tmp_path / "bin.json").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(NoraError, match=r"dataset file .*bin\.json is not UTF-8 text"):
        load_records(str(tmp_path / "bin.json"))
