"""Every allocation checked before it happens: the sampler, the RL and SFT steps and the
free-embedding runs refuse a request over the device's memory with `parallel.DoesNotFit`, at
once (nothing allocated, nothing compiled when the parts held for sure alone exceed the memory),
naming what it needs and a smaller setting that fits; that setting then runs."""

import dataclasses
import math
import re

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


@pytest.fixture
def compiles(monkeypatch):
    """A list that grows by one for every program compiled through `jax.stages.Lowered.compile`
    (how every memory check compiles) while the test runs."""
    counted, compile = [], jax.stages.Lowered.compile

    def counting(self, *args, **kwargs):
        counted.append(self)
        return compile(self, *args, **kwargs)

    monkeypatch.setattr(jax.stages.Lowered, "compile", counting)
    return counted


def refused_at_once(call, compiles):
    """The DoesNotFit `call()` raises, having compiled nothing."""
    before = len(compiles)
    with pytest.raises(parallel.DoesNotFit) as error:
        call()
    assert len(compiles) == before, "a refusal at once compiled a program"
    return str(error.value)


def test_a_sampling_budget_over_the_device_is_refused_and_the_suggested_one_runs(model,
                                                                                compiles):
    config = sampler.SamplingConfig(max_new_tokens=8, group_size=1 << 20)
    message = refused_at_once(lambda: sampler.sample(model, [[1, 2, 3]], jax.random.key(0),
                                                     config, device_bytes=4 * MIB), compiles)
    assert re.search(r"needs at least \S+ GiB per device \(weights .* prompt KV .* generated KV "
                     r".* outputs .*; and about \S+ GiB more: logits", message)
    group = int(re.search(r"would fit: .*group_size=(\d+)", message)[1])
    assert 1 <= group < config.group_size
    before = len(compiles)
    out = sampler.sample(model, [[1, 2, 3]], jax.random.key(0),
                         dataclasses.replace(config, group_size=group), device_bytes=4 * MIB)
    assert out.tokens.shape == (group, 8) and len(compiles) == before  # within half: no check


def test_the_default_device_memory_refuses_millions_of_tokens_over_many_traces(model, compiles):
    config = sampler.SamplingConfig(max_new_tokens=4_000_000, group_size=1 << 16)
    message = refused_at_once(lambda: sampler.sample(model, [[1, 2, 3]], jax.random.key(0),
                                                     config), compiles)
    assert "max_new_tokens=" in message.split("would fit:")[1]


