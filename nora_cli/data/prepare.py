"""The causal-LM data pipeline as one call per stage, shared by `nora train` (tasks/causal_lm/job.py) and
`nora data preview`, so the preview shows exactly the rows training sees.

Two stages because training reads the records before the model loads (a bad file fails in seconds, not
after a minute of loading) and tokenizes once the tokenizer is there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nora_cli.data.example import Example

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from nora_cli.config.schema import DataConfig


@dataclass
class Records:
    """The recipe's records (every source read, several mixed) in `format`, and the first one normalized."""

    records: list[dict]
    format: str
    first: Example


def read_records(dcfg: DataConfig, seed: int) -> Records:
    """Every source read (and mixed, with `data.datasets`), checked to be non-empty and to parse."""
    from nora_cli.data.formats import normalize_records
    from nora_cli.data.mixture import training_records

    records, fmt = training_records(dcfg, seed)
    return Records(records, fmt, normalize_records(records, fmt)[0])


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
