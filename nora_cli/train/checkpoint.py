"""Atomic checkpoints: written into a temp dir, fsynced, then renamed into place.

A crash mid-write leaves only a `.tmp-*` directory, which `latest()` never picks up.
A checkpoint holds just the trainable (LoRA) parameters plus optimizer, scheduler,
preconditioner, RNG and step; the frozen base is rebuilt deterministically on resume.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

CKPT_DIR = "checkpoints"


def _fsync_tree(path: Path) -> None:
    for f in sorted(path.rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_dir(target: Path, write: Callable[[Path], None]) -> Path:
    """Let `write` fill a fresh temp dir, then swap it in for `target`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".tmp-{target.name}-"))
    try:
        write(tmp)
        _fsync_tree(tmp)
        if target.exists():
            old = target.with_name(f".old-{target.name}-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def final_artifacts(out_dir: Path, write: Callable[[Path], None]) -> dict[str, Path]:
    """Write the final adapter into a temp dir, then move each file into `out_dir` atomically."""
    tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=".tmp-final-"))
    written: dict[str, Path] = {}
    try:
        write(tmp)
        _fsync_tree(tmp)
        for entry in sorted(tmp.iterdir()):
            dest = out_dir / entry.name
            if dest.is_dir() and entry.is_dir():
                shutil.rmtree(dest)
            os.replace(entry, dest)
            written[entry.name] = dest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return written


def _step_dirs(out_dir: Path) -> list[Path]:
    root = out_dir / CKPT_DIR
    if not root.is_dir():
        return []
    dirs = [d for d in root.iterdir() if d.is_dir() and d.name.startswith("step-") and (d / "state.json").is_file()]
    return sorted(dirs, key=lambda d: int(d.name.split("-")[1]))


def latest(out_dir: Path) -> Path | None:
    dirs = _step_dirs(out_dir)
    return dirs[-1] if dirs else None


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


def save(
    out_dir: Path, step: int, model: torch.nn.Module, optimizer: Any, scheduler: Any, precond: Any,
    accelerator: Any, *, best_val: float, keep_last: int | None,
) -> Path:
    """Collective: every rank calls it (each stores its own RNG state); the main rank writes the rest."""
    from safetensors.torch import save_file

    root = out_dir / CKPT_DIR
    target = root / f"step-{step:06d}"
    staging = root / f".tmp-step-{step:06d}"
    main = accelerator.is_main_process
    if main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(_rng_state(), staging / f"rng-{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if main:
        save_file(trainable_state(model), str(staging / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), staging / "optimizer.pt")
        torch.save(scheduler.state_dict(), staging / "scheduler.pt")
        if precond is not None:
            torch.save(precond.state_dict(), staging / "preconditioner.pt")
        if accelerator.scaler is not None:
            torch.save(accelerator.scaler.state_dict(), staging / "scaler.pt")
        state = {"step": step, "best_val": best_val if best_val != float("inf") else None}
        (staging / "state.json").write_text(json.dumps(state))  # written last: marks completeness
        _fsync_tree(staging)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
        if keep_last:
            for old in _step_dirs(out_dir)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return target


def load(path: Path, model: torch.nn.Module, optimizer: Any, scheduler: Any, precond: Any, accelerator: Any) -> dict:
    from safetensors.torch import load_file

    params = dict(model.named_parameters())
    saved = load_file(str(path / "trainable.safetensors"))
    missing = [n for n, p in params.items() if p.requires_grad and n not in saved]
    if missing:
        from nora_cli.errors import NoraError

        raise NoraError(f"checkpoint {path} does not match the model (missing {missing[0]}); was the recipe changed?")
    with torch.no_grad():
        for name, value in saved.items():
            params[name].copy_(value)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    if precond is not None and (path / "preconditioner.pt").is_file():
        precond.load_state_dict(torch.load(path / "preconditioner.pt", weights_only=False))
    if accelerator.scaler is not None and (path / "scaler.pt").is_file():
        accelerator.scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=False))
    rng = path / f"rng-{accelerator.process_index}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=False))
    state = json.loads((path / "state.json").read_text())
    if state.get("best_val") is None:
        state["best_val"] = float("inf")
    return state
