"""`nora sweep`: train + evaluate every (method, seed) pair of a recipe, then tabulate like the paper's Table 4.

One output tree, DIR/<method>/seed<k>/, each a normal `nora train` run directory plus the evaluation's
results.json. Runs go sequentially in this process and evaluate the model still in memory (no reload).
Re-running the same sweep skips finished runs, so an interrupted sweep resumes:

- finished       = adapter_model.safetensors (+ results.json with the same tasks/protocol/limit when
                   the sweep evaluates) exist in the run dir -> skipped;
- trained only   = adapter present, results missing or stale -> reloaded from disk and evaluated;
- half-finished  = anything else -> `train_recipe(resume=True)`: continues from its latest checkpoint,
                   or starts again from step 0 when it has none.

A run dir whose recipe.yaml differs from the one this sweep would train is an error, never a silent mix.
The table is always rebuilt from the files on disk (metrics.jsonl, results.json), so it equals the runs'
own metrics whichever process produced them; the table, stats and plots are in sweep_report.py.

Method names: the recipe presets (lora, nora, lora-p, nora+), init-only variants of LoRA (gaussian, pissa,
pissa_niter_K, olora = method lora with adapter.init replaced), each optionally followed by
`@KEY=VALUE` knobs for that method alone, e.g. `nora@sigma=0.02@side=input` (short keys in SHORT_KEYS or
any dotted recipe key). `base` is the untrained model, scored once in DIR/base/ with the same tasks and
autocast as the runs: the row every gain is measured from.
"""

from __future__ import annotations

import gc
import json
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nora_cli.config.load import load_recipe
from nora_cli.config.names import PISSA_NITER
from nora_cli.config.schema import METHOD_PRESETS, Recipe
from nora_cli.errors import NoraError
from nora_cli.lora import INITS
from nora_cli.sweep_report import (
    RESULTS_FILE,
    TIMING_FILE,
    plot_loss_curves,
    read_json,
    summarize,
    write_outputs,
)
from nora_cli.tasks import TASKS

BASE = "base"  # the untrained model: evaluated, never trained
#: inits no method preset stands for, run as method lora with adapter.init = the name (+ pissa_niter_K)
INIT_VARIANTS = tuple(name for name in INITS if name not in {p.init for p in METHOD_PRESETS.values()})
#: `@key=value` shorthands -> recipe keys; a key with a dot is taken as a recipe key as written
SHORT_KEYS = {
    "sigma": "adapter.sigma", "side": "adapter.side", "init": "adapter.init", "r": "adapter.r",
    "alpha": "adapter.alpha", "lr": "optimizer.lr", "damping": "optimizer.damping",
    "precondition": "optimizer.precondition", "normalize": "optimizer.normalize",
}
ADAPTER_FILE = "adapter_model.safetensors"


# --- parsing -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One table row: the name as typed (also its directory) and the recipe overrides it stands for."""

    name: str
    method: str
    preset: tuple[str, ...]  # method, init and preconditioner keys the name implies
    knobs: tuple[str, ...] = ()  # its own @KEY=VALUE overrides, applied after the sweep's --set

    @property
    def overrides(self) -> tuple[str, ...]:
        return self.preset + self.knobs

    @property
    def dirname(self) -> str:
        return re.sub(r"[/\\\s]+", "_", self.name)

    @property
    def trains(self) -> bool:
        return self.method != BASE


