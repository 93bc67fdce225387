"""Prompt templates: turn a normalized `Example` into text segments, each learned or masked.

Rendering into segments (rather than one string) is what makes loss masking exact: each segment is
tokenized on its own, so the boundary between "context" and "target" never depends on how a BPE merges
across it (see `nora_cli.data.tokenize`).

Templates:
  alpaca  LLM-Adapters' finetune.py `generate_prompt` byte for byte (the NoRA authors' training
          code, github.com/BingcongLi/NoRA, is a fork of LLM-Adapters with the same function);
          conversations use the `alpaca` chat template below, the same text for one user turn.
  chat    the tokenizer's own chat template.
  chatml, llama3, gemma, mistral
          named chat templates, for tokenizers that lack one; `template: FILE.jinja` reads one from a file.
  none    plain concatenation: prompt text, then the response.

A conversation rendered by a chat template learns every assistant turn as the template writes it after the
assistant's header: the content and the end-of-turn text (`<|im_end|>\\n`, `<|eot_id|>`, EOS). Role headers and
system, user and tool turns are masked. The turns are found by rendering the conversation incrementally with
the template itself (as transformers renders `tokenizer.chat_template`), so no token id is guessed.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

from nora_cli.config.names import is_template
from nora_cli.errors import NoraError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from nora_cli.data.example import Example

# --- LLM-Adapters' exact strings -------------------------------------------------------------
# In finetune.py the f-strings are indented inside the function body, so every line after the
# header carries 16 leading spaces, and the "blank" lines between sections are 16 spaces too.
# The header ends in one trailing space (with input) or two (without). The training prompt is
# `generate_prompt({**data_point, "output": ""})`, i.e. it ends in "### Response:\n" + 16 spaces.
_IND = " " * 16
_HEAD_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request."
)
_HEAD_PLAIN = "Below is an instruction that describes a task. Write a response that appropriately completes the request."


def alpaca_prompt(instruction: str, input: str | None = None) -> str:
    """LLM-Adapters finetune.py `generate_prompt` with output="": the TRAINING prompt.

    With input:    header + " \\n\\n" + 16sp "### Instruction:\\n" 16sp {instruction} "\\n" 16sp "\\n"
                   16sp "### Input:\\n" 16sp {input} "\\n" 16sp "\\n" 16sp "### Response:\\n" 16sp
    Without input: header + "  \\n\\n" + the same without the Input block.
    """
    if input:
        return (
            f"{_HEAD_INPUT} \n\n"
            f"{_IND}### Instruction:\n{_IND}{instruction}\n{_IND}\n"
            f"{_IND}### Input:\n{_IND}{input}\n{_IND}\n"
            f"{_IND}### Response:\n{_IND}"
        )
    return (
        f"{_HEAD_PLAIN}  \n\n"
        f"{_IND}### Instruction:\n{_IND}{instruction}\n{_IND}\n"
        f"{_IND}### Response:\n{_IND}"
    )


def alpaca_eval_prompt(instruction: str, input: str | None = None) -> str:
    """LLM-Adapters commonsense_evaluate.py / evaluate.py `generate_prompt(instruction, input)`.

    Differs from the training prompt only in whitespace: the header has no trailing space with
    input and one (not two) without, and the blank lines between sections are truly empty. The
    prompt still ends in "### Response:\\n" + 16 spaces, so generation continues the same way.
    """
    if input:
        return (
            f"{_HEAD_INPUT}\n\n"
            f"{_IND}### Instruction:\n{_IND}{instruction}\n\n"
            f"{_IND}### Input:\n{_IND}{input}\n\n"
            f"{_IND}### Response:\n{_IND}"
        )
    return (
        f"{_HEAD_PLAIN} \n\n"
        f"{_IND}### Instruction:\n{_IND}{instruction}\n\n"
        f"{_IND}### Response:\n{_IND}"
    )


# --- named chat templates ----------------------------------------------------------------------
# Jinja, as in tokenizer_config.json, written for transformers' environment (trim_blocks, lstrip_blocks).
# Each is the model family's published template, with system messages folded into the first user turn
# where the family has no system role. Any role other than system/assistant renders as a user-side turn.

_CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
_LLAMA3 = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim }}"
    "{{- '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
# Shared by gemma and mistral: the system message becomes the start of the first user turn.
_FOLD_SYSTEM = (
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{%- set system = messages[0]['content'] + '\\n\\n' %}{%- set turns = messages[1:] %}"
    "{%- else %}{%- set system = '' %}{%- set turns = messages %}{%- endif %}"
)
_GEMMA = (
    "{{- bos_token }}" + _FOLD_SYSTEM +
    "{%- for message in turns %}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{- '<start_of_turn>' + role + '\\n' + (system if loop.first else '') + message['content'] | trim }}"
    "{{- '<end_of_turn>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}"
)
_MISTRAL = (
    "{{- bos_token }}" + _FOLD_SYSTEM +
    "{%- for message in turns %}"
    "{%- if message['role'] == 'assistant' %}{{- message['content'] }}{{- eos_token }}"
    "{%- else %}{{- '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}{%- endif %}"
    "{%- endfor %}"
)
# One user turn renders exactly as `alpaca_prompt(instruction)` + reply + EOS (LLM-Adapters); later turns
# continue in the same layout. A system message replaces the "Below is an instruction ..." header.
_ALPACA = (
    "{{- bos_token }}"
    "{%- set ind = '" + _IND + "' %}"
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{{- messages[0]['content'] + '\\n\\n' }}{%- set turns = messages[1:] %}"
    "{%- else %}{{- '" + _HEAD_PLAIN + "  \\n\\n' }}{%- set turns = messages %}{%- endif %}"
    "{%- for message in turns %}"
    "{%- if message['role'] == 'assistant' %}{{- message['content'] }}{{- eos_token }}"
    "{%- else %}{{- ('' if loop.first else '\\n' + ind + '\\n') + ind + '### Instruction:\\n' + ind }}"
    "{{- message['content'] + '\\n' + ind + '\\n' + ind + '### Response:\\n' + ind }}{%- endif %}"
    "{%- endfor %}"
)

#: named chat templates for tokenizers without one; the one used is saved as the adapter tokenizer's chat_template
CHAT_TEMPLATES: dict[str, str] = {
    "chatml": _CHATML,
    "llama3": _LLAMA3,
    "gemma": _GEMMA,
    "mistral": _MISTRAL,
    "alpaca": _ALPACA,
}

#: every `data.template` name (besides a path ending in .jinja); config.names.TemplateName lists the same
TEMPLATES: tuple[str, ...] = ("alpaca", "chat", "none", *(name for name in CHAT_TEMPLATES if name != "alpaca"))

#: (text, learned) pieces of one training example, in order
Segment = tuple[str, bool]


def check_template(template: str) -> str:
    """`template` if it names a template (or a .jinja file), else one error listing the names."""
    if is_template(template):
        return template
    raise NoraError(f"unknown prompt template {template!r}; expected one of {', '.join(TEMPLATES)} "
                    "or a path to a .jinja chat template")


def uses_chat_template(template: str, example: Example) -> bool:
    """Whether `example` renders through a Jinja chat template (which writes its own BOS/turn tokens).

    `alpaca` does for conversations only: alpaca records keep LLM-Adapters' prompt and the tokenizer's BOS.
    """
    return template != "none" and not (template == "alpaca" and not example.messages)


def chat_template_source(template: str, tokenizer: PreTrainedTokenizerBase | None) -> str:
    """The Jinja text `template` stands for: the tokenizer's own (`chat`), a named one, or a .jinja file's."""
    check_template(template)
    if template in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[template]
    if template.endswith(".jinja"):
        return _template_file(template)
    if template != "chat":
        raise NoraError(f"template {template!r} is not a chat template")
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise NoraError(f"template 'chat' needs a tokenizer with a chat template; this one has none: use a named "
                        f"template ({', '.join(CHAT_TEMPLATES)}), a .jinja file, or 'none'")
    return tokenizer.get_chat_template()


@functools.lru_cache(maxsize=8)
def _template_file(path: str) -> str:
    """A .jinja file's text, read once per process (every example renders with it)."""
    from nora_cli.errors import read_text

    return read_text(Path(path).expanduser(), "chat template")