def test_the_rule_compiles_only_past_half_the_memory_and_refuses_at_once_on_certain_parts(
        compiles):
    def check(certain, rest, peak, memory=100):
        def compiled(change):
            compiles.append(change)
            return {"temporaries": peak // change.get("microbatches", 1)}
        return parallel.require_fits("a step", memory, lambda change: {
            "state": certain // change.get("microbatches", 1),
            "activations": rest // change.get("microbatches", 1)}, compiled,
            [[{"microbatches": m} for m in (2, 4, 8, 16)]], certain=("state",))

    def compiled_by(call):
        before = len(compiles)
        result = call()
        return result, len(compiles) - before

    assert compiled_by(lambda: check(20, 30, 10**6)) == (None, 0)  # E <= M / 2: runs as asked
    assert compiled_by(lambda: check(20, 60, 90)) == (90, 1)      # compiled: it fits
    # E > M but only approximately (the certain part is 20): the compiled figure decides
    assert compiled_by(lambda: check(20, 280, 90)) == (90, 1)
    before = len(compiles)
    with pytest.raises(parallel.DoesNotFit, match=r"needs \S+ GiB per device as compiled "
                       r"\(temporaries .* microbatches=4"):
        check(20, 160, 400)   # 400 / 2 compiled does not fit; (20 + 160) / 4 is within M / 2
    assert 1 < len(compiles) - before <= 1 + 3                   # bisection, not every knob
    message = refused_at_once(lambda: check(300, 10, 0), compiles)  # C > M: at once
    assert re.search(r"needs at least \S+ GiB per device \(state \S+ GiB; and about \S+ GiB "
                     r"more: activations .* would fit: microbatches=8$", message)  # 310/8 <= 50
    message = refused_at_once(lambda: check(10**4, 0, 0), compiles)
    assert message.endswith("no smaller setting fits by its estimate")


def test_a_policy_step_too_large_is_refused_naming_the_settings_that_fit(model, compiles):
    mesh = parallel.single_device_mesh()
    config = train.TrainConfig()

    def check(rows, width, config, memory, **kwargs):
        return train.require_policy_step_fits(model, rows, width, config, mesh, temperature=1.0,
                                              device_bytes=memory, **kwargs)

    message = refused_at_once(lambda: check(1 << 20, 4096, config, 512 * MIB), compiles)
    assert re.search(r"needs at least \S+ GiB per device \(parameters and optimizer state .* "
                     r"gradients .* batch .*; and about .* layer activations .* output head",
                     message)
    rows = int(re.search(r"would fit: .*rows=(\d+)", message)[1])
    before = len(compiles)
    assert check(rows, 4096, config, 512 * MIB) is None and len(compiles) == before
    # the batch fits but the approximate activations pass the memory: the compiled step decides
    with pytest.raises(parallel.DoesNotFit, match="as compiled") as error:
        check(256, 256, config, 4 * MIB)
    assert len(compiles) > before
    micro = int(re.search(r"would fit: train.microbatches=(\d+)", str(error.value))[1])
    check(256, 256, dataclasses.replace(config, microbatches=micro), 4 * MIB)  # no error
    # the RL loop's keys: prompts x group_size / minibatches rows, train.* settings
    message = refused_at_once(lambda: check(1 << 20, 4096, config, 512 * MIB,
                                            loop=(1 << 16, 16, 1)), compiles)
    assert message.startswith("the policy step on prompts x group_size / minibatches = "
                              "1048576 rows x 4096 tokens with train.microbatches=1, "
                              "train.logprob_chunk=512, train.remat='none' needs at least")
    found = re.search(r"prompts x group_size / minibatches = (\d+) rows, e.g. prompts=(\d+) or "
                      r"minibatches=(\d+)", message.split("would fit:")[1])
    rows, prompts, minibatches = map(int, found.groups())
    assert prompts * 16 == rows and (1 << 20) // minibatches == rows


def test_sft_refuses_a_step_too_large_before_it_writes_anything(model, tmp_path, compiles):
    data = sft.sft_batch([[1, 2]] * 8, [[3, 4]] * 8, length=8)
    config = sft.FitConfig(steps=2, batch_size=8, optimizer=train.OptimizerConfig(
        learning_rate=1e-3))
    message = refused_at_once(lambda: sft.fit(model, sft.sft_loss, data, config,
                                              tmp_path / "run", key=jax.random.key(0),
                                              device_bytes=1024, where="fit."), compiles)
    assert message.startswith("the training step with fit.batch_size=8, fit.microbatches=1, "
                              "fit.remat='none' needs at least")
    assert "parameters and optimizer state" in message
    assert not (tmp_path / "run").exists()


def stream_of(batch):
    """A `Stream` giving `batch` at every step."""
    def stream(start):
        while True:
            yield batch
    return stream


def test_a_stream_counts_its_placed_state_as_free_and_is_offered_a_smaller_batch(
        model, tmp_path, compiles, monkeypatch):
    config = sft.FitConfig(steps=1, batch_size=64, optimizer=train.OptimizerConfig(
        learning_rate=1e-3))
    batch = sft.sft_batch([[1, 2]] * 64, [[3, 4]] * 64, length=512)
    mesh = parallel.make_mesh(parallel.DATA, jax.local_devices()[:1])
    state, grads = train.placed_state(model, config.optimizer, mesh)[2].values()
    data = sum(np.asarray(v).nbytes for v in batch.values())
    # free memory once the state is placed: exactly twice the estimate, the state counted as free
    monkeypatch.setattr(parallel, "device_memory_bytes",
                        lambda device: 2 * (state + grads + data) - state)
    before = len(compiles)
    sft.fit(model, sft.sft_loss, stream_of(batch), config, tmp_path / "fits",
            key=jax.random.key(0))
    assert len(compiles) == before  # within half of the memory: not compiled to check
    # a stream's data scale with its batch: 16 rows fit within half of this memory, 32 do not
    memory = 2 * (state + grads + data // 4)
    message = refused_at_once(lambda: sft.fit(model, sft.sft_loss, stream_of(batch), config,
                                              tmp_path / "smaller", key=jax.random.key(0),
                                              device_bytes=memory), compiles)
    assert "would fit: FitConfig.batch_size=16" in message
    assert f"data {parallel.gib(data)}" in message


def test_free_embedding_runs_over_the_memory_are_refused_naming_the_runs_that_fit():
    memory, config = 3 * 2**30, fe.SolverConfig()
    with pytest.raises(parallel.DoesNotFit) as error:
        fe.solve([0, 1], [600, 600], 45, config, memory_bytes=memory)
    runs, per_run = fe.batch_size(2, 1), fe.run_bytes(fe.doc_slots(600), 45, config.k)
    most = memory // per_run  # one device
    assert most * per_run <= memory < (most + 1) * per_run <= runs * per_run
    assert str(error.value) == (
        f"{runs} free-embedding runs at n={fe.doc_slots(600)}, d=45, k={config.k} need "
        f"{parallel.gib(runs * per_run)} per device (1 device(s): {runs} run(s) of "
        f"{parallel.gib(per_run)}) but 3 GiB are available; use fewer runs per call (at most "
        f"{most}: fewer seeds or candidate n per call, a smaller critical_n window) or a "
        f"smaller n")
    assert math.isfinite(per_run)


def test_the_rl_loop_refuses_a_step_over_the_device_before_it_writes_anything(model, tmp_path,
                                                                              compiles):
    from jaxlab.rl import loop

    config = loop.LoopConfig(steps=1, prompts=1 << 14, group_size=64, max_prompt_tokens=4096,
                             max_new_tokens=1 << 16, minibatches=2)
    out = tmp_path / "run"
    message = refused_at_once(lambda: loop.run(
        model, lambda key, count: [], lambda *a: {}, config, out, key=jax.random.key(0)),
        compiles)
    found = re.search(r"would fit: .*prompts x group_size / minibatches = (\d+) rows, e.g. "
                      r"(?:prompts=(\d+) or )?minibatches=(\d+)", message)
    rows, prompts, minibatches = (int(n) if n else None for n in found.groups())
    assert rows == (1 << 20) // minibatches  # and fewer prompts, when they are whole
    assert prompts == (rows * 2 // 64 if rows * 2 % 64 == 0 else None)
    assert "train.microbatches=1" in message
    assert not out.exists()
