"""Typed experiment configs: a frozen dataclass schema, a YAML file, `key=value` overrides.

Every experiment declares its settings as a frozen dataclass whose `__post_init__` validates values.
`load_config` merges, in order, the dataclass defaults, a YAML file and command-line overrides
through OmegaConf structured configs, so an unknown key or an ill-typed value is an error naming it.
A key that was renamed (`RENAMED`, and a schema's own `RENAMED` class attribute for its top-level
fields) is refused with its new name.
"""

from __future__ import annotations

import argparse
import io
import pathlib
from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override names an unknown key or holds a bad value."""


# Keys that were renamed, by the end of their dotted path: a key ending in the old name (a whole
# component or more) is refused naming the key it is now. The same words mean the same thing in
# every config: `steps` is a run's length, an optimizer's settings sit in `optimizer`, the
# rollouts' temperature beside their top-k and top-p.
RENAMED = {
    "iterations": "steps",
    "max_steps": "steps",
    "learning_rate": "optimizer.learning_rate",
    "warmup_steps": "optimizer.warmup_steps",
    "weight_decay": "optimizer.weight_decay",
    "max_grad_norm": "optimizer.max_grad_norm",
    "adam_eps": "optimizer.adam_eps",
    "train.temperature": "temperature",
    "save_every": "checkpoint_every",
    "keep_last": "keep_checkpoints",
}


def renamed(schema: type, key: str) -> str | None:
    """The key that `key` (a dotted path) is now called in `schema`, or None: the schema's own
    `RENAMED` class attribute (whole paths) first, then the longest old ending in `RENAMED`."""
    own = getattr(schema, "RENAMED", {})
    if key in own:
        return own[key]
    endings = [old for old in RENAMED if key == old or key.endswith(f".{old}")]
    if not endings:
        return None
    old = max(endings, key=len)
    return key[:len(key) - len(old)] + RENAMED[old]


def _check_renamed(schema: type, base, layer, source: str) -> None:
    """ConfigError naming the first key of `layer` that `schema` does not have and that was
    renamed to a key it has, with its new name (keys of free-form mappings are left to them)."""
    for key in flatten(OmegaConf.to_container(layer)):
        new = renamed(schema, key)
        if (new is not None and OmegaConf.select(base, key, default=_ABSENT) is _ABSENT
                and OmegaConf.select(base, new, default=_ABSENT) is not _ABSENT):
            raise ConfigError(f"{source}: {key!r} was renamed {new!r}")


_ABSENT = object()


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}: nested settings named by their dotted keys."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def load_config(schema: type[T], path: str | pathlib.Path | None = None,
                overrides: Sequence[str] = ()) -> T:
    """`schema` filled from its defaults, then the YAML at `path`, then `key=value` overrides."""
    base = OmegaConf.structured(schema)
    layers = []
    if path is not None:
        layers.append((str(path), read_yaml(path)))
    check_overrides(overrides)
    if overrides:
        layers.append(("command line", OmegaConf.from_dotlist(list(overrides))))
    merged = base
    for source, layer in layers:
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as e:
            _check_renamed(schema, merged, layer, source)
            raise ConfigError(f"{source}: {_merge_error(merged, layer, e)}") from None
    try:
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(_first_line(e)) from None
    except (ValueError, TypeError) as e:  # raised by the schema's __post_init__
        raise ConfigError(str(e)) from None


def from_mapping(schema: type[T], mapping: Any, where: str) -> T:
    """`schema` filled from its defaults, then the (nested) mapping; ConfigError led by
    `where` for a key or value that does not fit."""
    base, layer = OmegaConf.structured(schema), OmegaConf.create(mapping)
    try:
        return OmegaConf.to_object(OmegaConf.merge(base, layer))
    except OmegaConfBaseException as e:
        _check_renamed(schema, base, layer, where)
        raise ConfigError(f"{where}: {_first_line(e)}") from None
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where}: {e}") from None


def check_overrides(overrides: Sequence[str]) -> None:
    """ConfigError listing the overrides that are not `key=value`."""
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"overrides must look like key=value, got {bad}")


def read_yaml(path: str | pathlib.Path):
    """The YAML mapping at `path` as an OmegaConf config; ConfigError naming `path:line` for a
    file that is not UTF-8 or not valid YAML, and `path` for one that is missing, not a mapping
    or holds a malformed `${...}` interpolation."""
    from jaxlab.jsonl import DataError, decode_utf8  # jsonl imports this module (via results)

    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    data = path.read_bytes()  # an OSError here (a permission) is one of its own
    try:
        config = OmegaConf.load(io.StringIO(decode_utf8(data, path)))
    except DataError as e:
        raise ConfigError(f"{e}; save the file as UTF-8") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or e})"
                          ) from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{path}: key {e.full_key}: {_first_line(e)}") from None
    except OSError as e:  # OmegaConf's error for a file holding one number or boolean
        raise ConfigError(f"{path}: expected a mapping of keys to values ({e})") from None
    if not OmegaConf.is_dict(config):
        raise ConfigError(f"{path}: expected a mapping of keys to values, got "
                          f"{type(OmegaConf.to_container(config)).__name__}")
    return config


def from_command_line(schema: type[T], argv: Sequence[str] | None = None,
                      description: str | None = None) -> T:
    """`--config FILE key=value ...` -> a `schema` instance. A bad key or value exits with a usage
    message naming it, before any work starts."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="YAML file (see configs/)")
    parser.add_argument("--check", action="store_true",
                        help="check the config (keys, values) and exit without running")
    parser.add_argument("--debug", action="store_true",
                        help="print an error's traceback here, not only its message "
                             "(jaxlab.cli.run)")
    parser.add_argument("overrides", nargs="*", help="key=value; dotted keys for nested fields")
    args = parser.parse_args(argv)
    try:
        config = load_config(schema, args.config, args.overrides)
    except ConfigError as e:
        parser.error(str(e))
    if args.check:
        print(f"{args.config or 'the defaults'}: a valid config")
        raise SystemExit(0)
    return config


