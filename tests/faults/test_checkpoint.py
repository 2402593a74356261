"""Checkpoints that cannot be used as they are: one of another model (other shapes) is refused
naming its parameters and kept, a write that fails (a full disk) is one error naming the
folder with the earlier checkpoints whole, and no path leaves Orbax threads printing at exit."""

import dataclasses
import errno
import logging
import os
import re
import subprocess
import sys
import textwrap
import traceback

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from orbax.checkpoint._src.serialization import serialization

from jaxlab.checkpoint import CheckpointConfig, Checkpointer, CheckpointMismatch, SaveError
from jaxlab.models.decoder import Decoder
from jaxlab.rl import train
from tests.rl import loop_job

from .conftest import snapshot

CONFIG = CheckpointConfig(keep_checkpoints=5, best_metric=None, async_save=False)


def state(width, step=1, dtype=jnp.float32):
    return {"params": {"embed": jnp.full((29, width), float(step), dtype), "bias": jnp.zeros(3)},
            "step": jnp.int32(step)}


def test_a_checkpoint_of_another_model_is_named_and_kept(tmp_path, caplog):
    with Checkpointer(tmp_path, CONFIG) as checkpointer:
        for step in (1, 2):
            checkpointer.save(step, state(64, step))
    before = snapshot(tmp_path)
    with Checkpointer(tmp_path, CONFIG) as checkpointer, caplog.at_level(logging.WARNING):
        with pytest.raises(CheckpointMismatch) as raised:
            checkpointer.restore(state(32))
    message = str(raised.value)
    assert message.startswith(f"checkpoint {tmp_path / '2'} holds another model or config")
    assert "params.embed: stored float32[29, 64], requested float32[29, 32]" in message
    assert "bias" not in message and "kept as it is" in message and "another out_dir" in message
    assert caplog.text == ""  # not damage: no earlier step tried, nothing set aside
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(("target", "line"), [
    (state(64, dtype=jnp.bfloat16), "params.embed: stored float32[29, 64], requested bfloat16"),
    ({"params": state(64)["params"]}, "step: stored int32[], not in the state"),
    ({**state(64), "extra": jnp.zeros(2)}, "extra: not in the checkpoint, requested float32[2]"),
], ids=["dtype", "a path stored only", "a path requested only"])
def test_other_dtypes_and_paths_are_named(tmp_path, target, line):
    with Checkpointer(tmp_path, CONFIG) as checkpointer:
        checkpointer.save(1, state(64))
        with pytest.raises(CheckpointMismatch, match=line.replace("[", r"\[")):
            checkpointer.restore(target)
        assert checkpointer.all_steps() == [1]


def _python(tmp_path, script: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.getcwd()}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script), str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=120)


def _only_traceback(stderr: str, error: str) -> None:
    """stderr holds one traceback, ending in `error`, and nothing from Orbax's threads."""
    assert stderr.count("Traceback (most recent call last)") == 1, stderr
    assert "Event loop is closed" not in stderr and "Exception ignored" not in stderr, stderr
    assert stderr.rstrip().splitlines()[-1].startswith(error) or f"\n{error}" in stderr, stderr


def test_resuming_a_narrower_model_exits_with_one_error_and_no_orbax_noise(tmp_path):
    """A run's train state (parameters, Adam moments, key) saved at hidden size 16, resumed
    with 8 under the same folder: one traceback, the mismatch's, and nothing from Orbax."""
    script = """
        import dataclasses, sys
        import jax
        from flax import nnx
        from jaxlab.models.decoder import Decoder
        from jaxlab.rl import scaffold, train
        from tests.rl import loop_job

        def state(hidden):
            config = dataclasses.replace(loop_job.CONFIG, hidden_size=hidden)
            return train.init_train_state(Decoder(config, nnx.Rngs(0)), train.OptimizerConfig(),
                                          jax.random.key(0))[1]

        step = lambda state, s: (state.replace(step=state.step + 1), None)
        scaffold.run(state(16), step, scaffold.Schedule(2, checkpoint_every=1), sys.argv[1])
        scaffold.run(state(8), step, scaffold.Schedule(4), sys.argv[1])
    """
    run = _python(tmp_path, script)
    assert run.returncode == 1
    _only_traceback(run.stderr, "jaxlab.checkpoint.CheckpointMismatch")
    assert (f"checkpoint {tmp_path / 'checkpoints' / '2'} holds another model or config"
            in run.stderr)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["2"]  # not set aside
    # The lines shown, and their count, are those of the leaves whose shapes the hidden size
    # changes, worked out here from the two states' trees: none for the optimizer's count, the
    # step or the key, nor for parameters of the same shape (the heads' norms).
    changed = _changed_shapes(*(jax.eval_shape(lambda h=h: _train_state(h)) for h in (16, 8)))
    assert "params.embed_tokens.embedding.value: stored float32[16, 16], requested " \
           "float32[16, 8]" in changed and any(line.startswith("opt_state.") for line in changed)
    shown = re.findall(r"^  (\S+: stored .*)$", run.stderr, re.MULTILINE)
    more = re.search(r"^  \.\.\. and (\d+) more$", run.stderr, re.MULTILINE)
    assert shown and set(shown) <= changed
    assert len(shown) + (int(more.group(1)) if more else 0) == len(changed)


