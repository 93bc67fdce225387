"""Tokenize once: a recipe's train/val features computed by `datasets.map` into an arrow table on disk.

The in-memory path (`tokenize.build_datasets`) re-read and re-tokenized the whole dataset on every run and
every rank, and held the features as Python lists (100k chat records: about a minute and 1.8 GB before the
first step). Here a cache miss tokenizes in batches (`num_proc` processes) into
`$NORA_CACHE/data/<key>/`; a later run, `--resume` and the other ranks of a DDP run memory-map that table
and never load or tokenize the records. The features and their order are exactly `build_datasets`'.

The key is a hash of everything that changes the features: every `data.*` setting except those in
`_NOT_FEATURES`, the seed, the size and mtime of each local file or folder the settings name, the
tokenizer's content (tokenizer.json, chat template, special tokens, BOS/EOS flags; not its path), and the
source of `nora_cli/data/*.py` (a change to a format, template or mask invalidates). A hub dataset is keyed
by its name and split: a new upstream revision needs `data.cache: false` once, or removing the folder.
One process builds a key while the others wait on its lock file; the folder appears by an atomic rename.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

from nora_cli.data import tokenize
from nora_cli.data.example import Example
from nora_cli.errors import NoraError

if TYPE_CHECKING:
    import pyarrow as pa
    from transformers import PreTrainedTokenizerBase

    from nora_cli.config.data import DataConfig

CACHE_VERSION = 1
META = "meta.json"
#: data settings that never change the features (how they are computed, or the streaming path's)
_NOT_FEATURES = frozenset({"cache", "num_proc", "streaming", "shuffle_buffer"})
#: records per `map` batch; below this many examples one process is faster than starting a pool
BATCH = 1000
_PARALLEL_FROM = 5000


@dataclass
class TextData:
    """A causal-LM job's tokenized data: `train`/`val` index like lists of {input_ids, labels}."""

    train: Sequence[dict[str, list[int]]]
    val: Sequence[dict[str, list[int]]]
    lengths: list[int]  # tokens per training example (the loop's length grouping)
    hit: bool | None = None  # True: read from the cache; False: built it; None: data.cache is off
    path: Path | None = None  # the cache folder


def tokenize_options(dcfg: DataConfig) -> dict[str, Any]:
    """The keyword arguments of `tokenize._tokenize_many` for a recipe (one place for the cache and the stream)."""
    return {"template": dcfg.template, "cutoff_len": dcfg.cutoff_len, "train_on_inputs": dcfg.train_on_inputs,
            "add_eos": dcfg.add_eos}


def prepare_text_data(
    dcfg: DataConfig, tokenizer: PreTrainedTokenizerBase, *, seed: int,
    load_examples: Callable[[], list[Example]],
) -> TextData:
    """Train/val features for `dcfg`: from the cache when its key exists, else computed (and cached unless
    `data.cache` is false). `load_examples` reads and normalizes the records; it is not called on a hit."""
    if dcfg.cutoff_len < 2:
        raise NoraError(f"cutoff_len must be at least 2 tokens, got {dcfg.cutoff_len}")
    if not dcfg.cache:
        examples, n_val = _ordered(dcfg, seed, load_examples)
        features = tokenize._tokenize_many(examples, tokenizer, **tokenize_options(dcfg))
        train, val = tokenize.split_features(features, n_val, dcfg.cutoff_len)
        return TextData(train, val, [len(f["input_ids"]) for f in train])
    from filelock import FileLock

    from nora_cli.models import cache_dir

    root = cache_dir() / "data"
    key = cache_key(dcfg, tokenizer, seed)
    folder = root / key
    opened = _try_open(folder)
    hit = opened is not None
    if opened is None:
        root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(root / f"{key}.lock")):  # one builder; the others wait, then read its table
            opened = _try_open(folder)
            hit = opened is not None
            if opened is None:
                _build(folder, dcfg, tokenizer, seed, load_examples)
                opened = open_cached(folder)
    train, val = opened
    print(f"data: {'read' if hit else 'tokenized into'} {folder} ({len(train)} train, {len(val)} val examples)",
          file=sys.stderr)
    return TextData(train, val, train.lengths(), hit, folder)


def _try_open(folder: Path) -> tuple[ArrowExamples, ArrowExamples] | None:
    """The cached views, or None when the folder is missing or damaged (then it is removed, to be rebuilt)."""
    if not (folder / META).is_file():
        return None
    try:
        return open_cached(folder)
    except Exception as err:  # a truncated or deleted table file: pyarrow raises ArrowInvalid/OSError/...
        print(f"data: the cached table {folder} is unreadable ({type(err).__name__}); tokenizing again",
              file=sys.stderr)
        shutil.rmtree(folder, ignore_errors=True)
        return None


def _ordered(dcfg: DataConfig, seed: int, load_examples: Callable[[], list[Example]]) -> tuple[list[Example], int]:
    return tokenize.order_examples(load_examples(), val_set_size=dcfg.val_set_size, seed=seed,
                                   max_samples=dcfg.max_samples, shuffle=dcfg.shuffle)


# --- the key --------------------------------------------------------------------------------------------


