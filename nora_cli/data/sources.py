"""Where records come from: local files, `save_to_disk` folders, dataset folders, the hub, built-ins.

JSON and JSON Lines are read here: their errors name the line and column, and every record keeps exactly
its own keys (arrow would unify the schema and fill a missing key with null, hiding "record 2 is missing
'output'"). Everything else goes through `datasets`: csv/tsv/parquet/arrow files via its packaged builders,
`save_to_disk` folders (a Dataset or a DatasetDict) via `load_from_disk`, other folders and hub ids
(with a config `name`, `data_files`) via `load_dataset`. `split` uses datasets' syntax everywhere,
slices included (`train[:10%]`, `train[10:20]+test`); a single file or a saved Dataset is one split,
whatever its name. Heavy libraries are imported only by the readers that need them.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from nora_cli.errors import NoraError, read_text

#: the `data_files` forms `datasets.load_dataset` accepts: one pattern, a list, or split -> pattern(s)
DataFiles = str | list[str] | dict[str, str | list[str]]


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


def _first_message(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _read_delimited(path: Path, sep: str) -> list[dict]:
    """CSV/TSV with a header row through datasets' csv builder; every column is text (no int/NaN guessing),
    as a spreadsheet cell's "007" or an empty `input` must stay what the user wrote."""
    import datasets

    text = read_text(path, "dataset file")
    header = next(csv.reader(text.splitlines()[:1] or [""], delimiter=sep), [])
    if not any(header):
        return []
    rows = list(csv.reader(text.splitlines()[1:2], delimiter=sep))
    if rows and len(rows[0]) > len(header):
        raise NoraError(f"{path}: row 1 has more values than the header has columns")
    features = datasets.Features({name: datasets.Value("string") for name in header})
    return _via_datasets(path, "csv", sep=sep, features=features, keep_default_na=False)


def _read_with(builder: str) -> Callable[[Path], list[dict]]:
    return lambda path: _via_datasets(path, builder)


@contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Reading a local file takes seconds at most: datasets' "Generating train split" bars would only
    clutter the output (and bury a one-line error)."""
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_enabled = not are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            enable_progress_bars()


def _via_datasets(path: Path, builder: str, **options: Any) -> list[dict]:
    import datasets

    try:
        with _no_progress_bars():
            return datasets.load_dataset(builder, data_files=str(path), split="train", **options).to_list()
    except Exception as err:  # arrow/pandas raise many types for corrupt files
        raise NoraError(f"{path}: cannot read {builder}: {_first_message(err)}") from None


#: file suffix -> reader (the whole file is one split)
READERS: dict[str, Callable[[Path], list[dict]]] = {
    ".json": _read_json,
    ".jsonl": _read_jsonl,
    ".csv": lambda path: _read_delimited(path, ","),
    ".tsv": lambda path: _read_delimited(path, "\t"),
    ".parquet": _read_with("parquet"),
    ".arrow": _read_with("arrow"),
}


# --- splits ------------------------------------------------------------------------------------


def _has_slice(split: str) -> bool:
    return "[" in split or "+" in split


def select_split(split: str, splits: dict[str, Callable[[], list[dict]]], where: str) -> list[dict]:
    """Records of `split` (datasets' syntax: `train`, `train[:10%]`, `train[5:]+test`) from named splits.

    `splits` maps each available split name to a loader; a single split (one file, a saved Dataset) answers
    to any name. Slices round like `datasets` does, so `train[:10%]` is the same rows everywhere.
    """
    def records_of(name: str) -> list[dict]:
        if len(splits) == 1:
            return next(iter(splits.values()))()
        if name not in splits:
            raise NoraError(f"{where} has no split {name!r}; it has {', '.join(splits)}")
        return splits[name]()

    if not _has_slice(split):
        return records_of(split)
    import datasets

    try:
        instruction = datasets.ReadInstruction.from_spec(split)
    except (ValueError, AssertionError) as err:
        raise NoraError(f"bad split {split!r} for {where}: {_first_message(err)}") from None
    names = [part.split("[", 1)[0].strip() for part in split.split("+")]
    loaded = {name: records_of(name) for name in names}
    try:
        parts = instruction.to_absolute({name: len(records) for name, records in loaded.items()})
    except (ValueError, AssertionError) as err:
        raise NoraError(f"bad split {split!r} for {where}: {_first_message(err)}") from None
    return [record for part in parts for record in loaded[part.splitname][part.from_:part.to]]


# --- folders and the hub -----------------------------------------------------------------------


def _is_saved(path: Path) -> bool:
    """A `save_to_disk` folder: a Dataset (state.json) or a DatasetDict (dataset_dict.json)."""
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def _load_saved(path: Path, split: str) -> list[dict]:
    import datasets

    try:
        saved = datasets.load_from_disk(str(path))
    except Exception as err:  # a damaged folder: missing arrow files, bad json
        raise NoraError(f"cannot load saved dataset {path}: {_first_message(err)}") from None
    if isinstance(saved, datasets.DatasetDict):
        parts = {name: saved[name].to_list for name in saved}
    else:
        parts = {"train": saved.to_list}
    return select_split(split, parts, f"saved dataset {path}")


def _load_hub(source: str, split: str, name: str | None = None, data_files: DataFiles | None = None) -> list[dict]:
    """A hub id or a local dataset folder through `datasets.load_dataset` (which slices splits itself)."""
    import datasets

    options: dict[str, Any] = {"split": split}
    if name is not None:
        options["name"] = name
    if data_files is not None:
        options["data_files"] = data_files
    try:
        dataset = datasets.load_dataset(source, **options)
    except Exception as err:  # datasets raises many types (not found, offline, bad config or split, ...)
        config = f", config {name!r}" if name is not None else ""
        raise NoraError(f"cannot load dataset {source!r} (split {split!r}{config}): {_first_message(err)}") from err
    return dataset.to_list()


def peek_hub(source: str, split: str, name: str | None = None, data_files: DataFiles | None = None,
             n: int = 100) -> list[dict]:
    """The first `n` records of a hub dataset without downloading it whole (streamed; the slice, if any, is
    left to the real load). Offline, streaming cannot resolve files, so the cached copy is read instead."""
    import os

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "false", "no", ""):
        return _load_hub(source, split, name, data_files)[:n]
    import itertools

    import datasets

    first = split.split("+", 1)[0].split("[", 1)[0].strip()  # a stream reads whole splits
    options: dict[str, Any] = {"name": name} if name is not None else {}
    if data_files is not None:
        options["data_files"] = data_files
    try:
        stream = datasets.load_dataset(source, split=first, streaming=True, **options)
        return list(itertools.islice(stream, n))
    except Exception as err:  # as in _load_hub
        config = f", config {name!r}" if name is not None else ""
        raise NoraError(f"cannot load dataset {source!r} (split {split!r}{config}): {_first_message(err)}") from err


def resolve_path(source: str, base_dir: Path | None = None) -> Path:
    """`source` as a local path: `~` expanded, relative paths against `base_dir` when given."""
    path = Path(source).expanduser()
    return Path(base_dir) / path if base_dir is not None and not path.is_absolute() else path


def is_hub_id(source: str, base_dir: Path | None = None) -> bool:
    """Whether `load_records` hands `source` to the hub (not a built-in, not a local file or folder)."""
    path = resolve_path(source, base_dir)
    if source.startswith("builtin:") or path.exists():
        return False
    return not (path.suffix.lower() in READERS or source.startswith((".", "/", "~")) or source.count("/") > 1)


def load_records(
    source: str,
    *,
    split: str = "train",
    base_dir: Path | None = None,
    name: str | None = None,
    data_files: DataFiles | None = None,
) -> list[dict]:
    """Raw records from a file (.json .jsonl .csv .tsv .parquet .arrow), a folder, a hub id, or `builtin:NAME`.

    Relative paths resolve against `base_dir` (the recipe's folder) when given. `split` (slices allowed)
    selects rows everywhere; `name` (a config such as GSM8K's "main") and `data_files` go to `load_dataset`
    for hub ids and dataset folders.
    """
    if source.startswith("builtin:"):
        from nora_cli.data.demo import BUILTIN

        if source not in BUILTIN:
            raise NoraError(f"unknown built-in dataset {source!r}; expected one of {', '.join(BUILTIN)}")
        loader = BUILTIN[source]
        return select_split(split, {s: (lambda s=s: loader(s)) for s in ("train", "test")}, source)
    path = resolve_path(source, base_dir)
    reader = READERS.get(path.suffix.lower())
    if reader is not None and not path.is_dir():
        if not path.is_file():
            raise NoraError(f"dataset file not found: {path}")
        return select_split(split, {"train": lambda: reader(path)}, str(path))
    if path.is_dir():
        if _is_saved(path) and data_files is None:
            return _load_saved(path, split)
        with _no_progress_bars():  # a folder of data files: datasets knows the layouts
            return _load_hub(str(path), split, name, data_files)
    if path.is_file():
        raise NoraError(f"unsupported data file format {path.suffix or '(no suffix)'!r}: {path}; "
                        f"expected {', '.join(READERS)}, a dataset folder or a hub dataset")
    if not is_hub_id(source, base_dir):
        raise NoraError(f"dataset not found: {path} (expected a {', '.join(READERS)} file or a dataset folder)")
    return _load_hub(source, split, name, data_files)
