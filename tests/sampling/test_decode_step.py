"""The decode loop's step as a pure function of its state: one step against a full forward pass
of the model, and the step run from Python until every slot is idle against `sample`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlab.models import hf, zoo
from jaxlab.sampling import sampler
from jaxlab.sampling.confidence import token_confidence
from jaxlab.sampling.sampler import SamplingConfig

PROMPTS = [[5, 9, 17, 3, 44], [7, 8], [100, 200, 300]]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return hf.load_pretrained(zoo.create("qwen3", tmp_path_factory.mktemp("q3")))


def start(model, config: SamplingConfig, key, budgets):
    """(initial state, params, shape) of the loop `sample` runs for PROMPTS, built by hand."""
    ids, mask = sampler.left_pad(PROMPTS)
    graphdef, state = nnx.split(model)
    prefix, logits = sampler.prefill(graphdef, state, jnp.asarray(ids), jnp.asarray(mask),
                                     int8_cache=config.int8_cache, scan_layers=config.scan_layers)
    shape = sampler.DecodeShape.of(config)
    request = sampler.Request.create(
        prefix, logits, sampler.prompt_keys(key, len(PROMPTS)),
        sampler.sampling_strategy(config), jnp.zeros(len(PROMPTS)),
        jnp.asarray(budgets, jnp.int32), shape)
    first = sampler.init_state(
        request, sampler.init_generated(model, len(PROMPTS), config),
        sampler.Samples.empty(len(PROMPTS), shape.capacity, config.max_new_tokens), shape)
    return first, sampler.DecodeParams(model), shape


def test_one_step_writes_each_live_slots_first_token_as_a_full_forward_pass_gives_it(model):
    # greedy: slot i of prompt p writes row p x capacity + i, token argmax of the logits after
    # the prompt, its confidence from the full distribution; prompt 1's budget of 1 leaves its
    # second slot idle
    config = SamplingConfig(max_new_tokens=6, group_size=2, budget=2, temperature=0.0)
    state, params, shape = start(model, config, jax.random.key(0), budgets=[2, 1, 2])
    after = jax.jit(lambda s: sampler.decode_step(s, params, shape))(state)
    np.testing.assert_array_equal(state.trace, [0, 1, 2, -1, 4, 5])
    rows = [0, 1, 2, 4, 5]
    out = jax.device_get(after.out)
    for row in rows:
        prompt = PROMPTS[row // shape.capacity]
        logits = model(jnp.asarray([prompt]))[0, -1]
        assert out.tokens[row, 0] == int(jnp.argmax(logits))
        np.testing.assert_allclose(out.confidence[row, 0], token_confidence(logits[None])[0],
                                   rtol=1e-4)
        np.testing.assert_allclose(out.logprobs[row, 0], jax.nn.log_softmax(logits).max(),
                                   atol=1e-4)
    assert not out.tokens[3].any() and not out.confidence[3].any()  # the idle slot's row
    np.testing.assert_array_equal(after.cache.index, [1, 1, 1, 0, 1, 1])
    assert int(after.step) == 1 and not out.lengths.any()  # no trace has ended yet
    # the same first tokens as the compiled loop
    whole = sampler.sample(model, PROMPTS, jax.random.key(0), config, budgets=[2, 1, 2])
    np.testing.assert_array_equal(whole.tokens[:, 0], out.tokens[rows, 0])


def test_the_step_run_from_python_until_every_slot_is_idle_is_the_compiled_loop(model):
    # refills (budget 3 > n = 2), stop tokens, a key per prompt: the step is the whole loop
    config = SamplingConfig(max_new_tokens=10, group_size=2, budget=3, temperature=1.0, window=3,
                            stop_ids=(3, 4, 5, 6, 7))
    keys = jax.random.split(jax.random.key(4), len(PROMPTS))
    state, params, shape = start(model, config, keys, budgets=[3, 3, 3])
    step = jax.jit(lambda s: sampler.decode_step(s, params, shape))
    while bool(jnp.any(state.live)):
        state = step(state)
    got = jax.device_get(state.out)
    want = jax.device_get(sampler.sample(model, PROMPTS, keys, config))
    assert int(want.steps) == int(state.step) > config.max_new_tokens  # slots were refilled
    assert (want.finish_reason == sampler.STOP).any()
    capacity_rows = np.concatenate([p * shape.capacity + np.arange(3) for p in range(3)])
    for name in ("tokens", "lengths", "finish_reason", "prompt_index"):
        np.testing.assert_array_equal(getattr(got, name)[capacity_rows], getattr(want, name))
    # the step compiled on its own may round the last bit unlike the loop's body
    for name in ("logprobs", "confidence", "group_confidence", "lowest_group_confidence",
                 "tail_confidence"):
        np.testing.assert_allclose(getattr(got, name)[capacity_rows], getattr(want, name),
                                   rtol=1e-6, atol=1e-6)
