"""JSON Lines files of typed records, with errors that name `file:line`."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple


class DataError(ValueError):
    """A data file that cannot be used as it is; the message names the file, line and field."""


class Field(NamedTuple):
    key: str
    kind: type             # str or int
    required: bool = True
    is_id: bool = False    # ids written as JSON numbers are read as strings


def field_value(record: dict, field: Field, where: str) -> Any:
    """The field's value, checked against its type ("" for a missing optional field)."""
    if field.key not in record:
        if field.required:
            raise DataError(f"{where}: missing key {field.key!r}")
        return ""
    value = record[field.key]
    if not isinstance(value, bool):
        if field.is_id and isinstance(value, int):
            return str(value)
        if isinstance(value, field.kind):
            return value
    raise DataError(f"{where}: {field.key!r} must be {field.kind.__name__}, got "
                    f"{type(value).__name__} {value!r}")


def read_jsonl(path: str | pathlib.Path, fields: Sequence[Field]) -> list[tuple]:
    """The records of a JSON Lines file as tuples of `fields`; DataError naming `path:line` for
    a line that is not a JSON object or lacks a field."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist")
    rows = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            where = f"{path}:{line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
            rows.append(tuple(field_value(record, field, where) for field in fields))
    return rows


def check_unique(keys: Sequence[Any], what: str, source: str) -> None:
    """DataError naming `source:line` of the first repeated key (key i stands on line i + 1)."""
    first: dict[Any, int] = {}
    for i, key in enumerate(keys):
        if key in first:
            raise DataError(f"{source}:{i + 1}: duplicate {what} {key!r} (first at "
                            f"{source}:{first[key] + 1})")
        first[key] = i


def jsonl_text(records: Iterable[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
