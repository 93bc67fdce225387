"""`nora data preview`: the first training rows exactly as the model sees them (template, tokenization,
truncation, packing), which tokens the loss learns, and counts that tell whether cutoff_len and packing
fit the data. Only the tokenizer loads, never the model's weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from nora_cli.errors import NoraError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from nora_cli.config.schema import Recipe

HISTOGRAM_BINS = 8


@dataclass(frozen=True)
class Piece:
    """A run of consecutive tokens with the same loss mask, decoded."""

    text: str
    learned: bool
    new_example: bool  # the first run of a packed row's 2nd, 3rd, … example


@dataclass(frozen=True)
class PreviewRow:
    text: str
    input_ids: list[int]
    label_mask: list[int]  # 1: the loss scores this token (predicted from the tokens before it)
    examples: int  # examples in this row (1 unless packed)
    pieces: list[Piece]


@dataclass(frozen=True)
class DataPreview:
    path: str
    format: str
    template: str
    cutoff_len: int
    packing: bool
    records: int  # read from the source
    train_examples: int  # after max_samples, the validation split and dropping examples with nothing to learn
    val_examples: int
    tokens: int  # real tokens over the training examples
    learned_tokens: int  # of which the loss scores
    truncated: int  # training examples that reached cutoff_len (cut, or their EOS did not fit)
    padding_efficiency: float  # real tokens / padded slots, micro-batches as the loop builds them
    packed_rows: int  # rows packing makes of the training examples (whether or not data.packing is on)
    packing_efficiency: float  # real tokens / (packed rows × cutoff_len)
    histogram: list[tuple[int, int, int]]  # (from, to inclusive, examples) over example lengths
    rows: list[PreviewRow]

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["rows"] = [{k: v for k, v in row.items() if k != "pieces"} for row in out["rows"]]
        out["histogram"] = [{"from": lo, "to": hi, "examples": n} for lo, hi, n in self.histogram]
        return out


def preview(recipe: Recipe, n: int) -> DataPreview:
    """Run the recipe's data pipeline with its tokenizer only and describe the result (first `n` rows)."""
    from nora_cli.data.packing import PackedRows
    from nora_cli.data.prepare import read_records, tokenized_splits
    from nora_cli.models import load_tokenizer_only

    if recipe.task != "causal-lm":
        raise NoraError(f"nora data preview shows text data; this recipe's task is {recipe.task}")
    dcfg, tcfg = recipe.data, recipe.train
    data = read_records(dcfg, recipe.seed)
    tokenizer = load_tokenizer_only(recipe.model.source, recipe.model.gguf_file, recipe.model.trust_remote_code)
    train, val = tokenized_splits(data, dcfg, tokenizer, recipe.seed)
    examples: Sequence[dict[str, Any]] = train.features if isinstance(train, PackedRows) else train
    n_val = len(val.features) if isinstance(val, PackedRows) else len(val)
    packed = train if isinstance(train, PackedRows) else PackedRows(examples, dcfg.cutoff_len)
    lengths = packed.example_lengths
    return DataPreview(
        path=dcfg.path, format=dcfg.format, template=dcfg.template, cutoff_len=dcfg.cutoff_len,
        packing=dcfg.packing, records=len(data.records), train_examples=len(examples), val_examples=n_val,
        tokens=sum(lengths), learned_tokens=sum(sum(_learned(f)) for f in examples),
        truncated=sum(length >= dcfg.cutoff_len for length in lengths),
        padding_efficiency=padding_efficiency(lengths, tcfg.micro_batch_size, tcfg.batch_size),
        packed_rows=len(packed), packing_efficiency=packed.efficiency,
        histogram=histogram(lengths, dcfg.cutoff_len),
        rows=[_row(train[i], tokenizer) for i in range(min(n, len(train)))],
    )


def padding_efficiency(lengths: Sequence[int], micro: int, batch: int) -> float:
    """Real tokens / padded slots when each step's `batch` examples are length-sorted into micro-batches of
    `micro`, each padded to its longest (the loop's batching, over the examples in dataset order)."""
    slots = 0
    for start in range(0, len(lengths), batch):
        step = sorted(lengths[start:start + batch])
        slots += sum(max(step[i:i + micro]) * len(step[i:i + micro]) for i in range(0, len(step), micro))
    return sum(lengths) / slots if slots else 1.0


def histogram(lengths: Sequence[int], cutoff_len: int) -> list[tuple[int, int, int]]:
    """Example counts over HISTOGRAM_BINS equal ranges of 1…cutoff_len tokens."""
    width = max(1, math.ceil(cutoff_len / HISTOGRAM_BINS))
    counts = [0] * math.ceil(cutoff_len / width)
    for length in lengths:
        counts[min(len(counts) - 1, max(0, length - 1) // width)] += 1
    return [(i * width + 1, min(cutoff_len, (i + 1) * width), c) for i, c in enumerate(counts)]


def _learned(feature: dict[str, Any]) -> list[int]:
    """1 where the loss scores the token: labelled, and not the first of its sequence (labels shift by one)."""
    from nora_cli.data.tokenize import IGNORE_INDEX

    starts = _starts(feature)
    return [int(label != IGNORE_INDEX and i not in starts) for i, label in enumerate(feature["labels"])]


def _starts(feature: dict[str, Any]) -> set[int]:
    positions = feature.get("position_ids")
    return {0} if positions is None else {i for i, p in enumerate(positions) if p == 0}


def _row(feature: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> PreviewRow:
    ids = list(feature["input_ids"])
    mask = _learned(feature)
    starts = _starts(feature)
    pieces, begin = [], 0
    for end in range(1, len(ids) + 1):
        if end == len(ids) or mask[end] != mask[begin] or end in starts:
            pieces.append(Piece(tokenizer.decode(ids[begin:end]), bool(mask[begin]), begin in starts and begin > 0))
            begin = end
    return PreviewRow(tokenizer.decode(ids), ids, mask, len(starts), pieces)
