"""`nora evaluate`: answer extraction, the lm-eval token split, shared-prompt loglikelihood against a
one-forward-per-candidate reference, base+adapter vs merged, sst2 few-shot via a recipe, and CLI errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from nora_cli.cli import app
from nora_cli.data.templates import alpaca_eval_prompt
from nora_cli.errors import NoraError
from nora_cli.evaluate import evaluate_model, get_task, prepare_task
from nora_cli.evaluate.loglik import encode_request, split_whitespace
from nora_cli.evaluate.report import summarize
from nora_cli.evaluate.tasks import default_data_path, first_letter, item_labels, last_number

runner = CliRunner()


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """One intra-op thread: on a small shared CPU, 2 threads spin-wait and ran these tests ~3x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _commonsense(shared: Path, folder: str) -> Path:
    return shared / "data" / "commonsense" / folder / "test.json"


def _read(output: Path) -> tuple[dict, list[dict]]:
    results = json.loads(output.read_text())
    lines = [json.loads(x) for x in output.with_name("predictions.jsonl").read_text().splitlines()]
    return results, lines


def _reference_scores(model, tokenizer, prompt: str, candidates: list[str]) -> list[float]:
    """Straightforward lm-eval loglikelihood: one unpadded full forward per candidate, no cache."""
    ctx = tokenizer(prompt).input_ids
    scores = []
    for cand in candidates:
        cont = tokenizer(prompt + cand).input_ids[len(ctx):]
        with torch.no_grad():  # logits of the last len(cont)+1 positions: those predicting cont
            logits = model(input_ids=torch.tensor([ctx + cont]), logits_to_keep=len(cont) + 1).logits[0]
        logp = torch.log_softmax(logits.double(), dim=-1)
        scores.append(sum(logp[j, t].item() for j, t in enumerate(cont)))
    return scores


def _check_consistent(results: dict, lines: list[dict]) -> None:
    """results.json agrees with predictions.jsonl: accuracy = mean correctness, n = lines, invalid = no pred."""
    for task, metrics in results["tasks"].items():
        rows = [r for r in lines if r["task"] == task]
        assert metrics["n"] == len(rows) > 0
        assert metrics["accuracy"] == pytest.approx(sum(r["correct"] for r in rows) / len(rows))
        assert metrics["invalid"] == sum(r["pred"] is None for r in rows)
        assert [r["index"] for r in rows] == list(range(len(rows)))
    accs = [m["accuracy"] for m in results["tasks"].values()]
    assert results["average"] == pytest.approx(sum(accs) / len(accs))


# --- extractors: hand-checked responses --------------------------------------------------------

CHOICE_CASES = [
    # task, response, expected pred, gold, correct
    ("boolq", "the correct answer is true", "true", "true", True),
    ("boolq", "false, definitely not true", "false", "true", False),  # first match wins
    ("boolq", "True", None, "true", False),  # case-sensitive like LLM-Adapters: no match
    ("piqa", "solution2 is better than solution1", "solution2", "solution2", True),
    ("arc-easy", "  the correct answer is answer3 (or answer1)", "answer3", "answer3", True),
    ("arc-easy", "Answer1: photosynthesis", None, "answer1", False),  # capitalised label is no match
    ("openbookqa", "answer5", "answer5", "answer2", False),
    ("social_i_qa", "I think answer2", "answer2", "answer2", True),
    ("hellaswag", "ending4 then ending1", "ending4", "ending4", True),
    ("winogrande", "option2", "option2", "option1", False),
    ("ARC-Challenge", "no idea", None, "answer1", False),
    ("demo", "the correct answer is green", "green", "green", True),
    ("demo", "blue, not red", "blue", "red", False),
]


@pytest.mark.parametrize(("task", "response", "pred", "gold", "correct"), CHOICE_CASES)
def test_choice_extractors(task: str, response: str, pred: str | None, gold: str, correct: bool) -> None:
    t = get_task(task)
    assert t.extract(response) == pred
    assert t.is_correct(t.extract(response), gold) is correct


MATH_CASES = [
    ("The total is 1,234.5 dollars.", 1234.5, "1234.5", True),
    ("3 apples minus 7 leaves -4", -4.0, "-4", True),
    ("First 12, then 15.0", 15.0, "15.0", True),  # last number wins
    ("so the answer is 4.", 4.0, "4", True),
    ("pi is about 3.14159", 3.14159, "3.1416", True),  # within 1e-3
    ("pi is about 3.15", 3.15, "3.14", False),
    ("The answer is 2,000,000", 2_000_000.0, "2,000,000", True),  # commas in the label too
    ("I cannot solve this", None, "7", False),
]