def parse_variant(text: str) -> Variant:
    """`nora`, `pissa`, `nora@sigma=0.02@side=input`, `lora@optimizer.lr=1e-3` -> a Variant."""
    name = text.strip()
    base, *knobs = name.split("@")
    if base == BASE:
        if knobs:
            raise NoraError(f"{name!r}: the base model takes no @knobs (it is not trained)")
        return Variant(BASE, BASE, ())
    if base in METHOD_PRESETS:
        method, init = base, METHOD_PRESETS[base].init
    elif base in INIT_VARIANTS or PISSA_NITER.match(base):
        method, init = "lora", base
    else:
        known = ", ".join([BASE, *METHOD_PRESETS, *INIT_VARIANTS, "pissa_niter_K"])
        raise NoraError(f"unknown method {base!r} in --methods; choose from {known} (optionally NAME@KEY=VALUE)")
    preset = METHOD_PRESETS[method]
    # The method name alone decides init and preconditioner, even if the recipe file pins them.
    keys = (f"method={method}", f"adapter.init={init}", f"optimizer.precondition={preset.precondition}",
            f"optimizer.normalize={str(preset.normalize).lower()}")
    overrides = []
    for knob in knobs:
        key, sep, value = knob.partition("=")
        if not sep or not key:
            raise NoraError(f"bad method knob {knob!r} in {name!r}: expected KEY=VALUE, e.g. nora@sigma=0.02")
        if "." not in key and key not in SHORT_KEYS:
            raise NoraError(f"unknown knob {key!r} in {name!r}; use one of {', '.join(SHORT_KEYS)} or a dotted "
                            "recipe key such as adapter.sigma")
        overrides.append(f"{SHORT_KEYS.get(key, key)}={value}")
    return Variant(name, method, keys, tuple(overrides))


def parse_methods(spec: str | Sequence[str]) -> list[Variant]:
    names = [n for n in (spec.split(",") if isinstance(spec, str) else spec) if n.strip()]
    if not names:
        raise NoraError("--methods is empty; e.g. --methods lora,nora")
    variants = [parse_variant(n) for n in names]
    dirs = [v.dirname for v in variants]
    if len(set(dirs)) != len(dirs):
        raise NoraError(f"a method is listed twice in --methods: {', '.join(v.name for v in variants)}")
    return variants


def parse_seeds(spec: str | Sequence[int]) -> list[int]:
    try:
        seeds = [int(s) for s in spec.split(",") if s.strip()] if isinstance(spec, str) else [int(s) for s in spec]
    except ValueError:
        raise NoraError(f"--seeds {spec!r}: expected comma-separated integers, e.g. 0,1,2") from None
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise NoraError(f"--seeds {spec!r}: needs distinct integers >= 0")
    return seeds


def parse_eval(spec: str | None) -> dict[str, str | None]:
    """`arc-easy=PATH,boolq` -> {"arc-easy": PATH, "boolq": None} (None: the recipe's or default test file)."""
    if not spec:
        return {}
    out: dict[str, str | None] = {}
    for item in (i.strip() for i in spec.split(",")):
        if item:
            task, sep, path = item.partition("=")
            if sep and not path.strip():
                raise NoraError(f"--eval {item!r}: empty path; write TASK or TASK=PATH")
            out[task.strip()] = str(Path(path.strip()).expanduser().resolve()) if sep else None
    return out


# --- the sweep -----------------------------------------------------------------------------------------


@dataclass
class EvalPlan:
    """What every run is scored on; results.json files that disagree with it are stale."""

    tasks: list[str]
    protocol: str
    limit: int | None
    batch_size: int
    data: dict[str, str] = field(default_factory=dict)
    prepared: list[Any] = field(default_factory=list)  # PreparedTask, built once for all runs


@dataclass
class SweepSpec:
    recipe: str
    variants: list[Variant]
    seeds: list[int]
    output_dir: Path
    overrides: tuple[str, ...] = ()
    eval: EvalPlan | None = None

    def run_dir(self, variant: Variant, seed: int) -> Path:
        """DIR/<method>/seed<k>; the base model's one directory serves every seed."""
        return self.output_dir / variant.dirname / (f"seed{seed}" if variant.trains else "")

    def run_recipe(self, variant: Variant, seed: int) -> Recipe:
        """Method preset, then the user's --set (all runs), then the variant's own knobs, seed and output dir."""
        overrides = [*variant.preset, *self.overrides, *variant.knobs, f"seed={seed}",
                     f"output.dir={self.run_dir(variant, seed)}"]
        return load_recipe(self.recipe, overrides)


