"""Init cost: nora's Nyström init vs PEFT's PiSSA (full SVD), PiSSA niter 4, OLoRA and default LoRA init.

    python benchmarks/init_cost.py                     # SmolLM2 + 7B-shaped set, 5 alternating rounds
    python benchmarks/init_cost.py --rounds 1 --skip-7b  # smoke run

SmolLM2-135M: all 7 projection types of all 30 layers (210 LoRA layers, r 32, alpha 64), the real weights.
nora's side is `nora_cli.lora.initialize(model, "nystrom")`; PEFT's sides call PEFT's own per-layer init
(`pissa_init`, `olora_init`, `reset_lora_parameters`) over the same layers, i.e. what
`get_peft_model(…, LoraConfig(init_lora_weights=…))` runs. Base weights are restored between runs
(untimed): PiSSA and OLoRA rewrite them.

7B-shaped set: Llama-7B's 32 × {q,k,v,o 4096×4096, gate/up 11008×4096, down 4096×11008} in bf16 storage
(13 GB), generated in memory and streamed: one layer is generated, wrapped with LoRA r 32, initialized and
freed at a time (generation untimed). Full-SVD PiSSA takes minutes per layer here, so every method is timed
on one layer of each of the three shapes and extrapolated to the 224 layers (×128, ×64, ×32); Nyström and
LoRA are also timed on the whole streamed set once as a check of the extrapolation.

Every arm runs once per round, the order reversed on odd rounds; ratios are per round, then the median.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import common

R, ALPHA = 32, 64
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# (name, out, in, count in Llama-7B)
SHAPES_7B = [("q_proj", 4096, 4096, 128), ("gate_proj", 11008, 4096, 64), ("down_proj", 4096, 11008, 32)]
ARMS = ["nystrom", "lora", "olora", "pissa_niter_4", "pissa"]
LABELS = {"nystrom": "nora Nyström", "lora": "PEFT default LoRA", "olora": "PEFT OLoRA",
          "pissa_niter_4": "PEFT PiSSA niter 4", "pissa": "PEFT PiSSA (full SVD)"}


def peft_init(layers: list[tuple[str, Any]], arm: str) -> None:
    """PEFT's own per-layer init, as `get_peft_model` runs it for `init_lora_weights=arm`."""
    for _, layer in layers:
        if arm == "lora":
            layer.reset_lora_parameters("default", True)
        elif arm == "olora":
            layer.olora_init("default")
        else:
            layer.pissa_init("default", arm)


def init_fn(model: Any, layers: list[tuple[str, Any]], arm: str) -> Callable[[], None]:
    import torch

    from nora_cli.lora import initialize

    def run() -> None:
        with torch.no_grad():
            if arm == "nystrom":
                initialize(model, "nystrom", seed=0)
            else:
                peft_init(layers, arm)

    return run


# --- SmolLM2 -----------------------------------------------------------------------------------------


def smollm2(rounds: int, arms: list[str]) -> dict[str, list[float]]:
    import torch
    from peft import get_peft_model

    from nora_cli.config.schema import AdapterConfig
    from nora_cli.lora import lora_config, lora_layers
    from nora_cli.models import load_causal_lm

    base, _ = load_causal_lm("smollm2-135m")
    model = get_peft_model(base, lora_config(AdapterConfig(r=R, alpha=ALPHA, target_modules=TARGETS)))
    layers = lora_layers(model)
    assert len(layers) == 210, len(layers)
    originals = [layer.get_base_layer().weight.detach().clone() for _, layer in layers]

    def restore() -> None:
        with torch.no_grad():
            for (_, layer), weight in zip(layers, originals, strict=True):
                layer.get_base_layer().weight.copy_(weight)

    def timed(arm: str) -> Callable[[], float]:
        fn = init_fn(model, layers, arm)

        def run() -> float:
            restore()
            seconds = common.timed(fn)
            print(f"smollm2 {arm}: {seconds:.3f} s", flush=True)
            return seconds

        return run

    return common.alternate({arm: timed(arm) for arm in arms}, rounds=rounds, warmup=1)


# --- 7B-shaped, streamed -----------------------------------------------------------------------------


def _layer(name: str, out_f: int, in_f: int, seed: int) -> tuple[Any, list[tuple[str, Any]]]:
    """model.layers.0.<section>.<name>: one bf16 Linear (random, scaled like a trained layer) in PEFT's LoRA
    layer, inside a module tree that names it as Llama does (the name seeds nora's sketch)."""
    import torch
    from peft import get_peft_model
    from torch import nn

    from nora_cli.config.schema import AdapterConfig
    from nora_cli.lora import lora_config, lora_layers

    gen = torch.Generator().manual_seed(seed)
    base = nn.Linear(in_f, out_f, bias=False, dtype=torch.bfloat16)
    with torch.no_grad():
        base.weight.copy_(torch.randn(out_f, in_f, generator=gen).mul_(in_f**-0.5))
    section = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
    root = node = nn.Module()
    for part in ["model", "layers", "0", section]:
        node.add_module(part, nn.Module())
        node = getattr(node, part)
    node.add_module(name, base)
    model = get_peft_model(root, lora_config(AdapterConfig(r=R, alpha=ALPHA, target_modules=[name])))
    return model, lora_layers(model)