def trained_chat_template(template: str, tokenizer: PreTrainedTokenizerBase, example: Example) -> str | None:
    """The chat template training rendered `example` with, to save as the adapter tokenizer's chat_template
    (so `nora sample` and vanilla `apply_chat_template` reproduce it); None when none was used."""
    return chat_template_source(template, tokenizer) if uses_chat_template(template, example) else None


# --- rendering -------------------------------------------------------------------------------------


def _llm_adapters(example: Example) -> list[Segment]:
    if not example.instruction:
        raise NoraError("template 'alpaca' needs an instruction; use template 'none' for the 'text' format")
    return [(alpaca_prompt(example.instruction, example.input), False), (example.output, True)]


def _plain(example: Example) -> list[Segment]:
    """`none`: each chat turn on its own line (assistant turns learned); else instruction/input lines + output."""
    if example.messages:
        last = len(example.messages) - 1
        return [(m["content"] + ("" if i == last else "\n"), m["role"] == "assistant")
                for i, m in enumerate(example.messages)]
    parts = [p for p in (example.instruction, example.input) if p]
    return [("".join(f"{p}\n" for p in parts), False), (example.output, True)]


def _conversation(messages: list[dict[str, str]], source: str,
                  tokenizer: PreTrainedTokenizerBase | None) -> list[Segment]:
    """Segments of a conversation under a Jinja chat template: each assistant turn, as the template renders it
    after the assistant's header (add_generation_prompt), is learned; everything else is masked.

    The prefixes must render identically inside the whole conversation; templates that rewrite earlier turns
    once later ones exist (e.g. dropping past reasoning) cannot be masked exactly and are refused."""
    import jinja2
    from transformers.utils.chat_template_utils import render_jinja_template

    tokens = dict(tokenizer.special_tokens_map) if tokenizer is not None else {}
    rendered: dict[tuple[int, bool], str] = {}

    def text(upto: int, generation: bool) -> str:
        if (upto, generation) not in rendered:
            try:
                out, _ = render_jinja_template([messages[:upto]], chat_template=source,
                                               add_generation_prompt=generation, **tokens)
            except jinja2.TemplateError as err:
                raise NoraError(f"chat template: {err}") from None
            rendered[upto, generation] = out[0]
        return rendered[upto, generation]

    full = text(len(messages), False)
    segments: list[Segment] = []
    done = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        header, turn = text(i, True), text(i + 1, False)
        if not (full.startswith(header) and full.startswith(turn) and done <= len(header) <= len(turn)):
            raise NoraError("this chat template renders earlier turns differently once later turns follow, so "
                            "the assistant turns cannot be masked exactly; use a named template "
                            f"({', '.join(CHAT_TEMPLATES)}) or a .jinja file")
        segments += [(full[done:len(header)], False), (full[len(header):len(turn)], True)]
        done = len(turn)
    segments.append((full[done:], False))
    return [s for s in segments if s[0]]


