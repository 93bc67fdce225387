"""`nora train RECIPE`: validate flags, run (or launch N processes of) the training loop."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

from nora_cli.errors import NoraError


def train(
    recipe: Annotated[str, typer.Argument(help="Recipe YAML path or shipped recipe name (see `nora recipes list`).")],
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a recipe key: --set train.max_steps=10 (repeatable).")
    ] = None,
    output_dir: Annotated[Path | None, typer.Option("--output-dir", "-o", help="Overrides output.dir.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the latest checkpoint in the output dir.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing run in the output dir.")] = False,
    num_processes: Annotated[
        int | None, typer.Option("--num-processes", help="Launch N data-parallel processes (GPUs, or CPU gloo).")
    ] = None,
) -> None:
    from nora_cli.recipe import load_recipe

    overrides = list(set_ or [])
    rec = load_recipe(recipe, overrides)
    if resume and overwrite:
        raise NoraError("--resume and --overwrite exclude each other")
    out = output_dir or Path(rec.output.dir)
    nproc = num_processes if num_processes is not None else rec.train.num_processes
    if nproc < 1:
        raise NoraError(f"--num-processes must be ≥ 1, got {nproc}")
    if nproc > 1 and "RANK" not in os.environ and "LOCAL_RANK" not in os.environ:
        raise SystemExit(_launch(nproc, recipe, overrides, out, resume, overwrite))

    from nora_cli.train import train_recipe
    from nora_cli.train.loop import TrainingStopped

    try:
        summary = train_recipe(rec, out, resume=resume, overwrite=overwrite)
    except TrainingStopped as stop:
        print(str(stop), file=sys.stderr)
        raise SystemExit(stop.exit_code) from None
    if summary.get("num_processes", 1) == 1 or os.environ.get("RANK", "0") == "0":
        loss = summary.get("final_loss")
        print(f"done: {summary['steps']} steps, final loss {loss:.4f} → {out}" if loss is not None else f"done → {out}")


def _launch(nproc: int, recipe: str, overrides: list[str], out: Path, resume: bool, overwrite: bool) -> int:
    """Re-run ourselves under `accelerate launch` with N processes.

    On CPU, accelerate's `--cpu` starts only one process and plain `--multi_gpu` starts
    unsynchronized ones; `ACCELERATE_USE_CPU=1` + `--multi_gpu` gives real gloo DDP.
    """
    import torch

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(nproc), "--multi_gpu",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", os.environ.get("NORA_MAIN_PORT", "29517"), "-m", "nora_cli"]
    if os.environ.get("NORA_DEBUG") == "1":
        cmd.append("--debug")
    cmd += ["train", recipe, "--output-dir", str(out), "--num-processes", str(nproc)]
    for item in overrides:
        cmd += ["--set", item]
    if resume:
        cmd.append("--resume")
    if overwrite:
        cmd.append("--overwrite")
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "1"
    return subprocess.call(cmd, env=env)
