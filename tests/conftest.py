"""Test environment: offline hub, the shared data folder, and a reusable SmolLM2 cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
# The safetensors conversion of the GGUF model is slow; keep it between test runs.
os.environ.setdefault("NORA_CACHE", str(REPO / ".nora_cache"))


def _shared() -> Path:
    path = Path(os.environ.get("NORA_SHARED", REPO.parent / "shared"))
    return path


@pytest.fixture(scope="session")
def shared() -> Path:
    """`../shared` (or $NORA_SHARED). Missing data fails loudly: CI must never silently skip."""
    path = _shared()
    if not (path / "data").is_dir():
        raise RuntimeError(f"shared data folder not found at {path}; set NORA_SHARED")
    return path
