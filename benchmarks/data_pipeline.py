"""Data pipeline: tokenize once (cached, num_proc) vs the in-memory path, and streaming memory vs data size.

    python benchmarks/data_pipeline.py    # ~10-15 min on 2 CPU cores; writes benchmarks/results/data_pipeline.md

Tokenization: 100k synthetic chat records (system/user/assistant, one or two turns; format chat, SmolLM2's
chat template, cutoff 512, 1000 held out for validation). Three arms, each in a fresh subprocess and
alternated round by round:
  old     today's path in the causal-LM job: load_records + normalize_records + build_datasets (one process,
          Python lists)
  first   nora_cli.data.cache.prepare_text_data on an empty cache, num_proc=2 (tokenizes into the arrow table)
  second  the same call again: a cache hit (memory-maps the table; the records are never read)
The timed part is the data step alone (the tokenizer is loaded and torch/transformers/datasets imported
before the clock starts, in every arm). After the clock stops the cached arms read every training row once,
so their peak RSS includes the whole table paged in. Peak RSS is wait4's for the arm's process: the largest
of the process and its `datasets` workers (each counted alone); the sum of the two peaks is recorded too.
Every arm hashes its features: the three must be identical.

Streaming: `data.streaming` over 10k and 1M synthetic text records (format text, template none, shuffle
buffer 10,000), one full pass each through `ExampleStream`; peak RSS of each process.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import statistics
import sys
import tempfile
import time
from array import array
from itertools import islice
from pathlib import Path

from common import REPO, RESULTS, machine, machine_md, run_measured, spread, write

N_CHAT, VAL, CUTOFF, SEED = 100_000, 1000, 512, 42
STREAM_SIZES = (10_000, 1_000_000)
WORDS = [f"{a}{b}" for a in ("ka", "lo", "mi", "ne", "su", "ta", "ri", "vo", "pe", "zu")
         for b in ("n", "sh", "rt", "lem", "ti", "go", "mar", "dex", "pol", "quin")]


def _sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."


def write_chat(path: Path, n: int) -> None:
    rng = random.Random(0)
    with path.open("w") as out:
        for _ in range(n):
            messages = [{"role": "system", "content": _sentence(rng, 5, 15)}] if rng.random() < 0.3 else []
            for _ in range(rng.choice((1, 1, 2))):
                messages += [{"role": "user", "content": _sentence(rng, 10, 50)},
                             {"role": "assistant", "content": _sentence(rng, 20, 80)}]
            out.write(json.dumps({"messages": messages}) + "\n")


def write_text(path: Path, n: int) -> None:
    rng = random.Random(1)
    with path.open("w") as out:
        for _ in range(n):
            out.write(json.dumps({"text": _sentence(rng, 8, 24)}) + "\n")


# --- one measured arm (a fresh process) ----------------------------------------------------------------


def child(arm: str, data: str, cache: str, result: str, num_proc: int) -> None:
    import datasets  # noqa: F401  (every arm pays the same imports before the clock starts)
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from nora_cli.config.data import DataConfig
    from nora_cli.data import build_datasets, load_records, normalize_records
    from nora_cli.data.cache import prepare_text_data
    from nora_cli.data.stream import prepare_stream
    from nora_cli.models import load_tokenizer, resolve_source

    tok = load_tokenizer(resolve_source("smollm2-135m"))  # the model cache is the caller's $NORA_CACHE
    os.environ["NORA_CACHE"] = cache  # the data cache: fresh for the first run of each round
    imports_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    digest = hashlib.sha256()
    start = time.perf_counter()
    if arm == "stream":
        dcfg = DataConfig(path=data, format="text", template="none", cutoff_len=CUTOFF, streaming=True,
                          shuffle_buffer=10_000)
        with open(data) as lines:
            n = sum(1 for _ in lines)
        train = None
        count = sum(1 for _ in islice(prepare_stream(dcfg, tok, seed=SEED).stream(0), n))  # one full pass
        lengths = [count]
    else:
        dcfg = DataConfig(path=data, format="chat", template="chat", cutoff_len=CUTOFF, val_set_size=VAL,
                          num_proc=num_proc)
        if arm == "old":
            records = load_records(dcfg.path, split=dcfg.split)
            normalize_records(records, dcfg.format)  # the job's check before the model loaded
            train, _ = build_datasets(records, tok, fmt=dcfg.format, template=dcfg.template,
                                      cutoff_len=dcfg.cutoff_len, train_on_inputs=dcfg.train_on_inputs,
                                      add_eos=dcfg.add_eos, val_set_size=dcfg.val_set_size, seed=SEED)
            lengths = [len(f["input_ids"]) for f in train]
        else:
            out = prepare_text_data(dcfg, tok, seed=SEED, load_examples=lambda: normalize_records(
                load_records(dcfg.path, split=dcfg.split), dcfg.format))
            assert out.hit is (arm == "second"), out.hit
            train, lengths = out.train, out.lengths
    seconds = time.perf_counter() - start
    for feature in train or ():  # every row read once: the cached arms page the whole table in
        digest.update(array("i", feature["input_ids"]).tobytes() + array("i", feature["labels"]).tobytes())
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    Path(result).write_text(json.dumps({
        "data_s": seconds, "examples": len(lengths) if train is not None else lengths[0],
        "tokens": sum(lengths) if train is not None else None, "features_sha256": digest.hexdigest(),
        "imports_mib": imports_mib, "self_peak_mib": own, "workers_peak_mib": workers,
    }))


def measure(arm: str, data: Path, cache: Path, work: Path, num_proc: int) -> dict:
    result = work / f"{arm}-{time.monotonic_ns()}.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": str(REPO), "HF_DATASETS_CACHE": str(work / "hf")}
    cmd = [sys.executable, __file__, "--child", arm, "--data", str(data), "--cache", str(cache), "--result", str(result),
           "--num-proc", str(num_proc)]
    proc = run_measured(cmd, env=env, log=work / f"{arm}.log")
    out = {**json.loads(result.read_text()), "wall_s": proc["wall_s"], "peak_rss_mib": proc["peak_rss_mb"]}
    print(f"  {arm:7s} data {out['data_s']:7.2f} s  peak {out['peak_rss_mib']:7.0f} MiB  ({data.name})", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="tokenization rounds (each: old, first, second)")
    parser.add_argument("--stream-rounds", type=int, default=2)
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--records", type=int, default=N_CHAT)
    parser.add_argument("--stream-sizes", type=int, nargs="+", default=list(STREAM_SIZES))
    parser.add_argument("--child")
    parser.add_argument("--data")
    parser.add_argument("--result")
    parser.add_argument("--cache")
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.data, args.cache, args.result, args.num_proc)

    # this process stays small (no torch before the children run): a child's peak RSS starts at its parent's
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {"old": [], "first": [], "second": []}
    streams: dict[int, list[dict]] = {n: [] for n in args.stream_sizes}
    with tempfile.TemporaryDirectory(prefix="nora-data-bench-") as tmp:
        work = Path(tmp)
        chat = work / "chat.jsonl"
        write_chat(chat, args.records)
        for rnd in range(args.rounds):
            cache = work / f"cache-{rnd}"
            order = ["old", "first", "second"] if rnd % 2 == 0 else ["first", "second", "old"]
            print(f"round {rnd + 1}/{args.rounds}", flush=True)
            for arm in order:
                runs[arm].append(measure(arm, chat, cache, work, args.num_proc))
        files = {}
        for n in args.stream_sizes:
            files[n] = work / f"text-{n}.jsonl"
            write_text(files[n], n)
        for rnd in range(args.stream_rounds):
            for n in args.stream_sizes if rnd % 2 == 0 else args.stream_sizes[::-1]:
                streams[n].append(measure("stream", files[n], work / "cache-stream", work, args.num_proc))
    report(args, runs, streams, load_before)


def report(args: argparse.Namespace, runs: dict[str, list[dict]], streams: dict[int, list[dict]],
           load_before: tuple[float, ...]) -> None:
    info = machine()
    info["loadavg"] = [round(x, 2) for x in load_before]
    hashes = {r["features_sha256"] for arm in runs.values() for r in arm}
    med = lambda arm, key: statistics.median(r[key] for r in runs[arm])  # noqa: E731
    speed_first = [o["data_s"] / f["data_s"] for o, f in zip(runs["old"], runs["first"], strict=True)]
    speed_second = [f["data_s"] / s["data_s"] for f, s in zip(runs["first"], runs["second"], strict=True)]
    rss_first = [f["peak_rss_mib"] / o["peak_rss_mib"] for o, f in zip(runs["old"], runs["first"], strict=True)]
    rss_second = [s["peak_rss_mib"] / o["peak_rss_mib"] for o, s in zip(runs["old"], runs["second"], strict=True)]
    small, big = min(streams), max(streams)
    stream_ratio = [b["peak_rss_mib"] / s["peak_rss_mib"] for s, b in zip(streams[small], streams[big], strict=True)]
    goals = {
        "first_speedup": (statistics.median(speed_first), 1.5, ">="),
        "second_s": (med("second", "data_s"), 2.0, "<="),
        "second_vs_first": (statistics.median(speed_second), 20.0, ">="),
        "rss_first_vs_old": (statistics.median(rss_first), 0.5, "<="),
        "rss_second_vs_old": (statistics.median(rss_second), 0.5, "<="),
        "stream_rss_big_vs_small": (statistics.median(stream_ratio), 1.2, "<="),
    }
    met = {k: (v <= g if op == "<=" else v >= g) for k, (v, g, op) in goals.items()}
    raw = {"machine": info, "records": args.records, "num_proc": args.num_proc, "cutoff_len": CUTOFF,
           "identical_features": len(hashes) == 1, "runs": runs, "streams": {str(k): v for k, v in streams.items()},
           "goals": {k: {"value": v, "goal": f"{op} {g}", "met": met[k]} for k, (v, g, op) in goals.items()}}
    write(RESULTS / "data_pipeline.json", json.dumps(raw, indent=1))
    yes = lambda k: "met" if met[k] else "**not met**"  # noqa: E731
    arm_rows = "\n".join(
        f"| {arm} | {spread([r['data_s'] for r in runs[arm]], '.2f')} | {spread([r['wall_s'] for r in runs[arm]], '.1f')} "
        f"| {spread([r['peak_rss_mib'] for r in runs[arm]], '.0f')} | {spread([r['self_peak_mib'] + r['workers_peak_mib'] for r in runs[arm]], '.0f')} "
        f"| {spread([r['imports_mib'] for r in runs[arm]], '.0f')} |" for arm in runs)
    stream_rows = "\n".join(
        f"| {n:,} | {spread([r['data_s'] for r in streams[n]], '.1f')} | {spread([r['peak_rss_mib'] for r in streams[n]], '.0f')} "
        f"| {spread([r['imports_mib'] for r in streams[n]], '.0f')} |" for n in streams)
    text = f"""# Data pipeline: tokenize once, and streaming

