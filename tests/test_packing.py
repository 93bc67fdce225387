"""Packing (`data.packing: true`): the packed loss and LoRA gradients equal the unpacked ones over the very same
target tokens (tiny Llama with SDPA and eager attention, and the real SmolLM2), and packing works in
`nora train`, with kill/resume and with two processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_train import ENV, _final_adapter, _nora, _recipe

from nora_cli.data.batch import collate
from nora_cli.data.packing import PackedRows, collate_packed, flatten_rows, plan_rows
from nora_cli.data.tokenize import IGNORE_INDEX, build_datasets
from nora_cli.tasks.causal_lm.fast import TrainForward

CUTOFF = 64
WORDS = ["red", "blue", "green", "gold", "gray", "pink", "teal", "plum"]


def _records() -> list[dict]:
    """Alpaca records of mixed lengths (some longer than the cutoff, so truncation is in the mix)."""
    rows = []
    for i in range(9):
        words = " ".join(WORDS[(i + k) % 8] for k in range(1 + 8 * i))
        rows.append({"instruction": f"Repeat: {words}", "input": "", "output": words[: 6 + 5 * i]})
    return rows


# --- the row plan -----------------------------------------------------------------------------------


def test_plan_rows_uses_every_example_once_within_capacity() -> None:
    lengths = [5, 64, 33, 31, 7, 20, 44, 1, 64, 12, 50, 13]
    rows = plan_rows(lengths, 64)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
    assert len(rows) == -(-sum(lengths) // 64)  # best-fit decreasing finds the fewest rows here
    assert rows == plan_rows(lengths, 64)  # a function of the lengths alone: same rows on every rank


def test_packed_rows_restart_positions_and_unlabel_each_first_token() -> None:
    features = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}, {"input_ids": [4, 5], "labels": [-100, 5]},
                {"input_ids": [6, 7, 8, 9], "labels": [6, 7, 8, 9]}]
    packed = PackedRows(features, 5)
    assert packed.rows == [[2], [0, 1]]  # the longest first; 3 does not fit beside 4; 2 fills 3's row
    assert packed[1] == {"input_ids": [1, 2, 3, 4, 5], "labels": [IGNORE_INDEX, 2, 3, IGNORE_INDEX, 5],
                         "position_ids": [0, 1, 2, 0, 1]}
    assert packed.efficiency == pytest.approx(9 / 10)
    batch = collate_packed([packed[0], packed[1]], pad_token_id=0)
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 0]  # padding: a segment of its own
    assert batch["attention_mask"].sum() == 9 and batch["labels"][0, 4] == IGNORE_INDEX


# --- packed == unpacked ---------------------------------------------------------------------------------


def _peft_model(model_dir: Path, attn: str) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attn)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B = 0 would leave A without gradient
            torch.nn.init.normal_(param, std=0.05)
    return model


def _loss_and_grads(model: torch.nn.Module, forward: TrainForward,
                    batches: list[dict]) -> tuple[float, int, list[torch.Tensor], list[int]]:
    """Mean loss over the batches' targets, its LoRA gradients, the target count and the target token ids."""
    model.zero_grad()
    outs = [forward(model, batch) for batch in batches]
    total = torch.stack([o.loss_sum for o in outs]).sum()
    count = int(sum(o.count for o in outs))
    (total / count).backward()
    grads = [p.grad.detach().clone() for p in model.parameters() if p.requires_grad]
    targets = sorted(t for b in batches for t in b["labels"][:, 1:][b["labels"][:, 1:] != IGNORE_INDEX].tolist())
    return (total / count).item(), count, grads, targets


