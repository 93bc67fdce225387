"""`nora evaluate`: score a base model, base + adapter, or merged model on commonsense/math tasks.

Flags override a recipe's model / output.dir (the adapter) / eval section when --recipe is given.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from nora_cli.config.names import EVAL_BATCH_SIZE, PROTOCOLS
from nora_cli.errors import NoraError
from nora_cli.options import AllowPickleOption, LimitOption, ProtocolOption


class EvalDtype(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"


def _data_map(data: str | None, tasks: list[str]) -> dict[str, str]:
    """`--data PATH` for one task, or `--data TASK=PATH[,TASK=PATH]` for several."""
    if not data:
        return {}
    if "=" not in data:
        if len(tasks) != 1:
            raise NoraError("--data PATH needs exactly one --task; for several use --data TASK=PATH,TASK=PATH")
        return {tasks[0]: data}
    pairs = [p.split("=", 1) for p in data.split(",") if p.strip()]
    if any(len(p) != 2 for p in pairs):
        raise NoraError("--data takes PATH or TASK=PATH[,TASK=PATH]")
    return {k.strip(): v.strip() for k, v in pairs}


def evaluate(
    model: Annotated[str | None, typer.Option("--model", help="Base model: hub id, local dir, .gguf, or alias "
                                              "(smollm2-135m). Default: the adapter's nora.json base_model.")] = None,
    adapter: Annotated[Path | None, typer.Option("--adapter", help="nora output dir or any PEFT adapter dir.")] = None,
    merged: Annotated[Path | None, typer.Option("--merged", help="A full merged model directory.")] = None,
    task: Annotated[str | None, typer.Option("--task", help="Comma-separated tasks: boolq, piqa, social_i_qa, "
                                             "hellaswag, winogrande, arc-easy, arc-challenge, openbookqa, gsm8k, "
                                             "svamp, multiarith, addsub, singleeq, mawps, aqua, demo, sst2.")] = None,
    data: Annotated[str | None, typer.Option("--data", help="Test file (LLM-Adapters JSON) for one task, or "
                                             "TASK=PATH,...; default $NORA_SHARED/data/<kind>/<Task>/test.json.")] = None,
    protocol: ProtocolOption = None,
    limit: LimitOption = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", min=1, help=f"Items per batch (default {EVAL_BATCH_SIZE}).")] = None,
    num_beams: Annotated[int, typer.Option("--num-beams", min=1, help="Beams; 4 matches LLM-Adapters.")] = 1,
    max_new_tokens: Annotated[int | None, typer.Option("--max-new-tokens", min=1,
                                                       help="Default 32 (commonsense) / 256 (math).")] = None,
    shots: Annotated[int, typer.Option("--shots", min=0, help="Demonstrations per prompt (sst2).")] = 0,
    dtype: Annotated[EvalDtype | None, typer.Option("--dtype", help="Model dtype (default fp32).")] = None,
    output: Annotated[Path | None, typer.Option("--output", help="results.json path; predictions.jsonl is "
                                                "written beside it.")] = None,
    recipe: Annotated[str | None, typer.Option("--recipe", help="Recipe file or name: its model, output.dir "
                                               "adapter and eval section are the defaults.")] = None,
    allow_pickle: AllowPickleOption = False,
) -> None:
    from rich.console import Console

    from nora_cli.evaluate import run_evaluation
    from nora_cli.evaluate.report import results_table

    tasks: list[str] = [t.strip() for t in task.split(",") if t.strip()] if task else []
    settings: dict = {}
    if recipe is not None:
        from nora_cli.config.load import load_recipe

        r = load_recipe(recipe)
        model = model or r.model.source
        if adapter is None and merged is None:
            adapter = Path(r.output.dir)
            if not (adapter / "adapter_config.json").is_file():
                raise NoraError(f"recipe output dir {adapter} holds no trained adapter; run `nora train {recipe}` "
                                "first, or pass --adapter/--merged")
        tasks = tasks or list(r.eval.tasks)
        settings = {"protocol": r.eval.protocol, "limit": r.eval.limit, "batch_size": r.eval.batch_size,
                    "data": dict(r.eval.data), "dtype": r.model.dtype,
                    "allow_pickle": r.model.allow_pickle}
    if not tasks:
        raise NoraError("pass --task T[,T...] (or a --recipe with eval.tasks)")
    results = run_evaluation(
        model=model,
        adapter=str(adapter) if adapter else None,
        merged=str(merged) if merged else None,
        dtype=dtype.value if dtype else settings.get("dtype", "fp32"),
        tasks=tasks,
        data=_data_map(data, tasks) or settings.get("data") or None,
        output=output,
        limit=limit or settings.get("limit"),
        shots=shots,
        protocol=protocol.value if protocol else settings.get("protocol", PROTOCOLS[0]),
        batch_size=batch_size or settings.get("batch_size", EVAL_BATCH_SIZE),
        num_beams=num_beams,
        max_new_tokens=max_new_tokens,
        allow_pickle=allow_pickle or bool(settings.get("allow_pickle")),
    )
    console = Console()
    console.print(results_table(results))
    if output is not None:
        console.print(f"wrote {output} and {output.with_name('predictions.jsonl')}", soft_wrap=True)
