"""The resumable loop every training job runs: restore, step, record, save, repeat.

    state = scaffold.run(state, step_fn, Schedule(steps=100, checkpoint_every=10), out_dir)

`loop.run` (RL), `sft.fit` (supervised training, the reward models, the arithmetic model) drive
it with their own step function; it owns what they share:

1. the train state is restored from the latest Orbax checkpoint in `out_dir/checkpoints/`
   (placed as the given state is: replicated or split over a mesh), and the run goes on from
   the step it holds, `state.step // updates_per_step`;
2. `metrics.jsonl` keeps the records of the steps done before (`jsonl.truncate_records`: those
   of steps the checkpoint had not reached are dropped, so a resumed run writes each once);
3. each step `step_fn(state, s) -> (state, record or None)`; a record is appended to
   `metrics.jsonl` (`jsonl.append_record`: flushed and synced) and shown on the progress bar;
4. a step that reports a non-finite loss or gradient (`NonFinite`, raised by `step_fn` with the
   state unchanged) stops the run with a FloatingPointError naming the step and the last good
   checkpoint, which is kept;
5. a checkpoint every `checkpoint_every` steps and at the end (Orbax step = `state.step`, the
   optimizer steps), the latest `keep_checkpoints` kept;
6. `on_save(state)`, if given, after each checkpoint with the state it holds (e.g. the policy
   written as a Hugging Face folder, `export_policy`), and once at the start of a resumed run
   with the restored state, so that what a kill cut short after the checkpoint is done again.

With several processes (`results.join_processes`) every process runs the loop alike: process 0
alone writes the metrics, every process its shards of the checkpoints.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import sys
from collections.abc import Callable

import jax
from flax import nnx
from jax.sharding import Mesh
from tqdm import tqdm

from jaxlab import jsonl, parallel
from jaxlab.checkpoint import CheckpointConfig, Checkpointer
from jaxlab.config import require_positive_ints
from jaxlab.rl import train

log = logging.getLogger("jaxlab")

METRICS = "metrics.jsonl"


class NonFinite(FloatingPointError):
    """A step whose loss or gradient was not finite (the step left the state unchanged)."""


@dataclasses.dataclass(frozen=True)
class Schedule:
    """How long a run lasts and how often it is saved."""

    steps: int                    # the run's length, in steps of its loop
    checkpoint_every: int = 100   # steps between checkpoints (and one at the end)
    keep_checkpoints: int = 1     # the latest this many are kept
    updates_per_step: int = 1     # optimizer steps (`TrainState.step`) per step of the loop

    def __post_init__(self):
        require_positive_ints(self, "steps", "checkpoint_every", "keep_checkpoints",
                              "updates_per_step")


# step_fn(state, s) -> (the state after step s, a metrics record or None).
StepFn = Callable[[train.TrainState, int], tuple[train.TrainState, "dict | None"]]
# on_save(state): called with each state checkpointed (and the state a run resumes from).
OnSave = Callable[[train.TrainState], None]


def run(state: train.TrainState, step_fn: StepFn, schedule: Schedule,
        out_dir: str | pathlib.Path, *, postfix: Callable[[dict], dict] | None = None,
        after: Callable[[int], None] | None = None, on_save: OnSave | None = None,
        ) -> train.TrainState:
    """Runs `step_fn` from the checkpointed step (or 0) to `schedule.steps`; returns the final
    state. `postfix(record)`: what the progress bar shows of a record (default: its loss);
    `after(s)`: called once step s's record is written, before its checkpoint; `on_save(state)`:
    called after each checkpoint with the state saved (every `checkpoint_every` steps and at the
    end), and first, in a resumed run, with the restored state. Every process calls them
    alike."""
    out = pathlib.Path(out_dir)
    metrics = out / METRICS
    postfix = postfix or (lambda r: {"loss": f"{r['loss']:.4f}"} if "loss" in r else {})
    with Checkpointer(out / "checkpoints", CheckpointConfig(
            keep_checkpoints=schedule.keep_checkpoints, best_metric=None)) as checkpointer:
        if checkpointer.latest_step() is not None:
            state = checkpointer.restore(state)  # placed as `state` is
            log.info("resuming from step %d (%s)",
                     int(state.step) // schedule.updates_per_step, checkpointer.directory)
            if on_save is not None:  # a kill may have cut short what followed the checkpoint
                on_save(state)
        start = int(state.step) // schedule.updates_per_step
        jsonl.truncate_records(metrics, start, "step")
        with tqdm(range(start, schedule.steps), initial=start, total=schedule.steps,
                  unit="step", file=sys.stderr, dynamic_ncols=True) as bar:
            for step in bar:
                try:
                    state, record = step_fn(state, step)
                except NonFinite as e:
                    raise FloatingPointError(
                        f"step {step}: {e}; the step was not applied, nothing of it is "
                        f"saved, and the run stops (last checkpoint: step "
                        f"{checkpointer.latest_step()} in {checkpointer.directory})") from None
                if record is not None:
                    jsonl.append_record(metrics, {"step": step, **record})
                    bar.set_postfix(**postfix(record))
                if after is not None:
                    after(step)
                if (step + 1) % schedule.checkpoint_every == 0 or step + 1 == schedule.steps:
                    checkpointer.save(int(state.step), state)
                    if on_save is not None:
                        on_save(state)
        checkpointer.wait()
    return state


def export_policy(model: nnx.Module, path: str | pathlib.Path, tokenizer=None, **fields
                  ) -> OnSave:
    """The `on_save` that writes `model`'s graph with the saved state's parameters to `path` as
    a Hugging Face folder (`hf.save_policy(model, path, tokenizer, **fields)`: token ids and
    generation settings), so that `path` holds the latest checkpoint's policy, whole. Fields
    transformers refuses are a ValueError here, before the run."""
    from jaxlab.models import hf

    hf.generation_config(**fields)
    graphdef = nnx.graphdef(model)
    return lambda state: hf.save_policy(nnx.merge(graphdef, state.params), path, tokenizer,
                                        **fields)


def init_state(model: nnx.Module, config: train.OptimizerConfig, key: jax.Array, mesh: Mesh,
               ) -> tuple[nnx.GraphDef, train.TrainState]:
    """`train.init_train_state` placed on `mesh`: replicated, or on a mesh that splits the model
    in its `parallel.tree_shardings` (parameters and Adam moments split over fsdp x tensor).
    There the parameters are split before they are copied and the moments are born split, so
    no device ever holds the whole state."""
    if not parallel.is_split_model(mesh):
        graphdef, state = train.init_train_state(model, config, key)
        return graphdef, parallel.put(state, parallel.replicated(mesh))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = parallel.put(params, parallel.tree_shardings(params, mesh))
    key = parallel.put(key, parallel.replicated(mesh))

    def init(params, key):
        return train.init_train_state(nnx.merge(graphdef, params, rest), config, key)[1]

    shardings = parallel.tree_shardings(jax.eval_shape(init, params, key), mesh)
    return graphdef, jax.jit(init, out_shardings=shardings)(params, key)
