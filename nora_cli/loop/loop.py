"""The one training loop, shared by causal-LM and DreamBooth jobs.

Reads top to bottom: setup → (resume) → for each optimizer step: lr → micro-batches
(forward/backward, no DDP sync until the last) → normalize by the step's unit count →
NoRA+ preconditioner (once per optimizer step, after unscaling) → clip → step → log →
validate → checkpoint → stop checks. Data order is a pure function of (seed, step), so a
checkpoint only needs the step number to resume mid-epoch exactly.

Size (~400 lines): the loop is meant to be read in one sitting, top to bottom, with the few helpers it
alone uses (schedule, step indices, one optimizer step, evaluation) beside it.
"""

from __future__ import annotations

import itertools
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from nora_cli.errors import NoraError
from nora_cli.loop import checkpoint as ckpt
from nora_cli.loop.job import Job
from nora_cli.loop.metrics import MetricsLog, peak_memory_mb
from nora_cli.safety import atomic_dir, atomic_write

if TYPE_CHECKING:
    from nora_cli.config.schema import Recipe, TrainConfig

if TYPE_CHECKING:
    from nora_cli.optim import Preconditioner


class TrainingStopped(Exception):
    """Raised after a signal-triggered checkpoint; carries the conventional exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Aborted(KeyboardInterrupt):
    """A second SIGINT/SIGTERM: stop at once without a checkpoint; the message says what was (not) kept."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class NonFiniteLoss(NoraError):
    exit_code = 1


@dataclass
class Schedule:
    """Static step arithmetic for a run."""

    total_steps: int
    steps_per_epoch: int
    accum: int  # micro-batches per optimizer step on each process
    micro: int  # examples per micro-batch
    batch: int  # global examples per optimizer step


def plan_schedule(n_examples: int | None, train_cfg: TrainConfig, world: int) -> Schedule:
    """The run's step arithmetic for `world` processes; computed once per run and handed to `run`.

    `n_examples` None is a stream of unknown length: the run is train.max_steps long and is its one "epoch"."""
    if train_cfg.batch_size % (train_cfg.micro_batch_size * world):
        raise NoraError(
            f"train.batch_size={train_cfg.batch_size} must be a multiple of train.micro_batch_size × "
            f"processes = {train_cfg.micro_batch_size} × {world}"
        )
    if n_examples is None:
        if not train_cfg.max_steps:
            raise NoraError("streaming data needs train.max_steps: a stream's length is not known in advance")
        n_examples = train_cfg.max_steps * train_cfg.batch_size
    steps_per_epoch = n_examples // train_cfg.batch_size
    if steps_per_epoch == 0:
        raise NoraError(f"the training set has {n_examples} examples, fewer than train.batch_size={train_cfg.batch_size}")
    total = train_cfg.max_steps or math.ceil(train_cfg.epochs * steps_per_epoch)
    if train_cfg.warmup_steps > total:
        raise NoraError(f"train.warmup_steps={train_cfg.warmup_steps} exceeds the run's {total} optimizer steps "
                        f"({train_cfg.epochs:g} epochs of {steps_per_epoch}); the lr would never reach its peak")
    accum = train_cfg.grad_accum_steps(world)
    return Schedule(total, steps_per_epoch, accum, train_cfg.micro_batch_size, train_cfg.batch_size)


