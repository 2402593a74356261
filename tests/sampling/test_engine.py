"""The decode loop's pure steps on hand-computed cases, its compiled-program cache, and the
memory check of a request."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.models import hf, zoo
from jaxlab.sampling import sampler
from jaxlab.sampling.confidence import GroupWindow
from jaxlab.sampling.memory import decode_memory, require_fits
from jaxlab.sampling.sampler import SamplingConfig


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return hf.load_pretrained(zoo.create("qwen3", tmp_path_factory.mktemp("q3")))


def test_refill_gives_finished_slots_the_next_traces_of_their_prompt_within_the_budget():
    # prompt 0 owns slots 0, 1 and has launched 2 traces; prompt 1 owns slots 2, 3 (launched 2)
    finishing = jnp.asarray([True, False, True, True])
    trace, launched, refilled = sampler.refill(
        finishing, prompt=jnp.asarray([0, 0, 1, 1]), trace=jnp.asarray([0, 1, 4, 5]),
        launched=jnp.asarray([2, 2]), budget=jnp.int32(3), capacity=4)
    # slot 0 takes trace 2 of prompt 0 (row 2); slot 2 takes trace 2 of prompt 1 (row 4 + 2);
    # slot 3 would take trace 3 of prompt 1, past the budget of 3: idle
    np.testing.assert_array_equal(trace, [2, 1, 6, -1])
    np.testing.assert_array_equal(launched, [3, 3])
    np.testing.assert_array_equal(refilled, [True, False, True, False])


def test_refill_matches_a_slot_by_slot_reference_with_per_prompt_budgets():
    # the rank of a finishing slot among its prompt's finishing slots, counted one by one
    rng = np.random.default_rng(0)
    step = jax.jit(sampler.refill, static_argnames="capacity")
    for _ in range(40):
        p, n = 3, 4
        prompt = np.arange(p * n) // n
        finishing = rng.random(p * n) < 0.5
        launched, budget = rng.integers(0, 6, p), rng.integers(0, 9, p)
        trace = rng.integers(-1, 24, p * n)
        got, got_launched, got_refilled = step(finishing, prompt, trace, launched, budget,
                                               capacity=8)
        want, want_launched = trace.copy(), launched.copy()
        for b in range(p * n):
            if finishing[b]:
                number = launched[prompt[b]] + finishing[:b][prompt[:b] == prompt[b]].sum()
                refilled = number < budget[prompt[b]]
                want[b] = prompt[b] * 8 + number if refilled else -1
                want_launched[prompt[b]] += refilled
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(got_launched, want_launched)
        np.testing.assert_array_equal(got_refilled, finishing & (want >= 0))


def test_finish_names_the_reason_a_trace_ends():
    window = GroupWindow(ring=jnp.zeros((4, 2)), total=jnp.asarray([2.0, 2.0, 20.0, 20.0]),
                         count=jnp.asarray([2, 1, 5, 5]))          # means 1, 2, 10, 10
    finishing, reason = sampler.finish(
        token=jnp.asarray([3, 3, 9, 3]), length=jnp.asarray([1, 1, 1, 8]), window=window,
        active=jnp.asarray([True, True, True, True]), stop_ids=jnp.asarray([9]),
        threshold=jnp.float32(1.5), max_new_tokens=8)
    # row 0: full window with mean 1 < 1.5; row 1: window not full; row 2: stop token;
    # row 3: length limit
    np.testing.assert_array_equal(finishing, [True, False, True, True])
    np.testing.assert_array_equal(np.asarray(reason)[[0, 2, 3]],
                                  [sampler.LOW_CONFIDENCE, sampler.STOP, sampler.LENGTH])
    never, _ = sampler.finish(jnp.asarray([3, 3, 9, 3]), jnp.asarray([1, 1, 1, 1]), window,
                              jnp.asarray([True, True, False, True]), jnp.asarray([9]), None, 8)
    np.testing.assert_array_equal(never, [False, False, False, False])  # inactive row 2 too


def test_record_writes_each_active_slot_at_its_length_and_drops_idle_ones():
    out = sampler.Samples.empty(1, 3, 4)
    row, length = jnp.asarray([2, 3, 0]), jnp.asarray([1, 0, 3])  # slot 1 idle (row 3 = N)
    out = sampler.record(out, row, length, jnp.asarray([7, 8, 9]), jnp.asarray([-1.0, -2, -3]),
                         jnp.asarray([0.5, 0.6, 0.7]), jnp.asarray([1.5, 1.6, 1.7]))
    want = np.zeros((3, 4), np.int32)
    want[2, 1], want[0, 3] = 7, 9
    np.testing.assert_array_equal(out.tokens, want)
    assert out.logprobs[2, 1] == -1 and out.group_confidence[0, 3] == np.float32(1.7)


def test_a_prompt_length_in_the_same_bucket_a_new_threshold_and_budget_do_not_recompile(model):
    config = SamplingConfig(max_new_tokens=6, group_size=2, budget=3, temperature=1.0,
                            stop_threshold=5.0, prompt_bucket=16)
    sampler.sample(model, [[1, 2, 3]], jax.random.key(0), config)
    before = sampler.decode_loop._cache_size(), sampler.prefill._cache_size()
    again = sampler.sample(model, [list(range(1, 12))], jax.random.key(1),
                           dataclasses.replace(config, stop_threshold=6.5, budget=4))
    assert (sampler.decode_loop._cache_size(), sampler.prefill._cache_size()) == before
    assert again.tokens.shape == (4, 6) and (np.asarray(again.finish_reason) > 0).all()
    sampler.sample(model, [list(range(1, 18))], jax.random.key(1), config)  # the next bucket
    assert sampler.prefill._cache_size() == before[1] + 1


def test_a_request_that_does_not_fit_says_what_it_needs_and_what_would_fit(model):
    config = SamplingConfig(max_new_tokens=64, group_size=8, prompt_bucket=8)
    need = decode_memory(model.config, 1, 8, config)
    smaller = decode_memory(model.config, 1, 8, dataclasses.replace(config, group_size=4))
    assert require_fits(model.config, 1, 8, config, need.peak) == need
    budget = (need.peak + smaller.peak) // 2
    with pytest.raises(ValueError, match=r"needs .* GiB .* would fit: .*group_size=4") as error:
        require_fits(model.config, 1, 8, config, budget)
    assert "max_new_tokens=" in str(error.value)
    pages = int(re.search(r"kv_pages=(\d+) \(pages of 64 tokens\)", str(error.value))[1])
    assert pages < 9 and decode_memory(model.config, 1, 8, dataclasses.replace(
        config, kv_pages=pages)).peak <= budget  # fewer pages than 8 slots x 64 tokens + 1
