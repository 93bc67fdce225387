"""Task registry: names, label sets, answer extractors and where each task's test data lives.

The extractors mirror LLM-Adapters' `commonsense_evaluate.py::extract_answer` and
`evaluate.py::extract_answer_number / extract_answer_letter` (same regexes, first match
wins for labels, last number for math), so `--protocol llm-adapters` reproduces the
paper's Table 4 numbers. Unlike LLM-Adapters, "no match" is kept apart (None) so it can
be counted as invalid; it still scores as wrong.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from nora_cli.errors import NoraError

Family = Literal["commonsense", "math", "fewshot"]
Pred = str | float | None

MATH_TOLERANCE = 1e-3  # LLM-Adapters' `miss`: |pred - label| <= 1e-3 counts as correct
_NUMBER = re.compile(r"-?\d+\.?\d*")
_LETTER = re.compile(r"A|B|C|D|E")  # as in LLM-Adapters: no word boundary, first hit wins


def first_match(alternatives: tuple[str, ...]) -> Callable[[str], str | None]:
    """First occurrence of any label in the stripped response (LLM-Adapters' re.findall(...)[0])."""
    pattern = re.compile("|".join(re.escape(a) for a in alternatives))

    def extract(response: str) -> str | None:
        found = pattern.findall(response.strip())
        return found[0] if found else None

    return extract


def last_number(response: str) -> float | None:
    """Last number in the response after removing thousands separators (LLM-Adapters math)."""
    found = _NUMBER.findall(response.replace(",", ""))
    return float(found[-1]) if found else None


def first_letter(response: str) -> str | None:
    """First capital A-E anywhere in the response (LLM-Adapters' AQuA extractor, verbatim)."""
    found = _LETTER.findall(response.strip())
    return found[0] if found else None


@dataclass(frozen=True)
class Task:
    """One evaluation task; `labels` is the label set loglikelihood scores when an item has no own list."""

    name: str  # canonical, lower case
    folder: str  # LLM-Adapters dataset folder spelling (and our default data folder)
    family: Family
    labels: tuple[str, ...] = ()
    extract: Callable[[str], Pred] | None = None
    max_new_tokens: int = 32  # LLM-Adapters: 32 for commonsense, 256 for math
    default_data: str | None = None  # a `builtin:` spec when the data ships with nora

    def gold(self, record: dict[str, Any]) -> str | float:
        if self.family == "math" and self.extract is last_number:
            try:
                return float(str(record["answer"]).replace(",", ""))
            except ValueError:
                raise NoraError(f"task {self.name!r}: answer {record['answer']!r} is not a number") from None
        return str(record["answer"]).strip()

    def is_correct(self, pred: Pred, gold: str | float) -> bool:
        if pred is None:
            return False
        if isinstance(gold, float):
            return abs(float(pred) - gold) <= MATH_TOLERANCE
        return pred == gold


def _choice(name: str, folder: str, labels: tuple[str, ...], **kw: Any) -> Task:
    return Task(name, folder, "commonsense", labels, first_match(labels), **kw)


def _math(name: str, folder: str, extract: Callable[[str], Pred] = last_number) -> Task:
    return Task(name, folder, "math", (), extract, max_new_tokens=256)


_ANSWERS = tuple(f"answer{i}" for i in range(1, 6))  # LLM-Adapters matches answer1..answer5

TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        _choice("boolq", "boolq", ("true", "false")),
        _choice("piqa", "piqa", ("solution1", "solution2")),
        _choice("social_i_qa", "social_i_qa", _ANSWERS),
        _choice("hellaswag", "hellaswag", tuple(f"ending{i}" for i in range(1, 5))),
        _choice("winogrande", "winogrande", ("option1", "option2")),
        _choice("arc-easy", "ARC-Easy", _ANSWERS),
        _choice("arc-challenge", "ARC-Challenge", _ANSWERS),
        _choice("openbookqa", "openbookqa", _ANSWERS),
        _math("gsm8k", "gsm8k"),
        _math("svamp", "SVAMP"),
        _math("multiarith", "MultiArith"),
        _math("addsub", "AddSub"),
        _math("singleeq", "SingleEq"),
        _math("mawps", "mawps"),
        _math("aqua", "AQuA", first_letter),
        _choice("demo", "demo", ("red", "blue", "green", "yellow"), default_data="builtin:demo-test"),  # data/demo.py
        Task("sst2", "SST-2", "fewshot", ("terrible", "great")),
    )
}

COMMONSENSE = [n for n, t in TASKS.items() if t.family == "commonsense" and n != "demo"]


def get_task(name: str) -> Task:
    """Look a task up by canonical name or LLM-Adapters folder spelling, case-insensitively."""
    key = name.strip().lower().replace("_", "-")
    for task in TASKS.values():
        if key in (task.name.replace("_", "-"), task.folder.lower().replace("_", "-")):
            return task
    raise NoraError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")


def parse_tasks(spec: str | list[str]) -> list[Task]:
    names = spec.split(",") if isinstance(spec, str) else spec
    tasks = [get_task(n) for n in names if n.strip()]
    if not tasks:
        raise NoraError(f"no task given; valid tasks: {', '.join(TASKS)}")
    return list(dict.fromkeys(tasks))


_FORMAT_LINE = re.compile(r"Answer format:\s*(\S+(?:/\S+)+)\s*$")


def item_labels(task: Task, record: dict[str, Any]) -> tuple[str, ...]:
    """The labels one item offers: its "Answer format: a/b/c" line if present, else the task's set.

    ARC has items with 3 or 5 options, so the per-item line is the truth; the task set is
    the fallback for data without it.
    """
    match = _FORMAT_LINE.search(str(record.get("instruction", "")).rstrip())
    return tuple(match.group(1).split("/")) if match else task.labels


def default_data_path(task: Task) -> str:
    """`$NORA_SHARED/data/<commonsense|math>/<Folder>/test.json`, or the task's builtin data."""
    if task.default_data:
        return task.default_data
    shared = os.environ.get("NORA_SHARED")
    if shared and task.family in ("commonsense", "math"):
        path = Path(shared) / "data" / task.family / task.folder / "test.json"
        if path.is_file():
            return str(path)
    what = "a JSON/JSONL of {sentence, label}" if task.family == "fewshot" else "its LLM-Adapters test.json"
    raise NoraError(f"no default test data for task {task.name!r}; pass --data PATH ({what})")


_REQUIRED = {"commonsense": ("instruction", "answer"), "math": ("instruction", "answer"),
             "fewshot": ("sentence", "label")}


def load_records(task: Task, source: str) -> list[dict[str, Any]]:
    """A task's items from a .json/.jsonl/.parquet file or a `builtin:` spec, with the fields checked."""
    from nora_cli.data.sources import load_records as read_records

    path = Path(source).expanduser()
    if not source.startswith("builtin:") and not path.is_file():
        raise NoraError(f"data file not found for task {task.name!r}: {path}")
    records = read_records(source, split="test")
    if not records:
        raise NoraError(f"no items in {source} for task {task.name!r}")
    for field in _REQUIRED[task.family]:
        if not all(field in r for r in records):
            raise NoraError(f"{source}: every item of task {task.name!r} needs a {field!r} field")
    return records
