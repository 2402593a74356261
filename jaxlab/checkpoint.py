"""Orbax checkpoints of a train state: the last N steps and the best one are kept.

Each checkpoint is written to a temporary directory and renamed into place when complete
(Orbax's atomic finalize), so a write interrupted by a crash or a kill leaves no checkpoint that
could be mistaken for a finished one; the leftover is ignored and removed on the next start.
A state restored from step s and trained on is bit-for-bit the run that never stopped, provided
the run's randomness and data order are functions of the state (see `jaxlab.rl.train`).

A state saved under one mesh restores under another (or on one device): `restore` places every
array by the shardings it is given, whatever split it was saved with. In a multi-process run every
process calls `save` and `restore` alike (Orbax writes each process's shards and process 0 the
metadata), on a filesystem every process sees.

A finished checkpoint can still be damaged later (a file cut short, emptied or edited, a disk that
filled up). `restore` then skips it with a warning naming its folder and what is wrong, and
restores the newest checkpoint before it that reads back whole and finite. A checkpoint of
another model or config (other parameter names, shapes or dtypes than the state restored into)
is not damage: before reading any array, `restore` compares the stored tree with the target's
and raises `CheckpointMismatch` naming the parameters, leaving every checkpoint as it is.

A write that fails (a full disk, a folder that cannot be written) raises `SaveError` naming the
checkpoint's folder, from `save`, `wait` or `close` (a background write's failure shows at the
next of them), Orbax's exception its cause; the checkpoints written before it are kept whole.
The tracebacks that Orbax's writer threads log for such a failure go to the run's log.txt when a
run has opened one (`results.open_run` gives the `absl` logger that file, on process 0), and are
otherwise (library use, the other processes) kept off the console, where the SaveError alone
reports the failure.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import operator
import pathlib
import shutil
from collections.abc import Mapping
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from orbax.checkpoint import checkpoint_managers

from jaxlab import results
from jaxlab.config import require, require_positive_ints

State = TypeVar("State")

log = logging.getLogger("jaxlab")


class RestoreError(RuntimeError):
    """No checkpoint of a directory can be restored; the message names each one and why."""


class CheckpointMismatch(ValueError):
    """A checkpoint that holds another tree than the state restored into (parameters of other
    names, shapes or dtypes: another model or config); it is kept as it is."""


class SaveError(RuntimeError):
    """A checkpoint that could not be written; the message names its folder and the cause."""

BEST_MODES = ("min", "max")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    keep_checkpoints: int = 3         # the newest checkpoints kept
    best_metric: str | None = "loss"  # also keep the best checkpoint by this metric (None: no)
    best_mode: str = "min"            # "min" or "max": which value of best_metric is best
    checkpoint_every: int = 1         # save at steps that are multiples of this
    async_save: bool = True           # write in a background thread while training goes on

    def __post_init__(self):
        require_positive_ints(self, "keep_checkpoints", "checkpoint_every")
        require(self.best_mode in BEST_MODES,
                f"CheckpointConfig.best_mode must be one of {BEST_MODES}, got {self.best_mode!r}")


class Checkpointer:
    """Saves and restores a pytree state (e.g. `TrainState`) under `directory/<step>/`."""

    def __init__(self, directory: str | pathlib.Path,
                 config: CheckpointConfig = CheckpointConfig()):
        self.directory = pathlib.Path(directory).absolute()
        self.config = config
        policies = [checkpoint_managers.LatestN(n=config.keep_checkpoints)]
        best_fn = None
        if config.best_metric is not None:
            best_fn = operator.itemgetter(config.best_metric)
            policies.append(checkpoint_managers.BestN(
                get_metric_fn=best_fn, reverse=config.best_mode == "min", n=1,
                keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=checkpoint_managers.FixedIntervalPolicy(config.checkpoint_every),
            preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
            best_fn=best_fn, best_mode=config.best_mode,
            enable_async_checkpointing=config.async_save,
            cleanup_tmp_directories=True,  # remove what an interrupted write left behind
            create=True)
        self._open = lambda: ocp.CheckpointManager(
            self.directory, options=options, item_handlers=ocp.StandardCheckpointHandler())
        self._manager = self._open()
        self._pending: int | None = None  # the step being written in the background
        self._quiet = _OrbaxTracebacks()
        logging.getLogger("absl").addFilter(self._quiet)

    def save(self, step: int, state: Any, metrics: Mapping[str, Any] | None = None,
             force: bool = False) -> bool:
        """Saves `state` as `step` if it is a save step (or `force`); returns whether it did.
        `metrics` (scalars) rank checkpoints for `best_metric`, which they must then contain."""
        if self.config.best_metric is not None:
            require(metrics is not None and self.config.best_metric in metrics,
                    f"metrics must contain {self.config.best_metric!r} to rank checkpoints, "
                    f"got {None if metrics is None else sorted(metrics)}")
        metrics = None if metrics is None else {k: float(v) for k, v in metrics.items()}
        self.wait()  # an earlier background write that failed raises here, naming its step
        with self._writing(int(step)):
            saved = self._manager.save(int(step), args=ocp.args.StandardSave(_spread(state)),
                                       metrics=metrics, force=force)
        self._pending = int(step) if saved else None
        return saved

    @contextlib.contextmanager
    def _writing(self, step: int | None):
        """Raises an error of Orbax's while it writes `step` as one SaveError naming the
        folder, the cause and the checkpoints kept (Orbax's exception, with its traceback, as
        the SaveError's cause)."""
        try:
            yield
        except Exception as e:
            folder = self.directory if step is None else self.directory / str(step)
            raise SaveError(
                f"checkpoint {folder} could not be written ({type(e).__name__}: "
                f"{_first_line(e)}); the complete checkpoints before it are kept "
                f"({self.all_steps()} in {self.directory}): make room or fix the folder's "
                f"permissions, and rerun to go on from the latest") from e

    def restore(self, target: State, step: int | None = None, shardings: Any = None) -> State:
        """The state saved at `step` (default: the newest complete checkpoint that restores),
        with the structure and dtypes of `target` (a freshly initialized state or its
        `jax.eval_shape`), its arrays placed by `shardings` (a tree of `jax.sharding.Sharding`s
        like `target`'s, e.g. `parallel.tree_shardings(target, mesh)`; default: those of
        `target`'s arrays). The mesh the state was saved under does not matter.

        A checkpoint that cannot be read back or holds non-finite values (on any process) is
        skipped with a warning naming its folder, and the one before it is tried. Raises
        FileNotFoundError when there is no complete checkpoint (or none at `step`),
        RestoreError, naming every checkpoint tried and why it failed, when none restores, and
        CheckpointMismatch, before any array is read and leaving every checkpoint as it is, when
        the one tried holds other parameter paths, shapes or dtypes than `target`.
        """
        self.wait()
        steps = self.all_steps()
        if step is not None:
            steps = [step] if step in steps else []
        if not steps:
            raise FileNotFoundError(f"no complete checkpoint {'' if step is None else step} in "
                                    f"{self.directory} (complete steps: {self.all_steps()})")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        if shardings is not None:
            abstract = jax.tree.map(
                lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                                            sharding=sharding),
                abstract, shardings)
        wanted = abstract
        abstract, placed = _spread_targets(abstract)
        failures = []
        for tried in reversed(steps):
            folder = self.directory / str(tried)
            try:
                self._check_tree(tried, wanted)
            except Exception as e:  # a mismatch, or metadata that cannot be read
                error = e
            else:
                error = None
            # Orbax's read has collectives of its own: before any process reads, every one
            # learns whether one saw a mismatch (all raise it) or could not read the metadata.
            mismatch, failed = _on_any_process(isinstance(error, CheckpointMismatch),
                                               error is not None)
            if mismatch:
                raise error if isinstance(error, CheckpointMismatch) else CheckpointMismatch(
                    f"checkpoint {folder} holds another model or config than the state "
                    f"restored into, as another process found (its error names the "
                    f"parameters); the checkpoint is kept as it is")
            if not failed:
                try:
                    state = placed(self._manager.restore(
                        tried, args=ocp.args.StandardRestore(abstract)))
                    bad = nonfinite_leaves(state)
                    if bad:
                        raise ValueError(f"non-finite values in {bad[:3]}")
                except Exception as e:  # Orbax, TensorStore and JSON errors alike
                    error = e
                # Each process reads its own shards: a step is restored only if every one did.
                (failed,) = _on_any_process(error is not None)
            if failed:
                e = error or RuntimeError("another process could not restore it")
                # A failed read can leave the manager unable to read the next step: reopen it.
                self._manager.close()
                self._manager = self._open()
                failures.append(f"{folder}: {type(e).__name__}: {_first_line(e)}")
                log.warning("checkpoint %s cannot be restored (%s: %s); %s", folder,
                            type(e).__name__, _first_line(e),
                            "trying the one before it" if tried != steps[0] else "none is left")
                continue
            if failures:
                self._set_aside(steps[steps.index(tried) + 1:])
                log.warning("restored step %d from %s", tried, folder)
            return state
        raise RestoreError(f"no checkpoint in {self.directory} can be restored:\n  "
                           + "\n  ".join(failures))

    def _check_tree(self, step: int, target: Any) -> None:
        """Raises CheckpointMismatch if the tree stored at `step` (its metadata: paths, shapes,
        dtypes) is not `target`'s; an unreadable metadata file raises as damage does."""
        stored = self._manager.item_metadata(step)
        if stored is None:  # no metadata: the read that follows says what is wrong
            return
        lines = mismatches(getattr(stored, "tree", stored), target)
        if lines:
            shown = "\n  ".join(lines[:8]) + (f"\n  ... and {len(lines) - 8} more"
                                              if len(lines) > 8 else "")
            raise CheckpointMismatch(
                f"checkpoint {self.directory / str(step)} holds another model or config than "
                f"the state restored into (stored vs requested):\n  {shown}\nThe checkpoint "
                f"is kept as it is: to go on with it, use the model and config it was "
                f"trained with; to train this model, use another out_dir")

    def _set_aside(self, steps: list[int]) -> None:
        """Renames the folders of damaged `steps` to `<step>.damaged` (kept for inspection, in
        place of an earlier one of that name), so that the run can save those steps again."""
        for step in steps:
            folder = self.directory / str(step)
            aside = folder.with_name(f"{step}.damaged")

            def move(folder=folder, aside=aside):
                shutil.rmtree(aside, ignore_errors=True)
                folder.rename(aside)

            results.write_once(move, aside)
            log.warning("moved the damaged checkpoint %s to %s", folder, aside)
        self._manager.close()
        self._manager = self._open()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """The kept step with the best `best_metric` (the latest if there is none)."""
        return self._manager.best_step()

    def wait(self) -> None:
        """Blocks until background writes are complete; raises SaveError if one failed."""
        step, self._pending = self._pending, None
        with self._writing(step):
            self._manager.wait_until_finished()

    def close(self) -> None:
        """Finishes the background writes (SaveError if one failed) and stops Orbax's threads,
        so that none is left to run, or print, as the interpreter exits."""
        try:
            self.wait()
        finally:
            self._manager.close()
            logging.getLogger("absl").removeFilter(self._quiet)

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        """Closes; while an exception (a KeyboardInterrupt too) is already on its way out, a
        failed write is logged rather than raised over it."""
        if kind is None:
            self.close()
            return
        try:
            self.close()
        except SaveError as e:
            log.error("%s", e)


