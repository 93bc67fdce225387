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


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct as a safetensors dir (converted once from the shipped GGUF)."""
    from nora_cli.models import resolve_source

    return Path(resolve_source("smollm2-135m").name_or_path)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    """A 2-layer Llama with random weights and SmolLM2's real tokenizer: fast end-to-end runs."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a test module: small models run several times faster on 2 shared cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
