"""Quality: the paper's Table 4 in miniature — LoRA, NoRA, LoRA-P, NoRA+, PiSSA on SmolLM2-135M, 3 seeds,
through `nora sweep`.

    python benchmarks/quality.py            # full: 64 steps, 80 test items per task (sized for ~90 min, quiet 2-core CPU)
    python benchmarks/quality.py --quick    # 24 steps, 24 items per task (sized for ~35 min)

Training data: one mixed subset of the LLM-Adapters train sets in $NORA_SHARED/data/commonsense/
(boolq, ARC-Easy, ARC-Challenge, openbookqa; piqa ships no train set), the same examples for every method:
`steps × batch + val` records drawn evenly from the four sets with a fixed seed, written to the work dir.
Each run sees each training record once. Recipe: the shipped smollm2-135m-commonsense settings (r 32,
alpha 64, dropout 0.05, q/k/v/up/down, AdamW lr 3e-4, linear decay, bf16 autocast) with a short cutoff.
Evaluation: the five test sets (boolq, piqa, ARC-Easy, ARC-Challenge, openbookqa), loglikelihood protocol,
first --limit items each. Validation loss: held-out records of the same mix (split by seed), after the
last step.

The sweep tree (adapters, metrics) stays in --work-dir (re-running resumes it); table.md, table.json,
loss_curves.png, loss_curves/<method>.png and README.md go to benchmarks/results/quality/<quick|full>/.
Threads: on a shared CPU, torch's default of one thread per core can run 5-10x slower than one thread
(oversubscribed spin-waits); pass --threads 1 there.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "quality"
TRAIN_SETS = ("boolq", "ARC-Easy", "ARC-Challenge", "openbookqa")
TEST_TASKS = ("boolq", "piqa", "arc-easy", "arc-challenge", "openbookqa")
METHODS = "lora,nora,lora-p,nora+,pissa"

# (optimizer steps, test items per task, validation records); batch 8 everywhere
CONFIGS = {"full": (64, 80, 64), "quick": (24, 24, 32)}
BATCH = 8


def shared_dir() -> Path:
    path = Path(os.environ.get("NORA_SHARED", REPO.parent / "shared"))
    if not (path / "data" / "commonsense").is_dir():
        raise SystemExit(f"no commonsense data under {path}/data; set NORA_SHARED")
    os.environ["NORA_SHARED"] = str(path)  # the sweep's evaluation finds the test sets through it
    return path


def write_mix(shared: Path, n_records: int, path: Path) -> dict[str, int]:
    """n_records drawn evenly from the train sets (seed 0), shuffled together; returns the per-set counts."""
    rng = random.Random(0)
    per_set = -(-n_records // len(TRAIN_SETS))
    rows: list[dict] = []
    counts = {}
    for name in TRAIN_SETS:
        records = json.loads((shared / "data" / "commonsense" / name / "train.json").read_text())
        picked = rng.sample(records, per_set)
        rows += picked
        counts[name] = len(picked)
    rng.shuffle(rows)
    path.write_text(json.dumps(rows[:n_records]))
    return counts


def write_recipe(path: Path, data: Path, steps: int, val: int) -> None:
    recipe = {
        "method": "lora",  # replaced per run by the sweep's --methods
        "seed": 0,
        "model": {"source": "smollm2-135m"},
        "adapter": {"r": 32, "alpha": 64, "dropout": 0.05,
                    "target_modules": ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"], "sigma": 0.1},
        "optimizer": {"name": "adamw", "lr": 3.0e-4},
        "data": {"path": str(data), "format": "alpaca", "template": "alpaca", "cutoff_len": 160,
                 "val_set_size": val},
        "train": {"max_steps": steps, "batch_size": BATCH, "micro_batch_size": BATCH, "lr_schedule": "linear",
                  "warmup_steps": max(1, steps // 10), "mixed_precision": "bf16", "log_steps": 1,
                  "eval_steps": steps, "save_steps": max(1, steps // 2), "keep_last": 1},
        "eval": {"protocol": "loglikelihood", "batch_size": 16},
        "output": {"dir": str(path.parent / "unused")},
    }
    path.write_text("# Written by benchmarks/quality.py; run through `nora sweep`.\n" + yaml.safe_dump(recipe))


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or platform.machine())
    return f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="24 steps and 24 items per task (~35 min)")
    parser.add_argument("--methods", default=METHODS, help=f"nora sweep --methods (default {METHODS})")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="sweep tree and data mix (default: $TMPDIR/nora-bench/quality-<config>)")
    parser.add_argument("--results", type=Path, default=None, help="default benchmarks/results/quality/<config>")
    args = parser.parse_args()

    config = "quick" if args.quick else "full"
    steps, limit, val = CONFIGS[config]
    work = args.work_dir or Path(tempfile.gettempdir()) / "nora-bench" / f"quality-{config}"
    results = args.results or RESULTS / config
    work.mkdir(parents=True, exist_ok=True)
    shared = shared_dir()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from nora_cli import sweep

    counts = write_mix(shared, steps * BATCH + val, work / "train_mix.json")
    write_recipe(work / "recipe.yaml", work / "train_mix.json", steps, val)
    eval_tasks = {t: None for t in TEST_TASKS}  # default test files under $NORA_SHARED
    spec = sweep.plan_sweep(str(work / "recipe.yaml"), args.methods, args.seeds, output_dir=work / "sweep",
                            eval_tasks=eval_tasks, protocol="loglikelihood", limit=limit)
    start = time.perf_counter()
    table = sweep.run_sweep(spec)
    wall = time.perf_counter() - start

    results.mkdir(parents=True, exist_ok=True)
    for name in ("table.md", "table.json", "loss_curves.png"):
        shutil.copy2(spec.output_dir / name, results / name)
    shutil.copytree(spec.output_dir / "loss_curves", results / "loss_curves", dirs_exist_ok=True)
    shutil.copy2(work / "recipe.yaml", results / "recipe.yaml")
    timings = [r.get("train_seconds", 0) + r.get("eval_seconds", 0)
               for per_seed in table["runs"].values() for r in per_seed.values()]
    trained = any(a != "skipped" for per_seed in table["actions"].values() for a in per_seed.values())
    command = "python benchmarks/quality.py" + (" --quick" if args.quick else "") + \
        (f" --threads {args.threads}" if args.threads else "") + \
        (f" --methods '{args.methods}'" if args.methods != METHODS else "")
    readme = [
        f"# Quality: Table 4 in miniature ({config})",
        "",
        f"Command: `{command}` (through `nora sweep`; the recipe it wrote is [recipe.yaml](recipe.yaml)).",
        "",
        f"Machine: {machine()}; torch threads {torch.get_num_threads()}; date {dt.date.today().isoformat()}. "
        f"Train+eval time summed over the {len(timings)} runs: {sum(timings) / 60:.1f} min "
        f"({min(timings) / 60:.1f}–{max(timings) / 60:.1f} min per run, model loading included). "
        + (f"Wall time of the last invocation {wall / 60:.1f} min (runs finished earlier in the work dir are "
           "skipped)." if trained else "The last invocation only re-tabulated runs finished earlier."),
        "",
        f"Setup: SmolLM2-135M-Instruct, r 32, alpha 64, q/k/v/up/down, AdamW lr 3e-4, batch {BATCH}, {steps} steps "
        f"(linear decay, {max(1, steps // 10)} warmup), bf16 autocast, cutoff 160. Train data: "
        f"{steps * BATCH + val} records mixed from " + ", ".join(f"{k} {v}" for k, v in counts.items())
        + f" (seed 0; {val} held out per seed for the validation loss). Test: first {limit} items of each test "
        "set, loglikelihood protocol, accuracy in %. Methods: " + ", ".join(f"`{m}`" for m in table["summary"])
        + f"; seeds {args.seeds}.",
        "",
        (spec.output_dir / "table.md").read_text(),
        "![loss curves](loss_curves.png)",
        "",
        "Reading it: every init except PiSSA leaves the model unchanged at step 0 (one factor is zero), so step 1's",
        "loss is the same for them. PiSSA's init is exact too (eval-mode loss equals the base model's), but its",
        "adapter carries W0's principal components, so the recipe's LoRA dropout (0.05, as in LLM-Adapters) on the",
        "adapter input perturbs the model itself during training; `pissa@adapter.dropout=0` (when listed) shows",
        "PiSSA without that handicap. Per-method curves with each seed: [loss_curves/](loss_curves/).",
    ]
    (results / "README.md").write_text("\n".join(readme) + "\n")
    print(f"wrote {results}/README.md ({wall / 60:.1f} min)", file=sys.stderr)


if __name__ == "__main__":
    main()
