"""A synthetic multi-step reasoning task a small model can learn, imperfectly, on a CPU.

A problem sums a few two-digit numbers; the solution writes every partial sum and ends in a boxed
answer, as reasoning models do:

    prompt:    "Q: 37+48+19\\nA:"
    solution:  " 37+48=85, 85+19=104. \\boxed{104}"

Text is tokenized one character per token with a fixed vocabulary (`char_tokenizer` builds a
Hugging Face fast tokenizer for it, saved with the model so that any tool can read both).
"""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

from jaxlab.config import require

PAD, EOS = "<pad>", "<eos>"
CHARS = list("0123456789+=,.: \nQA\\boxed{}")
VOCAB = [PAD, EOS, *dict.fromkeys(CHARS)]


@dataclasses.dataclass(frozen=True)
class Problem:
    id: str
    prompt: str
    answer: str
    solution: str  # a worked solution (training target)


def make_problem(rng: np.random.Generator, terms: int, index: int) -> Problem:
    """One problem with `terms` two-digit numbers and its step-by-step solution."""
    numbers = rng.integers(10, 100, terms).tolist()
    steps, total = [], numbers[0]
    for x in numbers[1:]:
        steps.append(f"{total}+{x}={total + x}")
        total += x
    return Problem(id=f"sum{terms}-{index}", prompt=f"Q: {'+'.join(map(str, numbers))}\nA:",
                   answer=str(total), solution=f" {', '.join(steps)}. \\boxed{{{total}}}")


def make_problems(count: int, terms: int, seed: int) -> list[Problem]:
    require(count >= 1 and terms >= 2, f"need count >= 1 and terms >= 2, got {count}, {terms}")
    rng = np.random.default_rng(seed)
    return [make_problem(rng, terms, i) for i in range(count)]


def draw_problems(rng: np.random.Generator, terms: int, count: int,
                  exclude: frozenset[str] | set[str] = frozenset(), distinct: bool = False,
                  ) -> list[Problem]:
    """`count` problems drawn from `rng` (ids by position), skipping any whose prompt is in
    `exclude` and, if `distinct`, any already drawn."""
    taken, chosen = set(exclude), []
    while len(chosen) < count:
        problem = make_problem(rng, terms, len(chosen))
        if problem.prompt not in taken:
            chosen.append(problem)
            if distinct:
                taken.add(problem.prompt)
    return chosen


# The held-out sets of a model trained with seed s are drawn from seeds HELD_OUT_SEEDS[split] + s
# and saved in the model's folder as HELD_OUT_FILES[split]. The test set is only ever used for
# reported figures; settings are chosen on validation.
HELD_OUT_SEEDS = {"test": 10_000, "validation": 30_000}
HELD_OUT_FILES = {"test": "problems.jsonl", "validation": "validation.jsonl"}


def held_out_sets(count: int, terms: int, seed: int) -> dict[str, list[Problem]]:
    """{"test": ..., "validation": ...}: `count` problems each, disjoint (by prompt) from each
    other. The test set is `make_problems(count, terms, HELD_OUT_SEEDS["test"] + seed)`; the
    validation set is drawn from its own seed, without repeats or test prompts. Training draws
    skip both (`held_out_prompts`)."""
    test = make_problems(count, terms, HELD_OUT_SEEDS["test"] + seed)
    validation = draw_problems(np.random.default_rng(HELD_OUT_SEEDS["validation"] + seed), terms,
                               count, exclude={p.prompt for p in test}, distinct=True)
    return {"test": test, "validation": [dataclasses.replace(p, id=f"val{terms}-{i}")
                                         for i, p in enumerate(validation)]}


def held_out_prompts(count: int, terms: int, seed: int) -> frozenset[str]:
    """The prompts of `held_out_sets(count, terms, seed)`, which training must never draw."""
    return frozenset(p.prompt for split in held_out_sets(count, terms, seed).values()
                     for p in split)


def encode(text: str) -> list[int]:
    """Character ids of `text` (every character must be in the vocabulary)."""
    index = {c: i for i, c in enumerate(VOCAB)}
    unknown = sorted({c for c in text if c not in index})
    require(not unknown, f"characters {unknown} are not in the task's vocabulary")
    return [index[c] for c in text]


def decode(ids) -> str:
    """Text of token ids, without padding and EOS."""
    return "".join(VOCAB[int(i)] for i in ids if VOCAB[int(i)] not in (PAD, EOS))


def token_count(problem: Problem) -> int:
    """Tokens of a training row: prompt, solution and EOS."""
    return len(problem.prompt) + len(problem.solution) + 1  # one token per character


def grade(response: str, answer: str) -> tuple[bool, bool]:
    """(correct, formatted) of a response: its last \\boxed{...} holds exactly `answer`, and it
    has a boxed answer at all (the answers are integers: exact string comparison; the task's
    grader, `tasks.GRADERS["arithmetic"]`)."""
    from jaxlab import tasks

    grader = tasks.GRADERS["arithmetic"]
    boxed = grader.answer(response)
    return grader.correct(boxed, answer), boxed is not None


def greedy_accuracy(model, problems, max_new_tokens: int) -> float:
    """Fraction of `problems` (with .prompt and .answer) that `model` (a Decoder) solves
    greedily (`tasks.evaluate`'s greedy figure, all problems in one batch)."""
    import jax

    from jaxlab import tasks

    return tasks.evaluate(model, [encode(p.prompt) for p in problems],
                          [p.answer for p in problems], tasks.GRADERS["arithmetic"], decode,
                          key=jax.random.key(0), stop_ids=(VOCAB.index(EOS),),
                          max_new_tokens=max_new_tokens, temperature=1.0, samples=0,
                          batch=max(1, len(problems)))["greedy"]


def char_tokenizer():
    """A transformers fast tokenizer for `VOCAB`, one token per character."""
    from jaxlab.models import zoo

    return zoo.char_tokenizer(VOCAB, unk=PAD, pad=PAD, eos=EOS)


def save_tokenizer(path: str | pathlib.Path) -> None:
    """`char_tokenizer()` saved in `path` (on process 0 only: `hf.save_tokenizer`)."""
    from jaxlab.models import hf

    hf.save_tokenizer(char_tokenizer(), path)
