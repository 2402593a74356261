"""The answer of a reasoning trace and which answers are the same (section 2 of
`papers/deepconf.md`).

A trace's answer is the content of its last balanced `\\boxed{...}`. Answers vote together when
math-verify finds them mathematically equal (`\\frac12`, `1/2`, `0.5` and `\\dfrac{1}{2}` are one
answer), not only when their strings match; an answer math-verify cannot parse falls back to its
text with whitespace collapsed. A trace without an answer does not vote.

    groups = group_answers([boxed_answer(text) for text in traces])
    groups.ids     # int32 [N]: group of each trace, NO_ANSWER (-1) where it has none
    groups.labels  # [G]: each group's first-seen member

math-verify bounds its parsing and comparisons with SIGALRM, so call these functions from the
main thread. math-verify and SymPy come with the `deepconf` extra (`pip install 'jaxlab[deepconf]'`)
and are imported on first use.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Sequence

import numpy as np

from jaxlab.extras import require_extra

NO_ANSWER = -1

# TeX tokens that matter for box matching: a box opening, a brace, or a control sequence (a word
# like `\frac`, or a backslash and one character like `\{` or `\\`, so escaped braces never
# count). Every other character lies between tokens.
_TOKENS = re.compile(r"(?P<box>\\boxed(?![A-Za-z])\s*\{)|(?P<open>\{)|(?P<close>\})"
                     r"|\\(?:[A-Za-z]+|.)", re.DOTALL)


def boxed_answer(text: str) -> str | None:
    """The content of the last balanced `\\boxed{...}` in `text`, stripped; None if there is none.

    "Last" is the box that opens last among those whose brace closes (so a nested
    `\\boxed{\\boxed{3}}` answers `3`, and a box cut off before its closing brace is skipped in
    favour of an earlier complete one). Braces follow TeX: `\\{` and `\\}` are literal characters,
    a `}` with nothing open is ignored, and `\\boxed {x}` (space before the brace) is a box. A box
    whose content is blank is no answer. Linear in len(text); never raises.
    """
    opened: list[int] = []  # per open brace: where its box content starts, or -1 if not a box
    start, end = -1, -1
    for token in _TOKENS.finditer(text):
        if token.lastgroup == "box":
            opened.append(token.end())
        elif token.lastgroup == "open":
            opened.append(-1)
        elif token.lastgroup == "close" and opened:
            content = opened.pop()
            if content > start:
                start, end = content, token.start()
    answer = text[start:end].strip() if start >= 0 else ""
    return answer or None


def normalize(answer: str) -> str:
    """The plain-string form of an answer: whitespace runs collapsed to one space, ends stripped."""
    return " ".join(answer.split())


def _math_verify():
    """The math_verify module (the `deepconf` extra)."""
    return require_extra("math_verify", "deepconf", "answer equivalence")


def _verify(gold: Sequence, answer: Sequence) -> bool:
    return bool(_math_verify().verify(list(gold), list(answer)))


@functools.lru_cache(maxsize=8192)
def _parsed(answer: str) -> tuple | None:
    """math-verify's parse of a normalized answer as a boxed expression, or None if it has none."""
    expressions = _math_verify().parse(f"\\boxed{{{answer}}}", fallback_mode="no_fallback")
    return tuple(expressions) or None


@functools.lru_cache(maxsize=65536)
def _verified(label: str, answer: str) -> bool:
    """`_verify` of two normalized answers that both parse, remembered: online voting regroups
    the same answers after every round."""
    return _verify(_parsed(label), _parsed(answer))


@functools.lru_cache(maxsize=8192)
def _identity(answer: str) -> str:
    """An exact structural key of a normalized answer that parses: equal keys are the same
    SymPy expression, so equal answers."""
    sympy = require_extra("sympy", "deepconf", "answer equivalence")
    return sympy.srepr(_parsed(answer)[0])


def equivalent(answer: str, other: str) -> bool:
    """Whether `other` is the same answer as `answer`: math-verify's `verify(answer, other)` when
    both parse (the first argument plays the gold role; math-verify is not quite symmetric), else
    equal normalized strings."""
    a, b = normalize(answer), normalize(other)
    pa, pb = _parsed(a), _parsed(b)
    if pa is None or pb is None:
        return a == b
    return _verify(pa, pb)


def is_correct(answer: str | None, reference: str) -> bool:
    """Whether a trace's answer equals the reference answer (False when it has none)."""
    return answer is not None and equivalent(reference, answer)


@dataclasses.dataclass(frozen=True)
class AnswerGroups:
    """Answers grouped by equivalence; groups numbered 0, 1, ... in order of first appearance."""

    ids: np.ndarray          # int32 [N], the group of each answer, NO_ANSWER where there is none
    labels: tuple[str, ...]  # [G], each group's first-seen member (normalized)

    def label(self, group: int) -> str | None:
        """The answer text of a group id, None for NO_ANSWER."""
        return None if group == NO_ANSWER else self.labels[group]


def group_answers(answers: Sequence[str | None]) -> AnswerGroups:
    """Groups answers [N] (None or blank: no answer) by mathematical equivalence.

    Deterministic, in order of first appearance: each distinct answer joins the first existing
    group whose label (first-seen member) it is `equivalent` to, else starts a new group. Answers
    are compared with their group's label only, so the groups do not depend on math-verify being
    transitive. Cost: identical normalized strings are merged first, then identical parsed
    expressions, so math-verify compares only distinct expressions with the group labels
    (U distinct parses and at most U x G comparisons, G groups).
    """
    normalized = [None if a is None else normalize(a) for a in answers]
    group_of: dict[str, int] = {}        # normalized answer -> group
    group_of_expr: dict[str, int] = {}   # parsed expression identity -> group
    labels: list[str] = []
    parsed_labels: list[tuple[int, str]] = []  # (group, label) of labels math-verify can read
    for answer in dict.fromkeys(a for a in normalized if a):
        expressions = _parsed(answer)
        if expressions is None:
            group_of[answer] = len(labels)
            labels.append(answer)
            continue
        key = _identity(answer)
        if key not in group_of_expr:
            group_of_expr[key] = next(
                (g for g, label in parsed_labels if _verified(label, answer)),
                len(labels))
            if group_of_expr[key] == len(labels):
                parsed_labels.append((len(labels), answer))
                labels.append(answer)
        group_of[answer] = group_of_expr[key]
    ids = np.array([group_of[a] if a else NO_ANSWER for a in normalized], np.int32)
    return AnswerGroups(ids=ids, labels=tuple(labels))
