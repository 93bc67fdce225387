"""Where records come from: local files (json, jsonl, csv, parquet), dataset folders, the hub, built-ins.

Heavy libraries (datasets, pyarrow) are imported inside the readers that need them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from nora_cli.errors import NoraError, read_text


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


def _read_csv(path: Path) -> list[dict]:
    """A CSV file with a header row (every value is text, as `datasets`' csv loader would give)."""
    import csv
    import io

    rows = list(csv.DictReader(io.StringIO(read_text(path, "dataset file"), newline="")))
    if rows and None in rows[0]:
        raise NoraError(f"{path}: row 1 has more values than the header has columns")
    return rows


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises ArrowInvalid/OSError subclasses for corrupt files
        raise NoraError(f"{path}: cannot read parquet: {str(err).splitlines()[0]}") from None


#: file suffix -> reader
READERS: dict[str, Callable[[Path], list[dict]]] = {
    ".json": _read_json,
    ".jsonl": _read_jsonl,
    ".parquet": _read_parquet,
    ".csv": _read_csv,
}


def _load_hub(name: str, split: str) -> list[dict]:
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as err:  # datasets raises many types (not found, offline, bad split, ...)
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise NoraError(f"cannot load dataset {name!r} (split {split!r}): {message}") from err
    return dataset.to_list()


def load_records(source: str, *, split: str = "train", base_dir: Path | None = None) -> list[dict]:
    """Raw records from a .json/.jsonl/.parquet/.csv file, a hub dataset, or `builtin:demo[-test]`.

    Relative paths resolve against `base_dir` (the recipe's folder) when given. `split` selects
    the hub split and the built-in demo split; a local file is a single split.
    """
    if source.startswith("builtin:"):
        from nora_cli.data.demo import BUILTIN

        if source not in BUILTIN:
            raise NoraError(f"unknown built-in dataset {source!r}; expected one of {', '.join(BUILTIN)}")
        return BUILTIN[source](split)
    path = Path(source).expanduser()
    if base_dir is not None and not path.is_absolute():
        path = Path(base_dir) / path
    reader = READERS.get(path.suffix.lower())
    if reader is not None:
        if not path.is_file():
            raise NoraError(f"dataset file not found: {path}")
        return reader(path)
    if path.is_dir():  # a local dataset folder: datasets knows every layout
        return _load_hub(str(path), split)
    if path.is_file():
        raise NoraError(f"unsupported data file format {path.suffix or '(no suffix)'!r}: {path}; "
                        f"expected {', '.join(READERS)}")
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise NoraError(f"dataset not found: {path} (expected a {', '.join(READERS)} file)")
    return _load_hub(source, split)
