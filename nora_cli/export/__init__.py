"""Export a trained adapter: a merged model, a clean PEFT adapter, or (diffusion) a diffusers LoRA.

Layout: `adapter` reads adapter dirs and resolves the base; `streaming` merges LoRA deltas into a
safetensors checkpoint tensor by tensor; `causal_lm` holds the LM exporters; `verify` compares an
export with base + adapter; `convert` turns PiSSA/OLoRA-style adapters into plain LoRA; `api` is
the (task, format) registry and `merge_adapter`. The public names are re-exported by nora_cli.merge.
"""