def _train_state(hidden: int) -> train.TrainState:
    config = dataclasses.replace(loop_job.CONFIG, hidden_size=hidden)
    return train.init_train_state(Decoder(config, nnx.Rngs(0)), train.OptimizerConfig(),
                                  jax.random.key(0))[1]


def _changed_shapes(stored, requested) -> set[str]:
    """"path: stored float32[16, 16], requested float32[16, 8]" for each leaf of two trees of
    one structure whose shapes differ (the path's keys joined by dots)."""
    def name(path) -> str:
        return ".".join(str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k))))
                        for k in path)

    def shown(leaf) -> str:
        return f"{leaf.dtype}[{', '.join(map(str, leaf.shape))}]"

    return {f"{name(path)}: stored {shown(a)}, requested {shown(b)}"
            for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(stored),
                                    jax.tree.leaves(requested), strict=True)
            if a.shape != b.shape}


def test_an_interrupt_during_a_background_write_finishes_it_and_exits_cleanly(tmp_path):
    script = """
        import sys
        import jax.numpy as jnp
        from jaxlab.checkpoint import CheckpointConfig, Checkpointer
        with Checkpointer(sys.argv[1], CheckpointConfig(best_metric=None)) as checkpointer:
            checkpointer.save(1, {"w": jnp.ones((256, 256))})
            raise KeyboardInterrupt
    """
    run = _python(tmp_path, script)
    assert run.returncode != 0
    _only_traceback(run.stderr, "KeyboardInterrupt")
    with Checkpointer(tmp_path, CONFIG) as checkpointer:
        np.testing.assert_array_equal(checkpointer.restore({"w": jnp.zeros((256, 256))})["w"], 1)


@pytest.mark.parametrize("async_save", [True, False])
def test_a_failed_write_is_one_error_naming_its_folder(tmp_path, monkeypatch, capfd, async_save):
    """A disk that fills up while step 2 is written: SaveError names 2's folder and the cause
    (chained, with its traceback), no Orbax traceback reaches stderr, and step 1 restores
    whole."""
    async def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    config = CheckpointConfig(keep_checkpoints=5, best_metric=None, async_save=async_save)
    with Checkpointer(tmp_path, config) as checkpointer:
        checkpointer.save(1, state(64, 1))
        checkpointer.wait()
        monkeypatch.setattr(serialization, "async_serialize_from_host", full)
        with pytest.raises(SaveError) as raised:
            checkpointer.save(2, state(64, 2))
            checkpointer.wait()
        monkeypatch.undo()
        assert str(raised.value).startswith(
            f"checkpoint {tmp_path / '2'} could not be written (OSError: [Errno 28] No space "
            f"left on device); the complete checkpoints before it are kept ([1] in {tmp_path})")
        cause = raised.value.__cause__
        assert isinstance(cause, OSError) and cause.errno == errno.ENOSPC
        assert "full" in [frame.name for frame in traceback.extract_tb(cause.__traceback__)]
    assert "Traceback" not in capfd.readouterr().err
    with Checkpointer(tmp_path, CONFIG) as checkpointer:
        assert checkpointer.all_steps() == [1]
        restored = checkpointer.restore(state(64))
    np.testing.assert_array_equal(restored["params"]["embed"], 1.0)


def test_a_failed_write_in_a_run_is_one_message_its_traceback_in_the_log(tmp_path):
    """The same full disk under `cli.run` with a run folder open: stderr holds one message and
    no traceback; log.txt holds the SaveError's traceback with Orbax's exception as its cause."""
    script = """
        import errno, sys
        import jax.numpy as jnp
        from orbax.checkpoint._src.serialization import serialization
        from jaxlab import cli, results
        from jaxlab.checkpoint import CheckpointConfig, Checkpointer

        async def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        def main(argv):
            out = results.open_run(sys.argv[1], {"seed": 0})
            with Checkpointer(out / "checkpoints", CheckpointConfig(best_metric=None)) as c:
                c.save(1, {"w": jnp.ones(4)})
                c.wait()
                serialization.async_serialize_from_host = full
                c.save(2, {"w": jnp.ones(4)})
                c.wait()

        cli.run(main, [])
    """
    run = _python(tmp_path, script)
    assert run.returncode == 1
    assert "Traceback" not in run.stderr and run.stderr.count("error: ") == 1, run.stderr
    assert f"checkpoint {tmp_path / 'checkpoints' / '2'} could not be written" in run.stderr
    log = (tmp_path / "log.txt").read_text()
    assert "The above exception was the direct cause of the following exception" in log
    assert "OSError: [Errno 28] No space left on device" in log and ", in full" in log
    assert "jaxlab.checkpoint.SaveError: checkpoint" in log