def lr_factor(step: int, *, total: int, warmup: int, kind: str) -> float:
    """Multiplier on the base lr at optimizer step `step` (0-based): linear warmup, then decay."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))  # cosine


def step_indices(step: int, sched: Schedule, n_examples: int, seed: int, shuffle: bool,
                 lengths: Sequence[int] | None = None) -> list[int]:
    """The global example indices of optimizer step `step` (epoch-wise permutation from the seed).

    With `lengths` and more than one micro-batch per step, the step's examples are ordered by length
    (stable), so each micro-batch holds similar lengths and pads less; the step's example set, and so
    its summed loss and gradient, are unchanged up to float summation order.
    """
    epoch, offset = divmod(step, sched.steps_per_epoch)
    if shuffle:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(n_examples, generator=gen)
    else:
        order = torch.arange(n_examples)
    start = offset * sched.batch
    indices = order[start : start + sched.batch].tolist()
    if lengths is not None and sched.batch > sched.micro:
        indices.sort(key=lambda j: lengths[j])
    return indices


class _SignalFlag:
    """SIGINT/SIGTERM set a flag; the loop checkpoints at the end of the current step. Both say so at once,
    since a step can take minutes; a second signal aborts without saving."""

    def __init__(self, out_dir: Path, log: MetricsLog) -> None:
        self.signum: int | None = None
        self.step = 0  # the step being computed (1-based), named in the messages
        self._out_dir, self._log = out_dir, log
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _SignalFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:  # second signal: stop now
            last = ckpt.latest(self._out_dir)
            kept = f"the last checkpoint is {last} (continue with --resume)" if last else "no checkpoint was saved"
            raise Aborted(f"{name} again: aborted step {self.step} without saving a checkpoint; {kept}",
                          128 + signum)
        self.signum = signum
        again = "Ctrl-C" if signum == signal.SIGINT else name
        self._log.notice(f"{name}: finishing step {self.step}, then saving a checkpoint "
                         f"({again} again to abort without saving)")

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def run(job: Job, recipe: Recipe, sched: Schedule, accelerator: Any, out_dir: Path, *,
        resume: bool, between_steps: Callable[[], None] | None = None) -> dict[str, Any]:
    """Train `job` per `recipe.train`/`recipe.optimizer` and `sched` (from `plan_schedule` for this job and
    world size); write checkpoints and final artifacts to out_dir. `between_steps` runs after each optimizer
    step in this thread (nora's CPU thread governor)."""
    from nora_cli.optim import build_optimizer

    tcfg, ocfg = recipe.train, recipe.optimizer
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    device = accelerator.device
    n = len(job.train_data)

    # --- setup: optimizer, preconditioner, schedule, DDP ---------------------------------
    raw_model = job.model
    optimizer, precond = build_optimizer(
        raw_model, name=ocfg.name, lr=ocfg.lr, weight_decay=ocfg.weight_decay, betas=tuple(ocfg.betas),
        momentum=ocfg.momentum, precondition=ocfg.precondition, damping=ocfg.damping, normalize=ocfg.normalize,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total=sched.total_steps, warmup=tcfg.warmup_steps, kind=tcfg.lr_schedule)
    )
    model, optimizer = accelerator.prepare(raw_model, optimizer)
    trainable = [p for p in raw_model.parameters() if p.requires_grad]

    # --- resume ---------------------------------------------------------------------------
    start_step, best_val = 0, math.inf
    if resume:
        latest = ckpt.latest(out_dir)
        if latest is None:
            if main:
                print(f"no checkpoint in {out_dir / 'checkpoints'}; starting from step 0", file=sys.stderr)
        else:
            state = ckpt.load(latest, raw_model, optimizer, scheduler, precond, accelerator)
            start_step, best_val = state["step"], state.get("best_val", math.inf)
            if main:
                print(f"resuming from {latest} (step {start_step}/{sched.total_steps})", file=sys.stderr)

    log = MetricsLog(out_dir / "metrics.jsonl", enabled=main, append=resume and start_step > 0)
    step = start_step
    stream = job.train_stream(start_step * sched.batch) if job.train_stream is not None else None
    with _SignalFlag(out_dir, log) as flag, log.progress(sched.total_steps, start_step, job.unit) as progress:
        while step < sched.total_steps:
            t0 = time.perf_counter()
            flag.step = step + 1
            model.train()
            if stream is None:
                source, indices = job.train_data, step_indices(step, sched, n, recipe.seed, recipe.data.shuffle,
                                                               job.lengths)
            else:  # the stream's next batch; every rank reads the same examples and takes its share
                source = list(itertools.islice(stream, sched.batch))
                indices = list(range(len(source)))

            # --- forward/backward over this process's micro-batches -----------------------
            loss_sum = torch.zeros((), device=device, dtype=torch.float64)
            count = torch.zeros((), device=device, dtype=torch.float64)
            units = 0
            for i in range(sched.accum):
                lo = (i * world + rank) * sched.micro
                batch = job.collate([source[j] for j in indices[lo : lo + sched.micro]])
                last = i == sched.accum - 1
                with accelerator.no_sync(model) if not last else nullcontext(), accelerator.autocast():
                    out = job.loss(model, batch)
                accelerator.backward(out.loss_sum)
                loss_sum += out.loss_sum.detach().double()
                count += out.count.double()
                units += int(batch.get("num_units", out.count))

            # --- normalize: mean over all units of the global step (== one big batch) -------
            totals = accelerator.reduce(torch.stack([loss_sum, count]), reduction="sum")
            loss = (totals[0] / totals[1]).item()
            scale = world / totals[1].item()  # DDP averaged grads over ranks; undo, then divide by units
            overflow = False  # fp16: GradScaler found inf/NaN while unscaling and will skip this update itself
            if accelerator.scaler is not None:
                accelerator.unscale_gradients()
                overflow = not _all_finite(trainable)
            for p in trainable:
                if p.grad is not None:
                    p.grad.mul_(scale)

            # --- NoRA+ preconditioner, clip, step (a non-finite loss/gradient stops or skips) -------
            loss = _fault_nan(step + 1, loss, trainable)
            grad_norm = optimizer_step(
                optimizer, precond, trainable, tcfg.max_grad_norm, loss=loss, overflow=overflow,
                on_non_finite=partial(_non_finite, step + 1, policy=tcfg.nan_policy, out_dir=out_dir, log=log),
            )
            lr = scheduler.get_last_lr()[0]  # the lr this step used; scheduler.step() moves to the next one
            scheduler.step()
            step += 1
            if between_steps is not None:
                between_steps()

            # --- log ---------------------------------------------------------------------------
            units_total = int(accelerator.reduce(torch.tensor(units, device=device), reduction="sum").item())
            dt = time.perf_counter() - t0
            record = {
                "step": step,
                "epoch": round(step / sched.steps_per_epoch, 4),
                "loss": loss,
                "lr": lr,
                "grad_norm": grad_norm,
                f"{job.unit}_per_s": units_total / dt,
                "step_s": dt,
                "threads": torch.get_num_threads(),
                "peak_mem_mb": peak_memory_mb(device),
            }
            if step % tcfg.log_steps == 0 or step == sched.total_steps:
                log.write(record)
            progress.update(step, record)

            # --- validate ------------------------------------------------------------------
            if tcfg.eval_steps and (step % tcfg.eval_steps == 0 or step == sched.total_steps):
                val = evaluate_loss(job, model, accelerator, sched.micro)
                if val is not None:
                    log.write({"step": step, "val_loss": val})
                    if tcfg.save_best and val < best_val:
                        best_val = val
                        if main:
                            atomic_dir(out_dir / "best", lambda d: job.save_final(raw_model, d))
            if job.on_validate is not None and main:  # the hook keeps its own schedule (e.g. validation images)
                job.on_validate(raw_model, step, sched.total_steps, out_dir)

            # --- checkpoint / stop -------------------------------------------------------------
            stop = _agree(flag.signum is not None, accelerator)
            if (tcfg.save_steps and step % tcfg.save_steps == 0 and step < sched.total_steps) or stop:
                path = ckpt.save(out_dir, step, raw_model, optimizer, scheduler, precond, accelerator,
                                 best_val=best_val, keep_last=tcfg.keep_last)
                if stop:
                    signum = flag.signum or signal.SIGTERM
                    raise TrainingStopped(
                        f"stopped by {signal.Signals(signum).name} at step {step}/{sched.total_steps}; "
                        f"checkpoint saved: {path} (continue with --resume)", 128 + signum,
                    )
                if os.environ.get("NORA_FAULT_KILL_AT_STEP") == str(step):  # crash injection for resume tests
                    os.kill(os.getpid(), signal.SIGKILL)

    # --- final artifacts -----------------------------------------------------------------------
    accelerator.wait_for_everyone()
    if world > 1:  # DDP must have kept every rank's adapter identical; record the evidence
        checksum = torch.stack([p.detach().double().sum() for p in trainable]).sum().reshape(1).to(device)
        log.write({"rank_param_checksums": accelerator.gather(checksum).tolist()})
    if main:
        for name, value in ckpt.final_artifacts(out_dir, lambda d: job.save_final(raw_model, d)).items():
            print(f"wrote {name}: {value}", file=sys.stderr)
        ckpt.prune_finished(out_dir, tcfg.save_steps, tcfg.keep_last)  # signal checkpoints were for resuming
        log.plot(out_dir / "loss.png")
    accelerator.wait_for_everyone()
    best = None if best_val == math.inf else best_val
    # unwrap drops DDP and the autocast patch accelerate put on forward under mixed precision
    plain = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    return {"steps": step, "final_loss": log.last_loss, "best_val": best, "model": plain}


