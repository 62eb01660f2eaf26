"""Prompt templates: the Alpaca template and the tokenizer's chat template.

The Alpaca template (Taori et al. 2023, "Stanford Alpaca") is what FedIT (Zhang et al. 2023,
"Towards Building the Federated GPT") and FlowerTune use for instruction data. For instruct models
that ship a chat template (SmolLM2-Instruct), :func:`format_prompt` can render the user turn with
``tokenizer.apply_chat_template`` instead.
"""

from __future__ import annotations

from typing import Any

# Alpaca's section headers; ``alpaca-short`` uses them without the one-sentence preamble (~30
# fewer tokens per example: on a small model at a few hundred training steps the preamble costs
# compute and teaches nothing).
ALPACA_SHORT_WITH_INPUT = (
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_SHORT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
) + ALPACA_SHORT_WITH_INPUT
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n"
) + ALPACA_SHORT_NO_INPUT
# System turn used by "chat-short" instead of the tokenizer's default one (SmolLM2's chat
# template inserts "You are a helpful AI assistant named SmolLM, trained by Hugging Face").
SHORT_SYSTEM = "Answer with the result only."
TEMPLATES = ("alpaca", "alpaca-short", "chat", "chat-short")


def alpaca_prompt(instruction: str, input: str = "", *, preamble: bool = True) -> str:  # noqa: A002
    """Render the Alpaca prompt (everything before the response).

    ``preamble=False`` leaves out its first sentence (the ``alpaca-short`` template).
    """
    if input and input.strip():
        fmt = ALPACA_WITH_INPUT if preamble else ALPACA_SHORT_WITH_INPUT
        return fmt.format(instruction=instruction, input=input)
    return (ALPACA_NO_INPUT if preamble else ALPACA_SHORT_NO_INPUT).format(instruction=instruction)


def alpaca_short_prompt(instruction: str, input: str = "") -> str:  # noqa: A002
    """Render the Alpaca section headers without the preamble sentence."""
    return alpaca_prompt(instruction, input, preamble=False)


def chat_prompt(
    tokenizer: Any,
    instruction: str,
    input: str = "",  # noqa: A002
    system: str | None = None,
) -> str:
    """Render a single user turn with the tokenizer's chat template, ready for the answer.

    ``system`` adds an explicit system turn (which replaces a template's default system prompt).
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("template='chat' needs a tokenizer with a chat_template")
    content = instruction if not (input and input.strip()) else f"{instruction}\n\n{input}"
    messages = [{"role": "user", "content": content}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def format_prompt(
    instruction: str,
    input: str = "",  # noqa: A002
    template: str = "alpaca",
    tokenizer: Any | None = None,
) -> str:
    """Render the prompt part of an instruction record.

    Parameters
    ----------
    instruction, input : str
        The record's instruction and optional context.
    template : {"alpaca", "alpaca-short", "chat", "chat-short"}
        ``"alpaca"``: the Alpaca template. ``"alpaca-short"``: its section headers without the
        preamble. ``"chat"``: ``tokenizer.apply_chat_template`` (with the template's default
        system prompt, if any). ``"chat-short"``: the same with the one-line system turn
        :data:`SHORT_SYSTEM`.
    tokenizer : PreTrainedTokenizerBase, optional
        Needed for ``template="chat"``.
    """
    if template == "alpaca":
        return alpaca_prompt(instruction, input)
    if template == "alpaca-short":
        return alpaca_short_prompt(instruction, input)
    if template == "chat":
        return chat_prompt(tokenizer, instruction, input)
    if template == "chat-short":
        return chat_prompt(tokenizer, instruction, input, system=SHORT_SYSTEM)
    raise ValueError(f"unknown template {template!r}; choose from {TEMPLATES}")
