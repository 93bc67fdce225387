"""Evaluate a loaded model on tasks: prepare items → run a protocol → score → report.

`evaluate_model` takes an already-loaded model (plain or PeftModel) so `nora train` can
score before and after training without reloading; `load_for_eval` + `run_evaluation`
serve the CLI. Protocols are a small registry: each turns prepared items into
per-item prediction dicts whose field names are stable (they are the predictions.jsonl
schema).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nora_cli.config.names import EVAL_BATCH_SIZE, Protocol
from nora_cli.errors import NoraError
from nora_cli.evaluate import fewshot
from nora_cli.evaluate.report import average, progress_bar, summarize, write_outputs
from nora_cli.evaluate.tasks import Task, default_data_path, get_task, item_labels, load_records

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

CANDIDATE = "the correct answer is {label}"  # LLM-Adapters' output format for commonsense items


@dataclass(frozen=True)
class Settings:
    protocol: Protocol = "llm-adapters"
    batch_size: int = EVAL_BATCH_SIZE  # items per generate() call / per shared-prompt scoring batch
    num_beams: int = 1  # 1 = greedy; 4 = the LLM-Adapters scripts
    max_new_tokens: int | None = None  # None = the task's default (32 commonsense, 256 math)


@dataclass(frozen=True)
class PreparedTask:
    """A task's items, ready for a protocol: prompt text, per-item label options and gold answers."""

    task: Task
    source: str
    indices: list[int]
    prompts: list[str]
    labels: list[tuple[str, ...]]
    golds: list[str | float]


def prepare_task(
    name: str | Task, protocol: Protocol, source: str | None = None, *, limit: int | None = None,
    shots: int = 0, seed: int = 0,
) -> PreparedTask:
    """Load and render one task's items (no model needed, so bad input fails before any loading)."""
    from nora_cli.data.templates import alpaca_eval_prompt

    task = name if isinstance(name, Task) else get_task(name)
    if protocol not in RUNNERS:
        raise NoraError(f"unknown protocol {protocol!r}; expected one of {', '.join(RUNNERS)}")
    if protocol == "loglikelihood" and not task.labels:
        raise NoraError(f"task {task.name!r} has free-form answers; use --protocol llm-adapters")
    if protocol == "llm-adapters" and task.family == "fewshot":
        raise NoraError(f"task {task.name!r} is scored by label-word likelihood; use --protocol loglikelihood")
    if limit is not None and limit <= 0:
        raise NoraError(f"--limit must be positive, got {limit}")
    source = source or default_data_path(task)
    records = load_records(task, source)
    n = len(records) if limit is None else min(limit, len(records))
    if task.family == "fewshot":
        prompts = fewshot.build_prompts(records, source, shots, limit=n, seed=seed)
        labels = [task.labels] * n
        golds: list[str | float] = [task.labels[fewshot.label_index(r["label"])] for r in records[:n]]
    else:
        prompts = [alpaca_eval_prompt(r["instruction"], r.get("input") or None) for r in records[:n]]
        labels = [item_labels(task, r) for r in records[:n]]
        golds = [task.gold(r) for r in records[:n]]
    return PreparedTask(task, source, list(range(n)), prompts, labels, golds)


def prepare_tasks(
    tasks: Sequence[str], protocol: Protocol, data: dict[str, str] | None = None, *,
    limit: int | None = None, shots: int = 0, seed: int = 0,
) -> list[PreparedTask]:
    """Prepare several tasks; `data` maps task names (any accepted spelling) to test files."""
    resolved = [get_task(t) for t in tasks]  # every name checked before any data is read
    names = [t.name for t in resolved]
    if len(set(names)) != len(names):
        raise NoraError(f"task listed twice: {', '.join(names)}")
    given = {get_task(k).name: v for k, v in (data or {}).items()}
    return [prepare_task(t, protocol, given.get(t.name), limit=limit, shots=shots, seed=seed) for t in resolved]


# --- protocols ---------------------------------------------------------------------------------

Advance = Callable[[int], None]


