"""Causal-LM job: load the base, wrap it with PEFT LoRA, apply the init, tokenize the data."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from nora_cli.loop.job import Job
from nora_cli.tasks.causal_lm.fast import TrainForward, enabled_fast_paths, use_sparse_dropout

if TYPE_CHECKING:
    from nora_cli.config.schema import Recipe
    from nora_cli.lora import InitResult


def build_peft_model(model: Any, recipe: Recipe) -> tuple[Any, InitResult]:
    """get_peft_model + the recipe's init, computed from the real (loaded) base weights."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    from nora_cli.lora import initialize, lora_config
    from nora_cli.models import keep_trainable_4bit_layout

    mcfg, acfg = recipe.model, recipe.adapter
    if mcfg.quantization == "4bit":
        keep_trainable_4bit_layout(model)  # before any forward: validation must not repack the weights
    if mcfg.quantization:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=mcfg.gradient_checkpointing)
    elif mcfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, lora_config(acfg, bias="none", task_type="CAUSAL_LM"))
    init = initialize(model, acfg.init, sigma=acfg.sigma, side=acfg.side, seed=recipe.seed)
    if "dropout" in enabled_fast_paths():
        use_sparse_dropout(model)
    return model, init


def _to_device(collate_fn: Any, device: torch.device) -> Any:
    def fn(features: list[dict]) -> dict[str, Any]:
        batch = collate_fn(features)
        out = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        out["num_units"] = int(out["attention_mask"].sum())  # throughput counts real input tokens
        return out

    return fn


def build_lm_job(recipe: Recipe, device: torch.device, out_dir: Path) -> Job:
    from nora_cli.data.batch import collate
    from nora_cli.data.example import Example
    from nora_cli.data.packing import collate_packed
    from nora_cli.data.prepare import conversational, training_data
    from nora_cli.data.templates import trained_chat_template
    from nora_cli.models import load_causal_lm_weights, load_tokenizer, resolve_source

    mcfg, dcfg = recipe.model, recipe.data
    source = resolve_source(mcfg.source, mcfg.gguf_file)
    tokenizer = load_tokenizer(source, mcfg.trust_remote_code)
    data = training_data(dcfg, tokenizer, recipe.seed)  # data first: a bad file fails before the model loads
    packed = data.packing is not None
    device_map = {"": device} if mcfg.quantization else None
    model = load_causal_lm_weights(
        source, dtype=mcfg.dtype, quantization=mcfg.quantization, trust_remote_code=mcfg.trust_remote_code,
        device_map=device_map, allow_pickle=mcfg.allow_pickle,
    )
    model.config.use_cache = False
    peft_model, init = build_peft_model(model, recipe)
    modifies_base = init.modifies_base
    initial_dir = out_dir / "initial_adapter"
    if modifies_base:
        from nora_cli.lora import save_initial_adapter

        save_initial_adapter(peft_model, initial_dir)
    if mcfg.quantization is None:
        peft_model.to(device)

    collate_fn = _to_device(partial(collate_packed if packed else collate, pad_token_id=tokenizer.pad_token_id),
                            device)
    # the chat template training used is saved with the adapter: `nora sample` and apply_chat_template reproduce it
    trained = trained_chat_template(dcfg.template, tokenizer, Example(messages=({},) if conversational(dcfg) else ()))
    if trained is not None:
        tokenizer.chat_template = trained

    def save_final(model: Any, target: Path) -> None:
        if modifies_base:
            from nora_cli.export.convert import save_converted_adapter

            save_converted_adapter(model, target, initial_dir)
        else:
            model.save_pretrained(target)
        tokenizer.save_pretrained(target)

    forward = TrainForward(peft_model, gradient_checkpointing=mcfg.gradient_checkpointing, packed=packed)
    meta: dict[str, Any] = {"packing": data.packing} if packed else {}
    return Job(
        model=peft_model,
        train_data=data.train,
        val_data=data.val or None,
        collate=collate_fn,
        loss=forward,
        save_final=save_final,
        meta={
            "base_model": mcfg.source,
            "base_model_resolved": source.name_or_path,
            "prompt_template": dcfg.template,
            "modifies_base": modifies_base,
            "fast_paths": forward.active(device, recipe.train.mixed_precision),
            **meta,
        },
        unit="tokens",
        lengths=data.lengths,
        train_stream=data.stream,
    )
