"""The policy-gradient step and the RL loop under the GPU and TPU backend policies
(dot_product_attention, float caches, plain products, the Pallas decode kernels in interpret
mode) against the CPU policy's: losses and steps to float tolerance, the same rollouts."""

import dataclasses
import json
import logging

import jax
import numpy as np
import pytest
from flax import nnx

from jaxlab import parallel
from jaxlab.models import backend
from jaxlab.models.decoder import Decoder
from jaxlab.rl import loop, scaffold, train
from tests.rl import loop_job
from tests.rl.test_train import (
    PLAIN,
    SHARED,
    TEMPERATURE,
    assert_params_close,
    fresh_like,
    grouped_batch,
    grouped_state,
    on,
)

METRICS = ("loss", "policy", "kl", "entropy", "clipped", "grad_norm", "count")


@pytest.mark.parametrize("name", ["gpu", "tpu"])
def test_the_policy_step_under_an_accelerator_policy_is_the_cpu_policys(name, data_mesh8):
    """One step from the same state and batch, row by row on one device and with shared
    prompts on 8 data devices and on a (data 2, fsdp 2, tensor 2) mesh: the accelerator
    policy's metrics and parameters are the CPU policy's."""
    graphdef, state = grouped_state()
    assert nnx.merge(graphdef, state.params).backend.name == "cpu"
    batch = grouped_batch(graphdef, state.params)
    one = parallel.single_device_mesh()
    want, want_metrics = train.train_step(*on(one, fresh_like(state), batch), graphdef=graphdef,
                                          config=PLAIN, temperature=TEMPERATURE, mesh=one)
    other = nnx.graphdef(nnx.merge(graphdef, state.params).set_backend(name))
    assert other != graphdef  # another program
    logp = train.policy_logprobs(other, state.params, batch.tokens, batch.mask)
    np.testing.assert_allclose(logp, train.policy_logprobs(graphdef, state.params, batch.tokens,
                                                           batch.mask), atol=1e-5)
    for mesh, shared in ((one, None), (data_mesh8, SHARED),
                         (parallel.make_train_mesh(2, 2, 2), SHARED)):
        _, placed = scaffold.init_state(nnx.merge(other, state.params), PLAIN.optimizer,
                                        jax.random.key(0), mesh)
        new, metrics = train.train_step(
            placed, jax.device_put(batch, parallel.batch_sharding(mesh)), graphdef=other,
            config=PLAIN, temperature=TEMPERATURE, mesh=mesh, shared=shared)
        for metric in METRICS:
            np.testing.assert_allclose(metrics[metric], want_metrics[metric], rtol=1e-5,
                                       atol=1e-7, err_msg=f"{metric} on {mesh.shape}")
        assert_params_close(new.params, want.params, PLAIN.optimizer.learning_rate)


def test_the_rl_loop_under_the_gpu_policy_samples_and_trains_as_under_the_cpu_policy(
        tmp_path, data_mesh8, caplog):
    config = dataclasses.replace(loop_job.config(2), prompts=4, group_size=4)
    architecture = dataclasses.replace(loop_job.CONFIG, head_dim=16)  # the GPU kernel's least
    runs = {}
    backend.explain.cache_clear()
    for name in ("cpu", "gpu"):
        model = Decoder(architecture, nnx.Rngs(0), backend=name)
        with caplog.at_level(logging.INFO, logger="jaxlab"):
            runs[name] = loop.run(model, loop_job.prompt_fn, loop_job.reward_fn, config,
                                  tmp_path / name, key=jax.random.key(0), mesh=data_mesh8)[1]
    assert "backend policy gpu (interpret): decode attention -> pallas_gpu" in caplog.messages
    records = {n: [json.loads(x) for x in (tmp_path / n / "metrics.jsonl").read_text()
                   .splitlines()] for n in runs}
    assert len(records["cpu"]) == 2
    for a, b in zip(records["cpu"], records["gpu"], strict=True):
        assert (a["reward_mean"], a["response_length"]) == (b["reward_mean"],
                                                            b["response_length"])
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5, atol=1e-7)
    diffs = np.concatenate([np.abs(np.asarray(x) - np.asarray(y)).ravel() for x, y in zip(
        jax.tree.leaves(runs["cpu"].params), jax.tree.leaves(runs["gpu"].params),
        strict=True)])
    # 4 Adam steps of about lr * sign(g): equal but where a near-zero gradient flips its sign.
    assert np.mean(diffs <= 1e-6) > 0.995 and diffs.max() <= 8e-2
