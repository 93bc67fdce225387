"""The llm-adapters protocol's generation: batched, left-padded `model.generate` with a KV cache.

Prompts are sorted by length so a batch wastes little on padding; responses come back in
the caller's order. Greedy by default; `num_beams=4` matches the LLM-Adapters scripts
(their temperature/top-p are inert there because sampling is off).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from typing import TYPE_CHECKING

from nora_cli.config.names import EVAL_BATCH_SIZE

if TYPE_CHECKING:
    from collections.abc import Iterator

    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@contextmanager
def left_padding(tokenizer: PreTrainedTokenizerBase) -> Iterator[None]:
    """Decoder-only batches must be left-padded so every row's next token follows its last real one."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        yield
    finally:
        tokenizer.padding_side = side


def generate_responses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    *,
    batch_size: int = EVAL_BATCH_SIZE,
    num_beams: int = 1,
    max_new_tokens: int = 32,
    on_batch: Callable[[int], None] | None = None,
) -> list[str]:
    """Decoded text after each prompt (special tokens dropped, whitespace stripped as LLM-Adapters does)."""
    import torch

    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    lengths = [len(tokenizer(p).input_ids) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    responses: list[str] = [""] * len(prompts)
    with left_padding(tokenizer), torch.inference_mode():
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            enc = tokenizer([prompts[i] for i in rows], return_tensors="pt", padding=True).to(device)
            out = model.generate(
                input_ids=enc.input_ids,
                attention_mask=enc.attention_mask,
                max_new_tokens=max_new_tokens,
                num_beams=num_beams,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=pad_id,
                use_cache=True,
            )
            texts = tokenizer.batch_decode(out[:, enc.input_ids.shape[1] :], skip_special_tokens=True)
            for i, text in zip(rows, texts, strict=True):
                responses[i] = text.strip()
            if on_batch is not None:
                on_batch(len(rows))
    return responses