def plan_sweep(
    recipe: str, methods: str | Sequence[str], seeds: str | Sequence[int], *, overrides: Sequence[str] = (),
    output_dir: str | Path | None = None, eval_tasks: dict[str, str | None] | None = None,
    protocol: str | None = None, limit: int | None = None,
) -> SweepSpec:
    """Validate everything cheap (names, recipes of every run, eval data) before any training starts."""
    variants, seed_list = parse_methods(methods), parse_seeds(seeds)
    base = load_recipe(recipe, list(overrides))
    out = Path(output_dir).expanduser().resolve() if output_dir else Path(f"{base.output.dir}-sweep")
    spec = SweepSpec(recipe, variants, seed_list, out, tuple(overrides))
    for v in variants:  # a bad knob fails now, not after hours of training
        spec.run_recipe(v, seed_list[0])
    if not TASKS[base.task].sweep:
        sweepable = ", ".join(name for name, task in TASKS.items() if task.sweep)
        raise NoraError(f"nora sweep runs {sweepable} recipes; {recipe} is task {base.task!r}")
    tasks = dict(eval_tasks) if eval_tasks else dict.fromkeys(base.eval.tasks)
    if not tasks and any(not v.trains for v in variants):
        raise NoraError("method 'base' is only evaluated: give --eval TASKS (or eval.tasks in the recipe)")
    if limit is not None and limit <= 0:
        raise NoraError(f"--limit must be positive, got {limit}")
    if tasks:
        from nora_cli.evaluate import get_task, prepare_tasks

        canonical = {get_task(k).name: v for k, v in tasks.items()}  # any spelling: ARC-Easy, arc-easy
        data = {get_task(k).name: v for k, v in base.eval.data.items() if get_task(k).name in canonical}
        data.update({k: v for k, v in canonical.items() if v})
        plan = EvalPlan(list(canonical), protocol or base.eval.protocol, limit or base.eval.limit,
                        base.eval.batch_size, data)
        plan.prepared = prepare_tasks(plan.tasks, plan.protocol, plan.data, limit=plan.limit)
        spec.eval = plan
    return spec


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def results_current(path: Path, plan: EvalPlan) -> bool:
    """results.json exists and scored the same tasks with the same protocol and limit."""
    results = read_json(path)
    return bool(results) and (
        list(results.get("tasks", {})) == plan.tasks
        and results.get("protocol") == plan.protocol
        and results.get("settings", {}).get("limit") == plan.limit
    )


def run_state(run_dir: Path, plan: EvalPlan | None) -> str:
    """done | evaluate (trained, results missing/stale) | resume (partial run dir) | new."""
    if (run_dir / ADAPTER_FILE).is_file():
        return "evaluate" if plan and not results_current(run_dir / RESULTS_FILE, plan) else "done"
    return "resume" if run_dir.is_dir() and any(run_dir.iterdir()) else "new"


def _check_same_recipe(run_dir: Path, recipe: Recipe) -> None:
    """Compare resolved values, not text: a key added to the schema later (with its default) is no change."""
    saved = run_dir / "recipe.yaml"
    if not saved.is_file():
        return
    try:
        same = load_recipe(str(saved)).model_dump() == recipe.model_dump()
    except NoraError:  # a key this nora no longer knows
        same = False
    if not same:
        raise NoraError(f"{run_dir} was trained from a different recipe than this sweep now asks for (changed "
                        "--set, @knobs or recipe file?); use another --output-dir or delete that run dir")


def _evaluate(model: Any, recipe: Recipe, run_dir: Path, plan: EvalPlan) -> None:
    """Score under the recipe's train.mixed_precision autocast: the precision the run trained and validated
    in (and on CPUs with bf16 units about twice as fast as fp32)."""
    import torch

    from nora_cli.evaluate import evaluate_model
    from nora_cli.models import load_tokenizer, resolve_source, torch_dtype

    tokenizer = load_tokenizer(resolve_source(recipe.model.source, recipe.model.gguf_file))
    precision = recipe.train.mixed_precision
    device = next(model.parameters()).device
    autocast = torch.autocast(device.type, dtype=torch_dtype(precision if precision != "no" else "bf16"),
                              enabled=precision != "no")
    with autocast:
        evaluate_model(model, tokenizer, plan.prepared, protocol=plan.protocol, limit=plan.limit,
                       batch_size=plan.batch_size, output=run_dir / RESULTS_FILE, model_name=recipe.model.source,
                       adapter_name=str(run_dir), progress=sys.stderr.isatty())


