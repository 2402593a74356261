"""Every allocation checked before it happens: the sampler, the RL and SFT steps and the
free-embedding runs refuse a request over the device's memory with `parallel.DoesNotFit`, at
once (nothing allocated, nothing compiled when the shape estimate alone exceeds the memory),
naming what it needs and a smaller setting that fits; that setting then runs."""

import dataclasses
import re
import time

import jax
import numpy as np
import pytest
from flax import nnx

from jaxlab import parallel
from jaxlab.limit import free_embedding as fe
from jaxlab.models.decoder import Decoder, DecoderConfig
from jaxlab.rl import sft, train
from jaxlab.sampling import sampler

TINY = DecoderConfig(family="qwen3", vocab_size=32, hidden_size=16, intermediate_size=32,
                     num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, qk_norm=True,
                     max_position_embeddings=1 << 24)
MIB = 2**20


@pytest.fixture(scope="module")
def model():
    return Decoder(TINY, nnx.Rngs(0))


def refused_at_once(call):
    """The DoesNotFit `call()` raises, within a second (nothing compiled or allocated)."""
    start = time.perf_counter()
    with pytest.raises(parallel.DoesNotFit) as error:
        call()
    assert time.perf_counter() - start < 1.0
    return str(error.value)


def test_a_sampling_budget_over_the_device_is_refused_and_the_suggested_one_runs(model):
    config = sampler.SamplingConfig(max_new_tokens=8, group_size=1 << 20)
    message = refused_at_once(lambda: sampler.sample(model, [[1, 2, 3]], jax.random.key(0),
                                                     config, device_bytes=4 * MIB))
    assert re.search(r"needs at least \S+ GiB \(weights .* generated KV .* outputs", message)
    group = int(re.search(r"would fit: group_size=(\d+)", message)[1])
    assert 1 <= group < config.group_size
    out = sampler.sample(model, [[1, 2, 3]], jax.random.key(0),
                         dataclasses.replace(config, group_size=group), device_bytes=4 * MIB)
    assert out.tokens.shape == (group, 8)


def test_the_default_device_memory_refuses_millions_of_tokens_over_many_traces(model):
    config = sampler.SamplingConfig(max_new_tokens=4_000_000, group_size=1 << 16)
    message = refused_at_once(lambda: sampler.sample(model, [[1, 2, 3]], jax.random.key(0),
                                                     config))
    assert "max_new_tokens=" in message.split("would fit:")[1]


def test_the_rule_compiles_only_between_half_the_memory_and_all_of_it():
    compiles = []

    def check(estimate, peak, memory=100):
        def compiled(change):
            compiles.append(change)
            return {"temporaries": peak // change.get("microbatches", 1)}
        return parallel.check_fits("a step", memory, lambda change: {
            "state": estimate // change.get("microbatches", 1)}, compiled,
            [[{"microbatches": m} for m in (2, 4, 8, 16)]])

    assert check(50, 10**6) is None and compiles == []        # E <= M / 2: runs as asked
    assert check(80, 90) == 90 and compiles == [{}]           # compiled: it fits
    with pytest.raises(parallel.DoesNotFit,
                       match=r"needs \S+ GiB per device \(temporaries .* microbatches=4"):
        check(80, 400)                                         # 400 / 4 fits, 400 / 2 not
    assert len(compiles) <= 1 + 1 + 1 + 3                      # bisection, not every knob
    with pytest.raises(parallel.DoesNotFit, match=r"at least .* microbatches=8"):
        check(300, 0)                  # E > M: nothing compiled, E / 8 within M / 2
    assert len(compiles) <= 6


def test_a_policy_step_too_large_is_refused_naming_rows_and_microbatches_that_fit(model):
    mesh = parallel.single_device_mesh()
    config = train.TrainConfig()
    message = refused_at_once(lambda: train.require_step_fits(
        model, 1 << 20, 4096, config, mesh, temperature=1.0, device_bytes=512 * MIB))
    assert re.search(r"needs at least \S+ GiB per device \(parameters and optimizer state "
                     r".* layer activations .* output head", message)
    rows = int(re.search(r"would fit: .*rows=(\d+)", message)[1])
    assert train.require_step_fits(model, rows, 4096, config, mesh, temperature=1.0,
                                   device_bytes=512 * MIB) is None
    message = refused_at_once(lambda: train.require_step_fits(
        model, 256, 256, config, mesh, temperature=1.0, device_bytes=4 * MIB))
    micro = int(re.search(r"would fit: microbatches=(\d+)", message)[1])
    assert train.require_step_fits(model, 256, 256, dataclasses.replace(
        config, microbatches=micro), mesh, temperature=1.0, device_bytes=4 * MIB) is None


def test_sft_refuses_a_step_too_large_before_it_writes_anything(model, tmp_path):
    data = sft.sft_batch([[1, 2]] * 8, [[3, 4]] * 8, length=8)
    config = sft.FitConfig(steps=2, batch_size=8, optimizer=train.OptimizerConfig(
        learning_rate=1e-3))
    message = refused_at_once(lambda: sft.fit(model, sft.sft_loss, data, config,
                                              tmp_path / "run", key=jax.random.key(0),
                                              device_bytes=1024))
    assert "parameters and optimizer state" in message
    assert not (tmp_path / "run").exists()


def test_free_embedding_runs_over_the_memory_are_refused_as_does_not_fit():
    with pytest.raises(parallel.DoesNotFit, match=r"at most \d+: fewer seeds"):
        fe.solve([0, 1], [600, 600], 45, fe.SolverConfig(), memory_bytes=3 * 2**30)
    assert issubclass(parallel.DoesNotFit, ValueError)
    assert np.isfinite(fe.run_bytes(600, 45, 2))


def test_the_rl_loop_refuses_a_step_over_the_device_before_it_writes_anything(model, tmp_path):
    from jaxlab.rl import loop

    config = loop.LoopConfig(steps=1, prompts=1 << 14, group_size=64, max_prompt_tokens=4096,
                             max_new_tokens=1 << 16)
    out = tmp_path / "run"
    message = refused_at_once(lambda: loop.run(
        model, lambda key, count: [], lambda *a: {}, config, out, key=jax.random.key(0)))
    assert "would fit" in message and "rows=" in message
    assert not out.exists()
