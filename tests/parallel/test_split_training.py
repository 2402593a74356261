"""The training entry points on meshes that split the model: `loop.run` and `sft.fit` on an
fsdp (and a data x fsdp x tensor) mesh compute what they compute on one device, while each
device holds only its shards of the parameters and optimizer state, kept so across steps and
restored so from a checkpoint."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import nnx

from jaxlab import parallel
from jaxlab.checkpoint import Checkpointer
from jaxlab.models.decoder import Decoder
from jaxlab.rl import loop, sft, train
from tests.rl import loop_job


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _diffs(a, b):
    return np.concatenate([np.abs(np.asarray(x) - np.asarray(y)).ravel() for x, y in zip(
        jax.tree.leaves(a), jax.tree.leaves(b), strict=True)])


def _held(tree) -> tuple[list[int], int]:
    """(the bytes of `tree` each device holds, what 1/8 of every matrix (all of them have an
    embedding dimension, split over fsdp=8) and the whole of every vector and scalar (norm
    scales, Adam's step count) come to): the second counted from the arrays' shapes, not from
    their shardings."""
    leaves = jax.tree.leaves(tree)
    matrices = sum(x.nbytes for x in leaves if x.ndim >= 2)
    rest = sum(x.nbytes for x in leaves if x.ndim < 2)
    return sorted(parallel.bytes_per_device(tree).values()), matrices // 8 + rest


def _assert_split_eight_ways(held: tuple[list[int], int]):
    per_device, expected = held
    assert per_device == [expected] * 8, held


def _restores(monkeypatch):
    """Records (step, `_held` of the parameters and optimizer state) of each state a checkpoint
    restore returns (before a step donates its buffers)."""
    seen = []
    restore = Checkpointer.restore

    def spy(self, *args, **kwargs):
        state = restore(self, *args, **kwargs)
        seen.append((int(state.step), _held((state.params, state.opt_state))))
        return state

    monkeypatch.setattr(Checkpointer, "restore", spy)
    return seen


@pytest.mark.parametrize("shape", [(1, 8, 1), (2, 2, 2)])
def test_loop_on_a_split_mesh_equals_one_device_and_holds_its_shards(tmp_path, shape):
    config = dataclasses.replace(loop_job.config(2), prompts=4, group_size=4)
    mesh = parallel.make_train_mesh(*shape)
    runs = {}
    for name, where in (("one", parallel.single_device_mesh()), ("split", mesh)):
        runs[name] = loop.run(Decoder(loop_job.CONFIG, nnx.Rngs(0)), loop_job.prompt_fn,
                              loop_job.reward_fn, config, tmp_path / name,
                              key=jax.random.key(0), mesh=where)[1]
    for a, b in zip(*(_records(tmp_path / n / "metrics.jsonl") for n in runs), strict=True):
        assert a["reward_mean"] == b["reward_mean"] and a["response_length"] == b[
            "response_length"]  # the same samples
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-4)
    # 4 Adam steps of about lr * sign(g): equal but where a near-zero gradient flips its sign.
    diffs = _diffs(runs["one"].params, runs["split"].params)
    assert np.mean(diffs <= 1e-6) > 0.995 and diffs.max() <= 8e-2
    state = runs["split"]
    for leaf, want in zip(jax.tree.leaves(state), jax.tree.leaves(
            parallel.tree_shardings(state, mesh)), strict=True):
        assert leaf.sharding.is_equivalent_to(want, leaf.ndim)
    if shape == (1, 8, 1):
        _assert_split_eight_ways(_held((state.params, state.opt_state)))


def test_a_loop_resumed_on_a_split_mesh_restores_split_and_ends_as_one_that_never_stopped(
        tmp_path, monkeypatch):
    config = dataclasses.replace(loop_job.config(2), prompts=4, group_size=4)
    mesh = parallel.make_train_mesh(1, 8, 1)

    def run(out, steps):
        return loop.run(Decoder(loop_job.CONFIG, nnx.Rngs(0)), loop_job.prompt_fn,
                        loop_job.reward_fn, dataclasses.replace(config, steps=steps),
                        tmp_path / out, key=jax.random.key(0), mesh=mesh)[1]

    whole = run("whole", 2)
    run("resumed", 1)
    restored = _restores(monkeypatch)
    resumed = run("resumed", 2)
    assert [step for step, _ in restored] == [2]  # minibatches=2 steps per iteration
    _assert_split_eight_ways(restored[0][1])
    assert _diffs(whole.params, resumed.params).max() == 0
    assert _records(tmp_path / "whole" / "metrics.jsonl") == [
        {**r, **{k: v for k, v in w.items() if "seconds" in k or "per_s" in k}}
        for r, w in zip(_records(tmp_path / "resumed" / "metrics.jsonl"),
                        _records(tmp_path / "whole" / "metrics.jsonl"), strict=True)]


def _data():
    rng = np.random.default_rng(0)
    return sft.sft_batch([rng.integers(3, 16, 3).tolist() for _ in range(32)],
                         [rng.integers(3, 16, 1 + i % 4).tolist() for i in range(32)], length=8)


def test_fit_on_a_split_mesh_equals_one_device_holds_its_shards_and_resumes_split(
        tmp_path, monkeypatch):
    # 2 micro-batches of 8 rows each split over the 8 fsdp devices.
    config = sft.FitConfig(steps=4, batch_size=16, microbatches=2, log_every=1,
                           checkpoint_every=2, optimizer=train.OptimizerConfig(
                               learning_rate=1e-2, warmup_steps=1))
    mesh = parallel.make_train_mesh(1, 8, 1)

    def fit(out, where, steps=4):
        return sft.fit(Decoder(loop_job.CONFIG, nnx.Rngs(0)), sft.sft_loss, _data(),
                       dataclasses.replace(config, steps=steps), tmp_path / out,
                       key=jax.random.key(1), mesh=where)

    one = nnx.state(fit("one", parallel.single_device_mesh()), nnx.Param)
    split = nnx.state(fit("split", mesh), nnx.Param)
    for a, b in zip(*(_records(tmp_path / n / "metrics.jsonl") for n in ("one", "split")),
                    strict=True):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
    diffs = _diffs(one, split)
    assert np.mean(diffs <= 1e-6) > 0.995 and diffs.max() <= 8 * config.optimizer.learning_rate
    _assert_split_eight_ways(_held(split))

    fit("resumed", mesh, steps=2)
    restored = _restores(monkeypatch)
    resumed = nnx.state(fit("resumed", mesh), nnx.Param)
    assert [step for step, _ in restored] == [2]
    _assert_split_eight_ways(restored[0][1])
    assert _diffs(split, resumed).max() == 0


def test_the_mesh_config_builds_the_train_mesh_or_none_for_one_device():
    assert parallel.MeshConfig().build() is None
    mesh = parallel.MeshConfig(data=2, fsdp=2, tensor=2).build()
    assert dict(mesh.shape) == {parallel.DATA: 2, parallel.FSDP: 2, parallel.TENSOR: 2}
    assert list(mesh.devices.ravel()) == jax.devices()
    assert parallel.MeshConfig(fsdp=4).build().devices.ravel().tolist() == jax.devices()[:4]
    with pytest.raises(ValueError, match="at most 8 each"):
        parallel.MeshConfig(fsdp=16).build()
    with pytest.raises(ValueError, match=r"MeshConfig\.fsdp must be an integer >= 1"):
        parallel.MeshConfig(fsdp=0)
