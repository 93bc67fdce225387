"""Export a trained adapter: a merged model, a clean PEFT adapter, or (diffusion) a diffusers LoRA.

Layout: `adapter` reads adapter dirs and resolves the base; `streaming` merges LoRA deltas into a
safetensors checkpoint tensor by tensor; `convert` turns PiSSA/OLoRA-style adapters into plain LoRA;
`job` holds ExportJob, Exporter and the reports. The exporters themselves are the tasks' (nora_cli/tasks/*/
export.py), registered per (task, format) in nora_cli.tasks.TASKS; nora_cli.merge runs them.
"""
