"""DeepConf's prompts: a problem as the model's chat turn, with the paper's instruction.

    ids = build_prompts(tokenizer, ["What is 2 + 3?"])[0]   # token ids, ready for the sampler

The paper's prompts end with "Please reason step by step, and put your final answer within
\\boxed{}." (section 3 of `papers/deepconf.md`); the official code (facebookresearch/deepconf,
`examples/`) puts the problem in a user message and applies the tokenizer's chat template with
`add_generation_prompt=True`, so the model starts its own turn. `build_prompts` does the same:
the user message is the problem, a newline, and the instruction. A tokenizer without a chat
template (e.g. the character tokenizer of `arithmetic.py`) gets the plain problem text, with one
logged warning; `chat_template=False` asks for the plain text without a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

log = logging.getLogger("jaxlab")

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def user_message(problem: str, instruction: str = INSTRUCTION) -> str:
    """The user turn: the problem, then the instruction on its own line (none when empty)."""
    return f"{problem}\n{instruction}" if instruction else problem


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def build_prompts(tokenizer, problems: Sequence[str], chat_template: bool = True,
                  instruction: str = INSTRUCTION, system_prompt: str = "",
                  template_kwargs: Mapping[str, Any] | None = None) -> list[list[int]]:
    """Token ids of each problem's prompt.

    With `chat_template` and a tokenizer that has one: the ids of
    `tokenizer.apply_chat_template(messages, add_generation_prompt=True)`, the messages being a
    system turn holding `system_prompt` (when not empty) and the user turn
    `user_message(problem, instruction)`, and `template_kwargs` passed on to the template (e.g.
    `{"enable_thinking": False}`, which Qwen3's template reads). Otherwise the plain problem
    text, tokenized without special tokens (a warning is logged once when a template was asked
    for but the tokenizer has none).
    """
    if chat_template and not has_chat_template(tokenizer):
        log.warning("the tokenizer has no chat template: prompts are the plain problem text, "
                    "without the instruction %r", instruction)
        chat_template = False
    if not chat_template:
        return [list(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in problems]
    prompts = []
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    for problem in problems:
        ids = tokenizer.apply_chat_template(
            [*system, {"role": "user", "content": user_message(problem, instruction)}],
            add_generation_prompt=True, tokenize=True, **(template_kwargs or {}))
        if not isinstance(ids, list):  # transformers may answer a BatchEncoding
            ids = ids["input_ids"]
        prompts.append([int(i) for i in ids])
    return prompts