def seven_b_subset(rounds: int, arms: list[str]) -> dict[str, dict[str, list[float]]]:
    """Seconds per layer of each 7B shape, per arm and round."""
    out: dict[str, dict[str, list[float]]] = {name: {arm: [] for arm in arms} for name, *_ in SHAPES_7B}

    def timed(arm: str) -> Callable[[], float]:
        def run() -> float:
            total = 0.0
            for i, (name, out_f, in_f, count) in enumerate(SHAPES_7B):
                container, layers = _layer(name, out_f, in_f, seed=i)
                seconds = common.timed(init_fn(container, layers, arm))
                out[name][arm].append(seconds)
                total += count * seconds
                del container, layers
            print(f"7b-subset {arm}: {', '.join(f'{out[n][arm][-1]:.3f}' for n, *_ in SHAPES_7B)} s per layer "
                  f"→ {total:.1f} s extrapolated", flush=True)
            return total

        return run

    common.alternate({arm: timed(arm) for arm in arms}, rounds=rounds, warmup=0)
    return out


def seven_b_full(arm: str) -> float:
    """Σ init seconds over all 224 streamed layers (generation untimed)."""
    total = 0.0
    for block in range(32):
        for name in TARGETS:
            out_f, in_f = {"gate_proj": (11008, 4096), "up_proj": (11008, 4096), "down_proj": (4096, 11008)}.get(
                name, (4096, 4096))
            container, layers = _layer(name, out_f, in_f, seed=block)
            total += common.timed(init_fn(container, layers, arm))
            del container, layers
    print(f"7b-full {arm}: {total:.2f} s", flush=True)
    return total


# --- report ------------------------------------------------------------------------------------------

GOALS = {"smollm2": {"pissa": 100, "pissa_niter_4": 10}, "7b": {"pissa": 1000, "pissa_niter_4": 10}}


def ratio_rows(times: dict[str, list[float]], goals: dict[str, int]) -> list[str]:
    rows = []
    for arm, values in times.items():
        ratio = common.pair_ratios(values, times["nystrom"])
        goal = goals.get(arm)
        verdict = "" if goal is None else f" (goal ≥ {goal}×: {'met' if statistics.median(ratio) >= goal else 'NOT met'})"
        rows.append(f"| {LABELS[arm]} | {common.spread(values, '.3g')} | "
                    f"{'—' if arm == 'nystrom' else common.spread(ratio, '.3g') + '×' + verdict} |")
    return rows


def report(info: dict[str, Any], args: argparse.Namespace, small: dict[str, list[float]] | None,
           subset: dict[str, dict[str, list[float]]] | None, full: dict[str, float], load_after: list[float]) -> str:
    lines = ["# Init cost: Nyström (nora) vs PEFT's PiSSA, PiSSA niter 4, OLoRA, LoRA", "",
             common.machine_md(info, load_after),
             f"- command: `python benchmarks/init_cost.py --rounds {args.rounds}{f' --threads {args.threads}' if args.threads else ''}`; every arm once per round, "
             "order reversed on odd rounds; ratios are arm / Nyström within a round, then the median "
             "(min–max); times are wall seconds for the whole set of layers", ""]
    if small is not None:
        lines += ["## SmolLM2-135M (210 LoRA layers: q,k,v,o,gate,up,down × 30, r 32, fp32 weights)", "",
                  "| init | seconds | slower than Nyström |", "|---|---|---|", *ratio_rows(small, GOALS["smollm2"]), ""]
    if subset is not None:
        extrapolated = {arm: [sum(count * subset[name][arm][i] for name, _, _, count in SHAPES_7B)
                              for i in range(len(subset[SHAPES_7B[0][0]][arm]))] for arm in subset[SHAPES_7B[0][0]]}
        lines += ["## 7B-shaped set (Llama-7B: 224 layers, bf16 storage, r 32) — EXTRAPOLATED", "",
                  "Each arm is timed on one layer of each shape (4096×4096, 11008×4096, 4096×11008; generated, "
                  "wrapped, initialized, freed) and the sum is scaled to the 224 layers (×128, ×64, ×32).", "",
                  "| init | seconds (224 layers, extrapolated) | slower than Nyström |", "|---|---|---|",
                  *ratio_rows(extrapolated, GOALS["7b"]), "",
                  "Per layer (median seconds):", "", "| init | " + " | ".join(
                      f"{n} {o}×{i}" for n, o, i, _ in SHAPES_7B) + " |", "|---" * (len(SHAPES_7B) + 1) + "|"]
        for arm in extrapolated:
            lines.append(f"| {LABELS[arm]} | " + " | ".join(
                f"{statistics.median(subset[n][arm]):.4g}" for n, *_ in SHAPES_7B) + " |")
        lines.append("")
        if full:
            lines += ["Check of the extrapolation, whole streamed set (224 layers, one pass): " + "; ".join(
                f"{LABELS[arm]} {seconds:.2f} s measured vs {statistics.median(extrapolated[arm]):.2f} s "
                f"extrapolated" for arm, seconds in full.items()), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--skip-smollm2", action="store_true")
    parser.add_argument("--skip-7b", action="store_true")
    parser.add_argument("--full-7b", default="nystrom,lora", help="arms also timed on the whole streamed set")
    parser.add_argument("--out", type=Path, default=common.RESULTS / "init_cost.md")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    args = parser.parse_args()
    common.apply_threads(args.threads)
    arms = args.arms.split(",")
    if "nystrom" not in arms:
        raise SystemExit("--arms must include nystrom (every ratio is against it)")
    info = common.machine()
    small = None if args.skip_smollm2 else smollm2(args.rounds, arms)
    subset = None if args.skip_7b else seven_b_subset(args.rounds, arms)
    full = {} if args.skip_7b else {arm: seven_b_full(arm) for arm in args.full_7b.split(",") if arm}
    load_after = [round(x, 2) for x in os.getloadavg()]
    raw = {"machine": info, "load_after": load_after, "smollm2": small, "7b_subset": subset, "7b_full": full,
           "shapes_7b": SHAPES_7B}
    common.write(args.out.with_suffix(".json"), json.dumps(raw, indent=1) + "\n")
    common.write(args.out, report(info, args, small, subset, full, load_after))


if __name__ == "__main__":
    main()
