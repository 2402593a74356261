"""The results folder every experiment leaves: resolved config, JSON metrics, a log, plots.

Writes are atomic (a temporary file renamed into place), so an interrupted run never leaves a
truncated JSON behind and a rerun resumes from what was finished.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

from omegaconf import OmegaConf

from jaxlab.config import ConfigError, read_yaml, to_yaml


def write_text(path: pathlib.Path, text: str) -> None:
    """Replaces `path` with `text` atomically, with the permissions of an ordinary new file
    (0666 less the umask, as `open` gives; a temporary file alone would be 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        f.write(text)
        f.flush()
        os.fchmod(f.fileno(), 0o666 & ~_umask())
        os.fsync(f.fileno())
    os.replace(f.name, path)


def _umask() -> int:
    """The process's umask (reading it means setting it: set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_json(path: pathlib.Path, value: Any) -> None:
    write_text(path, json.dumps(value, indent=2) + "\n")


def read_json(path: pathlib.Path, default: Any = None) -> Any:
    """The JSON at `path`, `default` if there is none; a corrupt file is an error naming it."""
    if not path.exists():
        return default
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def open_run(out_dir: str | pathlib.Path, config: Any, may_change: Sequence[str] = ()
             ) -> pathlib.Path:
    """Creates (or reopens, to resume) `out_dir`, records the resolved config in `config.yaml`,
    and sends log lines to the console and `log.txt`.

    Resuming with a different config would mix results of two experiments, so it is an error,
    except for `out_dir` and the top-level fields named in `may_change` (such as how many items
    to run, which only extends the results).
    """
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "config.yaml"
    resolved = to_yaml(config)
    if saved.exists():
        ignored = {"out_dir", *may_change}
        before, now = ({k: v for k, v in OmegaConf.to_container(tree).items() if k not in ignored}
                       for tree in (read_yaml(saved), OmegaConf.create(resolved)))
        if before != now:
            before, now = _flatten(before), _flatten(now)
            changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
            raise ConfigError(
                f"{out} holds results of a different config ({saved}: {changed} differ); choose "
                f"another out_dir or delete it to start over")
    write_text(saved, resolved)
    logger = logging.getLogger("jaxlab")
    logger.setLevel(logging.INFO)
    logger.handlers.clear()
    for handler in (logging.StreamHandler(sys.stderr), logging.FileHandler(out / "log.txt")):
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
    return out


def _flatten(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}: nested settings named by their dotted keys."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