`python benchmarks/data_pipeline.py` (see its docstring for what each arm does).

{machine_md(info, os.getloadavg())}- **other agents were running on this 2-core machine during the run** (the load average above says how busy
  it was); speed figures are ratios of arms alternated round by round, medians (min–max) of {args.rounds} rounds

## Tokenization of {args.records:,} chat records (cutoff {CUTOFF}, num_proc={args.num_proc})

Features identical in every arm and round: **{len(hashes) == 1}** (sha256 of all input_ids/labels).

| arm | data step (s) | process wall (s) | peak RSS, wait4 (MiB) | self + workers peaks (MiB) | after imports + tokenizer (MiB) |
|---|---|---|---|---|---|
{arm_rows}

| goal | measured (median, min–max) | |
|---|---|---|
| first run (num_proc={args.num_proc}) ≥ 1.5× faster than the old path | {spread(speed_first, '.2f')}× | {yes('first_speedup')} |
| second run (cache hit) ≤ 2 s | {spread([r['data_s'] for r in runs['second']], '.2f')} s | {yes('second_s')} |
| second run ≥ 20× faster than the first | {spread(speed_second, '.0f')}× | {yes('second_vs_first')} |
| peak RSS ≤ 0.5× of the old path: first run | {spread(rss_first, '.2f')}× | {yes('rss_first_vs_old')} |
| peak RSS ≤ 0.5× of the old path: cache hit | {spread(rss_second, '.2f')}× | {yes('rss_second_vs_old')} |

## Streaming: one pass over synthetic text records (shuffle buffer 10,000)

| records | pass (s) | peak RSS (MiB) | after imports + tokenizer (MiB) |
|---|---|---|---|
{stream_rows}

Peak RSS, {big:,} vs {small:,} records: {spread(stream_ratio, '.3f')}× (goal ≤ 1.2×: {yes('stream_rss_big_vs_small')}).
"""
    write(RESULTS / "data_pipeline.md", text)


if __name__ == "__main__":
    main()
