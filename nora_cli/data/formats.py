"""Record formats: one raw record (a dict from any source) -> the one normalized `Example`.

A format names the keys it reads (`alpaca`: instruction/input/output; `chat`: messages; `sharegpt`:
conversations; ...); a missing key is one error naming the format and the record's index. `apply_mapping`
first renames a user's columns and roles onto a format's (`data.columns`, `data.roles`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
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


#: canonical chat roles; `chat` messages use them as they are
ROLES = ("system", "user", "assistant", "tool")
#: ShareGPT `from` values -> chat roles (FastChat, Vicuna, function-calling dumps); `data.roles` adds more
SHAREGPT_ROLES = {
    "system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
    "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "model": "assistant",
    "tool": "tool", "function": "tool", "observation": "tool", "function_call": "assistant",
}


def _turns(record: dict, key: str, role_key: str, text_key: str, roles: dict[str, str]) -> tuple[dict, ...]:
    """The list under `key` as ({role, content}, ...) ending with the assistant turn to learn."""
    messages = record.get(key)
    if messages is None:
        raise MissingKey(key)
    if not isinstance(messages, list) or not messages:
        raise NoraError(f"{key!r} must be a non-empty list of {{{role_key}, {text_key}}} objects")
    turns = []
    for turn in messages:
        if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
            raise NoraError(f"every item of {key!r} needs {role_key!r} and {text_key!r}")
        role = roles.get(str(turn[role_key]))
        if role is None:
            raise NoraError(f"unknown {role_key} {turn[role_key]!r}; expected one of {', '.join(roles)} "
                            "(map others with data.roles, e.g. {bot: assistant})")
        turns.append({"role": role, "content": "" if turn[text_key] is None else _scalar(text_key, turn[text_key])})
    if turns[-1]["role"] != "assistant":
        raise NoraError("the last message must be the assistant's reply (the text to learn)")
    return tuple(turns)


def _chat(record: dict) -> Example:
    """OpenAI `{messages: [{role, content}, ...]}` (system/user/assistant/tool), ending with an assistant turn."""
    return Example(messages=_turns(record, "messages", "role", "content", {r: r for r in ROLES}))


def _sharegpt(record: dict) -> Example:
    """ShareGPT `{conversations: [{from, value}, ...]}`; `from` maps to roles by SHAREGPT_ROLES."""
    return Example(messages=_turns(record, "conversations", "from", "value", SHAREGPT_ROLES))


def _normalized(record: dict) -> Example:
    """A record that is already an Example's fields (`example_record`): mixed sources of several formats."""
    return Example(**{**record, "messages": tuple(record.get("messages") or ())})


def example_record(example: Example) -> dict[str, Any]:
    """An Example as a plain record of the internal `normalized` format (arrow- and JSON-friendly)."""
    return {"instruction": example.instruction, "input": example.input, "output": example.output,
            "answer": example.answer, "messages": [dict(m) for m in example.messages]}


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
    "sharegpt": _sharegpt,
    "sst2": _sst2,
    "normalized": _normalized,  # internal: what `mixture` hands on for several sources
}


#: format -> (list key, role key) of its turns, for `data.roles`
_TURNS = {"chat": ("messages", "role"), "sharegpt": ("conversations", "from")}


def apply_mapping(
    records: Sequence[dict], fmt: str, *, columns: Mapping[str, str] | None = None,
    roles: Mapping[str, str] | None = None,
) -> list[dict]:
    """Records with the user's column names mapped onto the format's keys (`data.columns`, format key ->
    column) and turn roles renamed (`data.roles`, e.g. {human: user, bot: assistant}); unchanged without."""
    if not columns and not roles:
        return list(records)
    if roles and fmt not in _TURNS:
        raise NoraError(f"data.roles applies to the chat and sharegpt formats, not {fmt!r}")
    columns = columns or {}
    renamed = set(columns.values())
    out = []
    for index, original in enumerate(records):
        record = {k: v for k, v in original.items() if k not in renamed}  # a renamed column leaves its old name
        for key, column in columns.items():
            if column not in original:
                raise NoraError(f"record {index} has no column {column!r} (data.columns maps {key!r} to it; "
                                f"it has: {', '.join(map(str, original)) or 'no keys'})")
            record[key] = original[column]
        if roles:
            key, role_key = _TURNS[fmt]
            if isinstance(record.get(key), list):
                record[key] = [{**t, role_key: roles.get(str(t.get(role_key)), t.get(role_key))}
                               if isinstance(t, dict) else t for t in record[key]]
        out.append(record)
    return out


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