@pytest.mark.parametrize(("response", "pred", "gold", "correct"), MATH_CASES)
def test_math_last_number(response: str, pred: float | None, gold: str, correct: bool) -> None:
    assert last_number(response) == pred
    for name in ("gsm8k", "SVAMP", "MultiArith", "AddSub", "SingleEq", "mawps"):
        task = get_task(name)
        assert task.is_correct(task.extract(response), task.gold({"answer": gold})) is correct


def test_aqua_first_letter() -> None:
    aqua = get_task("AQuA")
    assert first_letter("the right option is (C), not D") == "C"
    assert first_letter("Answer: B") == "A"  # LLM-Adapters' regex has no word boundary: "Answer" hits first
    assert first_letter("none of them") is None
    assert aqua.is_correct(aqua.extract("so (E)"), aqua.gold({"answer": "E"}))
    assert not aqua.is_correct(aqua.extract("so (E)"), aqua.gold({"answer": "B"}))


def test_summary_counts_invalid_as_wrong() -> None:
    preds = [{"pred": "true", "correct": True}, {"pred": None, "correct": False}, {"pred": "false", "correct": False}]
    assert summarize(preds, loglikelihood=False) == {"accuracy": pytest.approx(1 / 3), "n": 3, "invalid": 1}


def test_task_names_and_default_data(shared: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert get_task("ARC-Easy") is get_task("arc-easy") is get_task("Arc_Easy")
    assert get_task("SVAMP").name == "svamp" and get_task("social_i_qa").folder == "social_i_qa"
    with pytest.raises(NoraError, match="valid tasks: boolq, piqa, social_i_qa"):
        get_task("arc")
    monkeypatch.setenv("NORA_SHARED", str(shared))
    assert default_data_path(get_task("ARC-Challenge")) == str(_commonsense(shared, "ARC-Challenge"))
    assert default_data_path(get_task("addsub")) == str(shared / "data" / "math" / "AddSub" / "test.json")
    assert default_data_path(get_task("demo")) == "builtin:demo-test"
    with pytest.raises(NoraError, match="pass --data"):
        default_data_path(get_task("hellaswag"))  # not shipped in shared/
    monkeypatch.delenv("NORA_SHARED")
    with pytest.raises(NoraError, match="pass --data"):
        default_data_path(get_task("boolq"))


def test_item_labels_follow_answer_format_line(shared: Path) -> None:
    records = json.loads(_commonsense(shared, "ARC-Easy").read_text())
    five = next(r for r in records if r["answer"] == "answer5")
    assert item_labels(get_task("arc-easy"), five)[-1] == "answer5"
    assert item_labels(get_task("boolq"), {"instruction": "no format line"}) == ("true", "false")
    demo = prepare_task("demo", "loglikelihood", limit=3)
    assert len(demo.prompts) == 3 and all(lab == ("red", "blue", "green", "yellow") for lab in demo.labels)


# --- token split (lm-eval _encode_pair) --------------------------------------------------------


def test_token_split_mirrors_lm_eval(smollm2_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    prompt = alpaca_eval_prompt("Is the sky blue?\n\nAnswer format: true/false")
    ctx, conts = split_whitespace(prompt, ["the correct answer is true", "the correct answer is false"])
    assert prompt.endswith("### Response:\n" + " " * 16) and ctx == prompt.rstrip()
    assert [ctx + c for c in conts] == [prompt + "the correct answer is true", prompt + "the correct answer is false"]
    enc = encode_request(tok, ctx, conts)
    for c, ids in zip(conts, enc.continuations, strict=True):
        assert tok.decode(enc.context + ids) == ctx + c
    # A merge across the boundary: lm-eval keeps encode(context) and takes whole[len(context):].
    enc = encode_request(tok, "The quick brown fo", ["x jumps"])
    whole = tok("The quick brown fox jumps").input_ids
    assert enc.context == tok("The quick brown fo").input_ids
    assert enc.continuations == [whole[len(enc.context):]]


# --- loglikelihood == straightforward reference (tiny model, real tokenizer, 50 ARC-Easy items) -----


@pytest.fixture(scope="module")
def peaky_tiny(smollm2_dir: Path):
    """2-layer Llama with SmolLM2's tokenizer; a large init makes the candidates' scores differ clearly."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3,
                         max_position_embeddings=1024, tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval(), tok


def test_loglikelihood_matches_reference(peaky_tiny, shared: Path, tmp_path: Path) -> None:
    model, tok = peaky_tiny
    tok.pad_token = tok.eos_token
    data = {"arc-easy": str(_commonsense(shared, "ARC-Easy"))}
    out = tmp_path / "results.json"
    results = evaluate_model(model, tok, ["arc-easy"], protocol="loglikelihood", limit=50, batch_size=7,
                             data=data, output=out, progress=False)
    _, lines = _read(out)
    records = json.loads(_commonsense(shared, "ARC-Easy").read_text())[:50]
    assert len(lines) == results["tasks"]["arc-easy"]["n"] == 50
    worst, ref_correct = 0.0, 0
    for line, rec in zip(lines, records, strict=True):
        full = alpaca_eval_prompt(rec["instruction"])
        labels = item_labels(get_task("arc-easy"), rec)
        assert [line["prompt"] + c for c in line["candidates"]] == [f"{full}the correct answer is {lab}"
                                                                    for lab in labels]
        ref = _reference_scores(model, tok, line["prompt"], line["candidates"])
        worst = max(worst, max(abs(a - b) for a, b in zip(ref, line["scores"], strict=True)))
        ref_correct += labels[max(range(len(ref)), key=ref.__getitem__)] == rec["answer"]
    assert worst < 1e-4
    assert results["tasks"]["arc-easy"]["accuracy"] == ref_correct / 50
    assert model.training is False


def test_loglikelihood_multi_token_tails(peaky_tiny) -> None:
    """Candidates that differ over several tokens take the KV-cache path (pass 2); still equal the reference."""
    from nora_cli.evaluate.loglik import score_requests

    model, tok = peaky_tiny
    tok.pad_token = tok.eos_token
    items = [
        ("Where do ducks live?\n\nAnswer: ", [" on a pond", " in the river bank near the old mill", " x"]),
        ("Pick one.", [" red", " red wine", " blue sky at night"]),
        ("A much longer context that goes on for quite a few more tokens than the others do, " * 3,
         [" yes", " no"]),
        ("Short", [" a", " b c d e f"]),
    ]
    requests = [encode_request(tok, *split_whitespace(ctx, conts)) for ctx, conts in items]
    got = score_requests(model, tok, requests, batch_size=3)
    for (ctx, conts), scores in zip(items, got, strict=True):
        stripped, moved = split_whitespace(ctx, conts)
        assert _reference_scores(model, tok, stripped, moved) == pytest.approx(scores, abs=1e-4)


# --- the real SmolLM2 through the CLI -----------------------------------------------------------


def test_cli_both_protocols_on_smollm2(shared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NORA_SHARED", str(shared))
    outs = {}
    for protocol, extra in (("llm-adapters", ["--max-new-tokens", "12"]), ("loglikelihood", [])):
        out = tmp_path / protocol / "results.json"
        res = runner.invoke(app, ["evaluate", "--model", "smollm2-135m", "--task", "boolq,ARC-Easy", "--limit", "3",
                                  "--batch-size", "2", "--protocol", protocol, "--output", str(out), *extra])
        assert res.exit_code == 0, res.output
        assert "Avg" in res.stdout and "arc-easy" in res.stdout
        outs[protocol] = _read(out)
    results, lines = outs["llm-adapters"]
    _check_consistent(results, lines)
    assert results["protocol"] == "llm-adapters" and results["model"] == "smollm2-135m"
    records = {t: json.loads(_commonsense(shared, f).read_text()) for t, f in (("boolq", "boolq"),
                                                                                ("arc-easy", "ARC-Easy"))}
    for line in lines:
        rec = records[line["task"]][line["index"]]
        assert line["prompt"] == alpaca_eval_prompt(rec["instruction"]) and line["gold"] == rec["answer"]
        assert line["pred"] == get_task(line["task"]).extract(line["response"])
        assert line["correct"] == (line["pred"] == rec["answer"])

    results, lines = outs["loglikelihood"]
    _check_consistent(results, lines)
    assert set(results["tasks"]["boolq"]) == {"accuracy", "n", "invalid", "acc_norm"}
    from nora_cli.models import load_causal_lm

    model, tok = load_causal_lm("smollm2-135m")
    for line in lines:
        assert line["pred"] == line["labels"][max(range(len(line["scores"])), key=line["scores"].__getitem__)]
        if line["task"] == "boolq":  # real-model scores equal the one-forward-per-candidate reference
            ref = _reference_scores(model, tok, line["prompt"], line["candidates"])
            assert ref == pytest.approx(line["scores"], rel=2e-5, abs=1e-4)  # fp32 sums: order varies with threads


def test_adapter_equals_merged(smollm2_dir: Path, shared: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    from nora_cli.models import load_causal_lm

    base, tok = load_causal_lm("smollm2-135m")
    probe = tok("The sky is", return_tensors="pt").input_ids
    with torch.no_grad():
        before = base(probe).logits
    peft_model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(0)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)  # non-zero B: the adapter really changes the model
    with torch.no_grad():
        assert (peft_model(probe).logits - before).abs().max() > 1e-2
    adapter_dir, merged_dir = tmp_path / "adapter", tmp_path / "merged"
    peft_model.save_pretrained(adapter_dir)
    (adapter_dir / "nora.json").write_text(json.dumps({"base_model": "smollm2-135m"}))  # nora output layout
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(merged_dir)  # no tokenizer saved: --model supplies the base model's
    del base, peft_model, merged

    data = f"boolq={_commonsense(shared, 'boolq')},arc-easy={_commonsense(shared, 'ARC-Easy')}"
    runs = {}
    for kind, flags in (("adapter", ["--adapter", str(adapter_dir)]),  # base model from nora.json
                        ("merged", ["--merged", str(merged_dir), "--model", "smollm2-135m"])):
        out = tmp_path / kind / "results.json"
        res = runner.invoke(app, ["evaluate", *flags, "--task", "boolq,arc-easy", "--data", data,
                                  "--limit", "3", "--protocol", "loglikelihood", "--output", str(out)])
        assert res.exit_code == 0, res.output
        runs[kind] = _read(out)
    (ra, la), (rm, lm) = runs["adapter"], runs["merged"]
    assert ra["adapter"] == str(adapter_dir) and ra["model"] == "smollm2-135m"
    assert rm["adapter"] is None and rm["model"] == str(merged_dir)
    assert {t: m["accuracy"] for t, m in ra["tasks"].items()} == {t: m["accuracy"] for t, m in rm["tasks"].items()}
    for a, m in zip(la, lm, strict=True):
        assert a["candidates"] == m["candidates"] and a["pred"] == m["pred"]
        assert a["scores"] == pytest.approx(m["scores"], abs=2e-3)


# --- sst2 few-shot through a recipe (tiny model + tiny adapter) -----------------------------------

SST2 = [("a gorgeous, witty film", 1), ("dull and lifeless", 0), ("an utter waste of time", 0),
        ("warm, funny and wise", 1), ("the plot makes no sense", 0), ("one of the year's best", 1)]


def test_sst2_fewshot_via_recipe(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    data_dir = tmp_path / "sst2"
    data_dir.mkdir()
    (data_dir / "test.jsonl").write_text("".join(json.dumps({"sentence": s, "label": y}) + "\n" for s, y in SST2))
    train = [{"sentence": f"train sentence {i}", "label": ["terrible", "great"][i % 2]} for i in range(6)]
    (data_dir / "train.json").write_text(json.dumps(train))
    adapter_dir = tmp_path / "out"
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                                LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(adapter_dir)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model:\n  source: {tiny_llama_dir}\neval:\n  tasks: [sst2]\n  protocol: loglikelihood\n"
                      f"  data: {{sst2: {data_dir / 'test.jsonl'}}}\noutput:\n  dir: {adapter_dir}\n")
    out = tmp_path / "res" / "results.json"
    res = runner.invoke(app, ["evaluate", "--recipe", str(recipe), "--shots", "3", "--output", str(out)])
    assert res.exit_code == 0, res.output
    results, lines = _read(out)
    _check_consistent(results, lines)
    assert results["adapter"] == str(adapter_dir) and results["protocol"] == "loglikelihood"
    words = {t["sentence"]: t["label"] for t in train}
    for line, (sentence, label) in zip(lines, SST2, strict=True):
        assert line["gold"] == ["terrible", "great"][label]
        assert line["candidates"] == [" terrible", " great"]
        *demos, query = line["prompt"].split("\n\n")
        assert query == f"{sentence} It was" and len(demos) == 3
        for demo in demos:  # demonstrations come from train.json with their label words
            text, word = demo.rsplit(" It was ", 1)
            assert words[text] == word


# --- user errors: exit 2, one line ---------------------------------------------------------------


def _nora(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nora_cli", "evaluate", *args], capture_output=True, text=True,
                          timeout=120, env=env)


def test_user_errors_exit_2(tmp_path: Path, shared: Path) -> None:
    import os

    env = {k: v for k, v in os.environ.items() if k != "NORA_SHARED"}
    cases = [
        (["--model", "smollm2-135m", "--task", "arc-easy,nosuch"], "unknown task 'nosuch'; valid tasks: boolq"),
        (["--model", "smollm2-135m", "--task", "piqa"], "pass --data"),
        (["--model", "smollm2-135m", "--task", "boolq", "--data", str(tmp_path / "missing.json")], "not found"),
        (["--adapter", str(tmp_path), "--task", "boolq", "--data", str(_commonsense(shared, "boolq"))],
         "has no adapter_config.json"),
    ]
    for args, message in cases:
        proc = _nora(*args, env=env)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error:") and message in proc.stderr
