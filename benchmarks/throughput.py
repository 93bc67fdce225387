"""Training throughput and memory: `nora train` (the real CLI) vs a plain PEFT + transformers Trainer.

    python benchmarks/throughput.py                  # fp32 and bf16, 5 alternating rounds (~1 h on 2 cores)
    python benchmarks/throughput.py --rounds 1 --steps 4 --warmup-steps 1 --precisions fp32   # smoke run

Both sides train SmolLM2-135M (LoRA r 32 / alpha 64 / dropout 0.05 on q,k,v,up,down; init `lora`) on the
shared ARC-Easy train set in file order, batch 8, cutoff 256, alpaca template, AdamW lr 3e-4 linear decay,
grad-norm clip 1.0, for `--warmup-steps` untimed + `--steps` timed optimizer steps, in fp32 and in bf16
autocast. The two commands alternate (A B, B A, …) and every ratio is taken pair by pair, so machine
drift cancels. Tokens/s counts the real (non-padding) tokens of the timed steps — the same tokens on both
sides, which the script checks. Peak RSS is each child process's own (wait4). It also measures the
machine's matmul peak per dtype and reports the achieved FLOP/s as a fraction of it; and with
`--ablate` times nora's training forward with each fast path switched off in turn (in-process).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common

MODEL = "smollm2-135m"
TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
R, ALPHA, DROPOUT, LR, BATCH, CUTOFF = 32, 64, 0.05, 3e-4, 8, 256


# --- what the runs see -----------------------------------------------------------------------------


def step_tokens(model_dir: str, data: Path, total_steps: int) -> list[dict[str, int]]:
    """Per optimizer step: real tokens, padded tokens, label tokens and Σ L² (nora's own tokenization)."""
    from nora_cli.data.sources import load_records
    from nora_cli.data.tokenize import build_datasets
    from nora_cli.models import ModelSource, load_tokenizer

    tokenizer = load_tokenizer(ModelSource(model_dir, MODEL))
    train, _ = build_datasets(load_records(str(data)), tokenizer, fmt="alpaca", template="alpaca",
                              cutoff_len=CUTOFF, train_on_inputs=True, add_eos=True, val_set_size=0, seed=0,
                              shuffle=False)
    steps = []
    for s in range(total_steps):
        lengths = [len(f["input_ids"]) for f in train[s * BATCH:(s + 1) * BATCH]]
        steps.append({"tokens": sum(lengths), "padded": max(lengths) * len(lengths),
                      "labels": sum(n - 1 for n in lengths), "sq": sum(n * n for n in lengths)})
    return steps


def flops_per_step(step: dict[str, int], cfg: Any) -> float:
    """Useful FLOPs of one LoRA step on real tokens: frozen matmuls forward + input-gradient (4·N per token;
    frozen weights need no weight gradient), LoRA factors 6·r·(in+out), attention 12·layers·d·L per token
    (QKᵀ and PV, forward + backward, the usual full-square count)."""
    d, inter, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    head_dim = getattr(cfg, "head_dim", None) or d // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * head_dim, cfg.num_key_value_heads * head_dim
    shapes = {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
              "gate_proj": (d, inter), "up_proj": (d, inter), "down_proj": (inter, d)}
    frozen = layers * sum(i * o for i, o in shapes.values()) + d * cfg.vocab_size  # + LM head
    lora = layers * sum(R * (shapes[t][0] + shapes[t][1]) for t in TARGETS)
    tokens = step["tokens"]
    return 4 * frozen * tokens + 6 * lora * tokens + 12 * layers * q * step["sq"]


def matmul_peak(dtype_name: str, seconds: float = 3.0, n: int = 2048) -> dict[str, float]:
    """Best GFLOP/s of an n×n matmul over `seconds`: torch.matmul, and for fp32 also oneDNN (the path nora's
    frozen layers take), since on this CPU the two differ by 2×."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    kernels = {"torch.matmul": lambda: a @ b}
    if dtype_name == "fp32":
        kernels["oneDNN"] = lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
    out = {}
    for name, fn in kernels.items():
        fn()
        best, end = float("inf"), time.perf_counter() + seconds
        while time.perf_counter() < end:
            best = min(best, common.timed(fn))
        out[name] = 2 * n**3 / best / 1e9
    return out


# --- the two commands ------------------------------------------------------------------------------


def nora_cmd(data: Path, precision: str, total_steps: int, out_dir: Path) -> list[str]:
    sets = {
        "method": "lora", "seed": 0, "model.source": MODEL,
        "adapter.r": R, "adapter.alpha": ALPHA, "adapter.dropout": DROPOUT,
        "adapter.target_modules": "[" + ",".join(TARGETS) + "]",
        "optimizer.name": "adamw", "optimizer.lr": LR, "optimizer.weight_decay": 0.0,
        "data.path": str(data), "data.format": "alpaca", "data.template": "alpaca", "data.cutoff_len": CUTOFF,
        "data.train_on_inputs": "true", "data.val_set_size": 0, "data.shuffle": "false",
        "train.max_steps": total_steps, "train.batch_size": BATCH, "train.micro_batch_size": BATCH,
        "train.warmup_steps": 0, "train.lr_schedule": "linear", "train.max_grad_norm": 1.0,
        "train.mixed_precision": "'no'" if precision == "fp32" else "bf16", "train.log_steps": 1,
        "train.save_steps": "null", "train.eval_steps": "null", "eval.tasks": "[]",
    }
    cmd = [sys.executable, "-m", "nora_cli", "train", "smollm2-135m-commonsense", "--overwrite",
           "--output-dir", str(out_dir)]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    return cmd


def trainer_cmd(model_dir: str, data: Path, precision: str, warmup: int, steps: int, result: Path,
                out_dir: Path) -> list[str]:
    return [sys.executable, str(Path(__file__).with_name("trainer_baseline.py")), "--model-dir", model_dir,
            "--data", str(data), "--precision", precision, "--batch-size", str(BATCH),
            "--cutoff-len", str(CUTOFF), "--warmup-steps", str(warmup), "--steps", str(steps), "--r", str(R),
            "--alpha", str(ALPHA), "--dropout", str(DROPOUT), "--targets", ",".join(TARGETS), "--lr", str(LR),
            "--output-dir", str(out_dir), "--result", str(result)]


def nora_seconds(out_dir: Path, steps: list[dict[str, int]], warmup: int) -> tuple[float, float]:
    """Σ step time of the timed steps, from metrics.jsonl (`step_s`)."""
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    if [r["step"] for r in rows] != list(range(1, len(steps) + 1)):
        raise RuntimeError(f"unexpected steps in {out_dir / 'metrics.jsonl'}")
    seconds = sum(rows[i]["step_s"] for i in range(warmup, len(steps)))
    return seconds, statistics.fmean(r["loss"] for r in rows)  # the mean over steps, as Trainer reports


def run_pair(args: argparse.Namespace, precision: str, model_dir: str, data: Path, steps: list[dict[str, int]],
             work: Path) -> dict[str, Any]:
    total = args.warmup_steps + args.steps
    timed_tokens = sum(s["tokens"] for s in steps[args.warmup_steps:])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

    def nora() -> dict[str, Any]:
        out_dir = work / f"nora-{precision}"
        proc = common.run_measured(nora_cmd(data, precision, total, out_dir), env, work / "nora.log")
        seconds, loss = nora_seconds(out_dir, steps, args.warmup_steps)
        return {**proc, "seconds": seconds, "tokens_per_s": timed_tokens / seconds, "final_loss": loss}

    def trainer() -> dict[str, Any]:
        result = work / f"trainer-{precision}.json"
        proc = common.run_measured(trainer_cmd(model_dir, data, precision, args.warmup_steps, args.steps, result,
                                               work / "trainer-out"), env, work / "trainer.log")
        measured = json.loads(result.read_text())
        if measured["tokens"] != timed_tokens:
            raise RuntimeError(f"data mismatch: trainer saw {measured['tokens']} tokens, nora {timed_tokens}")
        return {**proc, "seconds": measured["seconds"], "tokens_per_s": measured["tokens_per_s"],
                "final_loss": measured["final_loss"]}

    runs: dict[str, list[dict[str, Any]]] = {"nora": [], "trainer": []}
    arms = {name: (lambda name=name, fn=fn: runs[name].append(fn()) or 0.0)
            for name, fn in (("nora", nora), ("trainer", trainer))}
    common.alternate(arms, rounds=args.rounds, warmup=0)
    for name, rs in runs.items():
        for i, r in enumerate(rs):
            print(f"{precision} {name} run {i}: {r['tokens_per_s']:.1f} tok/s, peak {r['peak_rss_mb']:.0f} MB, "
                  f"loss {r['final_loss']:.4f}", flush=True)
    return runs


def grouping_padding(model_dir: str, data: Path) -> dict[str, int]:
    """Tokens fed to the model in one epoch of the shipped smollm2-135m-commonsense recipe (batch 16 in two
    micro-batches of 8, shuffled with seed 0): real tokens, and padded tokens without and with nora's
    length grouping of each step's examples. A count, not a timing: compute scales with padded tokens."""
    from nora_cli.data.sources import load_records
    from nora_cli.data.tokenize import build_datasets
    from nora_cli.loop.loop import Schedule, step_indices
    from nora_cli.models import ModelSource, load_tokenizer

    tokenizer = load_tokenizer(ModelSource(model_dir, MODEL))
    train, _ = build_datasets(load_records(str(data)), tokenizer, fmt="alpaca", template="alpaca",
                              cutoff_len=CUTOFF, train_on_inputs=True, add_eos=True, val_set_size=0, seed=0)
    lengths = [len(f["input_ids"]) for f in train]
    sched = Schedule(total_steps=len(train) // 16, steps_per_epoch=len(train) // 16, accum=2, micro=8, batch=16)
    out = {"steps": sched.total_steps, "real": 0, "padded_plain": 0, "padded_grouped": 0}
    for step in range(sched.total_steps):
        for key, group in (("padded_plain", None), ("padded_grouped", lengths)):
            idx = step_indices(step, sched, len(train), 0, True, group)
            for lo in range(0, 16, 8):
                out[key] += max(lengths[j] for j in idx[lo:lo + 8]) * 8
        out["real"] += sum(lengths[j] for j in step_indices(step, sched, len(train), 0, True))
    return out


# --- per-path ablation (in-process) --------------------------------------------------------------


def ablate(model_dir: str, data: Path, rounds: int) -> dict[str, dict[str, list[float]]]:
    """Seconds of one fwd+bwd on 8-example batches with all fast paths on, each one off in turn, and all off;
    the arms alternate and the batches rotate, so every arm sees the same batches."""
    import torch
    from peft import get_peft_model

    from nora_cli.config.schema import AdapterConfig
    from nora_cli.data.batch import collate
    from nora_cli.data.sources import load_records
    from nora_cli.data.tokenize import build_datasets
    from nora_cli.lora import lora_config
    from nora_cli.models import load_causal_lm
    from nora_cli.tasks.causal_lm.fast import FAST_PATHS, TrainForward

    model, tokenizer = load_causal_lm(model_dir)
    model.config.use_cache = False
    train, _ = build_datasets(load_records(str(data)), tokenizer, fmt="alpaca", template="alpaca",
                              cutoff_len=CUTOFF, train_on_inputs=True, add_eos=True, val_set_size=0, seed=0,
                              shuffle=False)
    adapter = AdapterConfig(r=R, alpha=ALPHA, dropout=DROPOUT, target_modules=TARGETS)
    peft_model = get_peft_model(model, lora_config(adapter, task_type="CAUSAL_LM"))
    batches = [collate(train[i * BATCH:(i + 1) * BATCH], tokenizer.pad_token_id) for i in range(4)]
    every = frozenset(FAST_PATHS)
    configs = {"all on": every, **{f"without {p}": every - {p} for p in FAST_PATHS}, "all off": frozenset()}
    forward = TrainForward(peft_model, paths=every)  # one hook on the head; .paths is switched per arm
    results: dict[str, dict[str, list[float]]] = {}
    for precision in ("fp32", "bf16"):
        calls = iter(range(10**9))

        def arm(paths: frozenset[str], precision: str = precision, calls: Any = calls) -> float:
            _set_dropout(peft_model, sparse="dropout" in paths)
            forward.paths = paths
            batch = batches[next(calls) // len(configs) % len(batches)]  # one batch per round, for every arm
            peft_model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                out = forward(peft_model, batch)
            out.loss_sum.backward()
            return time.perf_counter() - start

        arms = {name: (lambda paths=paths: arm(paths)) for name, paths in configs.items()}
        results[precision] = common.alternate(arms, rounds=rounds, warmup=1)
        for name, times in results[precision].items():
            print(f"ablation {precision} {name}: {common.spread(times)} s", flush=True)
    return results


def _set_dropout(model: Any, *, sparse: bool) -> None:
    from torch import nn

    from nora_cli.tasks.causal_lm.fast import SparseDropout

    for module in model.modules():
        drops = getattr(module, "lora_dropout", None)
        if isinstance(drops, nn.ModuleDict):
            for key, drop in drops.items():
                if sparse and type(drop) is nn.Dropout:
                    drops[key] = SparseDropout(drop.p)
                elif not sparse and type(drop) is SparseDropout:
                    drops[key] = nn.Dropout(drop.p)


# --- report ------------------------------------------------------------------------------------------

GOALS = {"fp32": 1.0, "bf16": 1.5}  # tokens/s ratio nora / Trainer


def report(info: dict[str, Any], args: argparse.Namespace, runs: dict[str, Any], peaks: dict[str, Any],
           flops: float, tokens: int, ablation: dict[str, Any] | None, load_after: list[float],
           padding: dict[str, int] | None = None) -> str:
    lines = ["# Training throughput and memory: `nora train` vs PEFT + transformers Trainer", "",
             common.machine_md(info, load_after),
             f"- command: `python benchmarks/throughput.py --rounds {args.rounds}{f' --threads {args.threads}' if args.threads else ''} --steps {args.steps} "
             f"--warmup-steps {args.warmup_steps}{' --ablate' if ablation else ''}`",
             f"- workload: SmolLM2-135M-Instruct, LoRA r {R} / alpha {ALPHA} / dropout {DROPOUT} on "
             f"{', '.join(TARGETS)}; ARC-Easy train in file order, batch {BATCH}, cutoff {CUTOFF}, alpaca "
             f"template, AdamW lr {LR}, linear decay, clip 1.0; {args.warmup_steps} untimed + {args.steps} "
             f"timed steps ({tokens} real tokens, the same on both sides); runs alternate nora/Trainer, "
             f"{args.rounds} of each per precision", "",
             "| precision | nora tokens/s | Trainer tokens/s | speed ratio (goal) | nora peak RSS MB | "
             "Trainer peak RSS MB | memory ratio (goal ≤ 1.0) |",
             "|---|---|---|---|---|---|---|"]
    for precision, r in runs.items():
        nora, trainer = r["nora"], r["trainer"]
        speed = common.pair_ratios([x["tokens_per_s"] for x in nora], [x["tokens_per_s"] for x in trainer])
        mem = common.pair_ratios([x["peak_rss_mb"] for x in nora], [x["peak_rss_mb"] for x in trainer])
        ok_speed = "met" if statistics.median(speed) >= GOALS[precision] else "NOT met"
        ok_mem = "met" if statistics.median(mem) <= 1.0 else "NOT met"
        lines.append(
            f"| {precision} | {common.spread([x['tokens_per_s'] for x in nora], '.0f')} | "
            f"{common.spread([x['tokens_per_s'] for x in trainer], '.0f')} | **{common.spread(speed, '.2f')}×** "
            f"(≥ {GOALS[precision]}×: {ok_speed}) | {common.spread([x['peak_rss_mb'] for x in nora], '.0f')} | "
            f"{common.spread([x['peak_rss_mb'] for x in trainer], '.0f')} | **{common.spread(mem, '.2f')}×** "
            f"({ok_mem}) |")
    lines += ["", "Cells are median (min–max); ratios are nora / Trainer per alternated pair. Training loss, mean over "
              "all steps (same data and init distribution, different random streams): " + "; ".join(
                  f"{p} nora {statistics.median([x['final_loss'] for x in r['nora']]):.3f} vs Trainer "
                  f"{statistics.median([x['final_loss'] for x in r['trainer']]):.3f}" for p, r in runs.items()), "",
              "Samples/s (the issue quotes the Trainer at 1.74 fp32 / 2.57 bf16 on an idle machine of this kind): "
              + "; ".join(f"{p} nora {statistics.median([args.steps * BATCH / x['seconds'] for x in r['nora']]):.2f}, "
                          f"Trainer {statistics.median([args.steps * BATCH / x['seconds'] for x in r['trainer']]):.2f}"
                          for p, r in runs.items()), "",
              "## Achieved FLOP/s vs this machine's matmul peak", "",
              f"Useful FLOPs of the timed steps: {flops / 1e12:.2f} TFLOP (frozen matmuls 4·N per real token — "
              "forward and input gradient, no weight gradient for frozen weights; LoRA 6·r·(in+out); attention "
              "12·layers·d·L per token; padding not counted). Peak: best n=2048 matmul over 3 s, measured in this "
              "run at the same thread count as the runs, before and after the runs (the higher is used).", "",
              "| precision | matmul peak GFLOP/s | nora GFLOP/s | nora fraction of peak (goal ≥ 50%) | "
              "Trainer GFLOP/s | Trainer fraction |", "|---|---|---|---|---|---|"]
    for precision, r in runs.items():
        peak = max(max(p.values()) for p in peaks[precision])
        kinds = ", ".join(f"{k} {max(p[k] for p in peaks[precision]):.0f}" for k in peaks[precision][0])
        nora = statistics.median([flops / x["seconds"] / 1e9 for x in r["nora"]])
        trainer = statistics.median([flops / x["seconds"] / 1e9 for x in r["trainer"]])
        ok = "met" if nora / peak >= 0.5 else "NOT met"
        lines.append(f"| {precision} | {peak:.0f} ({kinds}) | {nora:.0f} | {100 * nora / peak:.0f}% ({ok}) | "
                     f"{trainer:.0f} | {100 * trainer / peak:.0f}% |")
    if padding:
        lines += ["", "## Length-grouped micro-batches", "",
                  f"One epoch ({padding['steps']} steps) of the shipped `smollm2-135m-commonsense` recipe (batch 16 = "
                  f"2 micro-batches of 8, shuffled): {padding['real']} real tokens; the model computes on "
                  f"{padding['padded_plain']} padded tokens when each step's examples are split in data order and "
                  f"on {padding['padded_grouped']} when nora orders them by length first "
                  f"({100 * (1 - padding['padded_grouped'] / padding['padded_plain']):.1f}% fewer). The benchmark "
                  "above uses batch = micro-batch = 8, where grouping cannot apply."]
    if ablation:
        lines += ["", "## Each fast path on its own (in-process, one fwd+bwd of 8 examples)", "",
                  "Seconds per fwd+bwd, median (min–max) over alternated rounds; the ratio is each arm over "
                  "\"all on\" (> 1: turning that path off costs time). Paths: see nora_cli/tasks/causal_lm/fast.py.", "",
                  "| arm | fp32 s | fp32 ratio | bf16 s | bf16 ratio |", "|---|---|---|---|---|"]
        names = list(next(iter(ablation.values())))
        for name in names:
            cells = []
            for precision in ("fp32", "bf16"):
                times = ablation[precision][name]
                ratio = common.pair_ratios(times, ablation[precision]["all on"])
                cells += [common.spread(times, ".2f"), common.spread(ratio, ".2f")]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="alternated runs of each command per precision")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per run")
    parser.add_argument("--warmup-steps", type=int, default=3, help="untimed steps at the start of each run")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--ablate", action="store_true", help="also time each fast path off (in-process)")
    parser.add_argument("--ablate-rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=common.RESULTS / "throughput.md")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    args = parser.parse_args()
    common.apply_threads(args.threads)

    import torch

    from nora_cli.models import resolve_source

    info = common.machine()
    model_dir = resolve_source(MODEL).name_or_path
    data = common.shared_dir() / "data" / "commonsense" / "ARC-Easy" / "train.json"
    steps = step_tokens(model_dir, data, args.warmup_steps + args.steps)
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir)
    timed = steps[args.warmup_steps:]
    flops = sum(flops_per_step(s, cfg) for s in timed)
    tokens = sum(s["tokens"] for s in timed)
    precisions = args.precisions.split(",")
    peaks = {p: [matmul_peak(p)] for p in precisions}
    runs = {}
    with tempfile.TemporaryDirectory(prefix="nora-throughput-") as tmp:
        for precision in precisions:
            runs[precision] = run_pair(args, precision, model_dir, data, steps, Path(tmp))
    ablation = ablate(model_dir, data, args.ablate_rounds) if args.ablate else None
    padding = grouping_padding(model_dir, data)
    for p in precisions:
        peaks[p].append(matmul_peak(p))
    load_after = [round(x, 2) for x in os.getloadavg()]
    raw = {"machine": info, "load_after": load_after, "torch_threads": torch.get_num_threads(), "runs": runs,
           "matmul_peak_gflops": peaks, "timed_flops": flops, "timed_tokens": tokens, "ablation": ablation,
           "grouping_padding": padding}
    common.write(args.out.with_suffix(".json"), json.dumps(raw, indent=1) + "\n")
    common.write(args.out, report(info, args, runs, peaks, flops, tokens, ablation, load_after, padding))


if __name__ == "__main__":
    main()
