"""The causal-LM data pipeline as one call per stage, shared by `nora train` (tasks/causal_lm/job.py) and
`nora data preview`, so the preview shows exactly the rows training sees.

Two stages because training reads the records before the model loads (a bad file fails in seconds, not
after a minute of loading) and tokenizes once the tokenizer is there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nora_cli.data.example import Example

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from nora_cli.config.data import DataConfig


@dataclass
class Records:
    """The recipe's records (every source read, several mixed) and the format they are in."""

    records: list[dict]
    format: str


def read_records(dcfg: DataConfig, seed: int) -> Records:
    """Every source read (and mixed, with `data.datasets`), checked to be non-empty and to parse."""
    from nora_cli.data.formats import normalize_records
    from nora_cli.data.mixture import training_records

    records, fmt = training_records(dcfg, seed)
    normalize_records(records, fmt)
    return Records(records, fmt)


def tokenized_splits(
    data: Records, dcfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int
) -> tuple[Sequence[dict[str, Any]], Sequence[dict[str, Any]]]:
    """(train, val) as the loop indexes them: tokenized examples, or packed rows with `dcfg.packing`."""
    from nora_cli.data.packing import PackedRows
    from nora_cli.data.tokenize import build_datasets

    train, val = build_datasets(
        data.records, tokenizer, fmt=data.format, template=dcfg.template, cutoff_len=dcfg.cutoff_len,
        train_on_inputs=dcfg.train_on_inputs, add_eos=dcfg.add_eos, val_set_size=dcfg.val_set_size,
        seed=seed, max_samples=dcfg.max_samples, shuffle=dcfg.shuffle,
    )
    if not dcfg.packing:
        return train, val
    return PackedRows(train, dcfg.cutoff_len), (PackedRows(val, dcfg.cutoff_len) if val else val)


@dataclass
class TrainingData:
    """What the causal-LM job trains on: indexable train/val rows (tokenized examples from the on-disk cache,
    or packed rows), their lengths for the loop's grouping (None when packed or streamed), or a stream."""

    train: Sequence[dict[str, Any]]
    val: Sequence[dict[str, Any]]
    lengths: list[int] | None
    stream: Callable[[int], Iterator[dict[str, Any]]] | None
    packing: dict[str, Any] | None  # rows, examples, efficiency when packed


def conversational(dcfg: DataConfig) -> bool:
    """Whether the records are conversations (they render through a chat template even under `alpaca`)."""
    formats = [dcfg.format] + [entry.format or dcfg.format for entry in dcfg.datasets or ()]
    return any(fmt in ("chat", "sharegpt") for fmt in formats)


def training_data(dcfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> TrainingData:
    """The job's data: streamed (`data.streaming`), else tokenized once into the on-disk cache (read back on
    later runs, --resume and the other ranks: the main rank builds a missing cache first), then packed with
    `data.packing`. Records are read only on a cache miss."""
    from accelerate import PartialState

    from nora_cli.data.cache import prepare_text_data
    from nora_cli.data.formats import normalize_records
    from nora_cli.data.mixture import training_records
    from nora_cli.data.packing import PackedRows

    if dcfg.streaming:
        from nora_cli.data.stream import prepare_stream

        streamed = prepare_stream(dcfg, tokenizer, seed=seed)
        return TrainingData(train=(), val=streamed.val, lengths=None, stream=streamed.stream, packing=None)

    def load_examples() -> list[Example]:
        records, fmt = training_records(dcfg, seed)
        return normalize_records(records, fmt)

    with PartialState().main_process_first():
        data = prepare_text_data(dcfg, tokenizer, seed=seed, load_examples=load_examples)
    if not dcfg.packing:
        return TrainingData(data.train, data.val, data.lengths, None, None)
    train = PackedRows(data.train, dcfg.cutoff_len)
    val = PackedRows(data.val, dcfg.cutoff_len) if len(data.val) else data.val
    info = {"rows": len(train), "examples": len(train.example_lengths), "efficiency": round(train.efficiency, 4)}
    return TrainingData(train, val, None, None, info)