def cache_key(dcfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> str:
    settings = {k: v for k, v in dcfg.model_dump(mode="json").items() if k not in _NOT_FEATURES}
    parts = {
        "version": CACHE_VERSION,
        "settings": settings,
        "seed": seed,
        "files": [_stamp(Path(s).expanduser()) for s in sorted(set(_strings(settings))) if _is_path(s)],
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "code": _code_hash(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _strings(v)


def _is_path(text: str) -> bool:
    try:
        return bool(text) and os.path.exists(os.path.expanduser(text))
    except (OSError, ValueError):
        return False


def _stamp(path: Path) -> list[Any]:
    """(absolute path, size, mtime) of a file, or of every file under a folder."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of what the tokenizer does, not where it was loaded from."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = [type(tokenizer).__name__] + [getattr(tokenizer, name, None) for name in (
        "chat_template", "special_tokens_map", "bos_token_id", "eos_token_id", "pad_token_id", "add_bos_token",
        "add_eos_token")]
    digest = hashlib.sha256(vocab.encode())
    digest.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _code_hash() -> str:
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


# --- build (a miss) -------------------------------------------------------------------------------------


def _num_proc(setting: int | None, n: int) -> int | None:
    """None runs `map` in this process (datasets starts a pool for any number, even 1)."""
    if setting is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        setting = min(cpus, 8) if n >= _PARALLEL_FROM else 1
    setting = min(setting, max(1, n // BATCH))  # a process per batch at most
    return setting if setting > 1 else None


def _build(folder: Path, dcfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int,
           load_examples: Callable[[], list[Example]]) -> None:
    """Tokenize into a temporary folder next to `folder`, then rename it into place."""
    import datasets
    import pyarrow.compute as pc

    examples, n_val = _ordered(dcfg, seed, load_examples)
    n_train = len(examples) - n_val
    # Examples travel to the workers as JSON text: exact for the string fields an Example holds (no pickle:
    # nothing nora reads back may run code), and no arrow schema to infer for the messages.
    source = datasets.Dataset.from_dict({"example": [json.dumps(asdict(e)) for e in examples]})
    del examples
    features = datasets.Features({"input_ids": datasets.List(datasets.Value("int32")),
                                  "labels": datasets.List(datasets.Value("int32")), "val": datasets.Value("bool")})
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{folder.name}-", dir=folder.parent))
    try:
        mapped = source.map(
            _tokenize_batch, batched=True, batch_size=BATCH, with_indices=True, remove_columns=["example"],
            fn_kwargs={"tokenizer": tokenizer, "options": tokenize_options(dcfg), "n_train": n_train},
            features=features, num_proc=_num_proc(dcfg.num_proc, len(source)),
            cache_file_name=str(tmp / "features.arrow"), new_fingerprint=folder.name, desc="tokenizing",
        )
        n_val_kept = int(pc.sum(pc.cast(mapped.data.column("val"), "int64")).as_py() or 0)
        if len(mapped) - n_val_kept == 0:
            raise tokenize.no_training_example(dcfg.cutoff_len)
        meta = {"version": CACHE_VERSION, "files": [Path(f["filename"]).name for f in mapped.cache_files],
                "train": len(mapped) - n_val_kept, "val": n_val_kept}
        del mapped, source
        (tmp / META).write_text(json.dumps(meta, indent=1))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is as shared as its parent
        if folder.exists():  # a damaged table (see _try_open)
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _example(text: str) -> Example:
    fields = json.loads(text)
    return Example(**{**fields, "messages": tuple(fields["messages"])})


def _tokenize_batch(batch: dict[str, list[Any]], indices: list[int], *, tokenizer: PreTrainedTokenizerBase,
                    options: dict[str, Any], n_train: int) -> dict[str, list[Any]]:
    """One `map` batch: the features of `build_datasets` for these examples, unlearnable ones dropped."""
    examples = [_example(text) for text in batch["example"]]
    features = tokenize._tokenize_many(examples, tokenizer, **options)
    kept = [(f, i) for f, i in zip(features, indices, strict=True) if tokenize.learnable(f)]
    return {"input_ids": [f["input_ids"] for f, _ in kept], "labels": [f["labels"] for f, _ in kept],
            "val": [i >= n_train for _, i in kept]}


# --- read (a hit) ---------------------------------------------------------------------------------------


def open_cached(folder: Path) -> tuple[ArrowExamples, ArrowExamples]:
    """(train, val) views of a cache folder, memory-mapped with pyarrow alone (no `datasets` import)."""
    import pyarrow as pa

    meta = json.loads((folder / META).read_text())
    tables = []
    for name in meta["files"]:  # the map stays open as long as the table's buffers live
        tables.append(pa.ipc.open_stream(pa.memory_map(str(folder / name))).read_all())
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    n_train = meta["train"]
    return ArrowExamples(table, 0, n_train), ArrowExamples(table, n_train, n_train + meta["val"])


class ArrowExamples(Sequence[dict[str, list[int]]]):
    """Rows [start, stop) of a features table; `view[i]` is the dict `build_datasets` returns for row i."""

    def __init__(self, table: pa.Table, start: int, stop: int) -> None:
        self._ids, self._labels = table.column("input_ids"), table.column("labels")
        self._start, self._len = start, stop - start

    def __len__(self) -> int:
        return self._len

    @overload
    def __getitem__(self, index: int) -> dict[str, list[int]]: ...
    @overload
    def __getitem__(self, index: slice) -> list[dict[str, list[int]]]: ...
    def __getitem__(self, index: int | slice) -> dict[str, list[int]] | list[dict[str, list[int]]]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._len))]
        if index < 0:
            index += self._len
        if not 0 <= index < self._len:
            raise IndexError(index)
        row = self._start + index
        return {"input_ids": self._ids[row].as_py(), "labels": self._labels[row].as_py()}

    def lengths(self) -> list[int]:
        import pyarrow.compute as pc

        return pc.list_value_length(self._ids.slice(self._start, self._len)).to_pylist()