def run_one(spec: SweepSpec, variant: Variant, seed: int) -> str:
    """Bring one run to 'done'; returns what it did: skipped | trained | resumed | evaluated."""
    from nora_cli.train import train_recipe

    run_dir = spec.run_dir(variant, seed)
    recipe = spec.run_recipe(variant, seed)
    _check_same_recipe(run_dir, recipe)
    if not variant.trains:
        return _evaluate_base(spec, recipe, run_dir)
    state = run_state(run_dir, spec.eval)
    if state == "done":
        return "skipped"
    timing_path = run_dir / TIMING_FILE
    timing = read_json(timing_path) or {}
    model = None
    if state in ("new", "resume"):
        start = time.perf_counter()
        model = train_recipe(recipe, run_dir, resume=state == "resume")["model"]
        timing["train_seconds"] = timing.get("train_seconds", 0.0) + time.perf_counter() - start
    if spec.eval is not None:
        start = time.perf_counter()
        if model is None:  # trained by an earlier, interrupted sweep: the adapter on disk is the run
            from nora_cli.evaluate import load_for_eval

            model = load_for_eval(adapter=run_dir, dtype=recipe.model.dtype,
                                  allow_pickle=recipe.model.allow_pickle).model
        _evaluate(model, recipe, run_dir, spec.eval)
        timing["eval_seconds"] = time.perf_counter() - start
    timing_path.write_text(json.dumps(timing) + "\n")
    del model
    gc.collect()
    return {"new": "trained", "resume": "resumed", "evaluate": "evaluated"}[state]


def _evaluate_base(spec: SweepSpec, recipe: Recipe, run_dir: Path) -> str:
    """Score the untrained model once (deterministic, so one run_dir serves all seeds)."""
    assert spec.eval is not None  # plan_sweep requires tasks when `base` is listed
    same_model = (read_json(run_dir / RESULTS_FILE) or {}).get("model") == recipe.model.source
    if same_model and results_current(run_dir / RESULTS_FILE, spec.eval):
        return "skipped"
    from nora_cli.evaluate import load_for_eval

    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model = load_for_eval(recipe.model.source, dtype=recipe.model.dtype).model
    _evaluate(model, recipe, run_dir, spec.eval)
    (run_dir / TIMING_FILE).write_text(json.dumps({"eval_seconds": time.perf_counter() - start}) + "\n")
    return "evaluated"


def run_sweep(spec: SweepSpec, log: Callable[[str], None] = _log) -> dict[str, Any]:
    """Every (variant, seed), seed by seed, then table.json/table.md/loss curves; returns the table dict."""
    spec.output_dir.mkdir(parents=True, exist_ok=True)
    total = len(spec.variants) * len(spec.seeds)
    actions: dict[str, dict[str, str]] = {}
    # seed-major: an interrupted sweep already holds a full comparison of every method for the first seeds
    for i, (variant, seed) in enumerate(((v, s) for s in spec.seeds for v in spec.variants), 1):
        log(f"[{i}/{total}] {variant.name} seed {seed} → {spec.run_dir(variant, seed)}")
        action = run_one(spec, variant, seed)
        actions.setdefault(variant.name, {})[str(seed)] = action
        log(f"[{i}/{total}] {variant.name} seed {seed}: {action}")
    table = summarize_sweep(spec)
    table["actions"] = actions
    write_outputs(table, spec.output_dir)
    trained = [v for v in spec.variants if v.trains]
    # after the tables: a plotting problem never loses the numbers
    plot_loss_curves({v.name: _run_dirs(spec, v) for v in trained}, {v.name: v.dirname for v in trained},
                     spec.output_dir)
    return table


def _run_dirs(spec: SweepSpec, variant: Variant) -> dict[str, Path]:
    return {str(s): spec.run_dir(variant, s) for s in spec.seeds}


def summarize_sweep(spec: SweepSpec) -> dict[str, Any]:
    """The table.json object of a sweep, rebuilt from its run directories (see sweep_report.summarize)."""
    plan = spec.eval
    header = {
        "recipe": str(spec.recipe),
        "methods": {v.name: list(v.overrides) for v in spec.variants},
        "seeds": spec.seeds,
        "set": list(spec.overrides),
        "eval": None if plan is None else {"tasks": plan.tasks, "protocol": plan.protocol, "limit": plan.limit,
                                           "data": plan.data},
    }
    return summarize(header, {v.name: _run_dirs(spec, v) for v in spec.variants}, plan.tasks if plan else [])

