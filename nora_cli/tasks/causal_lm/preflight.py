"""Causal-LM checks before the weights load: the adapter against the architecture (config.json alone), the data."""

from __future__ import annotations

from typing import TYPE_CHECKING

from nora_cli.errors import NoraError

if TYPE_CHECKING:
    from nora_cli.config.schema import Recipe


def check_lm_adapter(recipe: Recipe) -> None:
    """Target modules that match nothing and ranks outside 0 < r ≤ min(in, out) fail here, from config.json
    alone, with the names that would have worked. Matching follows PEFT: exact name or `.name` suffix."""
    from nora_cli.models import check_weight_format, linear_layers, model_skeleton, resolve_source

    mcfg, acfg = recipe.model, recipe.adapter
    source = resolve_source(mcfg.source, mcfg.gguf_file)
    check_weight_format(source, mcfg.allow_pickle)
    skeleton = model_skeleton(source, mcfg.trust_remote_code)
    layers = linear_layers(skeleton)
    head = skeleton.get_output_embeddings()
    head_name = next((n for n, m in skeleton.named_modules() if head is not None and m is head), None)
    available = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in layers if n != head_name))
    if acfg.target_modules == "all-linear":
        targeted = {n: s for n, s in layers.items() if n != head_name}
    else:
        targeted = {}
        for target in acfg.target_modules:
            hits = {n: s for n, s in layers.items() if n == target or n.endswith(f".{target}")}
            if not hits:
                raise NoraError(
                    f"adapter.target_modules: {target!r} matches no Linear layer of {mcfg.source}; "
                    f"available: {', '.join(available)}"
                )
            targeted.update(hits)
    if not targeted:
        raise NoraError(f"{mcfg.source} has no Linear layers for adapter.target_modules=all-linear")
    name, (fan_in, fan_out) = min(targeted.items(), key=lambda item: min(item[1]))
    if acfg.r > min(fan_in, fan_out):
        raise NoraError(
            f"adapter.r={acfg.r} exceeds min(in, out)={min(fan_in, fan_out)} of {name} ({fan_in}→{fan_out}); "
            f"use r ≤ {min(fan_in, fan_out)} or drop {name.rsplit('.', 1)[-1]} from adapter.target_modules"
        )


def check_data(recipe: Recipe) -> str:
    """The text data parses in its format; returns a line saying what was checked."""
    from nora_cli.data.check import check_text_data

    return check_text_data(recipe.data)
