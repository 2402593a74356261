import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.checkpoint import CheckpointConfig, Checkpointer


def state_at(step):
    return {"w": jnp.full((4, 3), float(step)), "step": jnp.int32(step),
            "key": jax.random.fold_in(jax.random.key(0), step)}


def assert_state(got, step):
    want = state_at(step)
    np.testing.assert_array_equal(got["w"], want["w"])
    assert got["step"] == step
    np.testing.assert_array_equal(jax.random.key_data(got["key"]),
                                  jax.random.key_data(want["key"]))


LOSSES = {1: 5.0, 2: 1.0, 3: 4.0, 4: 3.0, 5: 6.0, 6: 7.0}


@pytest.mark.parametrize("mode,best", [("min", 2), ("max", 6)])
def test_keeps_the_last_n_and_the_best(tmp_path, mode, best):
    config = CheckpointConfig(keep_checkpoints=2, best_metric="loss", best_mode=mode)
    with Checkpointer(tmp_path, config) as checkpointer:
        for step, loss in LOSSES.items():
            assert checkpointer.save(step, state_at(step), {"loss": loss, "other": -loss})
        checkpointer.wait()
        assert checkpointer.all_steps() == sorted({best, 5, 6})
        assert checkpointer.best_step() == best
    with Checkpointer(tmp_path, config) as reopened:  # what a restarted process sees
        assert reopened.all_steps() == sorted({best, 5, 6})
        assert_state(reopened.restore(state_at(0), step=best), best)
        assert_state(reopened.restore(jax.eval_shape(lambda: state_at(0))), 6)


def test_save_every_and_missing_metrics(tmp_path):
    config = CheckpointConfig(keep_checkpoints=5, checkpoint_every=2, async_save=False)
    with Checkpointer(tmp_path, config) as checkpointer:
        saved = [checkpointer.save(s, state_at(s), {"loss": 1.0}) for s in range(1, 6)]
        assert saved == [False, True, False, True, False]
        assert checkpointer.all_steps() == [2, 4]
        with pytest.raises(ValueError, match="'loss'"):
            checkpointer.save(6, state_at(6), {"accuracy": 1.0})


def test_restore_without_checkpoint_is_an_error(tmp_path):
    with Checkpointer(tmp_path) as checkpointer, pytest.raises(FileNotFoundError, match="no comp"):
        checkpointer.restore(state_at(0))


@pytest.mark.parametrize("field,value", [("keep_checkpoints", 0), ("checkpoint_every", 1.5),
                                         ("best_mode", "lowest")])
def test_bad_config_is_named(field, value):
    with pytest.raises(ValueError, match=field):
        CheckpointConfig(**{field: value})


# The child saves steps 1 and 2, then stops inside the write of step 3 after its arrays are on
# disk but before the atomic rename that publishes it, and waits there to be killed.
CHILD = textwrap.dedent("""
    import sys, time
    import jax.numpy as jnp
    from orbax.checkpoint.path import atomicity
    from jaxlab.checkpoint import CheckpointConfig, Checkpointer
    from tests.rl.test_checkpoint import state_at

    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def stalled_finalize(self):
        if self.get_final().name == "3":
            print("writing 3", flush=True)
            time.sleep(600)
        await finalize(self)

    atomicity.AtomicRenameTemporaryPath.finalize = stalled_finalize
    checkpointer = Checkpointer(sys.argv[1], CheckpointConfig(keep_checkpoints=5, best_metric=None))
    for step in (1, 2, 3):
        checkpointer.save(step, state_at(step))
        checkpointer.wait()
        print("saved", step, flush=True)
""")


def test_checkpoint_killed_mid_write_is_ignored(tmp_path):
    root = os.path.join(os.path.dirname(__file__), "..", "..")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=root, XLA_FLAGS="")
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True, env=env, cwd=root)
    try:
        lines = [child.stdout.readline().strip() for _ in range(3)]
        assert lines == ["saved 1", "saved 2", "writing 3"], lines
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=60)
    leftovers = [p for p in os.listdir(tmp_path) if p not in ("1", "2")]
    assert leftovers and all(p.startswith("3") for p in leftovers), os.listdir(tmp_path)

    with Checkpointer(tmp_path, CheckpointConfig(keep_checkpoints=5, best_metric=None)
                      ) as checkpointer:
        assert checkpointer.all_steps() == [1, 2]
        assert_state(checkpointer.restore(state_at(0)), 2)
        checkpointer.save(3, state_at(3))  # the step can be written again
        checkpointer.wait()
        assert_state(checkpointer.restore(state_at(0)), 3)
    assert sorted(os.listdir(tmp_path)) == ["1", "2", "3"]