def render_segments(template: str, example: Example,
                    tokenizer: PreTrainedTokenizerBase | None = None) -> list[Segment]:
    """The example's full training text as (text, learned) segments, in order."""
    check_template(template)
    if template == "none":
        return _plain(example)
    if not uses_chat_template(template, example):
        return _llm_adapters(example)
    messages = list(example.messages) or _as_messages(example)
    return _conversation(messages, chat_template_source(template, tokenizer), tokenizer)


def render(template: str, example: Example, tokenizer: PreTrainedTokenizerBase | None = None) -> tuple[str, str]:
    """(prompt, response): the text before the last learned segment, and the rest; together the full text."""
    segments = render_segments(template, example, tokenizer)
    last = max((i for i, (_, learned) in enumerate(segments) if learned), default=len(segments))
    return "".join(t for t, _ in segments[:last]), "".join(t for t, _ in segments[last:])


def render_prompt(
    template: str,
    example: Example,
    tokenizer: PreTrainedTokenizerBase | None = None,
    *,
    with_output: bool = False,
) -> str:
    """The prompt to generate from (or, with_output=True, the full training text)."""
    prompt, response = render(template, example, tokenizer)
    return prompt + response if with_output else prompt


def end_of_turn(template: str, tokenizer: PreTrainedTokenizerBase | None) -> str:
    """What a chat template writes after an assistant reply, stripped (`<|im_end|>`, `<|eot_id|>`, EOS): where
    generation should stop, as training taught the model to; '' when it writes nothing."""
    from nora_cli.data.example import Example

    reply = "nora"
    probe = Example(messages=({"role": "user", "content": "?"}, {"role": "assistant", "content": reply}))
    turn = next((text for text, learned in reversed(render_segments(template, probe, tokenizer)) if learned), "")
    return turn[turn.find(reply) + len(reply):].strip() if reply in turn else ""


def _as_messages(example: Example) -> list[dict[str, str]]:
    user = f"{example.instruction}\n\n{example.input}" if example.input else example.instruction
    return [{"role": "user", "content": user}, {"role": "assistant", "content": example.output}]
