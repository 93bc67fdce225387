"""A built-in dataset, generated here (no third-party data), for the demo and CI: is a number even or odd?

Why this task: SmolLM2-135M-Instruct cannot do it (the base scores chance, ~50%, on the held-out items:
it answers the same word for almost every number), yet the rule is one a LoRA adapter learns in ~30
optimizer steps, and it generalizes: the test numbers never occur in training, so a gain on them is the
rule (look at the last digit), not memorized items. The earlier multiple-choice demo (largest number,
sums, "answerK" labels) taught the 135M model only the answer format: its accuracy stayed at chance.

Items follow LLM-Adapters' commonsense_170k layout exactly ({instruction, input, output, answer}, an
"Answer format: even/odd" line like BoolQ's "true/false", "the correct answer is odd"), so the same
recipe, template, answer extraction and loglikelihood scoring work on the demo and on the real benchmarks.

Train and test are disjoint by construction: each number is hashed into one split (`split_of`), so no
test number appears in train for any seed or size.
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
TEST_SHARE = 10  # one number in TEST_SHARE goes to the test split
LOW, HIGH = 100, 9999  # 3- and 4-digit numbers: 9,900 of them, ~990 reserved for test
LABELS = ("even", "odd")


def split_of(number: int) -> Split:
    """The split a number belongs to, from a stable hash of the number alone (not of the seed)."""
    digest = hashlib.sha256(f"nora-demo-parity:{number}".encode()).digest()
    return "test" if int.from_bytes(digest[:4], "big") % TEST_SHARE == 0 else "train"


def parity_record(number: int) -> dict[str, str]:
    """One LLM-Adapters-style item asking for the parity of `number`."""
    answer = LABELS[number % 2]
    return {
        "instruction": f"Please answer the following question with even or odd: is the number {number} even "
                       f"or odd?\n\nAnswer format: {'/'.join(LABELS)}",
        "input": "",
        "output": f"the correct answer is {answer}",
        "answer": answer,
    }


def demo_records(split: Split, n: int | None = None, seed: int = 0) -> list[dict[str, str]]:
    """`n` distinct demo items (default 2000 train / 200 test), the same for the same (split, seed).

    Even and odd alternate, so every prefix is balanced: a model that always answers one word scores 50%.
    """
    if split not in SIZES:
        raise NoraError(f"the demo dataset has splits 'train' and 'test', not {split!r}")
    n = SIZES[split] if n is None else n
    pools = [[k for k in range(LOW + parity, HIGH + 1, 2) if split_of(k) == split] for parity in (0, 1)]
    if n > 2 * min(len(p) for p in pools):
        raise NoraError(f"the demo split {split!r} has at most {2 * min(len(p) for p in pools)} items, not {n}")
    rng = random.Random(f"nora-demo:{split}:{seed}")
    for pool in pools:  # whole pools, so a smaller n is a prefix of a larger one
        rng.shuffle(pool)
    numbers = [x for pair in zip(*pools, strict=False) for x in pair][:n]
    return [parity_record(k) for k in numbers]


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
