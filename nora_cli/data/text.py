"""Text data pipeline: load records, normalize them to `Example`, tokenize with exact loss masks, collate.

Heavy libraries (datasets, pyarrow, torch) are imported inside the functions that need them, so
importing this module is cheap and offline tests never touch the network.

Size (~400 lines): loading, tokenizing and collating stay together until the planned rewrite of this
module (the next issue) splits them; splitting it now would only be undone by that rewrite.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nora_cli.data.example import Example
from nora_cli.data.templates import render
from nora_cli.errors import NoraError, read_text

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # label value that cross-entropy skips (torch's default ignore_index)




# --- formats: raw record -> Example ----------------------------------------------------------


class MissingKey(NoraError):
    """A record lacks a key its format requires; `normalize_records` adds format and index."""

    def __init__(self, key: str):
        super().__init__(f"record has no {key!r} key")
        self.key = key


def _scalar(key: str, value: Any) -> str:
    """A field as text; a dict or list is an error (its str() would silently become training text)."""
    if isinstance(value, dict | list):
        raise NoraError(f"field {key!r} is a {'list' if isinstance(value, list) else 'mapping'}, expected text")
    return str(value)


def _get(record: dict, *keys: str) -> str:
    """The first present, non-null key as text ('question|query' style alternatives)."""
    for key in keys:
        if record.get(key) is not None:
            return _scalar(key, record[key])
    raise MissingKey("|".join(keys))


def _alpaca(record: dict) -> Example:
    """LLM-Adapters `{instruction, input, output[, answer]}` (commonsense_170k, math sets, alpaca)."""
    answer = record.get("answer")
    return Example(
        instruction=_get(record, "instruction"),
        input=_scalar("input", record.get("input") or ""),
        output=_get(record, "output"),
        answer=None if answer is None else _scalar("answer", answer),
    )


def _gsm8k(record: dict) -> Example:
    """GSM8K `{question, answer}` or MetaMathQA `{query, response}`; the '#### n' line stays in output."""
    output = _get(record, "answer", "response")
    final = output.rsplit("####", 1)[1].strip().replace(",", "") if "####" in output else None
    return Example(instruction=_get(record, "question", "query"), output=output, answer=final)


def _text(record: dict) -> Example:
    """Raw `{text}`: the whole text is the response (empty prompt)."""
    return Example(output=_get(record, "text"))


def _chat(record: dict) -> Example:
    """`{messages: [{role, content}, ...]}` ending with the assistant turn to learn."""
    messages = record.get("messages")
    if messages is None:
        raise MissingKey("messages")
    if not isinstance(messages, list) or not messages:
        raise NoraError("'messages' must be a non-empty list of {role, content} objects")
    turns = []
    for turn in messages:
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise NoraError("every message needs 'role' and 'content'")
        if turn["role"] not in ("system", "user", "assistant"):
            raise NoraError(f"unknown message role {turn['role']!r}; expected system, user or assistant")
        turns.append({"role": str(turn["role"]), "content": str(turn["content"])})
    if turns[-1]["role"] != "assistant":
        raise NoraError("the last message must be the assistant's reply (the text to learn)")
    return Example(messages=tuple(turns))


#: SST-2 label words (MeZO/LM-BFF prompt "<sentence> It was <word>"), shared with the few-shot evaluation
SST2_LABEL_WORDS = ("terrible", "great")


def _sst2(record: dict) -> Example:
    """GLUE SST-2 `{sentence, label}` as the plain text "<sentence> It was <word>" (use template none)."""
    label = _get(record, "label")
    words = {"0": SST2_LABEL_WORDS[0], "1": SST2_LABEL_WORDS[1], **{w: w for w in SST2_LABEL_WORDS}}
    if label not in words:
        raise NoraError(f"sst2 label must be 0/1 or {'/'.join(SST2_LABEL_WORDS)}, got {label!r}")
    return Example(output=f"{_get(record, 'sentence').strip()} It was {words[label]}")


#: format name -> record normalizer
FORMATS: dict[str, Callable[[dict], Example]] = {
    "alpaca": _alpaca,
    "gsm8k": _gsm8k,
    "text": _text,
    "chat": _chat,
    "sst2": _sst2,
}


def normalize_records(records: Sequence[dict], fmt: str) -> list[Example]:
    """Apply FORMATS[fmt] to every record; errors name the format, the record index and the key."""
    try:
        normalize = FORMATS[fmt]
    except KeyError:
        raise NoraError(f"unknown data format {fmt!r}; expected one of {', '.join(FORMATS)}") from None
    examples = []
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise NoraError(f"format {fmt!r}: record {index} is a {type(record).__name__}, not an object")
        try:
            examples.append(normalize(record))
        except MissingKey as err:
            raise NoraError(f"format {fmt!r}: record {index} is missing key {err.key!r} "
                            f"(it has: {', '.join(map(str, record)) or 'no keys'})") from None
        except NoraError as err:
            raise NoraError(f"format {fmt!r}: record {index}: {err}") from None
    if examples and not any(e.output.strip() or e.messages for e in examples):
        raise NoraError(f"format {fmt!r}: every record's output is empty (records 0-{len(examples) - 1}): "
                        "there is nothing to learn")
    return examples


# --- loading ---------------------------------------------------------------------------------


def _read_json(path: Path) -> list[dict]:
    text = read_text(path, "dataset file")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # one object per line saved as .json (datasets accepts it too)
            return _parse_jsonl(path, text)
        raise NoraError(f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise NoraError(f"{path}: expected a JSON list of objects")
    return data


def _parse_jsonl(path: Path, text: str) -> list[dict]:
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise NoraError(f"{path}: invalid JSON at line {lineno}, column {err.colno}: {err.msg}") from None
        if not isinstance(record, dict):
            raise NoraError(f"{path}: line {lineno} is not a JSON object")
        records.append(record)
    return records


def _read_jsonl(path: Path) -> list[dict]:
    return _parse_jsonl(path, read_text(path, "dataset file"))


def _read_csv(path: Path) -> list[dict]:
    """A CSV file with a header row (every value is text, as `datasets`' csv loader would give)."""
    import csv
    import io

    rows = list(csv.DictReader(io.StringIO(read_text(path, "dataset file"), newline="")))
    if rows and None in rows[0]:
        raise NoraError(f"{path}: row 1 has more values than the header has columns")
    return rows


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises ArrowInvalid/OSError subclasses for corrupt files
        raise NoraError(f"{path}: cannot read parquet: {str(err).splitlines()[0]}") from None


#: file suffix -> reader
READERS: dict[str, Callable[[Path], list[dict]]] = {
    ".json": _read_json,
    ".jsonl": _read_jsonl,
    ".parquet": _read_parquet,
    ".csv": _read_csv,
}


def _load_hub(name: str, split: str) -> list[dict]:
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as err:  # datasets raises many types (not found, offline, bad split, ...)
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise NoraError(f"cannot load dataset {name!r} (split {split!r}): {message}") from err
    return dataset.to_list()


def load_records(source: str, *, split: str = "train", base_dir: Path | None = None) -> list[dict]:
    """Raw records from a .json/.jsonl/.parquet/.csv file, a hub dataset, or `builtin:demo[-test]`.

    Relative paths resolve against `base_dir` (the recipe's folder) when given. `split` selects
    the hub split and the built-in demo split; a local file is a single split.
    """
    if source.startswith("builtin:"):
        from nora_cli.data.demo import BUILTIN

        if source not in BUILTIN:
            raise NoraError(f"unknown built-in dataset {source!r}; expected one of {', '.join(BUILTIN)}")
        return BUILTIN[source](split)
    path = Path(source).expanduser()
    if base_dir is not None and not path.is_absolute():
        path = Path(base_dir) / path
    reader = READERS.get(path.suffix.lower())
    if reader is not None:
        if not path.is_file():
            raise NoraError(f"dataset file not found: {path}")
        return reader(path)
    if path.is_dir():  # a local dataset folder: datasets knows every layout
        return _load_hub(str(path), split)
    if path.is_file():
        raise NoraError(f"unsupported data file format {path.suffix or '(no suffix)'!r}: {path}; "
                        f"expected {', '.join(READERS)}")
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise NoraError(f"dataset not found: {path} (expected a {', '.join(READERS)} file)")
    return _load_hub(source, split)


# --- tokenization ----------------------------------------------------------------------------


def _encode(tokenizer: PreTrainedTokenizerBase, texts: list[str], special: bool) -> list[list[int]]:
    """Token ids per text; with `special`, keep the tokenizer's BOS but never a trailing EOS."""
    if not texts:
        return []
    ids = tokenizer(texts, add_special_tokens=special)["input_ids"]
    eos = tokenizer.eos_token_id
    if special and eos is not None:  # tokenizers configured with add_eos_token would end the prompt
        ids = [row[:-1] if row and row[-1] == eos and not t.endswith(str(tokenizer.eos_token)) else row
               for row, t in zip(ids, texts, strict=True)]
    return [list(row) for row in ids]


def _assemble(
    prompt_ids: list[int], response_ids: list[int], eos: int | None, *,
    cutoff_len: int, train_on_inputs: bool, add_eos: bool,
) -> dict[str, list[int]]:
    input_ids = (prompt_ids + response_ids)[:cutoff_len]
    if add_eos and eos is not None and eos not in response_ids and len(input_ids) < cutoff_len:
        input_ids.append(eos)
    labels = list(input_ids)
    if not train_on_inputs:
        n = min(len(prompt_ids), len(labels))
        labels[:n] = [IGNORE_INDEX] * n
    return {"input_ids": input_ids, "labels": labels}


def _tokenize_many(
    examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, *,
    template: str, cutoff_len: int, train_on_inputs: bool, add_eos: bool,
) -> list[dict[str, list[int]]]:
    pairs = [render(template, example, tokenizer) for example in examples]
    # Chat templates write their own BOS/turn tokens into the text; other templates get the tokenizer's.
    prompts = _encode(tokenizer, [p for p, _ in pairs], special=template != "chat")
    responses = _encode(tokenizer, [r for _, r in pairs], special=False)
    return [
        _assemble(p, r, tokenizer.eos_token_id, cutoff_len=cutoff_len,
                  train_on_inputs=train_on_inputs, add_eos=add_eos)
        for p, r in zip(prompts, responses, strict=True)
    ]


def tokenize_example(
    example: Example,
    tokenizer: PreTrainedTokenizerBase,
    *,
    template: str,
    cutoff_len: int,
    train_on_inputs: bool,
    add_eos: bool,
) -> dict[str, list[int]]:
    """input_ids/labels for one example, following LLM-Adapters' `generate_and_tokenize_prompt`.

    - ids = tokens(prompt) + tokens(response), truncated to `cutoff_len` tokens (from the right).
    - EOS is appended when `add_eos`, the response does not already contain it (chat templates
      close the turn themselves) and the truncated sequence is shorter than `cutoff_len`; so a
      truncated example never gets EOS, exactly as in LLM-Adapters.
    - labels = input_ids; with `train_on_inputs=False` the prompt tokens (BOS included) are -100.

    One deliberate difference: LLM-Adapters tokenizes prompt+response as ONE string and masks
    len(tokens(prompt)) tokens. With byte-level BPE (SmolLM2, Llama 3, Qwen) the alpaca prompt's
    trailing 16 spaces merge with the response's first word, so that count is off by a token and
    the model trains on a token sequence generation (which starts from tokens(prompt)) never
    produces. Tokenizing the two parts separately makes the mask exact and matches inference;
    where the boundary tokenizes stably (most sentencepiece cases) both give the same ids.
    """
    return _tokenize_many([example], tokenizer, template=template, cutoff_len=cutoff_len,
                          train_on_inputs=train_on_inputs, add_eos=add_eos)[0]


# --- datasets --------------------------------------------------------------------------------


def _val_count(val_set_size: float, n: int) -> int:
    """An int is a count; a float in (0, 1) is a fraction of the records."""
    count = round(val_set_size * n) if isinstance(val_set_size, float) and 0 < val_set_size < 1 else int(val_set_size)
    if count < 0 or count >= n:
        raise NoraError(f"val_set_size {val_set_size} leaves no training data ({n} records)")
    return count


def build_datasets(
    records: list[dict],
    tokenizer: PreTrainedTokenizerBase,
    *,
    fmt: str,
    template: str,
    cutoff_len: int,
    train_on_inputs: bool,
    add_eos: bool,
    val_set_size: int | float,
    seed: int,
    max_samples: int | None = None,
    shuffle: bool = True,
) -> tuple[list[dict[str, list[int]]], list[dict[str, list[int]]]]:
    """(train, val) tokenized features; the same seed always gives the same split and order.

    Records are shuffled with a local `random.Random(seed)` (never the global RNG), capped at
    `max_samples`, and the last `val_set_size` become the validation set. Examples with nothing
    to learn (every shifted label -100, e.g. a prompt longer than cutoff_len) are dropped.
    """
    if cutoff_len < 2:
        raise NoraError(f"cutoff_len must be at least 2 tokens, got {cutoff_len}")
    examples = normalize_records(records, fmt)
    order = list(range(len(examples)))
    if shuffle:
        random.Random(seed).shuffle(order)
    if max_samples is not None:
        order = order[:max_samples]
    if not order:
        raise NoraError("the dataset is empty")
    n_val = _val_count(val_set_size, len(order))
    features = _tokenize_many([examples[i] for i in order], tokenizer, template=template, cutoff_len=cutoff_len,
                              train_on_inputs=train_on_inputs, add_eos=add_eos)
    train = [f for f in features[: len(order) - n_val] if _learnable(f)]
    val = [f for f in features[len(order) - n_val:] if _learnable(f)]
    if not train:
        raise NoraError(f"no training example has response tokens within cutoff_len={cutoff_len}")
    return train, val


def _learnable(feature: dict[str, list[int]]) -> bool:
    return any(label != IGNORE_INDEX for label in feature["labels"][1:])


def collate(
    features: list[dict[str, Any]], pad_token_id: int, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels (-100 padded) and num_tokens.

    num_tokens counts the targets the causal-LM loss actually scores (labels[:, 1:] != -100, as
    the model shifts labels), so the loop can divide the summed loss by the token count of the
    whole accumulated batch rather than averaging per micro-batch.
    """
    import torch

    if not features:
        raise ValueError("collate() needs at least one feature")
    length = max(len(f["input_ids"]) for f in features)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(features), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(features), length), dtype=torch.long)
    labels = torch.full((len(features), length), IGNORE_INDEX, dtype=torch.long)
    for row, feature in enumerate(features):
        n = len(feature["input_ids"])
        input_ids[row, :n] = torch.tensor(feature["input_ids"], dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(feature["labels"], dtype=torch.long)
    num_tokens = (labels[:, 1:] != IGNORE_INDEX).sum()
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "num_tokens": num_tokens}
