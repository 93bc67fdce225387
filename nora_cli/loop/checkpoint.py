"""Atomic checkpoints: written into a temp dir, fsynced, then renamed into place.

A crash mid-write leaves only a `.tmp-*` directory, which `latest()` never picks up (and
`clean_stale` removes on resume). A checkpoint holds just the trainable (LoRA) parameters plus
optimizer, scheduler, preconditioner, RNG and step; the frozen base is rebuilt deterministically
on resume. Everything loads with `torch.load(weights_only=True)`: a checkpoint cannot run code.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from nora_cli.errors import NoraError
from nora_cli.safety import atomic_write, fsync_tree, publish_modes, swap_in

CKPT_DIR = "checkpoints"


def final_artifacts(out_dir: Path, write: Callable[[Path], None]) -> dict[str, Path]:
    """Write the final adapter into a temp dir, then move each file into `out_dir` atomically."""
    tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=".tmp-final-"))
    written: dict[str, Path] = {}
    try:
        write(tmp)
        publish_modes(tmp)
        fsync_tree(tmp)
        # adapter_config.json goes last: until it is in place, a half-moved adapter is not loadable as one
        for entry in sorted(tmp.iterdir(), key=lambda e: (e.name == "adapter_config.json", e.name)):
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


#: files every checkpoint has (state.json last); optional ones are checked when present
_REQUIRED = ("state.json", "trainable.safetensors", "optimizer.pt", "scheduler.pt")
_OPTIONAL = ("preconditioner.pt", "scaler.pt")
DAMAGED_PREFIX = "damaged-"


def problem(path: Path) -> str | None:
    """Why the checkpoint at `path` cannot be resumed ("optimizer.pt: ..."), or None if every file loads.

    Reads each file fully (LoRA-sized, so cheap): a truncated or garbled file shows up here, before the
    model loads, instead of as a traceback in the middle of `load`."""
    from safetensors.torch import load_file

    for name in _REQUIRED:
        if not (path / name).is_file():
            return f"{name} is missing"
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        if not isinstance(state, dict) or not isinstance(state.get("step"), int) or state["step"] < 1:
            return "state.json has no step number"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"state.json: {err}"
    rngs = sorted(p.name for p in path.glob("rng-*.pt"))
    for name in ("trainable.safetensors", "optimizer.pt", "scheduler.pt", *_OPTIONAL, *rngs):
        file = path / name
        if not file.is_file():
            continue
        try:
            load_file(str(file)) if name.endswith(".safetensors") else _load_pt(file)
        except Exception as err:  # safetensors, zip, pickle and EOF errors: all mean "damaged"
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            return f"{name}: {first[:160]}"
    return None


def candidates(out_dir: Path) -> list[Path]:
    """Every `step-N` dir, complete or not (newest first): a damaged one must be seen to be reported."""
    root = out_dir / CKPT_DIR
    if not root.is_dir():
        return []
    dirs = [d for d in root.iterdir() if d.is_dir() and d.name.startswith("step-") and d.name[5:].isdigit()]
    return sorted(dirs, key=lambda d: int(d.name[5:]), reverse=True)


def newest_usable(out_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(newest checkpoint that loads, [(newer damaged checkpoint, problem), ...]).

    No checkpoint at all is (None, []): the run starts at step 0. Checkpoints that exist but none of which
    loads is an error naming the newest one's broken file."""
    damaged: list[tuple[Path, str]] = []
    for path in candidates(out_dir):
        issue = problem(path)
        if issue is None:
            return path, damaged
        damaged.append((path, issue))
    if damaged:
        path, issue = damaged[0]
        raise NoraError(f"no usable checkpoint to --resume in {out_dir / CKPT_DIR}: {path / issue}"
                        + (f" (and {len(damaged) - 1} older ones damaged too)" if len(damaged) > 1 else ""))
    return None, []


def set_aside_damaged(out_dir: Path) -> list[tuple[Path, str]]:
    """Rename checkpoints newer than the newest usable one to `damaged-step-N` (kept for inspection, never
    resumed from again) and say so on stderr; returns what was set aside."""
    import sys

    good, damaged = newest_usable(out_dir)
    for path, issue in damaged:
        os.replace(path, path.with_name(f"{DAMAGED_PREFIX}{path.name}"))
        print(f"warning: checkpoint {path} is damaged ({issue}); kept as {DAMAGED_PREFIX}{path.name}, "
              f"resuming from {good}", file=sys.stderr)
    return damaged