def mismatches(stored: Any, target: Any) -> list[str]:
    """How the `target` tree (arrays or `jax.ShapeDtypeStruct`s) differs from a checkpoint's
    `stored` metadata tree, one line per parameter path, in the target's order: "path: stored
    float32[29, 64], requested float32[29, 32]", or a path only one of them has. Leaves that are
    not arrays are compared by path only."""
    have, want = ocp.tree.to_flat_dict(stored), ocp.tree.to_flat_dict(target)
    lines = []
    for path in [*want, *(p for p in have if p not in want)]:
        name = ".".join(str(k) for k in path)
        if path not in have:
            lines.append(f"{name}: not in the checkpoint, requested {_shown(want[path])}")
        elif path not in want:
            lines.append(f"{name}: stored {_shown(have[path])}, not in the state")
        elif None not in (_signature(have[path]), _signature(want[path])) and (
                _signature(have[path]) != _signature(want[path])):
            lines.append(f"{name}: stored {_shown(have[path])}, requested {_shown(want[path])}")
    return lines


def _signature(leaf: Any) -> str | None:
    """"float32[29, 64]" for an array, its metadata or a ShapeDtypeStruct (a PRNG key as the
    uint32 data Orbax stores); None for a leaf that is not an array."""
    if not hasattr(leaf, "shape") or getattr(leaf, "dtype", None) is None:
        return None
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        leaf = jax.eval_shape(jax.random.key_data, leaf)
    return f"{jnp.dtype(leaf.dtype).name}[{', '.join(str(n) for n in leaf.shape)}]"


