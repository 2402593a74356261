"""What a run was started from, recorded so that a resume can tell when any of it changed.

A run records each of its inputs in `out_dir/inputs.json` (`results.check_inputs`) as a flat
mapping of what identifies it:

- a model folder (one with a config.json): every value of its config.json, the dtype and shape
  of every tensor (from the safetensors headers) and the size and sha256 of each tokenizer
  file. The weights themselves are not hashed (they can be many GiB): a model retrained with
  the same architecture under the same path is not told apart;
- any other folder: the size and sha256 of every file in it;
- a file: its size and sha256.

Resuming with an input that changed under the same path (a narrower model, an edited
tokenizer, a longer data file) would mix two experiments, so a rerun compares and is refused
naming what changed (`check_unchanged`).
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from collections.abc import Mapping
from typing import Any

from jaxlab.config import ConfigError, flatten

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
                   "tokenizer.model", "chat_template.jinja", "chat_template.json")
# config.json keys that a save rewrites without changing the model.
VOLATILE = ("transformers_version", "_name_or_path")


def of_path(path: str | pathlib.Path) -> dict[str, Any]:
    """The fingerprint of a model folder, a data folder or a file (see the module docstring):
    {what: value}, with JSON values. FileNotFoundError when `path` does not exist."""
    path = pathlib.Path(path)
    if path.is_file():
        return file_fingerprint(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if (path / "config.json").is_file():
        return model_fingerprint(path)
    return {f"{f.relative_to(path)}:{k}": v for f in sorted(path.rglob("*")) if f.is_file()
            for k, v in file_fingerprint(f).items()}


def file_fingerprint(path: pathlib.Path) -> dict[str, Any]:
    """{"size": bytes, "sha256": hex digest} of one file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(2**20):
            digest.update(block)
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}


def model_fingerprint(folder: pathlib.Path) -> dict[str, Any]:
    """config.json's values ("config.json:<dotted key>"), each tensor's "<dtype>[shape]"
    ("tensor:<name>") and each tokenizer file's size and sha256 ("<file>:size",
    "<file>:sha256")."""
    from jaxlab.models import hf

    config = hf.read_json(folder / "config.json")
    found = {f"config.json:{k}": v for k, v in flatten(config).items() if k not in VOLATILE}
    found.update({f"tensor:{name}": spec for name, spec in hf.tensor_specs(folder).items()})
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            found.update({f"{name}:{k}": v
                          for k, v in file_fingerprint(folder / name).items()})
    return found


def changes(before: Mapping[str, Any], now: Mapping[str, Any], limit: int = 6) -> list[str]:
    """What differs between two fingerprints of one input, for people: "<what>: <before> ->
    <now>" (or "added" / "removed"), at most `limit` of them and then how many more."""
    keys = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    lines = []
    for key in keys[:limit]:
        if key not in now:
            lines.append(f"{key} removed")
        elif key not in before:
            lines.append(f"{key} added")
        else:
            lines.append(f"{key}: {_short(before[key])} -> {_short(now[key])}")
    if len(keys) > limit:
        lines.append(f"and {len(keys) - limit} more")
    return lines


def _short(value: Any) -> str:
    """A fingerprint value for a message: a sha256 digest shortened to 12 characters."""
    if isinstance(value, str):
        return value[:12] if len(value) == 64 else value
    return json.dumps(value)


def check_unchanged(saved: Mapping[str, Mapping[str, Any]], now: Mapping[str, Mapping[str, Any]],
                    sources: Mapping[str, Any], record: pathlib.Path) -> None:
    """ConfigError when an input that `saved` (the fingerprints a run recorded in `record`)
    and `now` both have differs, naming each input, its path and what changed."""
    changed = [f"{name} ({sources[name]}): " + "; ".join(changes(saved[name], now[name]))
               for name in sorted(saved.keys() & now.keys()) if saved[name] != now[name]]
    if changed:
        raise ConfigError(
            f"{record.parent} was started from other inputs than this run's ({record}):\n  "
            + "\n  ".join(changed)
            + "\nresume with the inputs it was started from, or choose another out_dir "
              "(or delete it) to start over")
