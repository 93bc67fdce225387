"""k-shot prompts for the OPT recipe's SST-2-style classification (MeZO / LM-BFF template).

Each example reads "<sentence> It was <word>" with label words 0 -> "terrible",
1 -> "great"; demonstrations are separated by a blank line and the query ends at
"It was", so the candidates are " terrible" / " great" scored by loglikelihood.
Demonstrations come from a train split: `train.json[l]` beside a `test.json[l]` data file
when it exists, else the other items of the same file (never the query itself).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from nora_cli.errors import NoraError

LABEL_WORDS = ("terrible", "great")  # index = label
TEMPLATE = "{sentence} It was"
SEPARATOR = "\n\n"


def label_index(value: Any) -> int:
    """Accept 0/1, "0"/"1", or the label words themselves."""
    text = str(value).strip().lower()
    if text in LABEL_WORDS:
        return LABEL_WORDS.index(text)
    if text in ("0", "1"):
        return int(text)
    raise NoraError(f"sst2 label must be 0/1 or {'/'.join(LABEL_WORDS)}, got {value!r}")


def train_pool(data_path: str, test_records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], bool]:
    """(demonstration pool, whether it is the test file itself)."""
    path = Path(data_path)
    for suffix in (".json", ".jsonl"):
        sibling = path.with_name(path.stem.replace("test", "train") + suffix)
        if "test" in path.stem and sibling.is_file():
            text = sibling.read_text(encoding="utf-8")
            rows = ([json.loads(x) for x in text.splitlines() if x.strip()] if suffix == ".jsonl"
                    else json.loads(text))
            return rows, False
    return test_records, True


def demonstrations(pool: list[dict[str, Any]], shots: int, seed: int, exclude: int | None) -> list[dict]:
    """`shots` examples drawn with a per-item seed so every run and every batch size sees the same prompt."""
    candidates = [r for j, r in enumerate(pool) if j != exclude]
    if shots > len(candidates):
        raise NoraError(f"--shots {shots} needs at least {shots} demonstration items, found {len(candidates)}")
    return random.Random(seed).sample(candidates, shots)


def render(record: dict[str, Any], demos: list[dict[str, Any]]) -> str:
    """The context text: demonstrations with their label words, then the query up to "It was"."""
    parts = [f"{TEMPLATE.format(sentence=str(d['sentence']).strip())} {LABEL_WORDS[label_index(d['label'])]}"
             for d in demos]
    parts.append(TEMPLATE.format(sentence=str(record["sentence"]).strip()))
    return SEPARATOR.join(parts)


def build_prompts(
    records: list[dict[str, Any]], data_path: str, shots: int, *, limit: int | None = None, seed: int = 0
) -> list[str]:
    """Prompts for the first `limit` items; demonstrations may come from all of `records`."""
    pool, same_file = train_pool(data_path, records) if shots else ([], True)
    return [
        render(r, demonstrations(pool, shots, seed * 1_000_003 + i, i if same_file else None) if shots else [])
        for i, r in enumerate(records[:limit])
    ]