def _shown(leaf: Any) -> str:
    return _signature(leaf) or type(leaf).__name__


class _OrbaxTracebacks(logging.Filter):
    """Keeps the tracebacks that Orbax's background threads log (through absl) when a write
    fails off the console: the failure is raised as one SaveError, Orbax's exception its cause.
    Where a run's log file takes the `absl` logger's lines (`results.open_run`, on process 0),
    they go on to it; otherwise (library use, or a process without the log) they are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and record.exc_info and not any(
            isinstance(h, logging.FileHandler) for h in logging.getLogger("absl").handlers))


def nonfinite_leaves(tree: Any) -> list[str]:
    """The paths of `tree`'s floating-point leaves that hold a NaN or an infinity."""
    return [jax.tree_util.keystr(path) for path, x in jax.tree_util.tree_leaves_with_path(tree)
            if jnp.issubdtype(jnp.result_type(x), jnp.inexact) and not bool(jnp.isfinite(x).all())]


def _process_sharding() -> NamedSharding:
    """Replicated over one device per process (each one's first)."""
    first: dict[int, jax.Device] = {}
    for device in jax.devices():
        first.setdefault(device.process_index, device)
    return NamedSharding(Mesh(np.asarray([first[p] for p in sorted(first)]), ("processes",)),
                         PartitionSpec())


