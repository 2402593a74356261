"""Problem files for DeepConf runs: JSON Lines of {"id", "prompt", "answer"}."""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import NamedTuple

from jaxlab.jsonl import DataError, Field, check_unique, jsonl_text, read_jsonl
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
    check_unique([p.id for p in problems], "id", str(path))
    empty = next((line for line, p in enumerate(problems, 1) if not p.prompt), None)
    if empty is not None:
        raise DataError(f"{path}:{empty}: empty prompt")
    return problems


def save_problems(problems: Sequence[Problem], path: str | pathlib.Path) -> None:
    write_text(pathlib.Path(path), jsonl_text(p._asdict() for p in problems))
