"""The training forward's CPU fast paths (nora_cli.tasks.causal_lm.fast): same loss and gradients as the plain forward,
the model left exactly as it was, and SparseDropout drawing the same Bernoulli masks as nn.Dropout."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn

from nora_cli.tasks.causal_lm.fast import (
    FAST_PATHS,
    SparseDropout,
    TrainForward,
    drop_positions,
    enabled_fast_paths,
    length_groups,
    onednn_available,
    use_sparse_dropout,
)


def _tiny_peft(tiny_llama_dir: Path, dropout: float) -> nn.Module:
    """The tiny Llama with LoRA on q/v/down and a non-zero B, so every gradient path is exercised."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    model.config.use_cache = False
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, task_type="CAUSAL_LM",
                                                  target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.05)
    return peft_model


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir: Path):
    return _tiny_peft(tiny_llama_dir, dropout=0.0)


def batch() -> dict[str, torch.Tensor]:
    """Right-padded, with a masked prompt in row 0 and a padded, shorter row 1."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 500, (2, 12), generator=gen)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0
    ids[1, 8:] = 2
    labels = ids.clone()
    labels[0, :4] = -100
    labels[1, 8:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def loss_and_grads(model: nn.Module, forward: TrainForward, bf16: bool) -> tuple[float, int, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = forward(model, batch())
    out.loss_sum.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
    return out.loss_sum.item(), int(out.count), grads


def reference(model: nn.Module, bf16: bool) -> float:
    """The textbook loss: full logits, shifted, summed over labels."""
    b = batch()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), b["labels"][:, 1:].reshape(-1),
                           reduction="sum").item()


@pytest.mark.parametrize("path", FAST_PATHS)
@pytest.mark.parametrize("bf16", [False, True])
def test_each_path_matches_the_plain_forward(tiny: nn.Module, path: str, bf16: bool,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("nora_cli.tasks.causal_lm.fast.SPLIT_CALL_TOKENS", 0)  # so the 12- and 8-token rows split
    plain_loss, plain_count, plain_grads = loss_and_grads(tiny, TrainForward(tiny, paths=frozenset()), bf16)
    assert plain_loss == pytest.approx(reference(tiny, bf16), rel=1e-6)
    assert plain_count == 8 + 7  # row 0: 11 shifted labels, 3 of them prompt; row 1: 7 real tokens
    loss, count, grads = loss_and_grads(tiny, TrainForward(tiny, paths=frozenset({path})), bf16)
    assert count == plain_count
    if path in ("low_precision", "dropout") or (path == "onednn" and bf16) or (path == "eager" and not bf16):
        # bitwise: the same bf16 casts autocast makes; the others do not apply here (dropout is p=0)
        assert loss == plain_loss and torch.equal(grads, plain_grads)
    elif path == "eager":  # bf16 scores before the softmax: within bf16 noise, not bitwise
        assert loss == pytest.approx(plain_loss, rel=2e-2)
        assert (grads - plain_grads).norm() / plain_grads.norm() < 5e-2
    elif path == "split" and bf16:  # the LoRA weight gradients sum rows in bf16, in other groups
        assert loss == pytest.approx(plain_loss, rel=1e-5)
        assert (grads - plain_grads).norm() / plain_grads.norm() < 1e-2
    else:  # gather, split: same terms summed in another order; onednn: same fp32 math, other summation order
        assert loss == pytest.approx(plain_loss, rel=1e-5)
        torch.testing.assert_close(grads, plain_grads, rtol=1e-4, atol=1e-6)


def test_model_is_left_as_it_was(tiny: nn.Module) -> None:
    params = {name: p for name, p in tiny.named_parameters()}
    attention = tiny.get_base_model().config._attn_implementation
    forward = TrainForward(tiny, paths=frozenset(FAST_PATHS))
    assert onednn_available() and len(forward.frozen) > 0
    for bf16 in (False, True):
        loss_and_grads(tiny, forward, bf16)
    assert {name: p for name, p in tiny.named_parameters()} == params  # same Parameter objects
    assert all(p.dtype == torch.float32 for p in params.values())
    assert not any("forward" in m.__dict__ for m in tiny.modules())
    assert tiny.get_base_model().config._attn_implementation == attention
    # a plain forward outside the training loss still returns full logits
    assert tiny(input_ids=batch()["input_ids"]).logits.shape == (2, 12, tiny.config.vocab_size)


def test_length_groups_cut_where_padding_outweighs_a_call() -> None:
    def groups(lengths: list[int], call: int) -> list[list[int]] | None:
        mask = (torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]).long()
        rows = length_groups({"attention_mask": mask}, call)
        return None if rows is None else [r.tolist() for r in rows]

    assert groups([200, 10, 190, 12, 11, 205], 64) == [[1, 4, 3], [2, 0, 5]]
    assert groups([200, 10, 190, 12, 11, 205], 10_000) is None  # a call costs more than the padding saved
    assert groups([50, 50, 50], 0) is None  # no padding to save: never split
    assert groups([1, 2, 3], 0) == [[0], [1], [2]]
    left_padded = torch.tensor([[0, 1, 1], [1, 1, 1]])
    assert length_groups({"attention_mask": left_padded}, 0) is None


def test_disable_fast_paths_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NORA_DISABLE_FAST_PATHS", "eager, onednn")
    assert enabled_fast_paths() == frozenset(FAST_PATHS) - {"eager", "onednn"}
    monkeypatch.setenv("NORA_DISABLE_FAST_PATHS", "all")
    assert enabled_fast_paths() == frozenset()


def test_drop_positions_are_bernoulli() -> None:
    torch.manual_seed(0)
    n, p = 200_000, 0.05
    counts = [len(drop_positions(n, p)) for _ in range(20)]
    sd = math.sqrt(n * p * (1 - p))
    assert all(abs(c - n * p) < 5 * sd for c in counts)  # Binomial(n, p) counts
    pos = drop_positions(n, p)
    assert torch.all(pos[1:] > pos[:-1]) and pos[0] >= 0 and pos[-1] < n  # sorted, distinct, in range
    gaps = torch.diff(pos).double()  # Geometric(p): mean 1/p, P(gap = 1) = p
    assert gaps.mean().item() == pytest.approx(1 / p, rel=0.05)
    assert (gaps == 1).double().mean().item() == pytest.approx(p, abs=0.01)
    assert len(drop_positions(10, 0.2)) <= 10 and len(drop_positions(1, 0.05)) <= 1


def test_sparse_dropout_forward_backward_and_eval() -> None:
    drop = SparseDropout(0.1)
    x = torch.randn(64, 300, requires_grad=True)
    torch.manual_seed(1)
    y = drop(x)
    dropped = y == 0
    assert 0.07 < dropped.double().mean().item() < 0.13
    torch.testing.assert_close(y[~dropped], x[~dropped].detach() / 0.9)
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad == 0, dropped)  # the backward uses the forward's mask
    torch.testing.assert_close(x.grad[~dropped], torch.full_like(x.grad[~dropped], 1 / 0.9))
    torch.manual_seed(1)
    assert torch.equal(drop(x), y)  # the global RNG drives it: seeds and checkpointed RNG state reproduce it
    drop.eval()
    assert drop(x) is x


def test_use_sparse_dropout_swaps_lora_dropout_only(tiny_llama_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj"]))
    assert use_sparse_dropout(peft_model) == 2  # two layers
    drops = [m for m in peft_model.modules() if isinstance(m, nn.Dropout)]
    assert {type(m) for m in drops if m.p == 0.1} == {SparseDropout}


def test_step_indices_group_each_step_by_length() -> None:
    from nora_cli.loop.loop import Schedule, step_indices

    lengths = [7, 3, 9, 1, 5, 8, 2, 6, 4, 10, 11, 12]
    accum = Schedule(total_steps=6, steps_per_epoch=3, accum=2, micro=2, batch=4)
    for step in range(6):
        plain = step_indices(step, accum, 12, seed=5, shuffle=True)
        grouped = step_indices(step, accum, 12, seed=5, shuffle=True, lengths=lengths)
        assert sorted(grouped) == sorted(plain)  # the same examples in every step
        assert [lengths[j] for j in grouped] == sorted(lengths[j] for j in plain)
    one = Schedule(total_steps=3, steps_per_epoch=3, accum=1, micro=4, batch=4)  # one micro-batch: order kept
    assert step_indices(1, one, 12, seed=5, shuffle=True, lengths=lengths) == step_indices(1, one, 12, 5, True)


def test_sparse_dropout_in_the_model_matches_peft_dropout_statistically(tiny_llama_dir: Path) -> None:
    """p = 0.1 through the real LoRA layers. SparseDropout draws its mask from ~n·p float64 uniforms
    (geometric gaps), nn.Dropout from n Bernoulli draws: the same seed gives other masks, so the two
    paths cannot be compared draw by draw. Over K draws, the LoRA gradients must have the same mean
    (ρ = ‖mean difference‖² over its expected value (tr Σ₁ + tr Σ₂)/K is ~1; measured 0.92-1.10) and the
    same total variance (measured ratios 0.94-1.08; a wrong p, 0.2 for 0.1, gives 2.2)."""
    def lora_model(swap: bool) -> nn.Module:
        torch.manual_seed(123)  # PEFT draws lora_A from the global RNG: both models get the same adapter
        model = _tiny_peft(tiny_llama_dir, dropout=0.1)
        if swap:
            assert use_sparse_dropout(model) == 6  # 3 targets × 2 layers
        return model

    def gradients(model: nn.Module, draws: int, seed: int) -> torch.Tensor:
        forward = TrainForward(model, paths=frozenset())
        torch.manual_seed(seed)
        rows = []
        for _ in range(draws):
            model.zero_grad(set_to_none=True)
            forward(model, batch()).loss_sum.backward()
            rows.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
        return torch.stack(rows).double()

    draws = 100
    sparse, plain = gradients(lora_model(True), draws, 0), gradients(lora_model(False), draws, 1)
    var_sparse, var_plain = sparse.var(0).sum(), plain.var(0).sum()
    rho = (sparse.mean(0) - plain.mean(0)).norm() ** 2 / ((var_sparse + var_plain) / draws)
    assert 0.3 < rho < 2.5
    assert 0.85 < var_sparse / var_plain < 1.18