def to_yaml(config: Any) -> str:
    """The resolved config as YAML (written into every results folder)."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _merge_error(base, layer, error: OmegaConfBaseException) -> str:
    """OmegaConf's message for a key of `layer` that does not fit `base`, led by the key and the
    value given. OmegaConf leaves the key out for an element of a list (`ks=[a]`) and gives it
    relative to the element inside a list of configs, so the top-level key is then found by
    merging `layer`'s keys one at a time."""
    message = _first_line(error).replace("'$VALUE' of type '$VALUE_TYPE' ", "")
    key = error.full_key or None
    value = OmegaConf.select(layer, key, default=None) if key else None
    if value is None:
        culprit = next((k for k in layer if not _merges(base, {k: layer[k]})), None)
        if culprit is None:
            return f"{key}: {message}" if key else message
        if key:
            message = f"{key}: {message}"
        key, value = culprit, layer[culprit]
    shown = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    return f"{key}={shown!r}: {message}"


def _merges(base, layer: dict) -> bool:
    try:
        OmegaConf.merge(base, layer)
    except OmegaConfBaseException:
        return False
    return True


def require(condition: bool, message: str) -> None:
    """Raises ValueError(message) unless condition holds (for `__post_init__` checks)."""
    if not condition:
        raise ValueError(message)


def is_int(value: Any) -> bool:
    """An integer, and not a bool."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def require_positive_ints(config: Any, *names: str) -> None:
    """Raises ValueError naming the first of `config`'s fields `names` that is not an integer
    >= 1 (for `__post_init__` checks)."""
    for name in names:
        value = getattr(config, name)
        require(is_int(value) and value >= 1,
                f"{type(config).__name__}.{name} must be an integer >= 1, got {value!r}")


FLOAT_DTYPES = ("float32", "bfloat16", "float16")


def dtype_name(value: Any, what: str) -> str:
    """The canonical name ("float32", "bfloat16" or "float16") of a floating-point dtype written as
    a name ("bfloat16"), a NumPy dtype or scalar type (np.float32, np.dtype("float16")) or a JAX one
    (jnp.bfloat16, jnp.dtype("bfloat16")). Configs store the name, so they stay hashable and
    print as YAML.

    Raises ValueError naming the argument `what` and the value it got, e.g.
    "dtype must be float32, bfloat16 or float16, got int8" (or "got 'bf16'" for an unknown name).
    """
    if isinstance(value, str):
        name, shown = value, repr(value)   # names are taken as written: no aliases like "bf16"
    elif value is None:                    # (np.dtype(None) would be float64)
        name, shown = None, "None"
    else:
        try:
            name = shown = np.dtype(value).name
        except TypeError:                  # not a dtype at all (a number, a torch dtype, ...)
            name, shown = None, repr(value)
    require(name in FLOAT_DTYPES,
            f"{what} must be {', '.join(FLOAT_DTYPES[:-1])} or {FLOAT_DTYPES[-1]}, got {shown}")
    return name
