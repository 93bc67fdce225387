"""Prompt templates: turn a normalized `Example` into (prompt, response) text.

Returning the two parts separately (rather than one string) is what makes loss masking exact:
the tokenizer sees the prompt alone, so the boundary between "context" and "target" never
depends on how a BPE merges across it (see `nora_cli.data.tokenize.tokenize_example`).

Templates:
  alpaca  LLM-Adapters' finetune.py `generate_prompt` byte for byte (the NoRA authors' training
          code, github.com/BingcongLi/NoRA, is a fork of LLM-Adapters with the same function).
  chat    the tokenizer's own chat template (user/assistant turns).
  none    plain concatenation: prompt text, then the response.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

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


# --- renderers: (example, tokenizer) -> (prompt, response) ---------------------------------------


def _alpaca(example: Example, tokenizer: PreTrainedTokenizerBase | None) -> tuple[str, str]:
    if example.messages:
        user, assistant = _single_turn(example)
        return alpaca_prompt(user), assistant
    if not example.instruction:
        raise NoraError("template 'alpaca' needs an instruction; use template 'none' for the 'text' format")
    return alpaca_prompt(example.instruction, example.input), example.output


def _chat(example: Example, tokenizer: PreTrainedTokenizerBase | None) -> tuple[str, str]:
    """Prompt = the chat template up to the assistant header (add_generation_prompt=True)."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise NoraError("template 'chat' needs a tokenizer with a chat template; use 'alpaca' or 'none'")
    messages = list(example.messages) or _as_messages(example)
    if messages[-1]["role"] != "assistant":
        raise NoraError("template 'chat' needs the last message to be the assistant's reply")
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise NoraError("this tokenizer's chat template renders the prompt differently with and without "
                        "the reply, so the response cannot be masked exactly; use template 'alpaca'")
    return prompt, full[len(prompt):]


def _none(example: Example, tokenizer: PreTrainedTokenizerBase | None) -> tuple[str, str]:
    """Plain text: instruction (and input) on their own lines, then the response; text = response."""
    if example.messages:
        *context, last = _as_plain_turns(example)
        return "".join(f"{c}\n" for c in context), last
    parts = [p for p in (example.instruction, example.input) if p]
    return "".join(f"{p}\n" for p in parts), example.output


#: template name -> renderer returning (prompt, response)
TEMPLATES: dict[str, Callable[[Example, PreTrainedTokenizerBase | None], tuple[str, str]]] = {
    "alpaca": _alpaca,
    "chat": _chat,
    "none": _none,
}


def render(template: str, example: Example, tokenizer: PreTrainedTokenizerBase | None = None) -> tuple[str, str]:
    """(prompt, response) for one example; prompt + response is the full training text."""
    try:
        renderer = TEMPLATES[template]
    except KeyError:
        raise NoraError(f"unknown prompt template {template!r}; expected one of {', '.join(TEMPLATES)}") from None
    return renderer(example, tokenizer)


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


# --- helpers ---------------------------------------------------------------------------------


def _as_messages(example: Example) -> list[dict[str, str]]:
    user = f"{example.instruction}\n\n{example.input}" if example.input else example.instruction
    return [{"role": "user", "content": user}, {"role": "assistant", "content": example.output}]


def _single_turn(example: Example) -> tuple[str, str]:
    turns = [m for m in example.messages if m["role"] != "system"]
    if [m["role"] for m in turns] != ["user", "assistant"]:
        raise NoraError("template 'alpaca' takes single-turn chats (one user, one assistant message); "
                        "use template 'chat'")
    return turns[0]["content"], turns[1]["content"]


def _as_plain_turns(example: Example) -> list[str]:
    return [m["content"] for m in example.messages]
