"""A built-in multiple-choice dataset, generated here (no third-party data), for demos and CI.

Items follow LLM-Adapters' commonsense_170k layout exactly ({instruction, input, output, answer},
"the correct answer is answerK"), so the same recipe, template and answer extraction work on the
demo and on the real benchmarks. The questions (largest/smallest of a few numbers, small sums,
first word alphabetically) are easy enough that a 135M instruct model visibly improves after ~60
optimizer steps, and every answer is checkable by recomputation.

Train and test are disjoint by construction: each question's content key (the operands, or the
set of numbers/words) is hashed into one split, so no test question appears in train for any seed.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from nora_cli.errors import NoraError

Split = Literal["train", "test"]
SIZES: dict[str, int] = {"train": 2000, "test": 200}
TEST_SHARE = 10  # one content key in TEST_SHARE goes to the test split

# Common words with distinct first letters, so "first alphabetically" only needs the first letter.
WORDS = (
    "apple", "bread", "cloud", "dance", "eagle", "forest", "garden", "house", "island", "jacket",
    "kitten", "lemon", "mountain", "night", "orange", "pencil", "queen", "river", "summer", "table",
    "umbrella", "violin", "window", "yellow", "zebra",
)

# A question: (kind, content key, question text, correct option, distractor options)
Question = tuple[str, tuple, str, str, list[str]]


def _largest(rng: random.Random) -> Question:
    nums = rng.sample(range(10, 100), 4)
    best = max(nums)
    return ("largest", tuple(sorted(nums)), "Which number is the largest?",
            str(best), [str(n) for n in nums if n != best])


def _smallest(rng: random.Random) -> Question:
    nums = rng.sample(range(10, 100), 4)
    best = min(nums)
    return ("smallest", tuple(sorted(nums)), "Which number is the smallest?",
            str(best), [str(n) for n in nums if n != best])


def _addition(rng: random.Random) -> Question:
    a, b = rng.randint(1, 40), rng.randint(1, 40)
    total = a + b
    wrong = rng.sample([total + d for d in (-3, -2, -1, 1, 2, 3)], 2)
    return ("addition", (a, b), f"What is {a} + {b}?", str(total), [str(w) for w in wrong])


def _alphabetical(rng: random.Random) -> Question:
    words = rng.sample(WORDS, 3)
    first = min(words)
    return ("alphabetical", tuple(sorted(words)), "Which word comes first alphabetically?",
            first, [w for w in words if w != first])


#: question kinds, drawn uniformly
KINDS: tuple[Callable[[random.Random], Question], ...] = (_largest, _smallest, _addition, _alphabetical)


def split_of(kind: str, key: tuple) -> Split:
    """The split a question belongs to, from a stable hash of its content (not of the seed)."""
    digest = hashlib.sha256(repr((kind, key)).encode()).digest()
    return "test" if int.from_bytes(digest[:4], "big") % TEST_SHARE == 0 else "train"


def _record(rng: random.Random, question: str, correct: str, distractors: list[str]) -> dict[str, str]:
    """LLM-Adapters commonsense item with the correct option at a uniformly random position."""
    options = list(distractors)
    rng.shuffle(options)
    pos = rng.randrange(len(options) + 1)
    options.insert(pos, correct)
    k = len(options)
    listing = " ".join(f"Answer{i}: {opt}" for i, opt in enumerate(options, start=1))
    answer_format = "/".join(f"answer{i}" for i in range(1, k + 1))
    return {
        "instruction": f"Please choose the correct answer to the question: {question}\n\n"
                       f"{listing}\n\nAnswer format: {answer_format}",
        "input": "",
        "output": f"the correct answer is answer{pos + 1}",
        "answer": f"answer{pos + 1}",
    }


def demo_records(split: Split, n: int | None = None, seed: int = 0) -> list[dict[str, str]]:
    """`n` demo items (default 2000 train / 200 test), identical for the same (split, n, seed)."""
    if split not in SIZES:
        raise NoraError(f"the demo dataset has splits 'train' and 'test', not {split!r}")
    n = SIZES[split] if n is None else n
    rng = random.Random(f"nora-demo:{split}:{seed}")
    records: list[dict[str, str]] = []
    seen: set[str] = set()
    attempts = 0
    while len(records) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise NoraError(f"cannot draw {n} distinct demo questions for split {split!r}")
        kind, key, question, correct, distractors = rng.choice(KINDS)(rng)
        if split_of(kind, key) != split:
            continue
        record = _record(rng, question, correct, distractors)
        if record["instruction"] in seen:
            continue
        seen.add(record["instruction"])
        records.append(record)
    return records


def write_demo(path: str | Path, split: Split = "train", n: int | None = None, seed: int = 0) -> Path:
    """Write the demo split as an LLM-Adapters-style JSON list (readable by `load_records`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(demo_records(split, n, seed), indent=4) + "\n", encoding="utf-8")
    return path


#: `load_records` sources -> loader taking the requested split
BUILTIN: dict[str, Callable[[str], list[dict[str, str]]]] = {
    "builtin:demo": lambda split: demo_records(split),  # type: ignore[arg-type]
    "builtin:demo-test": lambda split: demo_records("test"),
}
