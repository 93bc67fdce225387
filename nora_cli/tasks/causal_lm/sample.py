"""`nora sample` for causal LMs: text from the base (+ the trained LoRA), streamed to stdout."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class TextRequest:
    model: str
    adapter: Path | None
    prompts: list[str]
    template: str | None = None  # a data.template name; None: nora.json's, else chat if the tokenizer has one
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    allow_pickle: bool = False  # also load pickled .bin base weights (torch.load(weights_only=True))


def sample_text(req: TextRequest) -> list[str]:
    """Generate an answer per prompt, streaming tokens to stdout as they come (TextStreamer)."""
    from nora_cli.export.adapter import open_adapter, read_adapter

    # the adapter's files first: a broken one fails before torch is even imported
    checked = None if req.adapter is None else read_adapter(req.adapter, req.allow_pickle)
    import torch
    from transformers import TextStreamer

    from nora_cli.data.example import Example
    from nora_cli.data.templates import end_of_turn, render_prompt, uses_chat_template
    from nora_cli.models import ModelSource, inference_device, load_causal_lm, load_tokenizer

    device = inference_device()
    dtype = "bf16" if device == "cuda" else "fp32"
    if checked is not None:
        opened = open_adapter(checked, req.model, dtype=dtype, allow_pickle=req.allow_pickle)
        # training saves its tokenizer with the adapter, with the chat template it trained with
        own = (checked.path / "tokenizer_config.json").is_file()
        model = opened.model
        tokenizer = load_tokenizer(ModelSource(str(checked.path), str(checked.path)) if own else opened.base)
    else:
        model, tokenizer = load_causal_lm(req.model, dtype=dtype, allow_pickle=req.allow_pickle)
    model.to(device).eval()
    recorded = checked.nora.meta.get("prompt_template") if checked is not None else None
    template = req.template or _recorded(recorded, tokenizer) or ("chat" if tokenizer.chat_template else "none")
    # stop where training taught the model to end its turn, also when that is not the tokenizer's EOS
    stop = end_of_turn(template, tokenizer) if uses_chat_template(template, Example(instruction="?")) else ""
    stops = {"stop_strings": [stop], "tokenizer": tokenizer} if stop and stop != tokenizer.eos_token else {}
    answers = []
    for i, prompt in enumerate(req.prompts):
        if len(req.prompts) > 1:
            print(f"{'' if i == 0 else chr(10)}>>> {prompt}", flush=True)
        example = Example(instruction=prompt)
        text = render_prompt(template, example, tokenizer)
        special = not uses_chat_template(template, example)  # chat templates write their own BOS
        inputs = tokenizer(text, return_tensors="pt", add_special_tokens=special).to(device)
        torch.manual_seed(req.seed)
        sampling = {"do_sample": True, "temperature": req.temperature, "top_p": req.top_p} \
            if req.temperature > 0 else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        with torch.inference_mode():
            out = model.generate(
                **inputs, max_new_tokens=req.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True), **sampling, **stops,
            )
        answer = tokenizer.decode(out[0, inputs.input_ids.shape[1]:], skip_special_tokens=True)
        answers.append(answer.removesuffix(stop) if stops else answer)
    return answers


def _recorded(template: str | None, tokenizer: Any) -> str | None:
    """The template training recorded; a chat template (named or a .jinja file) is the one training saved as
    the adapter tokenizer's chat_template, so `chat` reproduces it even where the file is gone."""
    from nora_cli.data.templates import CHAT_TEMPLATES

    if template and (template in CHAT_TEMPLATES or template.endswith(".jinja")) and template != "alpaca" \
            and getattr(tokenizer, "chat_template", None):
        return "chat"
    return template
