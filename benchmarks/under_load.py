"""Training speed when the CPU is shared: nora's tokens/s with 0, 1 and 2 competing busy processes.

Each cell is one fresh `nora train smollm2-135m-demo` process (demo recipe settings: batch 8, cutoff 128,
r 16; fp32 and bf16), run for a few optimizer steps; its speed is the real (non-padding) input tokens of the
timed steps over their summed step time, from metrics.jsonl (`tokens_per_s`, `step_s`). The competing
processes are pure-Python busy loops that this script starts before the run, bounds with a deadline, and
stops after it. The arms:

  old        torch's defaults, as nora ran before: one thread per core (`--threads <CPUs>` pins it, so no
             governor), OMP_WAIT_POLICY unset (libgomp spins 300,000 iterations at each barrier)
  new        nora's default now: threads = available CPUs, and the ThreadGovernor (nora_cli/threads.py) uses
             only the CPUs that other runnable work leaves free, checked between optimizer steps
  passive    one thread per core, pinned, with OMP_WAIT_POLICY=PASSIVE (threads sleep at barriers)
  spin       one thread per core, pinned, with GOMP_SPINCOUNT=10000 (a short spin, then sleep)
  1thread    one thread, pinned

torch's CPU wheel uses GNU OpenMP (libgomp; `torch.__config__.parallel_info()`), and oneDNN and MKL run on
the same runtime here, so libgomp's variables govern all three (KMP_BLOCKTIME is Intel OpenMP's and does
nothing here). The PEFT + transformers Trainer baseline (trainer_baseline.py, ARC-Easy, the settings of
throughput.py) runs as users run it (torch defaults) beside nora's new default under the same loads, so the
ratio to the anchor is known under load too.

    python benchmarks/under_load.py            # ~30 min on 2 cores; writes results/under_load.{md,json}
    python benchmarks/under_load.py --quick    # a smoke run: fp32, loads 0/1, arms old/passive, 3 steps
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import throughput  # noqa: E402

#: arm -> (environment, --threads: None = nora's default, "cpus" = one per available CPU)
ARMS: dict[str, tuple[dict[str, str], int | str | None]] = {
    "old": ({}, "cpus"),
    "new": ({}, None),
    "passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, "cpus"),
    "spin": ({"GOMP_SPINCOUNT": "10000"}, "cpus"),
    "1thread": ({}, 1),
}
BUSY = "import time\nend = time.time() + {seconds}\nwhile time.time() < end:\n    pass\n"


class Competitors:
    """`n` busy processes for at most `seconds`, stopped on exit."""

    def __init__(self, n: int, seconds: float) -> None:
        self.procs = [subprocess.Popen([sys.executable, "-c", BUSY.format(seconds=seconds)]) for _ in range(n)]
        time.sleep(0.5 if n else 0)

    def __enter__(self) -> Competitors:
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()


def arm_env(arm: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS",
                                                           "MKL_NUM_THREADS")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.update(ARMS[arm][0])
    return env


def arm_threads(arm: str) -> int | None:
    from nora_cli.threads import available_cpus

    threads = ARMS[arm][1]
    return available_cpus() if threads == "cpus" else threads  # type: ignore[return-value]


def nora_demo_cmd(precision: str, steps: int, out_dir: Path, threads: int | None) -> list[str]:
    cmd = [sys.executable, "-m", "nora_cli", "train", "smollm2-135m-demo", "--overwrite", "--output-dir",
           str(out_dir), "--set", f"train.max_steps={steps}", "--set", "train.warmup_steps=0",
           "--set", "eval.tasks=[]", "--set", "train.save_steps=null", "--set", "train.log_steps=1",
           "--set", f"train.mixed_precision={'no' if precision == 'fp32' else 'bf16'}"]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    return cmd


def speed(out_dir: Path, warmup: int) -> dict[str, Any]:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r][warmup:]
    tokens = sum(r["tokens_per_s"] * r["step_s"] for r in rows)
    seconds = sum(r["step_s"] for r in rows)
    nora_json = json.loads((out_dir / "nora.json").read_text())
    return {"tokens_per_s": tokens / seconds, "step_s": [r["step_s"] for r in rows],
            "threads": nora_json.get("threads"), "step_threads": [r.get("threads") for r in rows]}


def run_nora(arm: str, precision: str, load: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    out_dir = work / f"{arm}-{precision}-{load}"
    threads = arm_threads(arm)
    with Competitors(load, args.deadline):
        proc = common.run_measured(nora_demo_cmd(precision, args.warmup_steps + args.steps, out_dir, threads),
                                   arm_env(arm), work / "nora.log")
    return {**proc, **speed(out_dir, args.warmup_steps)}


def run_trainer(precision: str, load: int, args: argparse.Namespace, work: Path, model_dir: str,
                data: Path) -> dict[str, Any]:
    result = work / f"trainer-{precision}-{load}.json"
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = throughput.trainer_cmd(model_dir, data, precision, args.warmup_steps, args.steps, result,
                                 work / "trainer-out")
    with Competitors(load, args.deadline):
        proc = common.run_measured(cmd, env, work / "trainer.log")
    return {**proc, **json.loads(result.read_text())}


def run_nora_anchor(precision: str, load: int, args: argparse.Namespace, work: Path, data: Path) -> dict[str, Any]:
    """nora's new default on the Trainer's data and settings (throughput.py's command)."""
    out_dir = work / f"anchor-{precision}-{load}"
    cmd = throughput.nora_cmd(data, precision, args.warmup_steps + args.steps, out_dir)
    with Competitors(load, args.deadline):
        proc = common.run_measured(cmd, arm_env("new"), work / "nora.log")
    return {**proc, **speed(out_dir, args.warmup_steps)}


def report(info: dict[str, Any], args: argparse.Namespace, cells: dict[str, Any], anchor: dict[str, Any],
           load_after: list[float]) -> str:
    lines = ["# Training speed under load (`python benchmarks/under_load.py`)", "", common.machine_md(info, load_after),
             f"nora train smollm2-135m-demo, {args.warmup_steps} untimed + {args.steps} timed steps per run, "
             f"{args.rounds} run(s) per cell (median shown; min–max in brackets when more than one); "
             "tokens/s = real input tokens / step time. `× idle` = this load's median over the same arm's idle "
             "median (fair sharing of 2 cores with one busy process would give 0.5×).", ""]
    for precision, arms in cells.items():
        lines += [f"## {precision}", "", "| arm | " + " | ".join(
            f"{n} busy: tok/s (× idle) [threads in timed steps]" for n in args.loads) + " |",
                  "|---|" + "---|" * len(args.loads)]
        for arm, loads in arms.items():
            idle = statistics.median(r["tokens_per_s"] for r in loads[args.loads[0]])
            row = f"| {arm} |"
            for n in args.loads:
                speeds = [r["tokens_per_s"] for r in loads[n]]
                used = sorted({k for r in loads[n] for k in r.get("step_threads", []) if k is not None})
                row += (f" {common.spread(speeds, '.0f')} ({statistics.median(speeds) / idle:.2f}×) "
                        f"[{'/'.join(map(str, used))} thr] |")
            lines.append(row)
        lines.append("")
    lines += goals(args, cells)
    if anchor:
        lines += ["## vs the PEFT + Trainer baseline under the same load (throughput.py settings: ARC-Easy, cutoff "
                  "256, r 32)", "", "| precision | busy | nora tok/s (new default) | Trainer tok/s | nora / Trainer |",
                  "|---|---|---|---|---|"]
        for precision, loads in anchor.items():
            for n, pair in loads.items():
                a = statistics.median(r["tokens_per_s"] for r in pair["nora"])
                b = statistics.median(r["tokens_per_s"] for r in pair["trainer"])
                lines.append(f"| {precision} | {n} | {a:.0f} | {b:.0f} | {a / b:.2f}× |")
        lines.append("")
    return "\n".join(lines)


def goals(args: argparse.Namespace, cells: dict[str, Any]) -> list[str]:
    """The issue's two goals for the new default (passive) against the old one, per precision."""
    out = ["## Goals (new default = `new`)", ""]
    for precision, arms in cells.items():
        if not {"old", "new"} <= set(arms) or not {0, 1} <= set(args.loads):
            continue
        med = {arm: {n: statistics.median(r["tokens_per_s"] for r in arms[arm][n]) for n in (0, 1)}
               for arm in ("old", "new")}
        loaded = med["new"][1] / med["new"][0]
        idle = med["new"][0] / med["old"][0]
        out.append(f"- {precision}: with 1 busy process, the new default keeps **{loaded:.2f}×** of its idle speed "
                   f"(goal ≥ 0.4×: {'met' if loaded >= 0.4 else 'NOT met'}; the old default kept "
                   f"{med['old'][1] / med['old'][0]:.2f}×). Idle, new vs old default: **{idle:.2f}×** (goal ≥ 0.97×: "
                   f"{'met' if idle >= 0.97 else 'NOT met'}).")
    return [*out, ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps per run")
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1, help="runs per cell")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--loads", default="0,1,2")
    parser.add_argument("--arms", default="old,new,passive,1thread")
    parser.add_argument("--bf16-arms", default="old,new", help="arms for bf16 (slower on CPUs without bf16)")
    parser.add_argument("--anchor-loads", default="0,1", help="loads for the Trainer comparison ('' to skip)")
    parser.add_argument("--deadline", type=float, default=900, help="seconds a busy process lives at most")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=common.RESULTS / "under_load.md")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup_steps, args.precisions, args.loads = 2, 1, "fp32", "0,1"
        args.arms, args.anchor_loads = "old,new", ""
    args.loads = [int(x) for x in args.loads.split(",")]
    info = common.machine()
    from nora_cli.models import resolve_source

    model_dir = resolve_source(throughput.MODEL).name_or_path
    data = common.shared_dir() / "data" / "commonsense" / "ARC-Easy" / "train.json"
    cells: dict[str, Any] = {}
    anchor: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="nora-underload-") as tmp:
        work = Path(tmp)
        for precision in args.precisions.split(","):
            arms = (args.arms if precision == "fp32" else args.bf16_arms).split(",")
            cells[precision] = {arm: {n: [] for n in args.loads} for arm in arms}
            for rnd in range(args.rounds):
                order = arms if rnd % 2 == 0 else arms[::-1]
                for n in args.loads:
                    for arm in order:
                        r = run_nora(arm, precision, n, args, work)
                        cells[precision][arm][n].append(r)
                        print(f"{precision} {arm} busy={n}: {r['tokens_per_s']:.1f} tok/s "
                              f"(threads {r['threads']})", flush=True)
            if args.anchor_loads:
                anchor[precision] = {}
                for n in [int(x) for x in args.anchor_loads.split(",")]:
                    pair = {"nora": [run_nora_anchor(precision, n, args, work, data)],
                            "trainer": [run_trainer(precision, n, args, work, model_dir, data)]}
                    anchor[precision][n] = pair
                    print(f"{precision} anchor busy={n}: nora {pair['nora'][0]['tokens_per_s']:.1f}, "
                          f"trainer {pair['trainer'][0]['tokens_per_s']:.1f} tok/s", flush=True)
    load_after = [round(x, 2) for x in os.getloadavg()]
    raw = {"machine": info, "load_after": load_after, "args": {k: v for k, v in vars(args).items() if k != "out"},
           "cells": cells, "anchor": anchor}
    common.write(args.out.with_suffix(".json"), json.dumps(raw, indent=1, default=str) + "\n")
    common.write(args.out, report(info, args, cells, anchor, load_after))


if __name__ == "__main__":
    main()
