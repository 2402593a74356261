"""Orbax checkpoints of a train state: the last N steps and the best one are kept.

Each checkpoint is written to a temporary directory and renamed into place when complete
(Orbax's atomic finalize), so a write interrupted by a crash or a kill leaves no checkpoint that
could be mistaken for a finished one; the leftover is ignored and removed on the next start.
A state restored from step s and trained on is bit-for-bit the run that never stopped, provided
the run's randomness and data order are functions of the state (see `jaxlab.rl.train`).
"""

from __future__ import annotations

import dataclasses
import operator
import pathlib
from collections.abc import Mapping
from typing import Any, TypeVar

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from jaxlab.config import require, require_positive_ints

State = TypeVar("State")

BEST_MODES = ("min", "max")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    keep_last: int = 3               # the newest checkpoints kept
    best_metric: str | None = "loss" # also keep the best checkpoint by this metric (None: no)
    best_mode: str = "min"           # "min" or "max": which value of best_metric is best
    save_every: int = 1              # save at steps that are multiples of this
    async_save: bool = True          # write in a background thread while training goes on

    def __post_init__(self):
        require_positive_ints(self, "keep_last", "save_every")
        require(self.best_mode in BEST_MODES,
                f"CheckpointConfig.best_mode must be one of {BEST_MODES}, got {self.best_mode!r}")


class Checkpointer:
    """Saves and restores a pytree state (e.g. `TrainState`) under `directory/<step>/`."""

    def __init__(self, directory: str | pathlib.Path,
                 config: CheckpointConfig = CheckpointConfig()):
        self.directory = pathlib.Path(directory).absolute()
        self.config = config
        policies = [checkpoint_managers.LatestN(n=config.keep_last)]
        best_fn = None
        if config.best_metric is not None:
            best_fn = operator.itemgetter(config.best_metric)
            policies.append(checkpoint_managers.BestN(
                get_metric_fn=best_fn, reverse=config.best_mode == "min", n=1,
                keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=checkpoint_managers.FixedIntervalPolicy(config.save_every),
            preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
            best_fn=best_fn, best_mode=config.best_mode,
            enable_async_checkpointing=config.async_save,
            cleanup_tmp_directories=True,  # remove what an interrupted write left behind
            create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, state: Any, metrics: Mapping[str, Any] | None = None,
             force: bool = False) -> bool:
        """Saves `state` as `step` if it is a save step (or `force`); returns whether it did.
        `metrics` (scalars) rank checkpoints for `best_metric`, which they must then contain."""
        if self.config.best_metric is not None:
            require(metrics is not None and self.config.best_metric in metrics,
                    f"metrics must contain {self.config.best_metric!r} to rank checkpoints, "
                    f"got {None if metrics is None else sorted(metrics)}")
        metrics = None if metrics is None else {k: float(v) for k, v in metrics.items()}
        return self._manager.save(int(step), args=ocp.args.StandardSave(state), metrics=metrics,
                                  force=force)

    def restore(self, target: State, step: int | None = None) -> State:
        """The state saved at `step` (default: the latest complete one), with the structure,
        dtypes and shardings of `target` (a freshly initialized state or its `jax.eval_shape`).
        Raises FileNotFoundError when there is no complete checkpoint."""
        self.wait()
        step = self.latest_step() if step is None else step
        if step is None or step not in self.all_steps():
            raise FileNotFoundError(f"no complete checkpoint {'' if step is None else step} in "
                                    f"{self.directory} (complete steps: {self.all_steps()})")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """The kept step with the best `best_metric` (the latest if there is none)."""
        return self._manager.best_step()

    def wait(self) -> None:
        """Blocks until background writes are complete."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