def _run_generation(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prep: PreparedTask,
                    settings: Settings, advance: Advance) -> list[dict[str, Any]]:
    from nora_cli.evaluate.generate import generate_responses

    task = prep.task
    responses = generate_responses(
        model, tokenizer, prep.prompts, batch_size=settings.batch_size, num_beams=settings.num_beams,
        max_new_tokens=settings.max_new_tokens or task.max_new_tokens, on_batch=advance,
    )
    out = []
    for index, prompt, gold, response in zip(prep.indices, prep.prompts, prep.golds, responses, strict=True):
        pred = task.extract(response) if task.extract else None
        out.append({"task": task.name, "index": index, "prompt": prompt, "gold": gold, "pred": pred,
                    "correct": task.is_correct(pred, gold), "response": response})
    return out


def _continuations(task: Task, labels: tuple[str, ...]) -> list[str]:
    if task.family == "fewshot":
        return [f" {word}" for word in labels]
    return [CANDIDATE.format(label=label) for label in labels]


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def _run_loglikelihood(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prep: PreparedTask,
                       settings: Settings, advance: Advance) -> list[dict[str, Any]]:
    from nora_cli.evaluate.loglik import encode_request, score_requests, split_whitespace

    task = prep.task
    pairs = [split_whitespace(p, _continuations(task, labels)) for p, labels in zip(prep.prompts, prep.labels,
                                                                                     strict=True)]
    encoded = [encode_request(tokenizer, ctx, conts) for ctx, conts in pairs]
    scores = score_requests(model, tokenizer, encoded, batch_size=settings.batch_size, on_batch=advance)
    out = []
    for index, (ctx, conts), labels, gold, s in zip(prep.indices, pairs, prep.labels, prep.golds, scores,
                                                    strict=True):
        best = _argmax(s)
        best_norm = _argmax([v / len(c.encode("utf-8")) for v, c in zip(s, conts, strict=True)])
        out.append({"task": task.name, "index": index, "prompt": ctx, "gold": gold, "pred": labels[best],
                    "correct": labels[best] == gold, "candidates": conts, "labels": list(labels),
                    "scores": s, "pred_norm": labels[best_norm], "correct_norm": labels[best_norm] == gold})
    return out


#: the protocol registry; config.names.Protocol lists the same names (tests/test_recipe.py checks)
RUNNERS: dict[str, Callable[..., list[dict[str, Any]]]] = {
    "llm-adapters": _run_generation,
    "loglikelihood": _run_loglikelihood,
}


# --- entry points ------------------------------------------------------------------------------


