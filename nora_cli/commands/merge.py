"""`nora merge`: export an adapter as a merged model, a clean PEFT adapter or a diffusers LoRA."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from nora_cli.options import AllowPickleOption


def merge(
    adapter: Annotated[Path, typer.Option("--adapter", help="Adapter dir (a `nora train` output or PEFT adapter).")],
    out: Annotated[Path, typer.Option("--out", help="Output directory (must be empty unless --overwrite).")],
    base: Annotated[
        str | None, typer.Option("--base", help="Base model; default: the one recorded in nora.json / adapter_config.json.")
    ] = None,
    dtype: Annotated[
        str | None, typer.Option("--dtype", help="bf16, fp16 or fp32 (default: the base's stored dtype).")
    ] = None,
    fmt: Annotated[
        str | None, typer.Option("--format", help="merged (LM default), peft (clean adapter) or diffusers.")
    ] = None,
    verify: Annotated[
        bool, typer.Option("--verify", help="Compare logits with base + adapter on fixed prompts; exit 1 on mismatch.")
    ] = False,
    max_shard_size: Annotated[str, typer.Option("--max-shard-size", help="Largest weight file, e.g. 5GB.")] = "5GB",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty --out (atomically).")] = False,
    allow_pickle: AllowPickleOption = False,
) -> None:
    from nora_cli.merge import merge_adapter

    report = merge_adapter(
        adapter, out, base=base, dtype=dtype, fmt=fmt, max_shard_size=max_shard_size, overwrite=overwrite,
        verify=verify, allow_pickle=allow_pickle,
    )
    for line in report.lines():
        print(line)