def evaluate_loss(job: Job, model: Any, accelerator: Any, micro: int) -> float | None:
    """Unit-weighted mean loss over the validation set (sharded over processes)."""
    if not job.val_data:
        return None
    model.eval()
    world, rank = accelerator.num_processes, accelerator.process_index
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    idx = list(range(rank * micro, len(job.val_data), world * micro))
    with torch.no_grad():
        for lo in idx:
            batch = job.collate([job.val_data[j] for j in range(lo, min(lo + micro, len(job.val_data)))])
            with accelerator.autocast():
                out = job.loss(model, batch)
            total += torch.stack([out.loss_sum.double(), out.count.double()])
    total = accelerator.reduce(total, reduction="sum")
    model.train()
    return (total[0] / total[1]).item() if total[1] > 0 else None


def optimizer_step(
    optimizer: torch.optim.Optimizer, precond: Preconditioner | None, params: Sequence[torch.nn.Parameter],
    max_grad_norm: float | None, *, loss: float = 0.0, overflow: bool = False,
    on_non_finite: Callable[[float, float], None] | None = None,
) -> float:
    """The loop's update from the (normalized) gradients in `params`: NoRA+ precondition → clip → step →
    zero_grad. Returns the gradient norm before clipping. Public so benchmarks time this very step.

    A non-finite loss or gradient norm calls `on_non_finite(loss, grad_norm)`, which raises to stop; if it
    returns, the gradients are dropped so the step changes nothing ("skip"). fp16 overflow (finite loss, inf
    gradients, `overflow`) is routine and left to GradScaler, which skips that update itself."""
    if precond is not None:
        precond.apply()
    grad_norm = _clip(list(params), max_grad_norm)
    # GradScaler decided before the preconditioner ran: a non-finite gradient it made from finite ones
    # (λ = 0) is ours to skip.
    overflow = overflow and math.isfinite(loss)
    if not (math.isfinite(loss) and math.isfinite(grad_norm)) and not overflow:
        if on_non_finite is not None:
            on_non_finite(loss, grad_norm)
        optimizer.zero_grad(set_to_none=True)  # no gradients, so the step below changes nothing
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def _clip(params: list[torch.nn.Parameter], max_norm: float | None) -> float:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    if max_norm:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))