def evaluate_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[str] | Sequence[PreparedTask],
    *,
    protocol: Protocol = "llm-adapters",
    limit: int | None = None,
    batch_size: int = EVAL_BATCH_SIZE,
    data: dict[str, str] | None = None,
    output: Path | str | None = None,
    num_beams: int = 1,
    max_new_tokens: int | None = None,
    shots: int = 0,
    seed: int = 0,
    model_name: str | None = None,
    adapter_name: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate an already-loaded model; returns the results.json dict (and writes it when `output`).

    The model's train/eval mode is restored afterwards, so a training loop can call this mid-run.
    """
    if batch_size <= 0 or num_beams <= 0:
        raise NoraError("--batch-size and --num-beams must be positive")
    prepared = [t for t in tasks if isinstance(t, PreparedTask)]
    if len(prepared) != len(tasks):
        prepared = prepare_tasks([str(t) for t in tasks], protocol, data, limit=limit, shots=shots, seed=seed)
    settings = Settings(protocol, batch_size, num_beams, max_new_tokens)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    was_training = model.training
    model.eval()
    predictions: list[dict[str, Any]] = []
    metrics: dict[str, dict[str, Any]] = {}
    try:
        with progress_bar(progress) as bar:
            for prep in prepared:
                bar_id = bar.add_task(prep.task.name, total=len(prep.indices))
                preds = RUNNERS[protocol](model, tokenizer, prep, settings,
                                          lambda n, bar_id=bar_id: bar.advance(bar_id, n))
                metrics[prep.task.name] = summarize(preds, protocol == "loglikelihood")
                predictions.extend(preds)
    finally:
        model.train(was_training)
    results = {
        "model": model_name or getattr(model.config, "_name_or_path", None) or type(model).__name__,
        "adapter": adapter_name,
        "protocol": protocol,
        "tasks": metrics,
        "average": average(metrics),
        "settings": {"batch_size": batch_size, "num_beams": num_beams, "max_new_tokens": max_new_tokens,
                     "limit": limit, "shots": shots,
                     "data": {p.task.name: p.source for p in prepared}},
    }
    if output is not None:
        write_outputs(results, predictions, Path(output))
    return results


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str  # the base model as the user named it (or the merged dir)
    adapter: str | None


def load_for_eval(
    model: str | None = None, adapter: str | Path | None = None, merged: str | Path | None = None,
    dtype: str = "fp32", allow_pickle: bool = False,
) -> LoadedModel:
    """Base model, base + PEFT adapter (nora output dir or any PEFT dir), or a merged model dir.

    Pickled (.bin) weights load only with `allow_pickle`; the adapter's files are checked before any model."""
    from nora_cli.export.adapter import open_adapter, read_adapter
    from nora_cli.models import (
        check_weight_format,
        load_causal_lm,
        load_tokenizer,
        resolve_source,
        torch_dtype,
    )
    from nora_cli.run_dir import recorded_base

    if adapter is not None and merged is not None:
        raise NoraError("pass either --adapter or --merged, not both")
    if merged is not None:
        merged_dir = Path(merged).expanduser()
        if not (merged_dir / "config.json").is_file():
            raise NoraError(f"--merged {merged_dir} is not a model directory (no config.json)")
        if any((merged_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            net, tokenizer = load_causal_lm(str(merged_dir), dtype=dtype, allow_pickle=allow_pickle)
        else:  # `save_pretrained` of a merged model alone writes no tokenizer: take the base model's
            tok_source = model or recorded_base(merged_dir)
            if not tok_source:
                raise NoraError(f"{merged_dir} has no tokenizer; pass --model BASE to use the base model's")
            from transformers import AutoModelForCausalLM

            check_weight_format(resolve_source(str(merged_dir)), allow_pickle)
            safe = {"use_safetensors": None, "weights_only": True} if allow_pickle else {"use_safetensors": True}
            net = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch_dtype(dtype), **safe)
            tokenizer = load_tokenizer(resolve_source(tok_source))
        net.eval()
        return LoadedModel(net, tokenizer, str(merged), None)
    if adapter is not None:
        adapter_dir = Path(adapter).expanduser()
        if not (adapter_dir / "adapter_config.json").is_file():
            raise NoraError(f"{adapter_dir} has no adapter_config.json; pass a nora output dir or a PEFT "
                            "adapter directory")
        checked = read_adapter(adapter_dir, allow_pickle)
        model = model or recorded_base(adapter_dir)
        if not model:
            raise NoraError(f"{adapter_dir} does not name its base model; pass --model BASE")
        opened = open_adapter(checked, model, dtype=dtype, allow_pickle=allow_pickle)
        return LoadedModel(opened.model, load_tokenizer(opened.base), str(model), str(adapter))
    if not model:
        raise NoraError("pass --model BASE (or --adapter DIR / --merged DIR / --recipe RECIPE)")
    net, tokenizer = load_causal_lm(model, dtype=dtype, allow_pickle=allow_pickle)
    net.eval()
    return LoadedModel(net, tokenizer, str(model), None)


def run_evaluation(
    *, model: str | None, adapter: str | None, merged: str | None, dtype: str, tasks: Sequence[str],
    data: dict[str, str] | None = None, output: Path | None = None, limit: int | None = None,
    shots: int = 0, protocol: Protocol = "llm-adapters", allow_pickle: bool = False, **kwargs: Any,
) -> dict[str, Any]:
    """The CLI's one call: check the output path, tasks and data first (cheap), then load and evaluate."""
    if output is not None:
        from nora_cli.safety import check_writable

        if Path(output).is_dir():
            raise NoraError(f"--output {output} is a directory; pass a file path such as {Path(output) / 'results.json'}")
        check_writable(Path(output), "--output")
    prepared = prepare_tasks(tasks, protocol, data, limit=limit, shots=shots)
    loaded = load_for_eval(model, adapter, merged, dtype, allow_pickle)
    return evaluate_model(loaded.model, loaded.tokenizer, prepared, protocol=protocol, limit=limit, shots=shots,
                          output=output, model_name=loaded.name, adapter_name=loaded.adapter, **kwargs)
