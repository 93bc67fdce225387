"""The closed sets of names a recipe and the CLI accept, and the eval batch default, without pydantic.

`schema.py` types the recipe with these; `commands/` builds `--help` choices from them without paying
pydantic's import cost. Each set mirrors the registry that implements it, one layer up (config may not
import them): `lora.INITS`, `evaluate.runner.RUNNERS`, `schema.METHOD_PRESETS`,
`data.templates.CHAT_TEMPLATES` (with alpaca, chat and none).
tests/test_recipe.py checks that every Literal equals its registry, in order.
"""

from __future__ import annotations

import re
from typing import Literal, get_args

Method = Literal["lora", "nora", "lora-p", "nora+"]
InitName = Literal["lora", "gaussian", "pissa", "olora", "nystrom"]
Protocol = Literal["llm-adapters", "loglikelihood"]
#: data.template: the prompt templates and named chat templates of `data.templates` (or a path ending in .jinja)
TemplateName = Literal["alpaca", "chat", "none", "chatml", "llama3", "gemma", "mistral"]

METHODS: tuple[str, ...] = get_args(Method)
INIT_NAMES: tuple[str, ...] = get_args(InitName)
PROTOCOLS: tuple[str, ...] = get_args(Protocol)
TEMPLATE_NAMES: tuple[str, ...] = get_args(TemplateName)
#: PiSSA with K randomized-SVD iterations (`pissa_niter_4`): an init name outside the closed set
PISSA_NITER = re.compile(r"^pissa_niter_[1-9][0-9]*$")

#: prompts per generation/scoring batch in `nora evaluate` (EvalConfig.batch_size's default)
EVAL_BATCH_SIZE = 8


def is_template(value: str) -> bool:
    """A `data.template` value: a template name, or a chat template file (`*.jinja`)."""
    return value in TEMPLATE_NAMES or value.endswith(".jinja")
