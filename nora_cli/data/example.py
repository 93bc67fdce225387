"""The one normalized record every format reads into and every template renders from."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    """One normalized training/eval item; templates decide how it becomes text."""

    instruction: str = ""
    input: str = ""
    output: str = ""  # the target text the model learns to produce
    answer: str | None = None  # gold label for evaluation ("answer2", "72"), if the record has one
    messages: tuple[dict[str, str], ...] = ()  # chat format only: ({"role", "content"}, ...)