def _all_finite(params: list[torch.nn.Parameter]) -> bool:
    grads = [p.grad for p in params if p.grad is not None]
    return not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


def _fault_nan(step: int, loss: float, params: list[torch.nn.Parameter]) -> float:
    """NORA_FAULT_NAN_AT_STEP=N poisons step N's loss and gradients (fault injection for the NaN tests)."""
    if os.environ.get("NORA_FAULT_NAN_AT_STEP") != str(step):
        return loss
    for p in params:
        if p.grad is not None:
            p.grad.fill_(math.nan)
    return math.nan


def _non_finite(step: int, loss: float, grad_norm: float, policy: str, out_dir: Path, log: MetricsLog) -> None:
    """nan_policy "stop": raise (exit 1) naming the step and the last good checkpoint; "skip": warn."""
    what = "loss" if not math.isfinite(loss) else "gradient norm"
    if policy == "stop":
        last = ckpt.latest(out_dir)
        keep = f"last good checkpoint {last} is kept (continue with --resume)" if last else "no checkpoint yet"
        raise NonFiniteLoss(
            f"non-finite {what} at step {step} (loss={loss}, grad_norm={grad_norm}); {keep}; "
            "set train.nan_policy=skip to skip such steps"
        )
    log.warn(f"skipped step {step}: non-finite {what} (loss={loss}, grad_norm={grad_norm}); weights unchanged")


def _agree(flag: bool, accelerator: Any) -> bool:
    """All ranks stop together if any rank got a signal."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor(float(flag), device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


def write_recipe(out_dir: Path, recipe_yaml: str) -> None:
    """The resolved recipe, written before training (and before the run's nora.json, which train.py owns)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "recipe.yaml", recipe_yaml.encode())
