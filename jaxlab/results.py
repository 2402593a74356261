"""The results folder every experiment leaves: resolved config, JSON metrics, a log, plots.

Writes are atomic (a temporary file renamed into place), so an interrupted run never leaves a
truncated JSON behind and a rerun resumes from what was finished.

One run works in a folder at a time: `open_run` takes an advisory lock on `out_dir/run.lock`
(`fcntl.flock`, held until the process ends), and a second run is refused naming the process
that holds it. A lock file left by a process that died is taken over with a warning.

An experiment may run as several processes (`join_processes`, its first call): every process
computes the same results, process 0 alone writes them and the log, and every process waits for
each write, so that any of them may read back what was written.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import json
import logging
import os
import pathlib
import socket
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import jax
import numpy as np
from omegaconf import OmegaConf

from jaxlab import parallel
from jaxlab.config import ConfigError, flatten, read_yaml, renamed, to_yaml

T = TypeVar("T")


def join_processes() -> int:
    """The first call of every experiment's `main()`, before JAX touches a backend: joins the
    multi-process run the environment describes (`parallel.initialize_processes`: PROCESS_ENV,
    SLURM, Open MPI or a TPU pod slice) and returns the process count (1 when there is none)."""
    return parallel.initialize_processes()


def _several_processes() -> bool:
    return jax.process_count() > 1


def is_writer() -> bool:
    """Whether this process writes results: process 0 of a multi-process run, or the only one.
    (Asking starts JAX's backend: in an experiment, `join_processes` has run by then.)"""
    return jax.process_index() == 0


def write_once(write: Callable[[], None], what: str | pathlib.Path) -> None:
    """Runs `write` (which writes `what`) on process 0 only; with several processes, every one
    then waits until it is done, so that each may read back what was written, and a write that
    fails raises on every process (`together`), so none waits for a process that has stopped.
    Every process must call it alike (as they do running the same program)."""
    together(lambda: write() if is_writer() else None, f"writing {what}")


def together(fn: Callable[[], T], what: str) -> T:
    """`fn()` (host code that every process runs alike: a prompt or reward function, a write on
    process 0); with several processes, an exception that `fn` raises on any one of them is
    raised on every one (the others raise RuntimeError naming the process), so that none waits
    in a collective for a process that has stopped. The processes synchronize once per call."""
    if jax.process_count() == 1:
        return fn()
    from jax.experimental import multihost_utils

    value, error = None, None
    try:
        value = fn()
    except Exception as e:  # raised below, once every process knows
        error = e
    failed = np.asarray(multihost_utils.process_allgather(np.asarray(error is not None)))
    if error is not None:
        raise error
    if failed.any():
        raise RuntimeError(f"{what} failed on process {np.flatnonzero(failed).tolist()} (see "
                           f"its log); process {jax.process_index()} stops with it")
    return value


def wait_for_all(what: str) -> None:
    """With several processes, returns once every one has called it (with the same `what`):
    e.g. once all have read a file that process 0 is about to change."""
    if _several_processes():
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(f"jaxlab.results: {what}")


def write_text(path: pathlib.Path, text: str) -> None:
    """Replaces `path` with `text` atomically, with the permissions of an ordinary new file
    (0666 less the umask, as `open` gives; a temporary file alone would be 0600). On process 0
    only (`write_once`)."""
    write_once(lambda: _replace(path, lambda f: f.write(text.encode())), path)


def save_figure(figure, path: pathlib.Path, **savefig_args) -> None:
    """`figure.savefig(path, **savefig_args)` as an atomic write on process 0 only (its format
    from the suffix of `path`)."""
    format_ = pathlib.Path(path).suffix.lstrip(".") or None
    write_once(lambda: _replace(path, lambda f: figure.savefig(f, format=format_,
                                                               **savefig_args)), path)


def _replace(path: pathlib.Path, write: Callable) -> None:
    """Writes a temporary file beside `path` with `write(binary file)` and renames it to `path`."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("wb", dir=path.parent, delete=False, suffix=".tmp") as f:
        write(f)
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
    write_text(path, json_text(value))


def json_text(value: Any) -> str:
    """`value` as the JSON files of a results folder hold it (indented, a final newline)."""
    return json.dumps(value, indent=2) + "\n"


def read_json(path: pathlib.Path, default: Any = None) -> Any:
    """The JSON at `path`, `default` if there is none; a damaged file is a DataError naming
    `path:line` (`jsonl.read_json`)."""
    from jaxlab import jsonl  # jsonl writes through this module

    path = pathlib.Path(path)
    return jsonl.read_json(path) if path.exists() else default


def spread(values: Sequence[float]) -> dict:
    """{mean, std, min, max, values} of one figure over seeds; std is the sample standard
    deviation, sqrt(sum (x - mean)^2 / (n - 1)) (0 for a single value)."""
    x = np.asarray(values, np.float64)
    std = float(x.std(ddof=1)) if len(x) > 1 else 0.0
    return {"mean": float(x.mean()), "std": std, "min": float(x.min()), "max": float(x.max()),
            "values": x.tolist()}


def open_run(out_dir: str | pathlib.Path, config: Any, may_change: Sequence[str] = ()
             ) -> pathlib.Path:
    """Creates (or reopens, to resume) `out_dir`, records the resolved config in `config.yaml`,
    and sends log lines to the console and `log.txt`.

    The folder is locked for this process (`lock_run`): a second run in it is refused.

    Resuming with a different config would mix results of two experiments, so it is an error,
    except for `out_dir` and the fields named in `may_change` (such as how many items to run,
    which only extends the results; a dotted key names a nested field: "task.eval_limit").

    With several processes, every one checks the config, process 0 alone creates the folder and
    logs to it, and the others send only warnings and errors to the console. Orbax's log lines
    (the `absl` and `asyncio` loggers) go to `log.txt` alone.
    """
    out = pathlib.Path(out_dir)
    saved = out / "config.yaml"
    resolved = to_yaml(config)
    if saved.exists():
        ignored = ("out_dir", *may_change)
        before, now = ({k: v for k, v in flatten(OmegaConf.to_container(tree)).items()
                        if not any(k == i or k.startswith(f"{i}.") for i in ignored)}
                       for tree in (read_yaml(saved), OmegaConf.create(resolved)))
        if before != now:
            changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
            moved = {k: renamed(type(config), k) for k in sorted(before.keys() - now.keys())}
            moved = [f"{k} is now {new}" for k, new in moved.items() if new is not None]
            raise ConfigError(
                f"{out} holds results of a different config ({saved}: {changed} differ"
                + (f"; written by an earlier version: {', '.join(moved)}" if moved else "")
                + "); choose another out_dir or delete it to start over")
    write_once(lambda: out.mkdir(parents=True, exist_ok=True), out)
    left = together(lambda: lock_run(out) if is_writer() else None, f"locking {out / LOCK}")
    write_text(saved, resolved)
    _log_to(out)
    if left:
        logging.getLogger("jaxlab").warning(
            "%s: taking over the lock of process %s, which ended without releasing it",
            out / LOCK, left)
    return out


LIBRARY_LOGGERS = ("absl", "asyncio")   # Orbax's, and its writer threads' event loops'


def _log_to(out: pathlib.Path) -> None:
    """jaxlab's log lines to the console and, on process 0, `out/log.txt`; Orbax's (with the
    tracebacks of its writer threads) to log.txt alone on process 0 (an error that stops the
    run is raised and reported once), their warnings and errors to the console on the
    others."""
    from absl import logging as _  # noqa: F401  (its logger class, before "absl" is created)

    close_run_log()
    logger = logging.getLogger("jaxlab")
    logger.setLevel(logging.INFO if is_writer() else logging.WARNING)
    if is_writer():
        form, log_file = "%(asctime)s %(message)s", LogFile(out / "log.txt")
    else:
        form, log_file = f"%(asctime)s process {jax.process_index()}: %(message)s", None
    console = logging.StreamHandler(sys.stderr)
    for handler in (console, log_file):
        if handler is not None:
            handler.setFormatter(logging.Formatter(form, "%H:%M:%S"))
            logger.addHandler(handler)
    for name in LIBRARY_LOGGERS:
        library = logging.getLogger(name)
        library.propagate = False
        if log_file is None:
            library.addHandler(stderr := logging.StreamHandler(sys.stderr))
            stderr.setLevel(logging.WARNING)
            stderr.setFormatter(console.formatter)
        else:
            library.addHandler(log_file)


def close_run_log() -> None:
    """Undoes `open_run`'s logging: jaxlab's handlers are removed (its log file closed) and
    Orbax's loggers print as before."""
    for name in ("jaxlab", *LIBRARY_LOGGERS):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
            handler.close()
        if name != "jaxlab":
            logger.propagate = True


class LogFile(logging.FileHandler):
    """The run's log.txt; a line that cannot be written (a full disk) is dropped quietly (the
    terminal still shows it), not reported with a traceback of its own."""

    def handleError(self, record: logging.LogRecord) -> None:
        pass


INPUTS = "inputs.json"


def check_inputs(out: pathlib.Path, **sources: str | pathlib.Path) -> None:
    """Records what the run in `out` is started from (each named input: a model folder, a data
    folder or a file; `jaxlab.fingerprint`) in `out/inputs.json`, or, when resuming, refuses
    (ConfigError) if any input recorded there changed, naming it and what changed. An input
    first named by a rerun is added, one given as None or "" is not recorded. Call it once
    the inputs exist, before any work uses them; every process calls it alike, process 0
    reads the inputs.
    """
    from jaxlab import fingerprint

    record = pathlib.Path(out) / INPUTS
    sources = {name: path for name, path in sources.items() if path}

    def checked() -> dict | None:   # the record to write, None if unchanged
        saved = read_json(record, {})
        now = {name: fingerprint.of_path(path) for name, path in sources.items()}
        fingerprint.check_unchanged({k: v["fingerprint"] for k, v in saved.items()}, now,
                                    sources, record)
        merged = {**saved, **{name: {"path": str(sources[name]), "fingerprint": now[name]}
                              for name in now}}
        return None if merged == saved else merged

    # Process 0 reads the inputs and decides; a refusal stops every process.
    merged = together(lambda: checked() if is_writer() else None, f"checking {record}")

    def write() -> None:
        if merged is not None:
            _replace(record, lambda f: f.write(json_text(merged).encode()))

    write_once(write, record)


LOCK = "run.lock"
_held: dict[pathlib.Path, int] = {}   # folder -> descriptor of its locked run.lock


class RunLocked(RuntimeError):
    """Another process is running in a results folder."""


def lock_run(out: pathlib.Path) -> str | None:
    """Takes the advisory lock of results folder `out` for this process (`out/run.lock`, which
    then holds `pid host`), until the process ends; again in the same process, nothing. Raises
    RunLocked naming the process that holds it. Returns the process a lock file left unlocked
    names ("<pid> on <host>": one that was killed), whose lock this takes over, else None."""
    out = pathlib.Path(out).resolve()
    if out in _held:
        return None
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = _holder(fd) or "unknown"
        os.close(fd)
        if e.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        raise RunLocked(f"{out} is in use by another run (process {holder}, from "
                        f"{out / LOCK}); wait for it to end, stop it, or choose another out_dir"
                        ) from None
    left = _holder(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    _held[out] = fd
    return left or None


def _holder(fd: int) -> str:
    """The process a run.lock names ("<pid> on <host>"; empty if none)."""
    return " on ".join(os.pread(fd, 200, 0).decode(errors="replace").split())


@atexit.register
def _release_locks() -> None:
    """Empties and unlocks every run.lock this process holds (a normal end: a lock file that
    still names a process was left by one that was killed)."""
    for fd in _held.values():
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.close(fd)
    _held.clear()
