"""`nora train RECIPE`: validate flags, run (or launch N processes of) the training loop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

from nora_cli.errors import NoraError
from nora_cli.options import AllowPickleOption, RecipeArg, SetOption


def train(
    recipe: RecipeArg,
    set_: SetOption = None,
    output_dir: Annotated[Path | None, typer.Option("--output-dir", "-o", help="Overrides output.dir.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the latest checkpoint in the output dir.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing run in the output dir.")] = False,
    num_processes: Annotated[
        str | None,
        typer.Option("--num-processes", help="Launch N data-parallel processes (GPUs, or CPU gloo); "
                     "'all': one per visible GPU."),
    ] = None,
    allow_pickle: AllowPickleOption = False,
    threads: Annotated[int | None, typer.Option("--threads", min=1, help="CPU threads per process (sets "
                                                "train.threads; default: the CPUs other work leaves free).")] = None,
) -> None:
    from nora_cli.config.load import load_recipe
    from nora_cli.run_dir import output_lock
    from nora_cli.train import preflight

    overrides = list(set_ or [])
    if allow_pickle:
        overrides.append("model.allow_pickle=true")
    if threads is not None:
        overrides.append(f"train.threads={threads}")
    rec = load_recipe(recipe, overrides)
    out = output_dir or Path(rec.output.dir)
    nproc = _process_count(num_processes) if num_processes is not None else rec.train.num_processes
    if nproc > 1 and "RANK" not in os.environ and "LOCAL_RANK" not in os.environ:
        preflight(rec, out, resume=resume, overwrite=overwrite)  # once, before spawning: one error, exit 2
        with output_lock(out):  # held by the launcher for all its ranks
            raise SystemExit(_launch(nproc, recipe, overrides, out, resume, overwrite))

    from nora_cli.loop.loop import Aborted, TrainingStopped
    from nora_cli.train import train_recipe

    try:
        summary = train_recipe(rec, out, resume=resume, overwrite=overwrite)
    except (TrainingStopped, Aborted) as stop:
        if os.environ.get("RANK", "0") == "0":  # every rank stops; one says so
            print(str(stop), file=sys.stderr)
        raise SystemExit(stop.exit_code) from None
    if summary.get("num_processes", 1) == 1 or os.environ.get("RANK", "0") == "0":
        loss = summary.get("final_loss")
        print(f"done: {summary['steps']} steps, final loss {loss:.4f} → {out}" if loss is not None else f"done → {out}")


def _process_count(value: str) -> int:
    if value == "all":
        import torch

        if not torch.cuda.is_available():
            raise NoraError("--num-processes all needs CUDA GPUs (none visible); pass a number instead")
        return torch.cuda.device_count()
    try:
        count = int(value)
    except ValueError:
        raise NoraError(f"--num-processes expects a number or 'all', got {value!r}") from None
    if count < 1:
        raise NoraError(f"--num-processes must be ≥ 1, got {count}")
    return count


def _launch(nproc: int, recipe: str, overrides: list[str], out: Path, resume: bool, overwrite: bool) -> int:
    """Re-run ourselves under `accelerate launch` with N processes.

    On CPU, accelerate's `--cpu` starts only one process and plain `--multi_gpu` starts
    unsynchronized ones; `ACCELERATE_USE_CPU=1` + `--multi_gpu` gives real gloo DDP.
    accelerate reads its config only from $HF_HOME/accelerate/; the Docker image mounts the HF cache
    there, so it points $NORA_ACCELERATE_CONFIG at its own file instead.
    """
    import torch

    from nora_cli.run_dir import LOCK_ENV
    from nora_cli.safety import Terminated

    config = os.environ.get("NORA_ACCELERATE_CONFIG")
    if config and not Path(config).is_file():
        raise NoraError(f"NORA_ACCELERATE_CONFIG={config} does not exist")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *(["--config_file", config] if config else []),
           "--num_processes", str(nproc), "--multi_gpu",
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
    env = {**os.environ, LOCK_ENV: str(out.resolve())}
    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "1"
    launcher = subprocess.Popen(cmd, env=env)
    try:
        return launcher.wait()
    except Terminated:
        # SIGTERM is often sent to this process alone (`docker stop`, `kill PID`): pass it on and let the ranks
        # checkpoint and exit before this process, and with it the output dir's lock, goes away. (Ctrl-C
        # already reaches the whole process group.)
        launcher.send_signal(signal.SIGTERM)
        launcher.wait()
        raise
