"""Record formats: one raw record (a dict from any source) -> the one normalized `Example`.

A format names the keys it reads (`alpaca`: instruction/input/output; `chat`: messages; ...); a missing key
is one error naming the format and the record's index.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from nora_cli.data.example import Example
from nora_cli.errors import NoraError


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
