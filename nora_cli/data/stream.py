"""Streaming (`data.streaming: true`): records read lazily and tokenized as training consumes them.

For data larger than RAM: a `datasets.IterableDataset` over the hub dataset or local file, a seeded shuffle
buffer (`data.shuffle_buffer` records, reshuffled each pass), then the map-style path's own steps (normalize,
render, tokenize, drop unlearnable examples) in batches. The order is a pure function of (data, seed): pass
after pass the stream never ends, and the loop takes the next `batch_size` examples per optimizer step.
`--resume` restarts the stream and skips the examples the checkpointed steps used (step × batch_size):
exact, at the cost of reading and tokenizing them again.

What differs from the map-style path: the order (a buffer shuffle is local, not a permutation of the whole
set); `max_samples` takes the first N records of the source; `val_set_size` takes the first records of the
source (before shuffling) as the validation set, held in memory; steps are not grouped by length.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nora_cli.data import tokenize
from nora_cli.data.cache import tokenize_options
from nora_cli.data.formats import normalize_records
from nora_cli.errors import NoraError

if TYPE_CHECKING:
    from datasets import IterableDataset
    from transformers import PreTrainedTokenizerBase

    from nora_cli.config.data import DataConfig

#: records normalized and tokenized together
STREAM_BATCH = 256
#: local file suffix -> the `datasets` builder that streams it
_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet",
             ".arrow": "arrow"}


def open_stream(dcfg: DataConfig) -> IterableDataset:
    """The raw records of `dcfg.path` as an iterable dataset (nothing is read until it is iterated)."""
    import datasets

    source, split = dcfg.path, dcfg.split
    try:
        if source.startswith("builtin:"):  # small generated sets: already in memory
            from nora_cli.data.sources import load_records

            return datasets.Dataset.from_list(load_records(source, split=split)).to_iterable_dataset()
        path = Path(source).expanduser()
        builder = _BUILDERS.get(path.suffix.lower())
        if builder is not None and path.is_file():
            extra = {"sep": "\t"} if path.suffix.lower() == ".tsv" else {}
            return datasets.load_dataset(builder, data_files=str(path), split="train", streaming=True, **extra)
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():  # save_to_disk
            saved = datasets.load_from_disk(str(path))
            return (saved[split] if isinstance(saved, datasets.DatasetDict) else saved).to_iterable_dataset()
        if builder is not None or source.startswith((".", "/", "~")):
            raise NoraError(f"dataset file not found: {path}")
        return datasets.load_dataset(source, split=split, streaming=True)
    except NoraError:
        raise
    except Exception as err:  # datasets raises many types (not found, offline, bad split, ...)
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise NoraError(f"cannot stream dataset {source!r} (split {split!r}): {message}") from err


@dataclass
class StreamData:
    """A streaming job's data: `stream(skip)` yields training features from example `skip` on, forever."""

    stream: ExampleStream
    val: list[dict[str, list[int]]]


def prepare_stream(dcfg: DataConfig, tokenizer: PreTrainedTokenizerBase, *, seed: int) -> StreamData:
    if dcfg.cutoff_len < 2:
        raise NoraError(f"cutoff_len must be at least 2 tokens, got {dcfg.cutoff_len}")
    source = open_stream(dcfg)
    if dcfg.max_samples is not None:
        source = source.take(dcfg.max_samples)
    n_val = int(dcfg.val_set_size)
    val = list(features(source.take(n_val), tokenizer, dcfg)) if n_val else []
    stream = ExampleStream(source.skip(n_val) if n_val else source, tokenizer, dcfg, seed)
    return StreamData(stream, val)


class ExampleStream:
    """Training features in a fixed order for a seed: pass after pass, each through a seeded shuffle buffer."""

    def __init__(self, source: IterableDataset, tokenizer: PreTrainedTokenizerBase, dcfg: DataConfig,
                 seed: int) -> None:
        self._source, self._tokenizer, self._dcfg, self._seed = source, tokenizer, dcfg, seed

    def __call__(self, skip: int = 0) -> Iterator[dict[str, list[int]]]:
        """The stream from example `skip` on (the examples before it are read and dropped)."""
        return itertools.islice(self._passes(), skip, None)

    def _passes(self) -> Iterator[dict[str, list[int]]]:
        for epoch in itertools.count():
            data = self._source
            if self._dcfg.shuffle:  # a fresh shuffled view per pass; datasets seeds it from (seed, epoch)
                data = data.shuffle(seed=self._seed, buffer_size=self._dcfg.shuffle_buffer)
                data.set_epoch(epoch)
            count = 0
            for feature in features(data, self._tokenizer, self._dcfg):
                count += 1
                yield feature
            if count == 0:
                raise NoraError(f"no streamed training example has response tokens within "
                                f"cutoff_len={self._dcfg.cutoff_len}")


def features(records: Iterable[dict[str, Any]], tokenizer: PreTrainedTokenizerBase,
             dcfg: DataConfig) -> Iterator[dict[str, list[int]]]:
    """The learnable features of `records`, in order, computed STREAM_BATCH records at a time."""
    options = tokenize_options(dcfg)
    it = iter(records)
    start = 0
    while batch := list(itertools.islice(it, STREAM_BATCH)):
        try:
            examples = normalize_records(batch, dcfg.format)
        except NoraError as err:
            raise NoraError(f"streamed records {start}-{start + len(batch) - 1}: {err}") from None
        yield from (f for f in tokenize._tokenize_many(examples, tokenizer, **options) if tokenize.learnable(f))
        start += len(batch)