def _assert_packed_equals_unpacked(model_dir: Path, attn: str) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    features, _ = build_datasets(_records(), tokenizer, fmt="alpaca", template="none", cutoff_len=CUTOFF,
                                 train_on_inputs=False, add_eos=True, val_set_size=0, seed=0)
    packed = PackedRows(features, CUTOFF)
    assert len(packed) < len(features) and any(len(row) > 1 for row in packed.rows)
    assert any(len(f["input_ids"]) == CUTOFF for f in features)  # truncated examples are in the mix
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    unpacked_batches = [collate(features[i:i + 3], pad) for i in range(0, len(features), 3)]
    rows = [packed[i] for i in range(len(packed))]
    packed_batches = [collate_packed(rows[i:i + 2], pad) for i in range(0, len(rows), 2)]
    assert any(bool((b["attention_mask"] == 0).any()) for b in packed_batches)  # row padding is in the mix

    model = _peft_model(model_dir, attn)
    forward = TrainForward(model)  # the training forward, fast paths included
    loss, count, grads, targets = _loss_and_grads(model, forward, unpacked_batches)
    for batches in (packed_batches, [flatten_rows(b) for b in packed_batches]):  # flatten: flash's layout
        p_loss, p_count, p_grads, p_targets = _loss_and_grads(model, forward, batches)
        assert p_count == count and p_targets == targets  # the same tokens are scored
        assert p_loss == pytest.approx(loss, rel=1e-5, abs=0)
        for g, pg in zip(grads, p_grads, strict=True):
            torch.testing.assert_close(pg, g, rtol=1e-5, atol=1e-5 * float(g.abs().max()))
        assert any(float(g.abs().max()) > 0 for g in grads)
    # control: the same rows with a plain 2-D mask (attention across examples) give another loss
    crossing = [{k: v for k, v in b.items() if k != "position_ids"} for b in packed_batches]
    c_loss, *_ = _loss_and_grads(model, forward, crossing)
    assert abs(c_loss - loss) > 1e-3


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_and_grads_equal_unpacked_tiny_llama(tiny_llama_dir: Path, attn: str, one_thread: None) -> None:
    _assert_packed_equals_unpacked(tiny_llama_dir, attn)


@pytest.mark.slow
def test_packed_loss_and_grads_equal_unpacked_smollm2(smollm2_dir: Path, one_thread: None) -> None:
    _assert_packed_equals_unpacked(smollm2_dir, "sdpa")


# --- nora train -------------------------------------------------------------------------------------------

PACKED = {"data.packing": True, "data.cutoff_len": 256}


def test_packed_training_runs_and_records_it(tmp_path: Path, tiny_llama_dir: Path) -> None:
    proc = _nora("train", str(_recipe(tmp_path, tiny_llama_dir, **PACKED)))
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((tmp_path / "out" / "nora.json").read_text())
    assert meta["fast_paths"] == ["gather", "onednn"]  # no `split`: packed rows have nothing to split
    packing = meta["packing"]
    assert packing["examples"] == 40 and packing["rows"] < 40 and 0.5 < packing["efficiency"] <= 1
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 6 and all(0 < x < 20 for x in losses)
    assert [r["step"] for r in rows if "val_loss" in r] == [3, 6]


def test_packed_kill_and_resume_is_bitwise_identical(tmp_path: Path, tiny_llama_dir: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    ref = _recipe(tmp_path / "a", tiny_llama_dir, **PACKED, **{"adapter.dropout": 0.1})
    assert _nora("train", str(ref)).returncode == 0
    crashed = _recipe(tmp_path / "b", tiny_llama_dir, **PACKED, **{"adapter.dropout": 0.1})
    proc = _nora("train", str(crashed), env={**ENV, "NORA_FAULT_KILL_AT_STEP": "4"})
    assert proc.returncode == -9
    proc = _nora("train", str(crashed), "--resume")
    assert proc.returncode == 0, proc.stderr
    assert "(step 4/6)" in proc.stderr
    a, b = _final_adapter(tmp_path / "a" / "out"), _final_adapter(tmp_path / "b" / "out")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_packed_two_processes_match_one_process(tmp_path: Path, tiny_llama_dir: Path) -> None:
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    common = {**PACKED, "train.max_steps": 3, "train.save_steps": None, "train.eval_steps": None}
    one = _recipe(tmp_path / "one", tiny_llama_dir, **common)
    two = _recipe(tmp_path / "two", tiny_llama_dir, **common, **{"train.micro_batch_size": 1})
    assert _nora("train", str(one)).returncode == 0
    proc = _nora("train", str(two), "--num-processes", "2", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _final_adapter(tmp_path / "one" / "out"), _final_adapter(tmp_path / "two" / "out")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0)
