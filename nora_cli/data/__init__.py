"""Text data: loading, record formats, prompt templates, tokenization with exact loss masks, collation."""

from nora_cli.data.demo import demo_records, write_demo
from nora_cli.data.example import Example

# demo_records, write_demo
from nora_cli.data.templates import TEMPLATES, alpaca_eval_prompt, alpaca_prompt, render, render_prompt
from nora_cli.data.text import (
    FORMATS,
    IGNORE_INDEX,
    build_datasets,
    collate,
    load_records,
    normalize_records,
    tokenize_example,
)

__all__ = [
    "FORMATS",
    "IGNORE_INDEX",
    "TEMPLATES",
    "Example",
    "alpaca_eval_prompt",
    "alpaca_prompt",
    "build_datasets",
    "collate",
    "demo_records",
    "load_records",
    "normalize_records",
    "render",
    "render_prompt",
    "tokenize_example",
    "write_demo",
]
