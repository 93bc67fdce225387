"""A built-in dataset, generated here (no third-party data), for the demo and CI: sort words into 4 groups.

The instruction states a rule: "Answer red if the word names an animal, blue if a food, green if a
country, yellow if a job", then gives one word. SmolLM2-135M-Instruct does not follow it (the base scores
near chance, 25%, on the held-out words), yet it knows what the words are, so a LoRA adapter learns to
apply the rule in ~30 optimizer steps when the loss is on the response only (`train_on_inputs: false`; with
the prompt in the loss, the one answer token is ~1/70 of it and the adapter learns the prompt instead).
The test words never occur in training (each word is hashed into one split), so a gain on them is the rule
applied to new words, not memorized items. Earlier demos taught the 135M model only the answer format: a
multiple-choice mix with "answerK" labels, and "is N even or odd?" (its loss stayed at the coin-flip floor
of the answer token for 30 steps).

Items follow LLM-Adapters' commonsense_170k layout exactly ({instruction, input, output, answer}, an
"Answer format: red/blue/green/yellow" line like BoolQ's "true/false", "the correct answer is red"), so
the same recipe, template, answer extraction and loglikelihood scoring work on the demo and on the real
benchmarks.
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
TRAIN_SIZE = 2000  # drawn with replacement from the training words; the test split is every test word once
TEST_SHARE = 3  # one word in TEST_SHARE goes to the test split

#: group -> (its answer word, common words of that group, space-separated)
_GROUP_TEXT: dict[str, tuple[str, str]] = {
    "animal": ("red",
        "cat dog horse cow pig sheep goat lion tiger bear wolf fox rabbit mouse rat deer zebra giraffe elephant "
        "monkey camel donkey eagle owl parrot duck goose frog snake lizard turtle shark whale dolphin salmon crab "
        "spider bee ant butterfly squirrel kangaroo koala panda leopard cheetah hippo rhino otter seal penguin"),
    "food": ("blue",
        "bread cheese butter rice pasta pizza soup salad apple banana orange grape lemon cherry peach pear mango "
        "carrot potato tomato onion garlic cucumber lettuce cabbage broccoli bean corn egg bacon sausage steak ham "
        "yogurt cookie cake pie muffin pancake waffle noodle sandwich burger taco honey jam chocolate candy cereal "
        "popcorn olive"),
    "country": ("green",
        "France Germany Spain Italy Portugal Greece Poland Sweden Norway Finland Denmark Ireland Austria Belgium "
        "Netherlands Switzerland Russia Ukraine Turkey Egypt Kenya Nigeria Ghana Morocco Ethiopia India China "
        "Japan Korea Vietnam Thailand Indonesia Malaysia Pakistan Iran Iraq Israel Canada Mexico Brazil Argentina "
        "Chile Peru Colombia Cuba Jamaica Australia Mongolia Nepal Hungary Romania"),
    "job": ("yellow",
        "doctor nurse teacher farmer lawyer pilot driver baker butcher chef cook waiter plumber carpenter painter "
        "singer dancer actor writer poet journalist soldier sailor firefighter policeman judge dentist surgeon "
        "engineer architect scientist programmer banker cashier clerk mechanic electrician tailor barber gardener "
        "janitor librarian professor secretary accountant pharmacist photographer musician guitarist astronaut"),
}
#: group -> (its answer word, its words)
GROUPS: dict[str, tuple[str, tuple[str, ...]]] = {g: (a, tuple(t.split())) for g, (a, t) in _GROUP_TEXT.items()}
LABELS = tuple(answer for answer, _ in GROUPS.values())
RULE = "Answer red if the word names an animal, blue if a food, green if a country, yellow if a job."


def split_of(word: str) -> Split:
    """The split a word belongs to, from a stable hash of the word alone (not of the seed)."""
    digest = hashlib.sha256(f"nora-demo:{word}".encode()).digest()
    return "test" if int.from_bytes(digest[:4], "big") % TEST_SHARE == 0 else "train"


def word_record(word: str, group: str) -> dict[str, str]:
    """One LLM-Adapters-style item: the rule, the word, the answer word of its group."""
    answer = GROUPS[group][0]
    return {
        "instruction": f"{RULE}\n\nWord: {word}\n\nAnswer format: {'/'.join(LABELS)}",
        "input": "",
        "output": f"the correct answer is {answer}",
        "answer": answer,
    }


def demo_words(split: Split) -> list[tuple[str, str]]:
    """(word, group) of one split, in a fixed order."""
    return [(w, g) for g, (_, words) in GROUPS.items() for w in words if split_of(w) == split]


def demo_records(split: Split, n: int | None = None, seed: int = 0) -> list[dict[str, str]]:
    """Train: `n` items (default 2000) drawn from the training words, a smaller n a prefix of a larger one.
    Test: every test word once, shuffled by `seed` (the first `n` with n given)."""
    if split not in ("train", "test"):
        raise NoraError(f"the demo dataset has splits 'train' and 'test', not {split!r}")
    pool = demo_words(split)
    rng = random.Random(f"nora-demo:{split}:{seed}")
    if split == "train":
        picks = [rng.choice(pool) for _ in range(TRAIN_SIZE if n is None else n)]
    else:
        picks = rng.sample(pool, len(pool))[:n]
    return [word_record(w, g) for w, g in picks]


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
