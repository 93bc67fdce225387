"""The recipe schema: shipped recipes, method presets, --set overrides, path resolution, one-line errors, CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import get_args

import pytest
import yaml
from typer.testing import CliRunner

from nora_cli.cli import app
from nora_cli.config.load import (
    RECIPES_DIR,
    find_recipe,
    load_recipe,
    recipe_description,
    recipe_to_yaml,
    shipped_recipes,
)
from nora_cli.config.reference import recipe_json_schema
from nora_cli.config.schema import METHOD_PRESETS, Recipe
from nora_cli.errors import NoraError

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _write(folder: Path, text: str, name: str = "r.yaml") -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# --- shipped recipes -------------------------------------------------------------------------------------


def test_shipped_recipes_live_in_the_repo() -> None:
    assert RECIPES_DIR == REPO / "recipes"
    names = {p.stem for p in shipped_recipes()}
    assert {
        "llama7b-commonsense",
        "llama2-7b-commonsense",
        "gemma7b-metamath",
        "opt1.3b-fewshot-sst2",
        "smollm2-135m-demo",
        "smollm2-135m-commonsense",
    } <= names


@pytest.mark.parametrize("path", shipped_recipes(), ids=lambda p: p.stem)
def test_shipped_recipe_loads_and_round_trips(
    path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(path.stem)
    assert recipe == load_recipe(str(path))  # by name == by path
    lines = path.read_text().splitlines()
    assert lines[0].startswith(f"# nora train {path.stem}"), "first line must be the command that runs it"
    assert recipe_description(path) == lines[1].lstrip("# ")
    assert "--set method=" in path.read_text(), "mention the method variants"
    saved = _write(tmp_path / "out", recipe_to_yaml(recipe), "recipe.yaml")
    again = load_recipe(str(saved))
    assert again == recipe
    assert recipe_to_yaml(again) == recipe_to_yaml(recipe)
    assert Path(recipe.output.dir).is_absolute() and Path(recipe.output.dir).parent.parent == tmp_path


def test_paper_settings() -> None:
    llama = load_recipe("llama7b-commonsense")
    assert (llama.adapter.r, llama.adapter.alpha, llama.optimizer.lr, llama.train.epochs) == (32, 64, 3e-4, 3)
    assert (llama.train.batch_size, llama.data.cutoff_len, llama.adapter.sigma) == (16, 256, 0.02)
    assert llama.adapter.target_modules == ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
    assert len(llama.eval.tasks) == 8
    gemma = load_recipe("gemma7b-metamath")
    assert (
        len(gemma.adapter.target_modules) == 7 and gemma.train.batch_size == 128 and gemma.train.epochs == 2
    )
    opt = load_recipe("opt1.3b-fewshot-sst2")
    assert (opt.adapter.r, opt.adapter.alpha, opt.adapter.target_modules) == (8, 16, ["q_proj", "v_proj"])
    assert (opt.train.epochs, opt.train.batch_size, opt.optimizer.lr, opt.data.max_samples) == (
        5,
        8,
        1e-4,
        1000,
    )
    demo = load_recipe("smollm2-135m-demo")
    assert (demo.method, demo.adapter.init, demo.optimizer.precondition) == ("nora+", "nystrom", "scaled-gd")
    assert demo.data.path == "builtin:demo" and demo.model.source == "smollm2-135m"


def test_commonsense_recipe_reads_shared_data() -> None:
    recipe = load_recipe("smollm2-135m-commonsense")
    expected = (REPO.parent / "shared" / "data" / "commonsense" / "ARC-Easy").resolve()
    assert Path(recipe.data.path) == expected / "train.json" and Path(recipe.data.path).is_file()
    assert Path(recipe.eval.data["arc-easy"]) == expected / "test.json"


def test_nora_recipes_env_overrides_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(tmp_path, "# nora train mine\n# Mine.\nadapter:\n  r: 3\n", "mine.yaml")
    monkeypatch.setenv("NORA_RECIPES", str(tmp_path))
    assert [p.name for p in shipped_recipes()] == ["mine.yaml"]
    assert load_recipe("mine").adapter.r == 3
    assert load_recipe("mine.yaml").adapter.r == 3


# --- presets and overrides -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "init", "precondition", "normalize"),
    [
        ("lora", "lora", "none", False),
        ("nora", "nystrom", "none", False),
        ("lora-p", "lora", "scaled-gd", False),
        ("nora+", "nystrom", "scaled-gd", True),
    ],
)
def test_method_presets(method: str, init: str, precondition: str, normalize: bool) -> None:
    recipe = Recipe(method=method)
    assert (recipe.adapter.init, recipe.optimizer.precondition, recipe.optimizer.normalize) == (
        init,
        precondition,
        normalize,
    )
    assert set(METHOD_PRESETS) == {"lora", "nora", "lora-p", "nora+"}


def test_name_literals_match_their_registries() -> None:
    """config may not import the registries (they live in higher layers), so the Literals it validates
    with are checked against them here: a new init, protocol or method needs both, in the same order."""
    from nora_cli.config.names import EVAL_BATCH_SIZE, InitName, Method, Protocol
    from nora_cli.config.schema import EvalConfig
    from nora_cli.evaluate.runner import RUNNERS, Settings
    from nora_cli.lora import INITS
    from nora_cli.sweep import INIT_VARIANTS

    assert get_args(InitName) == tuple(INITS)
    assert get_args(Protocol) == tuple(RUNNERS)
    assert get_args(Method) == tuple(METHOD_PRESETS)
    assert INIT_VARIANTS == ("gaussian", "pissa", "olora")  # the inits no method preset stands for
    # one eval batch default: the recipe's and `nora evaluate`'s
    assert EvalConfig().batch_size == Settings().batch_size == EVAL_BATCH_SIZE == 8


def test_grad_accum_steps_follows_the_real_world_size() -> None:
    from nora_cli.config.schema import TrainConfig
    from nora_cli.loop.loop import plan_schedule

    cfg = TrainConfig(batch_size=16, micro_batch_size=2)
    assert cfg.grad_accum_steps() == 8 and cfg.grad_accum_steps(4) == 2
    assert plan_schedule(64, cfg, 4).accum == 2  # the loop accumulates what the recipe says


def test_explicit_keys_override_presets(tmp_path: Path) -> None:
    path = _write(
        tmp_path, "method: nora+\nadapter:\n  init: pissa_niter_4\noptimizer:\n  normalize: false\n"
    )
    recipe = load_recipe(str(path))
    assert (recipe.adapter.init, recipe.optimizer.precondition, recipe.optimizer.normalize) == (
        "pissa_niter_4",
        "scaled-gd",
        False,
    )
    # a preset never mutates a section shared with another recipe
    adapter = Recipe(method="lora").adapter.model_copy(update={"init": None})
    assert Recipe(method="nora", adapter=adapter).adapter.init == "nystrom" and adapter.init is None


def test_set_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path / "recipes", "train:\n  max_steps: 5\n  batch_size: 8\n  micro_batch_size: 4\n")
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(
        str(path),
        [
            "train.max_steps=10",
            "method=nora+",
            "adapter.target_modules=[q_proj,v_proj]",
            "optimizer.betas=[0.8, 0.95]",
            "optimizer.lr=1e-3",
            "eval.data.arc-easy=test.json",
            "data.path=mine.jsonl",
            "model.quantization=4bit",
            "adapter.sigma=0.5",
            "adapter.sigma=0.25",  # the last one wins
        ],
    )
    assert recipe.train.max_steps == 10 and recipe.train.micro_batch_size == 4  # siblings kept
    assert (recipe.method, recipe.adapter.init, recipe.optimizer.normalize) == ("nora+", "nystrom", True)
    assert recipe.adapter.target_modules == ["q_proj", "v_proj"]
    assert recipe.optimizer.betas == (0.8, 0.95) and recipe.optimizer.lr == 1e-3
    assert recipe.adapter.sigma == 0.25 and recipe.model.quantization == "4bit"
    # paths typed on the command line are relative to the current directory, not to the recipe
    assert recipe.eval.data == {"arc-easy": str(tmp_path / "test.json")}
    assert recipe.data.path == str(tmp_path / "mine.jsonl")
    assert (
        load_recipe(str(path), ["adapter.target_modules=all-linear"]).adapter.target_modules == "all-linear"
    )


def test_relative_paths_resolve_against_recipe_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "proj" / "models" / "tiny").mkdir(parents=True)
    text = (
        "model:\n  source: models/tiny\n"
        "data:\n  path: ../data/train.json\n"
        "eval:\n  data:\n    boolq: ../data/boolq.json\n"
        "output:\n  dir: runs/a\n"
    )
    path = _write(tmp_path / "proj", text)
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(str(path.relative_to(tmp_path)))
    assert recipe.model.source == str(tmp_path / "proj" / "models" / "tiny")  # exists -> a path
    assert recipe.data.path == str(tmp_path / "data" / "train.json")
    assert recipe.eval.data == {"boolq": str(tmp_path / "data" / "boolq.json")}
    assert recipe.output.dir == str(tmp_path / "runs" / "a")  # outputs: relative to where nora runs
    hub = load_recipe(str(path), ["model.source=org/name", "data.path=meta-math/MetaMathQA"])
    assert (hub.model.source, hub.data.path) == ("org/name", "meta-math/MetaMathQA")  # hub ids untouched
    gguf = load_recipe(str(path), ["model.source=weights/m.gguf"])
    assert gguf.model.source == str(tmp_path / "weights" / "m.gguf")


# --- one-line errors -------------------------------------------------------------------------------------

BAD = {
    "unknown-top": ("methd: nora\n", [], ["unknown key 'methd'", "did you mean 'method'?"]),
    "unknown-nested": ("train:\n  max_step: 3\n", [], ["unknown key 'train.max_step'", "'train.max_steps'"]),
    "unknown-via-set": ("method: nora\n", ["adapter.rnk=4"], ["unknown key 'adapter.rnk'", "did you mean 'adapter.r'?"]),
    "wrong-type": ("train:\n  max_steps: ten\n", [], ["train.max_steps:", "integer", "got 'ten'"]),
    "out-of-range": ("adapter:\n  r: 0\n", [], ["adapter.r:", "greater than 0", "got 0"]),
    "dropout-range": ("adapter:\n  dropout: 1.0\n", [], ["adapter.dropout:", "less than 1", "got 1.0"]),
    "bad-literal": (
        "method: nora++\n",
        [],
        ["method:", "'lora', 'nora', 'lora-p' or 'nora+'", "got 'nora++'"],
    ),
    "bad-literal-hint": (
        "model:\n  dtype: bf61\n",
        [],
        ["model.dtype:", "got 'bf61'", "did you mean 'bf16'?"],
    ),
    "bad-init": (
        "adapter:\n  init: nystrm\n",
        [],
        ["adapter.init:", "pissa_niter_K", "did you mean 'nystrom'?"],
    ),
    "bad-targets": ("adapter:\n  target_modules: []\n", [], ["adapter.target_modules:", "'all-linear'"]),
    "short-betas": ("optimizer:\n  betas: [0.9]\n", [], ["optimizer.betas: too few values, got [0.9]"]),
    "batch": (
        "train:\n  batch_size: 12\n  micro_batch_size: 4\n  num_processes: 2\n",
        [],
        ["batch_size (12) must be a multiple of micro_batch_size × num_processes", "4 × 2 = 8"],
    ),
    "dreambooth": ("task: dreambooth\n", [], ["task 'dreambooth' needs a `dreambooth:` section"]),
    "not-a-mapping": ("- a\n- b\n", [], ["a recipe must be a YAML mapping", "got list"]),
    "set-syntax": ("method: nora\n", ["train.max_steps"], ["bad --set 'train.max_steps'", "KEY=VALUE"]),
    "set-empty-key": ("method: nora\n", ["train..x=1"], ["bad --set 'train..x=1'"]),
    "set-into-value": ("seed: 3\n", ["seed.x=1"], ["bad --set seed.x", "seed is a value (3), not a section"]),
    "empty-file": ("", ["train.max_steps=5"], ["r.yaml is empty"]),
    "comments-only": ("# nothing here\n", [], ["r.yaml is empty"]),
    "duplicate-key": ("optimizer:\n  lr: 0.1\noptimizer:\n  lr: 0.2\n", [], ["r.yaml:3: invalid YAML: duplicate key 'optimizer'"]),
    "infinite-lr": ("optimizer:\n  lr: .inf\n", [], ["optimizer.lr: expected a finite number, got inf"]),
    "bool-rank": ("adapter:\n  r: yes\n", [], ["adapter.r: expected a valid integer, got True"]),
    "float-steps": ("train:\n  max_steps: 1.0e+30\n", [], ["train.max_steps: expected a valid integer, got 1e+30"]),
    "beta-range": ("optimizer:\n  betas: [0.9, 1.5]\n", [], ["optimizer.betas[1]: expected a value less than 1"]),
    "seed-range": ("seed: 4294967296\n", [], ["seed: expected a value less than 4294967296"]),
    "warmup-over-steps": ("train:\n  max_steps: 5\n  warmup_steps: 6\n", [], ["warmup_steps (6) exceeds max_steps (5)"]),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_recipe_one_line_error(case: str, tmp_path: Path) -> None:
    text, overrides, expected = BAD[case]
    path = _write(tmp_path, text)
    with pytest.raises(NoraError) as info:
        load_recipe(str(path), overrides)
    message = str(info.value)
    assert "\n" not in message
    for part in expected:
        assert part in message


def test_invalid_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "method: nora\nadapter:\n  r: 4\n  alpha: [1,\n")
    with pytest.raises(NoraError, match=rf"^{path}:5: invalid YAML"):
        load_recipe(str(path))


def test_missing_file_and_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(NoraError, match=rf"recipe file not found: {tmp_path / 'nope.yaml'}"):
        load_recipe(str(tmp_path / "nope.yaml"))
    with pytest.raises(NoraError) as info:
        load_recipe("smollm2-135m-dmeo")
    assert "no recipe file or shipped recipe named 'smollm2-135m-dmeo'" in str(info.value)
    assert "smollm2-135m-demo" in str(info.value) and "gemma7b-metamath" in str(info.value)
    assert find_recipe("smollm2-135m-demo.yaml") == RECIPES_DIR / "smollm2-135m-demo.yaml"


def test_schema_documents_every_field() -> None:
    schema = recipe_json_schema()
    sections = [schema, *schema["$defs"].values()]
    undocumented = [
        f"{section['title']}.{name}"
        for section in sections
        for name, field in section.get("properties", {}).items()
        if not field.get("description")
    ]
    assert undocumented == []
    assert all(
        section.get("additionalProperties") is False for section in sections if "properties" in section
    )


# --- CLI -------------------------------------------------------------------------------------------------


def test_cli_list_show_schema() -> None:
    result = runner.invoke(app, ["recipes", "list"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for path in shipped_recipes():
        assert path.stem in result.stdout
    assert "nora+" in result.stdout and "google/gemma-7b" in result.stdout

    result = runner.invoke(app, ["recipes", "show", "smollm2-135m-demo"])
    assert result.exit_code == 0
    assert result.stdout == (RECIPES_DIR / "smollm2-135m-demo.yaml").read_text()

    result = runner.invoke(app, ["recipes", "schema"])
    assert result.exit_code == 0
    assert json.loads(result.stdout)["properties"]["method"]["default"] == "nora"


def test_cli_validate(tmp_path: Path) -> None:
    result = runner.invoke(app, ["recipes", "validate", "smollm2-135m-demo", "--set", "train.max_steps=7"])
    assert result.exit_code == 0, result.output
    resolved = yaml.safe_load(result.stdout)
    assert resolved["train"]["max_steps"] == 7 and resolved["optimizer"]["precondition"] == "scaled-gd"

    bad = _write(tmp_path, "adapter:\n  rr: 4\n")
    for args in (["recipes", "validate", str(bad)], ["recipes", "show", "no-such-recipe"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2
        assert result.stdout == ""
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1


def test_real_binary_exit_code(tmp_path: Path) -> None:
    """The installed `nora` entry point (cli.main), not just the Typer app, exits 2 on a bad recipe."""
    bad = _write(tmp_path, "train:\n  batch_size: 3\n  micro_batch_size: 2\n")
    nora = shutil.which("nora", path=str(Path(sys.executable).parent)) or "nora"
    proc = subprocess.run([nora, "recipes", "validate", str(bad)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "must be a multiple of micro_batch_size" in proc.stderr


def test_yaml_1_1_no_means_no(tmp_path: Path) -> None:
    """`mixed_precision: no` is the string "no" (YAML 1.1 would read False), `true` is still an error."""
    assert load_recipe(str(_write(tmp_path, "train:\n  mixed_precision: no\n"))).train.mixed_precision == "no"
    with pytest.raises(NoraError, match="train.mixed_precision"):
        load_recipe(str(_write(tmp_path, "train:\n  mixed_precision: yes\n")))


def test_alias_bomb_is_a_short_error_fast(tmp_path: Path) -> None:
    """A billion-laughs recipe (9^9 strings by reference) fails in well under a second with a short line."""
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]")
    path = _write(tmp_path, "\n".join([*lines, "data:", "  path: *i", ""]))
    start = time.perf_counter()
    with pytest.raises(NoraError) as info:
        load_recipe(str(path))
    assert time.perf_counter() - start < 5
    message = str(info.value)
    assert "data.path: expected a valid string" in message and len(message) < 400, message


def test_warmup_longer_than_an_epoch_based_run_is_refused() -> None:
    """With max_steps the schema checks warmup; with epochs the step count is known once the data is."""
    from nora_cli.config.schema import TrainConfig
    from nora_cli.loop.loop import plan_schedule

    cfg = TrainConfig(batch_size=2, micro_batch_size=2, epochs=1, warmup_steps=3)
    assert plan_schedule(6, cfg, 1).total_steps == 3
    with pytest.raises(NoraError, match=r"train\.warmup_steps=3 exceeds the run's 2 optimizer steps"):
        plan_schedule(4, cfg, 1)
