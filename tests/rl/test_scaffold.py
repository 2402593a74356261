"""The resumable loop of every training job (`jaxlab.rl.scaffold`), on a step function whose
effect is known by hand: step s adds 1 to every weight and records loss s^2."""

import jax
import numpy as np
import pytest
from flax import nnx

from jaxlab import jsonl
from jaxlab.checkpoint import Checkpointer
from jaxlab.rl import scaffold, train


def _state() -> train.TrainState:
    return train.init_train_state(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), train.OptimizerConfig(),
                                  jax.random.key(0))[1]


def _step(state, s, fail_at=None):
    if s == fail_at:
        raise scaffold.NonFinite("loss nan")
    state = state.replace(params=jax.tree.map(lambda x: x + 1, state.params), step=state.step + 1)
    return state, {"loss": float(s * s)}


def _weights(state):
    return [np.asarray(x) for x in jax.tree.leaves(state.params)]


def test_a_run_resumed_from_its_checkpoint_ends_as_one_that_never_stopped(tmp_path):
    start = _weights(_state())
    whole = scaffold.run(_state(), _step, scaffold.Schedule(5, checkpoint_every=2),
                         tmp_path / "whole")
    assert int(whole.step) == 5
    for got, before in zip(_weights(whole), start, strict=True):
        np.testing.assert_array_equal(got, before + 5)
    records = jsonl.resume_records(tmp_path / "whole" / scaffold.METRICS)
    assert records == [{"step": s, "loss": float(s * s)} for s in range(5)]

    cut = tmp_path / "cut"
    scaffold.run(_state(), _step, scaffold.Schedule(3, checkpoint_every=2), cut)
    # a kill after step 3's record but before its checkpoint: the record is written again once
    jsonl.append_record(cut / scaffold.METRICS, {"step": 3, "loss": 9.0})
    with Checkpointer(cut / "checkpoints") as checkpointer:
        assert checkpointer.all_steps() == [3]
    resumed = scaffold.run(_state(), _step, scaffold.Schedule(5, checkpoint_every=2), cut)
    assert jsonl.resume_records(cut / scaffold.METRICS) == records
    for got, want in zip(_weights(resumed), _weights(whole), strict=True):
        np.testing.assert_array_equal(got, want)


def test_records_of_steps_the_checkpoint_had_not_reached_are_dropped(tmp_path):
    scaffold.run(_state(), _step, scaffold.Schedule(2, checkpoint_every=2), tmp_path)
    for s in (2, 3):  # written by a run killed before its next checkpoint
        jsonl.append_record(tmp_path / scaffold.METRICS, {"step": s, "loss": -1.0})
    scaffold.run(_state(), _step, scaffold.Schedule(4, checkpoint_every=2), tmp_path)
    assert [r["loss"] for r in jsonl.resume_records(tmp_path / scaffold.METRICS)] == [0, 1, 4, 9]


def test_a_non_finite_step_stops_naming_it_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(FloatingPointError, match=r"step 3: loss nan; the step was not applied"
                                                 r".*last checkpoint: step 2"):
        scaffold.run(_state(), lambda state, s: _step(state, s, fail_at=3),
                     scaffold.Schedule(5, checkpoint_every=2, keep_checkpoints=2), tmp_path)
    with Checkpointer(tmp_path / "checkpoints") as checkpointer:
        assert checkpointer.all_steps() == [2]
    assert [r["step"] for r in jsonl.resume_records(tmp_path / scaffold.METRICS)] == [0, 1, 2]


def test_optimizer_steps_per_step_set_where_a_run_resumes(tmp_path):
    """An RL step of 2 optimizer updates: a checkpoint at optimizer step 4 is loop step 2."""
    def two_updates(state, s):
        state, record = _step(state, s)
        return state.replace(step=state.step + 1), record

    schedule = scaffold.Schedule(2, checkpoint_every=1, updates_per_step=2)
    scaffold.run(_state(), two_updates, schedule, tmp_path)
    calls = []
    scaffold.run(_state(), lambda state, s: calls.append(s) or two_updates(state, s),
                 scaffold.Schedule(3, checkpoint_every=1, updates_per_step=2), tmp_path)
    assert calls == [2]


@pytest.mark.parametrize("field", ["steps", "checkpoint_every", "keep_checkpoints",
                                   "updates_per_step"])
def test_bad_schedules_are_refused_naming_the_field(field):
    settings = {"steps": 3, field: 0}
    with pytest.raises(ValueError, match=f"Schedule.{field} must be an integer >= 1"):
        scaffold.Schedule(**settings)