def _spread(state: Any) -> Any:
    """`state` as Orbax saves it in a multi-process run: each array that a process holds whole
    on its own devices (a copy every process holds alike, as when each trains the same model)
    made one array replicated over `_process_sharding`; arrays that span processes as they are.
    A single process: `state` itself."""
    if jax.process_count() == 1:
        return state
    sharding = _process_sharding()
    mine = next(d for d in sharding.mesh.devices.flat if d.process_index == jax.process_index())

    def spread(path, leaf):
        if not isinstance(leaf, jax.Array) or not leaf.is_fully_addressable:
            return leaf
        if not leaf.is_fully_replicated:
            raise ValueError(
                f"state{jax.tree_util.keystr(path)} is split over the devices of one process: in "
                f"a multi-process run, a state's arrays span every process (a mesh of "
                f"jax.devices()) or each process holds them whole")
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(spread(path, jax.random.key_data(leaf)),
                                            impl=jax.random.key_impl(leaf))
        local = jax.device_put(leaf.addressable_data(0), mine)
        return jax.make_array_from_single_device_arrays(leaf.shape, sharding, [local])

    return jax.tree_util.tree_map_with_path(spread, state)


def _spread_targets(abstract: Any) -> tuple[Any, Any]:
    """Restore targets that Orbax accepts in a multi-process run (arrays of one process's
    devices read as `_spread` saved them), and the function that places what was read by the
    targets' own shardings."""
    if jax.process_count() == 1:
        return abstract, lambda state: state
    sharding = _process_sharding()

    def local(leaf) -> bool:
        return (isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding is not None
                and leaf.sharding.is_fully_addressable)

    targets = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                                             sharding=sharding)
                           if local(leaf) else leaf, abstract)

    def placed(state):
        return jax.tree.map(lambda leaf, target: jax.device_put(leaf.addressable_data(0),
                                                                target.sharding)
                            if local(target) else leaf, state, abstract)

    return targets, placed


def _on_any_process(*flags: bool) -> list[bool]:
    """For each of `flags`, whether it holds on this process or, in a multi-process run, on any
    other (one collective for all of them)."""
    if jax.process_count() == 1:
        return list(flags)
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(np.asarray(flags)).any(axis=0).tolist()


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0][:300] if str(e) else type(e).__name__
