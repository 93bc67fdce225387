"""Held-out accuracy of the demo: base model vs LoRA vs NoRA+ over several seeds.

    python benchmarks/demo_gain.py [--seeds 0,1,2] [--threads 1] [--out out/demo-gain]

Runs `nora sweep smollm2-135m-demo --methods base,lora,nora+ --seeds ...` in-process (the demo recipe:
SmolLM2-135M-Instruct, r 16, 30 optimizer steps of 8 examples, fp32) and scores every run on the
held-out words of nora's word-group task (`builtin:demo-test`, 69 words; none occurs in the training data). Each seed changes the adapter init, the data order and dropout; both methods of a seed see
the same data in the same order. The sweep tree under --out is resumable: re-running skips finished runs.
Writes benchmarks/results/demo_gain.md (per-seed and mean accuracies, the gain over the base) and
demo_gain.json (the sweep's table.json plus the machine).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import common

from nora_cli import sweep

METHODS = "base,nora+,lora"
GOAL = 0.20  # the demo's promise: ≥ 20 accuracy points over the base model


def report(table: dict[str, Any], info: dict[str, Any], wall_s: float) -> str:
    seeds = [str(s) for s in table["seeds"]]
    acc = {m: [table["runs"][m][s]["accuracy"]["demo"] for s in seeds] for m in table["runs"]}
    base = statistics.fmean(acc["base"])
    lines = [
        "# Demo gain: base vs LoRA vs NoRA+ on held-out items", "",
        f"`python benchmarks/demo_gain.py --seeds {','.join(seeds)}` — recipe `smollm2-135m-demo` "
        "(SmolLM2-135M-Instruct, r 16, 30 steps × 8 examples, fp32), task `demo` "
        "(\"Answer red if the word names an animal, blue if a food, green if a country, yellow if a job\"; "
        "69 test words never in training), loglikelihood scoring. Chance is 25%.", "",
        common.machine_md(info),
        f"- wall time of this invocation: {wall_s / 60:.1f} min on a shared machine (runs already in --out are "
        "reused, not re-run; not a speed claim)",
        "", "| method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | gain over base |",
        "|---|" + "---:|" * (len(seeds) + 2),
    ]
    for method, values in acc.items():
        mean = statistics.fmean(values)
        gain = "—" if method == "base" else f"{100 * (mean - base):+.1f} points"
        lines.append(f"| `{method}` | " + " | ".join(f"{100 * v:.1f}" for v in values)
                     + f" | **{100 * mean:.1f}** | {gain} |")
    best = max(statistics.fmean(v) for m, v in acc.items() if m != "base")
    met = "met" if best - base >= GOAL else "not met"
    lines += ["", f"Goal: ≥ {100 * GOAL:.0f} points over the base on the mean: {met}.",
              "The base row is one evaluation (the untrained model is deterministic), repeated per seed.",
              "Losses and per-run details: the `.json` (the sweep's table.json).", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    parser.add_argument("--out", default="out/demo-gain", help="sweep tree (resumable)")
    args = parser.parse_args()
    common.apply_threads(args.threads)
    info = common.machine()
    start = time.perf_counter()
    spec = sweep.plan_sweep("smollm2-135m-demo", METHODS, args.seeds, output_dir=args.out)
    table = sweep.run_sweep(spec)
    wall = time.perf_counter() - start
    common.write(common.RESULTS / "demo_gain.md", report(table, info, wall))
    common.write(common.RESULTS / "demo_gain.json",
                 json.dumps({"machine": info, "wall_s": wall, "table": table}, indent=2) + "\n")


if __name__ == "__main__":
    main()
