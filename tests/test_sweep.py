"""`nora sweep`: method/knob parsing, a tiny 2 methods × 2 seeds sweep whose table equals the runs' own
files, and resuming an interrupted sweep (missing seed, missing results, half-trained run) without redoing
finished work."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from nora_cli import sweep as lib
from nora_cli import sweep_report
from nora_cli.commands.sweep import sweep as sweep_command
from nora_cli.errors import NoraError

WORDS = ["red", "blue", "green", "gold", "gray", "pink", "teal", "plum"]


def _write_inputs(tmp: Path, model_dir: Path) -> tuple[Path, Path]:
    """Alpaca train data, an LLM-Adapters-format 2-choice test file, and a tiny recipe."""
    rows = [{"instruction": f"Join the colors {WORDS[i % 8]} and {WORDS[(i * 3 + 1) % 8]}.", "input": "",
             "output": f"{WORDS[i % 8]}-{WORDS[(i * 3 + 1) % 8]}"} for i in range(40)]
    (tmp / "data.json").write_text(json.dumps(rows))
    test = [{"instruction": f"Please choose the correct answer to the question: which color is {w}?\n\n"
             f"Answer1: {w} Answer2: {WORDS[(j + 3) % 8]}\n\nAnswer format: answer1/answer2",
             "input": "", "output": f"the correct answer is answer{1 + j % 2}", "answer": f"answer{1 + j % 2}"}
            for j, w in enumerate(WORDS)]
    (tmp / "test.json").write_text(json.dumps(test))
    recipe = {
        "method": "lora",
        "model": {"source": str(model_dir)},
        "adapter": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "up_proj"]},
        "optimizer": {"lr": 1e-2},
        "data": {"path": "data.json", "cutoff_len": 48, "val_set_size": 8},
        "train": {"max_steps": 6, "batch_size": 4, "micro_batch_size": 4, "eval_steps": 3, "save_steps": 2,
                  "keep_last": 2},
        "eval": {"tasks": ["demo"], "batch_size": 8},
        "output": {"dir": str(tmp / "unused")},
    }
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path, tmp / "test.json"


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("sweep")(sweep_command)
    app.command("noop")(lambda: None)  # two commands: Typer keeps "sweep" as a subcommand name
    return app


def _invoke(recipe: Path, test: Path, out: Path, seeds: str) -> tuple[dict, str]:
    """Run the command; returns table.json and stderr (training's own messages go there)."""
    result = CliRunner().invoke(_app(), [
        "sweep", str(recipe), "--methods", "lora,nora", "--seeds", seeds, "--eval", f"arc-easy={test}",
        "--protocol", "loglikelihood", "--limit", "6", "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("Mean ± std over seeds") and "| `nora` |" in result.stdout
    return json.loads((out / "table.json").read_text()), result.stderr


def _expected(run_dir: Path) -> dict:
    """Recompute one run's table entries from its own files, independently of the library."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = {r["step"]: r["loss"] for r in rows if "loss" in r}  # a resumed step's later row wins
    losses = [train[s] for s in sorted(train)]
    val = {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}
    k = math.ceil(0.1 * len(losses))
    results = json.loads((run_dir / "results.json").read_text())
    return {"final_train_loss": sum(losses[-k:]) / k, "mean_train_loss": statistics.fmean(losses),
            "val_loss": val[max(val)], "acc": results["tasks"]["arc-easy"]["accuracy"],
            "average": results["average"], "steps": max(train), "n": results["tasks"]["arc-easy"]["n"]}


def _mtimes(out: Path) -> dict[str, float]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns
            for p in out.glob("*/seed*/*") if p.name in ("adapter_model.safetensors", "results.json")}


def test_parse_variants_and_knobs() -> None:
    pissa = lib.parse_variant("pissa")
    assert pissa.method == "lora" and "adapter.init=pissa" in pissa.overrides
    assert "optimizer.precondition=none" in pissa.overrides
    plus = lib.parse_variant("nora+@sigma=0.02@optimizer.lr=1e-3")
    assert plus.method == "nora+" and plus.overrides[-2:] == ("adapter.sigma=0.02", "optimizer.lr=1e-3")
    assert "optimizer.normalize=true" in plus.overrides and plus.dirname == "nora+@sigma=0.02@optimizer.lr=1e-3"
    assert lib.parse_variant("pissa_niter_4").overrides[1] == "adapter.init=pissa_niter_4"
    assert lib.parse_seeds("0, 2,5") == [0, 2, 5]
    assert lib.parse_eval("boolq,arc-easy=x.json")["boolq"] is None
    for bad in ("lora,adam", "nora@foo=1", "nora@sigma", "lora,lora"):
        with pytest.raises(NoraError):
            lib.parse_methods(bad)
    for bad in ("0,0", "-1", "a"):
        with pytest.raises(NoraError):
            lib.parse_seeds(bad)
    assert sweep_report.final_train_loss([5.0] * 10 + [1.0, 3.0]) == pytest.approx(2.0)  # ceil(1.2) = 2 last steps


def test_variant_recipes_apply_method_then_set_then_knobs(tmp_path: Path, tiny_llama_dir: Path) -> None:
    recipe, _ = _write_inputs(tmp_path, tiny_llama_dir)
    spec = lib.plan_sweep(str(recipe), "pissa,nora+@sigma=0.3", "4", overrides=["adapter.sigma=0.05"],
                          output_dir=tmp_path / "sw", eval_tasks={})
    pissa, plus = (spec.run_recipe(v, 4) for v in spec.variants)
    assert (pissa.method, pissa.adapter.init, pissa.optimizer.precondition, pissa.seed) == ("lora", "pissa", "none", 4)
    assert pissa.adapter.sigma == 0.05 and plus.adapter.sigma == 0.3  # --set for all, @knob wins for its method
    assert (plus.adapter.init, plus.optimizer.precondition, plus.optimizer.normalize) == ("nystrom", "scaled-gd", True)
    assert plus.output.dir == str(tmp_path / "sw" / "nora+@sigma=0.3" / "seed4")
    assert spec.eval.tasks == ["demo"]  # the recipe's eval.tasks when --eval is absent
    with pytest.raises(NoraError, match="sigma"):
        lib.plan_sweep(str(recipe), "nora@sigma=-1", "0", output_dir=tmp_path / "x")
    with pytest.raises(NoraError, match="data file not found"):
        lib.plan_sweep(str(recipe), "nora", "0", eval_tasks={"arc-easy": str(tmp_path / "none.json")})


def test_sweep_table_equals_runs_and_resumes(tmp_path: Path, tiny_llama_dir: Path) -> None:
    recipe, test = _write_inputs(tmp_path, tiny_llama_dir)
    out = tmp_path / "sweep"

    # 1) an "interrupted" sweep: only seed 0 ran
    first, _ = _invoke(recipe, test, out, "0")
    assert first["actions"] == {"lora": {"0": "trained"}, "nora": {"0": "trained"}}
    before = _mtimes(out)
    assert len(before) == 4

    # 2) the full sweep: seed 0 is skipped untouched, seed 1 trains
    table, _ = _invoke(recipe, test, out, "0,1")
    assert table["actions"] == {m: {"0": "skipped", "1": "trained"} for m in ("lora", "nora")}
    after = _mtimes(out)
    assert {k: after[k] for k in before} == before
    nora_meta = json.loads((out / "nora" / "seed1" / "nora.json").read_text())
    assert nora_meta["method"] == "nora" and nora_meta["init"]["name"] == "nystrom" and nora_meta["init"]["seed"] == 1

    # the table is exactly the runs' own numbers, and mean ± std over the two seeds
    for method in ("lora", "nora"):
        runs = [_expected(out / method / f"seed{s}") for s in (0, 1)]
        for seed, exp in zip("01", runs, strict=True):
            got = table["runs"][method][seed]
            assert got["steps"] == exp["steps"] == 6 and exp["n"] == 6
            for key in ("final_train_loss", "mean_train_loss", "val_loss", "average"):
                assert got[key] == pytest.approx(exp[key], rel=1e-12), (method, seed, key)
            assert got["accuracy"]["arc-easy"] == exp["acc"]
        s = table["summary"][method]
        for key, vals in (("final_train_loss", [r["final_train_loss"] for r in runs]),
                          ("val_loss", [r["val_loss"] for r in runs]), ("average", [r["average"] for r in runs])):
            assert s[key]["mean"] == pytest.approx(statistics.fmean(vals), rel=1e-12)
            assert s[key]["std"] == pytest.approx(statistics.stdev(vals), rel=1e-9, abs=1e-15)
        acc = [r["acc"] for r in runs]
        assert s["accuracy"]["arc-easy"]["mean"] == pytest.approx(statistics.fmean(acc))
        row = next(line for line in (out / "table.md").read_text().splitlines() if line.startswith(f"| `{method}` |"))
        expected_cell = f"{s['final_train_loss']['mean']:.4f} ± {s['final_train_loss']['std']:.4f}"
        assert expected_cell in row and f"{100 * s['average']['mean']:.1f} ±" in row
    assert (out / "loss_curves.png").stat().st_size > 5000
    assert {p.name for p in (out / "loss_curves").iterdir()} == {"lora.png", "nora.png"}
    # the two methods really differ (NoRA's init is not LoRA's zero-B init)
    assert table["runs"]["lora"]["0"]["mean_train_loss"] != table["runs"]["nora"]["0"]["mean_train_loss"]

    # 3) interrupted later: lora/seed1 lost its results, nora/seed1 died after its step-4 checkpoint
    (out / "lora" / "seed1" / "results.json").unlink()
    half = out / "nora" / "seed1"
    for name in ("adapter_model.safetensors", "adapter_config.json", "results.json"):
        (half / name).unlink()
    before = _mtimes(out)
    again, log = _invoke(recipe, test, out, "0,1")
    assert again["actions"] == {"lora": {"0": "skipped", "1": "evaluated"}, "nora": {"0": "skipped", "1": "resumed"}}
    after = _mtimes(out)
    for key in ("lora/seed0/results.json", "lora/seed1/adapter_model.safetensors", "nora/seed0/results.json"):
        assert after[key] == before[key], key  # untouched
    assert (half / "adapter_model.safetensors").is_file() and (out / "lora" / "seed1" / "results.json").is_file()
    assert "resuming from" in log and "step 4/6" in log  # continued from its checkpoint, not from scratch
    assert log.count("resuming from") == 1 and "[4/4] nora seed 1: resumed" in log
    steps = [json.loads(line)["step"] for line in (half / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert sorted(set(steps)) == [1, 2, 3, 4, 5, 6]
    # reloaded-from-disk evaluation scores the same adapter as the in-memory one did
    assert again["runs"]["lora"]["1"]["accuracy"] == table["runs"]["lora"]["1"]["accuracy"]
    for method in ("lora", "nora"):
        for seed in "01":
            exp = _expected(out / method / f"seed{seed}")
            assert again["runs"][method][seed]["final_train_loss"] == pytest.approx(exp["final_train_loss"], rel=1e-12)

    # 4) a saved recipe lacking a key that has its default (an older nora wrote it) is the same recipe ...
    saved = out / "lora" / "seed0" / "recipe.yaml"
    text = saved.read_text()
    assert "  trust_remote_code: false\n" in text
    saved.write_text(text.replace("  trust_remote_code: false\n", ""))
    spec = lib.plan_sweep(str(recipe), "lora", "0", output_dir=out, eval_tasks={"arc-easy": str(test)},
                          protocol="loglikelihood", limit=6)
    assert lib.run_one(spec, spec.variants[0], 0) == "skipped"
    # ... but changing the recipe under an existing tree is refused, not mixed in
    with pytest.raises(NoraError, match="different recipe"):
        spec = lib.plan_sweep(str(recipe), "lora", "0", overrides=["optimizer.lr=0.5"], output_dir=out,
                              eval_tasks={"arc-easy": str(test)}, protocol="loglikelihood", limit=6)
        lib.run_sweep(spec, log=lambda _: None)


def test_base_row_is_the_untrained_model(tmp_path: Path, tiny_llama_dir: Path) -> None:
    """`base` is scored once (one dir for all seeds), like a plain `evaluate_model` of the base, and never trains."""
    from nora_cli.evaluate import evaluate_model, load_for_eval, prepare_task

    recipe, test = _write_inputs(tmp_path, tiny_llama_dir)
    out = tmp_path / "sweep"
    spec = lib.plan_sweep(str(recipe), "base,lora", "0,1", output_dir=out, eval_tasks={"arc-easy": str(test)},
                          protocol="loglikelihood", limit=6)
    table = lib.run_sweep(spec, log=lambda _: None)
    assert table["actions"] == {"base": {"0": "evaluated", "1": "skipped"}, "lora": {"0": "trained", "1": "trained"}}
    assert sorted(p.name for p in (out / "base").iterdir()) == ["predictions.jsonl", "results.json",
                                                                 "sweep_timing.json"]
    loaded = load_for_eval(str(tiny_llama_dir))
    ref = evaluate_model(loaded.model, loaded.tokenizer, [prepare_task("arc-easy", "loglikelihood", str(test), limit=6)],
                         protocol="loglikelihood", progress=False)
    base = table["runs"]["base"]
    assert base["0"]["accuracy"] == base["1"]["accuracy"] == {"arc-easy": ref["tasks"]["arc-easy"]["accuracy"]}
    assert base["0"]["steps"] == 0 and base["0"]["final_train_loss"] is None
    assert table["summary"]["base"]["final_train_loss"] is None
    assert "| `base` | — | — | — |" in (out / "table.md").read_text()
    assert {p.name for p in (out / "loss_curves").iterdir()} == {"lora.png"}
    assert lib.run_one(spec, spec.variants[0], 1) == "skipped"
    results = out / "base" / "results.json"
    results.write_text(results.read_text().replace(json.dumps(str(tiny_llama_dir)), '"another-model"'))
    assert lib.run_one(spec, spec.variants[0], 0) == "evaluated"  # scored for another base model: stale
    with pytest.raises(NoraError, match="no @knobs"):
        lib.parse_methods("base@sigma=0.1")
    with pytest.raises(NoraError, match="only evaluated"):
        lib.plan_sweep(str(recipe), "base", "0", overrides=["eval.tasks=[]"], output_dir=out)
