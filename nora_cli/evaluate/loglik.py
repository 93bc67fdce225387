"""Loglikelihood scoring of candidate continuations, lm-evaluation-harness style, with a shared prompt.

Token split (lm-eval `_encode_pair`): trailing whitespace of the context moves to the
front of every continuation, then `context + continuation` is encoded as one string and
the tokens after the encoded context are the continuation. The scored sequence is
`encode(context) + those tokens`, so every candidate of an item shares the exact context
tokens.

That sharing is what makes it cheap: each batch of items runs its (left-padded) contexts
once, together with the token prefix all candidates share; candidates that differ only in
their last token are scored from that one pass, longer ones reuse its KV cache (rows
repeated per candidate) and run only their own tokens. The cost per item is about one
forward pass of the prompt, not one per candidate.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from nora_cli.config.names import EVAL_BATCH_SIZE
from nora_cli.errors import NoraError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def split_whitespace(context: str, continuations: Sequence[str]) -> tuple[str, list[str]]:
    """Move the context's trailing whitespace onto each continuation (as lm-eval does)."""
    stripped = context.rstrip()
    tail = context[len(stripped) :]
    return stripped, [tail + c for c in continuations]


@dataclass(frozen=True)
class Encoded:
    context: list[int]
    continuations: list[list[int]]


def encode_request(tokenizer: PreTrainedTokenizerBase, context: str, continuations: Sequence[str]) -> Encoded:
    """Token ids of one context and its continuations (the context already whitespace-split)."""
    ctx = tokenizer(context).input_ids
    conts = [tokenizer(context + c).input_ids[len(ctx) :] for c in continuations]
    if not ctx:  # lm-eval conditions an empty context on the end-of-text token
        ctx = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]
    if any(not c for c in conts):
        raise NoraError(f"a candidate continuation encodes to no tokens: {continuations!r}")
    return Encoded(ctx, conts)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _shared_prefix(conts: list[list[int]]) -> int:
    """Tokens all continuations start with, leaving each at least one token of its own."""
    n = min(len(c) for c in conts) - 1
    for j in range(n):
        if any(c[j] != conts[0][j] for c in conts):
            return j
    return max(n, 0)


def _score_batch(model: PreTrainedModel, batch: list[Encoded], pad_id: int) -> list[list[float]]:
    """Summed log-probabilities of every continuation of every item in `batch`.

    Pass 1 runs each item's context plus the token prefix its candidates share ("the correct
    answer is answer"), left-padded, once. When every candidate then differs in one final
    token (the usual case), its score is read off pass 1 and there is no pass 2; otherwise
    the cache rows are repeated per candidate and only the differing tails run again.
    """
    import torch

    device = next(model.parameters()).device
    shared = [_shared_prefix(e.continuations) for e in batch]
    heads = [e.context + e.continuations[0][:p] for e, p in zip(batch, shared, strict=True)]
    tails = [[c[p:] for c in e.continuations] for e, p in zip(batch, shared, strict=True)]
    need_cache = any(len(t) > 1 for ts in tails for t in ts)

    # 1) context + shared prefix, left-padded; logits for the last max(shared)+1 positions.
    width = max(len(h) for h in heads)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, h in enumerate(heads):
        ids[i, width - len(h) :] = torch.tensor(h)
        mask[i, width - len(h) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    keep = max(shared) + 1
    out = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=need_cache,
                logits_to_keep=keep)
    logp1 = torch.log_softmax(out.logits.float(), dim=-1)  # [items, keep, vocab]
    prefix_score = []
    for i, (e, p) in enumerate(zip(batch, shared, strict=True)):
        targets = torch.tensor(e.continuations[0][:p], device=device)
        rows = logp1[i, keep - 1 - p : keep - 1]
        prefix_score.append(rows.gather(-1, targets[:, None]).sum() if p else logp1.new_zeros(()))

    # 2) one row per candidate: its first own token from pass 1, later tokens on a copy of the cache.
    owner = [i for i, ts in enumerate(tails) for _ in ts]
    flat = [t for ts in tails for t in ts]
    rows = torch.tensor(owner, device=device)
    first_ids = torch.tensor([t[0] for t in flat], device=device)
    scores = torch.stack(prefix_score)[rows] + logp1[rows, -1].gather(-1, first_ids[:, None]).squeeze(-1)
    if need_cache:
        cache = out.cache
        cache.batch_select_indices(rows)
        length = max(len(t) for t in flat)
        tail_ids = torch.full((len(flat), length), pad_id, dtype=torch.long)
        tail_mask = torch.zeros((len(flat), length), dtype=torch.long)
        for r, t in enumerate(flat):
            tail_ids[r, : len(t)] = torch.tensor(t)
            tail_mask[r, : len(t)] = 1
        tail_ids, tail_mask = tail_ids.to(device), tail_mask.to(device)
        positions = mask.sum(-1)[rows, None] + torch.arange(length, device=device)[None, :]
        full_mask = torch.cat([mask[rows], tail_mask], dim=-1)
        # the last tail token predicts nothing we score, so it is not fed
        out2 = model(input_ids=tail_ids[:, :-1], attention_mask=full_mask[:, :-1],
                     position_ids=positions[:, :-1], cache=cache, use_cache=True)
        logp2 = torch.log_softmax(out2.logits.float(), dim=-1)
        scores = scores + (logp2.gather(-1, tail_ids[:, 1:, None]).squeeze(-1) * tail_mask[:, 1:]).sum(-1)

    result: list[list[float]] = [[] for _ in batch]
    for r, i in enumerate(owner):
        result[i].append(scores[r].item())
    return result


def score_requests(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[Encoded],
    *,
    batch_size: int = EVAL_BATCH_SIZE,
    on_batch: Callable[[int], None] | None = None,
) -> list[list[float]]:
    """Scores for each request's continuations, batched `batch_size` items at a time (longest first)."""
    import torch

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i].context))
    results: list[list[float]] = [[] for _ in requests]
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            for i, s in zip(idx, _score_batch(model, [requests[i] for i in idx], pad_id), strict=True):
                results[i] = s
            if on_batch is not None:
                on_batch(len(idx))
    return results
