"""Prompts through the tokenizer's chat template, as transformers applies it."""

import logging

import pytest

from jaxlab.deepconf import arithmetic, prompts
from jaxlab.models import hf, zoo


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory):
    """`zoo.chat_tokenizer()` (ChatML special tokens, a Qwen-style chat template) saved to and
    loaded from a local folder as a checkpoint's tokenizer is."""
    folder = tmp_path_factory.mktemp("tokenizer")
    zoo.chat_tokenizer().save_pretrained(folder)
    return hf.load_tokenizer(folder)


def test_the_instruction_is_the_papers():
    assert prompts.INSTRUCTION == ("Please reason step by step, and put your final answer "
                                   "within \\boxed{}.")


def test_chat_template_is_applied_as_transformers_applies_it(chat_tokenizer):
    problems = ["What is 2 + 3?", "Find x: 2x = 10."]
    got = prompts.build_prompts(chat_tokenizer, problems)
    for ids, problem in zip(got, problems, strict=True):
        message = [{"role": "user", "content": f"{problem}\n{prompts.INSTRUCTION}"}]
        want = chat_tokenizer.apply_chat_template(message, add_generation_prompt=True,
                                                  tokenize=True)
        assert ids == (want if isinstance(want, list) else list(want["input_ids"]))
        # and the text the template writes, by hand: ChatML with the assistant turn opened
        assert chat_tokenizer.decode(ids) == (
            f"<|im_start|>user\n{problem}\n{prompts.INSTRUCTION}<|im_end|>\n"
            "<|im_start|>assistant\n")


def test_the_flag_turns_the_template_off(chat_tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger="jaxlab"):
        got = prompts.build_prompts(chat_tokenizer, ["1+1"], chat_template=False)
    assert got == [chat_tokenizer("1+1", add_special_tokens=False)["input_ids"]]
    assert not caplog.records


def test_a_tokenizer_without_template_falls_back_to_the_plain_prompt_with_a_warning(caplog):
    tokenizer = arithmetic.char_tokenizer()
    assert not prompts.has_chat_template(tokenizer)
    problems = ["Q: 12+34\nA:", "Q: 5+6\nA:"]
    with caplog.at_level(logging.WARNING, logger="jaxlab"):
        got = prompts.build_prompts(tokenizer, problems)
    assert got == [arithmetic.encode(p) for p in problems]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no chat template" in warnings[0].getMessage()


def test_template_arguments_reach_the_template():
    """Qwen3's template reads `enable_thinking`; template_kwargs pass it (and any other)."""
    chat_tokenizer = zoo.chat_tokenizer()
    chat_tokenizer.chat_template = (
        "{%- for m in messages %}{{ m.content }}{% endfor %}"
        "{%- if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}")
    off = prompts.build_prompts(chat_tokenizer, ["1+1"], instruction="",
                                template_kwargs={"enable_thinking": False})[0]
    default = prompts.build_prompts(chat_tokenizer, ["1+1"], instruction="")[0]
    assert chat_tokenizer.decode(off) == "1+1<think></think>"
    assert chat_tokenizer.decode(default) == "1+1"
