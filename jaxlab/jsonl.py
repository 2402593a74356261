"""JSON Lines files of typed records and JSON files, with errors that name `file:line`, and files
that a run appends to record by record (`resume_records`, `append_record`): a kill can cut the
last line short, and the next run drops that line with a warning and goes on."""

from __future__ import annotations

import json
import logging
import os
import pathlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

from jaxlab import results

log = logging.getLogger("jaxlab")


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
    return [tuple(field_value(record, field, where) for field in fields)
            for where, record in _records(path, _file_bytes(path).splitlines())]


def read_records(path: str | pathlib.Path) -> list[dict]:
    """Every line of a JSON Lines file as a JSON object; DataError naming `path:line` for a line
    that is not UTF-8, not JSON or not an object."""
    return [record for _, record in located_records(path)]


def located_records(path: str | pathlib.Path) -> list[tuple[str, dict]]:
    """("path:line", JSON object) for every line of a JSON Lines file (errors as
    `read_records`)."""
    path = pathlib.Path(path)
    return list(_records(path, _file_bytes(path).splitlines()))


def read_json(path: str | pathlib.Path) -> Any:
    """The JSON value in the file at `path`; DataError naming `path:line` for a file that is
    missing, not UTF-8 or not valid JSON."""
    path = pathlib.Path(path)
    return parse_json(_file_bytes(path), path)


def parse_json(data: bytes, path: str | pathlib.Path, line: int = 1) -> Any:
    """The JSON value in `data`, the bytes of `path` from line `line` on; DataError naming
    `path:line` (and the column) where they are not UTF-8 or not valid JSON."""
    text = decode_utf8(data, path, line)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{line + e.lineno - 1}: not valid JSON ({e.msg}, column "
                        f"{e.colno})") from None


def decode_utf8(data: bytes, path: str | pathlib.Path, line: int = 1) -> str:
    """`data`, the bytes of `path` from line `line` on, as text; DataError naming `path:line`
    and the column of the first byte that is not UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        row = line + data.count(b"\n", 0, e.start)
        column = e.start - data.rfind(b"\n", 0, e.start)
        raise DataError(f"{path}:{row}: not UTF-8 text (byte {data[e.start]:#04x} at column "
                        f"{column})") from None


def _file_bytes(path: pathlib.Path) -> bytes:
    """The bytes of the file at `path`; DataError when there is none."""
    if not path.is_file():
        raise DataError(f"{path} does not exist")
    return path.read_bytes()


def _records(path: pathlib.Path, lines: Sequence[bytes]) -> Iterator[tuple[str, dict]]:
    """("file:line", JSON object) for each line; DataError naming `file:line` for a line that is
    not UTF-8, not JSON or not an object."""
    for line_no, line in enumerate(lines, 1):
        where = f"{path}:{line_no}"
        record = parse_json(line, path, line_no)
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        yield where, record


def resume_records(path: str | pathlib.Path) -> list[dict]:
    """The records of a JSON Lines file that a run appends to (none if there is no file).

    A last line without its newline is what a kill in the middle of `append_record` leaves: it is
    removed from the file with a warning naming it, so the run redoes that record. Any other bad
    line is a DataError naming `file:line`.
    """
    path = pathlib.Path(path)
    data = path.read_bytes() if path.exists() else b""
    lines = data.splitlines()
    partial = bool(data) and not data.endswith(b"\n")
    if partial:
        log.warning("%s:%d: dropping a partial last line (%d bytes, cut off by an interrupted "
                    "write); its record will be redone", path, len(lines), len(lines[-1]))
        lines = lines[:-1]

    def cut():
        if partial:
            with path.open("r+b") as f:
                f.truncate(len(data) - len(data.splitlines()[-1]))

    # Called whether or not a line is cut (or the file exists): in a multi-process run, another
    # process may read the file after process 0 has cut it.
    results.write_once(cut, path)
    return [record for _, record in _records(path, lines)]


def append_record(path: str | pathlib.Path, record: dict) -> None:
    """Appends `record` as one line, flushed to disk before returning; on process 0 only
    (`results.write_once`)."""
    def append():
        with pathlib.Path(path).open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())

    results.write_once(append, path)


def truncate_records(path: str | pathlib.Path, count: int, key: str) -> None:
    """Keeps the records of a file that a run appends to whose `key` is below `count` (the steps
    a restored state has done), so that a resumed run writes each step's record once; a partial
    last line goes as in `resume_records`. On process 0 only (`results.write_text`)."""
    path = pathlib.Path(path)
    if not path.exists():
        return
    kept = []
    for record in resume_records(path):
        if key not in record:
            raise DataError(f"{path}:{len(kept) + 1}: missing key {key!r}")
        if record[key] >= count:
            break
        kept.append(record)
    results.write_text(path, jsonl_text(kept))


def check_unique(keys: Sequence[Any], what: str, source: str,
                 where: Sequence[str] | None = None) -> None:
    """DataError naming where the first repeated key stands: `where[i]` for key i (e.g.
    "file row 3"), by default `source:line` (key i on line i + 1)."""
    where = where or [f"{source}:{i + 1}" for i in range(len(keys))]
    first: dict[Any, int] = {}
    for i, key in enumerate(keys):
        if key in first:
            raise DataError(f"{where[i]}: duplicate {what} {key!r} (first at "
                            f"{where[first[key]]})")
        first[key] = i


def jsonl_text(records: Iterable[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
