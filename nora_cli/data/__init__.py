"""Data: sources (files, folders, hub, built-ins) → formats (one Example per record) → mixture (one source or
several mixed) → templates → tokenize (exact loss masks, train/val split) → batch; images.py for DreamBooth,
check.py for the cheap pre-load check."""

from nora_cli.data.batch import collate
from nora_cli.data.demo import demo_records, write_demo
from nora_cli.data.example import Example
from nora_cli.data.formats import FORMATS, normalize_records
from nora_cli.data.sources import load_records
from nora_cli.data.templates import (
    CHAT_TEMPLATES,
    TEMPLATES,
    alpaca_eval_prompt,
    alpaca_prompt,
    render,
    render_prompt,
    render_segments,
)
from nora_cli.data.tokenize import IGNORE_INDEX, build_datasets, tokenize_example

__all__ = [
    "CHAT_TEMPLATES",
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
    "render_segments",
    "tokenize_example",
    "write_demo",
]
