"""Tokenization with exact loss masks, and the train/validation split of tokenized examples.

The prompt and the response are tokenized together, so the boundary token is the one the model really
sees; labels mask the prompt (unless train_on_inputs) and padding with IGNORE_INDEX.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

from nora_cli.data.example import Example
from nora_cli.data.formats import normalize_records
from nora_cli.data.templates import render
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
