"""Tokenization with exact loss masks, and the train/validation split of tokenized examples.

A template renders each example as (text, learned) segments; each segment is tokenized on its own, so
the mask boundary is a token boundary, and labels mask the unlearned segments (unless train_on_inputs)
with IGNORE_INDEX. Conversations learn every assistant turn and nothing else by default.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

from nora_cli.data.example import Example
from nora_cli.data.formats import normalize_records
from nora_cli.data.templates import render_segments, uses_chat_template
from nora_cli.errors import NoraError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # label value that cross-entropy skips (torch's default ignore_index)


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
    """One prompt + response pair (LLM-Adapters' layout): `_assemble_segments` with two segments."""
    return _assemble_segments([(prompt_ids, False), (response_ids, True)], eos, cutoff_len=cutoff_len,
                              train_on_inputs=train_on_inputs, add_eos=add_eos)


def _assemble_segments(
    segments: Sequence[tuple[list[int], bool]], eos: int | None, *,
    cutoff_len: int, train_on_inputs: bool, add_eos: bool,
) -> dict[str, list[int]]:
    """input_ids/labels from (ids, learned) segments: masked segments get IGNORE_INDEX unless train_on_inputs."""
    input_ids: list[int] = []
    labels: list[int] = []
    for ids, learned in segments:
        input_ids += ids
        labels += ids if learned or train_on_inputs else [IGNORE_INDEX] * len(ids)
    input_ids, labels = input_ids[:cutoff_len], labels[:cutoff_len]
    last_learned = next((ids for ids, learned in reversed(segments) if learned), [])
    if add_eos and eos is not None and eos not in last_learned and len(input_ids) < cutoff_len:
        input_ids.append(eos)
        labels.append(eos)
    return {"input_ids": input_ids, "labels": labels}


def learns_inputs(train_on_inputs: bool | None, example: Example) -> bool:
    """`data.train_on_inputs` for one example; None is the format's default: conversations (chat, sharegpt)
    learn their assistant turns only, every other format learns its prompt too (LLM-Adapters' default)."""
    return not example.messages if train_on_inputs is None else train_on_inputs


def _tokenize_many(
    examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, *,
    template: str, cutoff_len: int, train_on_inputs: bool | None, add_eos: bool,
) -> list[dict[str, list[int]]]:
    rendered = [render_segments(template, example, tokenizer) for example in examples]
    # Chat templates write their own BOS/turn tokens into the text; other templates get the tokenizer's BOS
    # on their first segment. Every segment is tokenized on its own: the mask boundary is a token boundary.
    special_first = [not uses_chat_template(template, example) for example in examples]
    pairs = list(zip(rendered, special_first, strict=True))
    firsts = _encode(tokenizer, [segs[0][0] for segs, first in pairs if first], special=True)
    rest = _encode(tokenizer, [text for segs, first in pairs for text, _ in (segs[1:] if first else segs)],
                   special=False)
    firsts_it, rest_it = iter(firsts), iter(rest)
    features = []
    for example, (segs, first) in zip(examples, pairs, strict=True):
        ids = [next(firsts_it)] if first else []
        ids += [next(rest_it) for _ in range(len(segs) - len(ids))]
        features.append(_assemble_segments(
            [(i, learned) for i, (_, learned) in zip(ids, segs, strict=True)], tokenizer.eos_token_id,
            cutoff_len=cutoff_len, train_on_inputs=learns_inputs(train_on_inputs, example), add_eos=add_eos))
    return features


def tokenize_example(
    example: Example,
    tokenizer: PreTrainedTokenizerBase,
    *,
    template: str,
    cutoff_len: int,
    train_on_inputs: bool | None,
    add_eos: bool,
) -> dict[str, list[int]]:
    """input_ids/labels for one example, following LLM-Adapters' `generate_and_tokenize_prompt`.

    - ids = the tokens of each rendered segment in order (prompt, response; or a conversation's turns),
      truncated to `cutoff_len` tokens (from the right).
    - EOS is appended when `add_eos`, the last learned segment does not already contain it (chat templates
      close the turn themselves) and the truncated sequence is shorter than `cutoff_len`; so a
      truncated example never gets EOS, exactly as in LLM-Adapters.
    - labels = input_ids, with masked segments (the prompt, BOS included; a conversation's headers, system,
      user and tool turns) set to -100 unless `train_on_inputs` (None: see `learns_inputs`).

    One deliberate difference: LLM-Adapters tokenizes prompt+response as ONE string and masks
    len(tokens(prompt)) tokens. With byte-level BPE (SmolLM2, Llama 3, Qwen) the alpaca prompt's
    trailing 16 spaces merge with the response's first word, so that count is off by a token and
    the model trains on a token sequence generation (which starts from tokens(prompt)) never
    produces. Tokenizing the parts separately makes the mask exact and matches inference;
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


def order_examples(
    examples: list[Example], *, val_set_size: int | float, seed: int, max_samples: int | None = None,
    shuffle: bool = True,
) -> tuple[list[Example], int]:
    """The examples in training order and how many at the end are validation (the split of `build_datasets`).

    Shuffled with a local `random.Random(seed)` (never the global RNG), then capped at `max_samples`.
    """
    order = list(range(len(examples)))
    if shuffle:
        random.Random(seed).shuffle(order)
    if max_samples is not None:
        order = order[:max_samples]
    if not order:
        raise NoraError("the dataset is empty")
    return [examples[i] for i in order], _val_count(val_set_size, len(order))


def split_features(
    features: list[dict[str, list[int]]], n_val: int, cutoff_len: int,
) -> tuple[list[dict[str, list[int]]], list[dict[str, list[int]]]]:
    """(train, val): the last `n_val` features are validation; unlearnable features are dropped."""
    train = [f for f in features[: len(features) - n_val] if learnable(f)]
    val = [f for f in features[len(features) - n_val:] if learnable(f)]
    if not train:
        raise no_training_example(cutoff_len)
    return train, val


def no_training_example(cutoff_len: int) -> NoraError:
    return NoraError(f"no training example has response tokens within cutoff_len={cutoff_len}")


def build_datasets(
    records: list[dict],
    tokenizer: PreTrainedTokenizerBase,
    *,
    fmt: str,
    template: str,
    cutoff_len: int,
    train_on_inputs: bool | None,
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
    This is the in-memory path; `nora_cli.data.cache` computes the same features once into an on-disk table.
    """
    if cutoff_len < 2:
        raise NoraError(f"cutoff_len must be at least 2 tokens, got {cutoff_len}")
    examples, n_val = order_examples(normalize_records(records, fmt), val_set_size=val_set_size, seed=seed,
                                     max_samples=max_samples, shuffle=shuffle)
    features = _tokenize_many(examples, tokenizer, template=template, cutoff_len=cutoff_len,
                              train_on_inputs=train_on_inputs, add_eos=add_eos)
    return split_features(features, n_val, cutoff_len)


def learnable(feature: dict[str, list[int]]) -> bool:
    """Some label after the first is scored (the causal-LM loss shifts labels by one)."""
    return any(label != IGNORE_INDEX for label in feature["labels"][1:])
