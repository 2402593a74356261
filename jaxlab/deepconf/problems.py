"""Problem files for DeepConf runs: JSON Lines of {"id", "prompt", "answer"}."""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import NamedTuple

from jaxlab.jsonl import DataError, Field, jsonl_text, read_jsonl
from jaxlab.results import write_text

_FIELDS = (Field("id", str, is_id=True), Field("prompt", str), Field("answer", str, is_id=True))


class Problem(NamedTuple):
    id: str
    prompt: str
    answer: str


def load_problems(path: str | pathlib.Path) -> list[Problem]:
    """Every problem of the file; DataError naming file:line for a malformed line, a duplicate
    id or an empty prompt, and for a file with no problems."""
    problems = [Problem(*row) for row in read_jsonl(path, _FIELDS)]
    if not problems:
        raise DataError(f"{path} holds no problems")
    seen: dict[str, int] = {}
    for line, p in enumerate(problems, 1):
        if p.id in seen:
            raise DataError(f"{path}:{line}: duplicate id {p.id!r} (first at line {seen[p.id]})")
        if not p.prompt:
            raise DataError(f"{path}:{line}: empty prompt")
        seen[p.id] = line
    return problems


def save_problems(problems: Sequence[Problem], path: str | pathlib.Path) -> None:
    write_text(pathlib.Path(path), jsonl_text(p._asdict() for p in problems))
