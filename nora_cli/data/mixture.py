"""A recipe's training records: one source, or several mixed (`data.datasets`), before any model loads.

One source hands on its raw records with `data.columns`/`data.roles` applied, in its own format, so later
stages see exactly what the user's format names. Several sources may differ in format: each is normalized
in its own and handed on as `normalized` records (an Example's fields), taken by `weight` (a multiple of the
source's size) and capped by `max_samples`; the choice is seeded, so a recipe and seed give the same mix.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from nora_cli.data.formats import apply_mapping, example_record, normalize_records
from nora_cli.data.sources import is_hub_id, load_records, peek_hub
from nora_cli.errors import NoraError

if TYPE_CHECKING:
    from nora_cli.config.data import DataConfig, DataSource


def read_source(src: DataConfig | DataSource, fmt: str, *, peek: int | None = None) -> list[dict]:
    """One source's records with columns and roles mapped; `peek` reads only the first records of a hub id."""
    if peek is not None and is_hub_id(src.path):
        records = peek_hub(src.path, src.split, src.name, src.data_files, n=peek)
    else:
        records = load_records(src.path, split=src.split, name=src.name, data_files=src.data_files)
    return apply_mapping(records, fmt, columns=src.columns, roles=src.roles)


def take(n: int, *, weight: float | None, max_samples: int | None, rng: random.Random) -> list[int]:
    """Indices of a source's records to use: every record `int(weight)` times plus a seeded sample of the
    fractional part, at most `max_samples`; kept in the source's order (training shuffles later)."""
    count = n if weight is None else round(weight * n)
    if max_samples is not None:
        count = min(count, max_samples)
    whole, rest = divmod(count, n) if n else (0, 0)
    return list(range(n)) * whole + sorted(rng.sample(range(n), rest))


def training_records(dcfg: DataConfig, seed: int, *, peek: int | None = None) -> tuple[list[dict], str]:
    """(records, format) for `build_datasets`; errors name the source. `peek`: see `read_source`."""
    if dcfg.datasets is None:
        records = read_source(dcfg, dcfg.format, peek=peek)
        if not records:
            raise NoraError(f"the dataset {dcfg.path} is empty")
        return records, dcfg.format
    mixed: list[dict] = []
    for index, src in enumerate(dcfg.datasets):
        fmt = src.format or dcfg.format
        where = f"data.datasets[{index}] ({src.path})"
        try:
            records = read_source(src, fmt, peek=peek)
            if not records:
                raise NoraError("the dataset is empty")
            examples = normalize_records(records, fmt)
        except NoraError as err:
            raise NoraError(f"{where}: {err}") from None
        rng = random.Random(seed * 1_000_003 + index)
        mixed += [example_record(examples[i]) for i in take(len(examples), weight=src.weight,
                                                            max_samples=src.max_samples, rng=rng)]
    if not mixed:
        raise NoraError("data.datasets: every dataset contributes 0 examples (check weight and max_samples)")
    return mixed, "normalized"
