"""Chat training: every assistant turn learned and nothing else, token by token, with the tokenizer's own chat
template and with each named template on a tokenizer that has none; train_on_inputs defaults; the template
saved with the adapter's tokenizer."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, get_args

import pytest
import yaml

from nora_cli.data import CHAT_TEMPLATES, TEMPLATES, Example, normalize_records, render, render_segments
from nora_cli.data.templates import trained_chat_template
from nora_cli.data.tokenize import IGNORE_INDEX, build_datasets, learns_inputs, tokenize_example
from nora_cli.errors import NoraError

SYSTEM = "You are a careful calculator."
TURNS = [("What is 12 + 30?", "12 + 30 = 42."),
         ("And 25 + 49?", "25 + 49 = 74."),
         ("Thanks! Now 7 times 6, please.", "7 × 6 = 42. Anything else?")]
MESSAGES = [{"role": "system", "content": SYSTEM}] + [
    {"role": role, "content": text} for user, reply in TURNS for role, text in (("user", user), ("assistant", reply))
]
REPLIES = [reply for _, reply in TURNS]


@pytest.fixture(scope="module")
def tok(smollm2_dir: Path) -> Any:
    """SmolLM2's real tokenizer, whose own chat template is ChatML (<|im_end|> is its EOS)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def bare_tok(smollm2_dir: Path) -> Any:
    """The same vocabulary without a chat template (as a base model's tokenizer often is)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    tokenizer.chat_template = None
    return tokenizer


def _conversation() -> Example:
    return normalize_records([{"messages": MESSAGES}], "chat")[0]


def _find(ids: list[int], piece: list[int], start: int) -> int:
    for pos in range(start, len(ids) - len(piece) + 1):
        if ids[pos:pos + len(piece)] == piece:
            return pos
    raise AssertionError(f"tokens {piece} not found in {ids[start:]}")


def _reference_labels(tokenizer: Any, input_ids: list[int], end_of_turn: str) -> list[int]:
    """Independent reference: tokenize each assistant reply + the end-of-turn text on its own, locate it in
    order in input_ids; those tokens are learned, every other token is -100."""
    labels, start = [IGNORE_INDEX] * len(input_ids), 0
    for reply in REPLIES:
        piece = tokenizer(reply + end_of_turn, add_special_tokens=False)["input_ids"]
        pos = _find(input_ids, piece, start)
        labels[pos:pos + len(piece)] = piece
        start = pos + len(piece)
    return labels


def _assert_same_tokens(tokenizer: Any, got: list[int], expected: list[int]) -> None:
    """Token by token, naming the first token that differs."""
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert g == e, f"token {i} {tokenizer.decode([e if e != IGNORE_INDEX else g])!r}: label {g}, expected {e}"


def test_every_assistant_turn_is_learned_with_smollm2s_own_template(tok: Any) -> None:
    feat = tokenize_example(_conversation(), tok, template="chat", cutoff_len=1024, train_on_inputs=None,
                            add_eos=True)
    # the model sees exactly what vanilla transformers renders and tokenizes
    text = tok.apply_chat_template(MESSAGES, tokenize=False)
    assert feat["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    expected = _reference_labels(tok, feat["input_ids"], "<|im_end|>\n")
    _assert_same_tokens(tok, feat["labels"], expected)
    learned = tok.decode([t for t in feat["labels"] if t != IGNORE_INDEX])
    assert learned == "".join(f"{reply}<|im_end|>\n" for reply in REPLIES)  # "25 + 49 = 74." included
    masked = tok.decode([t for t, label in zip(feat["input_ids"], feat["labels"], strict=True)
                         if label == IGNORE_INDEX])
    assert masked.count("<|im_start|>assistant\n") == 3 and SYSTEM in masked and TURNS[1][0] in masked
    assert not any(reply in masked for reply in REPLIES)


END_OF_TURN = {  # what each named template writes after a reply (EOS: the tokenizer's own)
    "chatml": lambda t: "<|im_end|>\n",
    "llama3": lambda t: "<|eot_id|>",
    "gemma": lambda t: "<end_of_turn>\n",
    "mistral": lambda t: t.eos_token,
    "alpaca": lambda t: t.eos_token,
}


@pytest.mark.parametrize("name", list(CHAT_TEMPLATES))
def test_named_templates_learn_every_assistant_turn_on_a_bare_tokenizer(bare_tok: Any, name: str) -> None:
    assert set(END_OF_TURN) == set(CHAT_TEMPLATES)
    example = _conversation()
    with pytest.raises(NoraError, match="has none: use a named template"):
        tokenize_example(example, bare_tok, template="chat", cutoff_len=1024, train_on_inputs=None, add_eos=True)
    feat = tokenize_example(example, bare_tok, template=name, cutoff_len=1024, train_on_inputs=None, add_eos=True)
    text = bare_tok.apply_chat_template(MESSAGES, chat_template=CHAT_TEMPLATES[name], tokenize=False)
    end_of_turn = END_OF_TURN[name](bare_tok)
    # add_eos: where the template's end of turn is not the tokenizer's EOS, EOS ends the example (learned)
    eos = [] if bare_tok.eos_token in end_of_turn else [bare_tok.eos_token_id]
    assert bare_tok.decode(feat["input_ids"]) == text + bare_tok.decode(eos)
    expected = _reference_labels(bare_tok, feat["input_ids"], end_of_turn)
    expected[len(expected) - len(eos):] = eos
    _assert_same_tokens(bare_tok, feat["labels"], expected)
    # the role headers and the user/system text stay in the input, masked
    masked = bare_tok.decode([t for t, label in zip(feat["input_ids"], feat["labels"], strict=True)
                              if label == IGNORE_INDEX])
    assert SYSTEM in masked and all(user in masked for user, _ in TURNS)


def test_alpaca_chat_template_keeps_llm_adapters_text_for_one_turn(bare_tok: Any) -> None:
    from nora_cli.data import alpaca_prompt

    one = normalize_records([{"messages": MESSAGES[1:3]}], "chat")[0]
    assert render("alpaca", one) == (alpaca_prompt(TURNS[0][0]), TURNS[0][1])
    prompt, response = render("alpaca", one, bare_tok)
    assert (prompt, response) == (bare_tok.bos_token + alpaca_prompt(TURNS[0][0]), TURNS[0][1] + bare_tok.eos_token)


def test_tool_turns_are_masked(tok: Any) -> None:
    example = Example(messages=({"role": "user", "content": "Weather?"},
                                {"role": "assistant", "content": "Calling the tool."},
                                {"role": "tool", "content": "sunny, 21 C"},
                                {"role": "assistant", "content": "It is sunny."}))
    feat = tokenize_example(example, tok, template="chatml", cutoff_len=256, train_on_inputs=None, add_eos=True)
    learned = tok.decode([t for t in feat["labels"] if t != IGNORE_INDEX])
    assert learned == "Calling the tool.<|im_end|>\nIt is sunny.<|im_end|>\n"


def test_a_template_that_rewrites_earlier_turns_is_refused(tok: Any, tmp_path: Path) -> None:
    drops_history = tmp_path / "last-only.jinja"  # earlier replies vanish once a later turn exists
    drops_history.write_text("{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
                             "{{ m['role'] + ': ' + m['content'] + '\n' }}{% endif %}{% endfor %}"
                             "{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(NoraError, match="cannot be masked exactly"):
        render_segments(str(drops_history), _conversation(), tok)


# --- train_on_inputs --------------------------------------------------------------------------------


def test_train_on_inputs_defaults_by_format(tok: Any) -> None:
    chat = _conversation()
    kw: dict[str, Any] = {"template": "chat", "cutoff_len": 1024, "add_eos": True}
    default = tokenize_example(chat, tok, train_on_inputs=None, **kw)
    assert tokenize_example(chat, tok, train_on_inputs=False, **kw) == default
    everything = tokenize_example(chat, tok, train_on_inputs=True, **kw)
    assert everything["labels"] == everything["input_ids"] == default["input_ids"]
    assert IGNORE_INDEX in default["labels"]
    # alpaca records keep LLM-Adapters' default (true): the prompt is learned too
    record = Example(instruction="Name a color.", output="red")
    kw["template"] = "alpaca"
    alpaca = tokenize_example(record, tok, train_on_inputs=None, **kw)
    assert alpaca == tokenize_example(record, tok, train_on_inputs=True, **kw)
    assert alpaca["labels"] == alpaca["input_ids"]
    assert IGNORE_INDEX in tokenize_example(record, tok, train_on_inputs=False, **kw)["labels"]
    assert learns_inputs(None, chat) is False and learns_inputs(None, record) is True
    # build_datasets resolves it per example the same way
    train, _ = build_datasets([{"messages": MESSAGES}], tok, fmt="chat", template="chat", cutoff_len=1024,
                              train_on_inputs=None, add_eos=True, val_set_size=0, seed=0)
    assert train == [default]


def test_recipes_keep_their_behaviour_and_old_recipes_load(tmp_path: Path) -> None:
    from nora_cli.config.data import DataConfig
    from nora_cli.config.load import load_recipe, recipe_to_yaml, shipped_recipes
    from nora_cli.config.names import TemplateName

    assert get_args(TemplateName) == TEMPLATES  # config's Literal mirrors data/templates.py
    assert DataConfig().train_on_inputs is None
    for path in shipped_recipes():
        recipe = load_recipe(str(path))
        if recipe.task != "causal-lm":
            continue
        explicit = yaml.safe_load(path.read_text()).get("data", {}).get("train_on_inputs")
        example = normalize_records(
            [{"instruction": "q", "output": "a", "sentence": "s", "label": 1, "question": "q", "answer": "a",
              "text": "t"}],
            recipe.data.format)[0]
        # before: `true` unless the recipe said otherwise; none of them is a chat recipe
        assert learns_inputs(recipe.data.train_on_inputs, example) is (True if explicit is None else explicit)
    # a resumed run's recipe.yaml written before the change (explicit true) still loads, and the new default
    # round-trips as null
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump({"data": {"format": "chat", "template": "chat", "train_on_inputs": True}}))
    assert load_recipe(str(old)).data.train_on_inputs is True
    new = tmp_path / "new.yaml"
    new.write_text(yaml.safe_dump({"data": {"format": "chat", "template": "chatml"}}))
    recipe = load_recipe(str(new))
    again = tmp_path / "again.yaml"
    again.write_text(recipe_to_yaml(recipe))
    assert load_recipe(str(again)) == recipe and recipe.data.train_on_inputs is None


def test_template_names_and_jinja_files_in_recipes(tmp_path: Path) -> None:
    from nora_cli.config.load import load_recipe

    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "mine.jinja").write_text(CHAT_TEMPLATES["chatml"])
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump({"data": {"format": "chat", "template": "templates/mine.jinja"}}))
    template = load_recipe(str(recipe_file)).data.template
    assert template == str((tmp_path / "templates" / "mine.jinja").resolve())  # relative to the recipe file
    assert render_segments(template, _conversation()) == render_segments("chatml", _conversation())
    recipe_file.write_text(yaml.safe_dump({"data": {"template": "vicuna"}}))
    with pytest.raises(NoraError, match="chatml, llama3, gemma, mistral or a path to a .jinja"):
        load_recipe(str(recipe_file))


# --- the template saved with the adapter -----------------------------------------------------------


@pytest.mark.parametrize("name", list(CHAT_TEMPLATES))
def test_saved_tokenizer_reproduces_the_training_template(bare_tok: Any, name: str, tmp_path: Path,
                                                          smollm2_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    tokenizer.chat_template = None
    example = _conversation()
    tokenizer.chat_template = trained_chat_template(name, tokenizer, example)
    tokenizer.save_pretrained(tmp_path)
    saved = AutoTokenizer.from_pretrained(tmp_path)
    trained_text = "".join(text for text, _ in render_segments(name, example, bare_tok))
    assert saved.apply_chat_template(MESSAGES, tokenize=False) == trained_text
    # LLM-Adapters records keep their prompt: the tokenizer's template is left alone
    assert trained_chat_template("alpaca", tokenizer, Example(instruction="q", output="a")) is None


def test_train_saves_the_template_and_sample_uses_it(tmp_path: Path, tiny_llama_dir: Path) -> None:
    """`nora train` with a .jinja template on a base without one; the file is gone when `nora sample` runs,
    so sample works only through the template saved with the adapter's tokenizer."""
    from transformers import AutoTokenizer

    base = tmp_path / "bare-base"
    shutil.copytree(tiny_llama_dir, base)
    (base / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((base / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    assert AutoTokenizer.from_pretrained(base).chat_template is None
    jinja = ("{% for m in messages %}{{ '### ' + m['role'] + ':\\n' + m['content'] + ' [end]\\n' }}"
             "{% endfor %}{% if add_generation_prompt %}{{ '### assistant:\\n' }}{% endif %}")
    (tmp_path / "turns.jinja").write_text(jinja)
    (tmp_path / "chat.json").write_text(json.dumps([{"messages": MESSAGES}] * 4))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"source": str(base)}, "adapter": {"r": 2, "alpha": 4, "target_modules": ["q_proj"]},
        "data": {"path": "chat.json", "format": "chat", "template": "turns.jinja", "cutoff_len": 256},
        "train": {"max_steps": 1, "batch_size": 2, "micro_batch_size": 2}, "output": {"dir": str(tmp_path / "out")},
    }))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "nora_cli", "train", str(recipe)], capture_output=True, text=True,
                         env=env, timeout=600)
    assert run.returncode == 0, run.stderr
    out = tmp_path / "out"
    saved = AutoTokenizer.from_pretrained(out)
    assert saved.chat_template == jinja
    assert saved.apply_chat_template(MESSAGES, tokenize=False) == \
        "".join(f"### {m['role']}:\n{m['content']} [end]\n" for m in MESSAGES)
    assert yaml.safe_load((out / "recipe.yaml").read_text())["data"]["train_on_inputs"] is None
    (tmp_path / "turns.jinja").unlink()
    sample = subprocess.run([sys.executable, "-m", "nora_cli", "sample", "--adapter", str(out), "--prompt", "Hi?",
                             "--max-new-tokens", "2"], capture_output=True, text=True, env=env, timeout=600)
    assert sample.returncode == 0, sample.stderr  # rendered with the saved template; stop_strings=["[end]"]


def test_sampling_stops_at_the_templates_end_of_turn(tok: Any, bare_tok: Any) -> None:
    from nora_cli.data.templates import end_of_turn

    assert end_of_turn("chat", tok) == tok.eos_token == "<|im_end|>"  # SmolLM2: the same token, nothing to add
    for name, text in END_OF_TURN.items():
        assert end_of_turn(name, bare_tok) == text(bare_tok).strip()
    assert end_of_turn("none", None) == ""