def _drop(path: Path) -> None:
    """Delete a checkpoint dir; renamed first, so a torn delete is never taken for the latest checkpoint."""
    doomed = path.with_name(f".del-{path.name}")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def prune_finished(out_dir: Path, save_steps: int | None, keep_last: int | None) -> None:
    """At the end of a completed run keep exactly what an uninterrupted run keeps: the `save_steps`
    checkpoints (newest `keep_last`). Checkpoints taken on SIGINT/SIGTERM exist only to resume; the
    finished adapter replaces them. With save_steps null, checkpoints/ goes away entirely."""
    on_grid = [d for d in _step_dirs(out_dir) if save_steps and int(d.name[5:]) % save_steps == 0]
    keep = set(on_grid[-keep_last:] if keep_last else on_grid)
    for path in _step_dirs(out_dir):
        if path not in keep:
            _drop(path)
    root = out_dir / CKPT_DIR
    if root.is_dir() and not any(root.iterdir()):
        root.rmdir()


#: name prefixes of the staging/aside entries the atomic writers leave behind when killed
_STALE_PREFIXES = (".tmp-", ".old-", ".del-")


def clean_stale(out_dir: Path) -> list[Path]:
    """Remove what a killed run left half-written (only ever nora's own dot-prefixed staging entries)."""
    removed = []
    for folder in (out_dir, out_dir / CKPT_DIR):
        if not folder.is_dir():
            continue
        for entry in sorted(folder.iterdir()):
            if entry.name.startswith(_STALE_PREFIXES):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                removed.append(entry)
    return removed


def rewind_metrics(out_dir: Path) -> None:
    """Drop metrics rows past the newest checkpoint: a resumed run redoes those steps and logs them again.

    After a SIGKILL between checkpoints the log is ahead of the checkpoint; without this, resumed steps
    would appear twice. A torn last line (killed mid-write) is dropped too."""
    path, last = out_dir / "metrics.jsonl", latest(out_dir)
    if last is None or not path.is_file():
        return
    step = json.loads((last / "state.json").read_text())["step"]
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and row.get("step", float("inf")) <= step:
            keep.append(line + "\n")
    atomic_write(path, "".join(keep).encode())


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state()
        # as a tensor, so the file loads with weights_only=True (no numpy pickles)
        state["numpy"] = [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]
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

        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


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
        if os.environ.get("NORA_FAULT_KILL_IN_CHECKPOINT") == str(step):  # crash mid-write, for atomicity tests
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save(optimizer.state_dict(), staging / "optimizer.pt")
        torch.save(scheduler.state_dict(), staging / "scheduler.pt")
        if precond is not None:
            torch.save(precond.state_dict(), staging / "preconditioner.pt")
        if accelerator.scaler is not None:
            torch.save(accelerator.scaler.state_dict(), staging / "scaler.pt")
        state = {"step": step, "best_val": best_val if best_val != float("inf") else None}
        (staging / "state.json").write_text(json.dumps(state))  # written last: marks completeness
        swap_in(staging, target)  # re-saving a step moves the old copy aside first, never deletes it in place
        if keep_last:
            for old in _step_dirs(out_dir)[:-keep_last]:
                _drop(old)
    accelerator.wait_for_everyone()
    return target


def _load_pt(path: Path) -> Any:
    """torch.load restricted to tensors and plain containers: a tampered checkpoint cannot run code."""
    import pickle

    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else "unsupported object"
        raise NoraError(f"refusing to load {path}: it holds more than tensors and plain data ({first[:120]})") from None


def load(path: Path, model: torch.nn.Module, optimizer: Any, scheduler: Any, precond: Any, accelerator: Any) -> dict:
    from safetensors.torch import load_file

    params = dict(model.named_parameters())
    saved = load_file(str(path / "trainable.safetensors"))
    missing = [n for n, p in params.items() if p.requires_grad and n not in saved]
    if missing:
        raise NoraError(f"checkpoint {path} does not match the model (missing {missing[0]}); was the recipe changed?")
    with torch.no_grad():
        for name, value in saved.items():
            params[name].copy_(value)
    optimizer.load_state_dict(_load_pt(path / "optimizer.pt"))
    scheduler.load_state_dict(_load_pt(path / "scheduler.pt"))
    if precond is not None and (path / "preconditioner.pt").is_file():
        precond.load_state_dict(_load_pt(path / "preconditioner.pt"))
    if accelerator.scaler is not None and (path / "scaler.pt").is_file():
        accelerator.scaler.load_state_dict(_load_pt(path / "scaler.pt"))
    rng = path / f"rng-{accelerator.process_index}.pt"
    if rng.is_file():
        _set_rng_state(_load_pt(rng))
    state = json.loads((path / "state.json").read_text())
    if state.get("best_val") is None:
        state["best_val"] = float("inf")
    return state
