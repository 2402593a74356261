"""The sampler under the GPU and TPU backend policies (float caches, "slots" keys,
dot_product_attention prefill, the Pallas decode kernels in interpret mode) against the CPU
policy's: the same tokens under greedy decoding, log-probs and confidences to float tolerance.
"""

import dataclasses

import jax
import numpy as np
import pytest

from jaxlab.deepconf import online
from jaxlab.models import hf, zoo
from jaxlab.sampling import sampler
from jaxlab.sampling.sampler import SamplingConfig

PROMPTS = [[5, 9, 17, 3, 44], [7, 8], [100, 200, 300]]
# head dim 128: the TPU kernel's (the GPU kernel takes any power of two from 16)
CASES = {
    "greedy": SamplingConfig(max_new_tokens=12, group_size=2, window=4, tail=5, temperature=0.0),
    "greedy-paged-scanned": SamplingConfig(max_new_tokens=24, group_size=2, temperature=0.0,
                                           kv_pages=9, scan_layers=True),
    "nucleus-refill-early-stop": SamplingConfig(max_new_tokens=12, group_size=2, budget=5,
                                                temperature=0.8, top_p=0.9, window=3),
}


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return zoo.create("qwen3", tmp_path_factory.mktemp("q3"), head_dim=128, seed=3)


@pytest.fixture(scope="module")
def models(path):
    return {name: hf.load_pretrained(path, backend=name) for name in ("cpu", "gpu", "tpu")}


def _close(got, want, atol):
    np.testing.assert_array_equal(got.lengths, want.lengths)
    np.testing.assert_array_equal(got.finish_reason, want.finish_reason)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=atol)
    np.testing.assert_allclose(got.confidence, want.confidence, atol=atol)
    np.testing.assert_allclose(got.lowest_group_confidence, want.lowest_group_confidence,
                               atol=atol)


# Every case under the GPU policy; the TPU policy (its kernel in interpret mode, ~4x slower
# than the GPU's) under greedy decoding, unrolled and paged + scanned: the refill and early
# stop are the loop's, not the kernel's.
@pytest.mark.parametrize("name, case", [("gpu", case) for case in sorted(CASES)]
                         + [("tpu", "greedy"), ("tpu", "greedy-paged-scanned")])
def test_sampling_under_an_accelerator_policy_gives_the_cpu_policys_traces(models, name, case):
    config, key = CASES[case], jax.random.key(7)
    if case.endswith("early-stop"):  # a threshold splitting the traces of an unstopped run,
        lowest = np.sort(sampler.sample(models["cpu"], PROMPTS, key, config)  # midway between
                         .lowest_group_confidence)                            # two of them
        middle = len(lowest) // 2
        config = dataclasses.replace(
            config, stop_threshold=float(lowest[middle - 1] + lowest[middle]) / 2)
    want = jax.device_get(sampler.sample(models["cpu"], PROMPTS, key, config))
    got = jax.device_get(sampler.sample(models[name], PROMPTS, key, config))
    if case.endswith("early-stop"):  # the case exercises what it names
        assert {int(r) for r in want.finish_reason} == {sampler.LENGTH, sampler.LOW_CONFIDENCE}
        assert len(want.lengths) == len(got.lengths) == 5 * len(PROMPTS)  # refilled
    # the TPU kernel reads keys and values in bfloat16: its log-probs move by ~1e-3 (enough to
    # move a sampled draw, which is why it runs greedy cases only)
    _close(got, want, atol=5e-3 if name == "tpu" else 1e-4)


def test_deepconf_online_under_the_gpu_policy_gives_the_cpu_policys_result(models):
    sampling = SamplingConfig(max_new_tokens=12, group_size=4, window=3, temperature=1.0)
    config = online.OnlineConfig(rule="deepconf-low", warmup=8, budget=16, batch=4)

    def decode(ids):  # a stand-in for reading a trace: its first token mod 3
        return f"so \\boxed{{{int(ids[0]) % 3}}}"

    want, got = (online.solve(models[name], PROMPTS[0], jax.random.key(1), sampling, config,
                              decode) for name in ("cpu", "gpu"))
    assert (got.answer, got.launched, got.stopped, got.tokens, got.rounds) == (
        want.answer, want.launched, want.stopped, want.tokens, want.rounds)
    np.testing.assert_allclose(got.threshold, want.threshold, rtol=1e-5)
    assert got.votes.keys() == want.votes.keys()
    for answer, votes in want.votes.items():
        np.testing.assert_allclose(got.votes[answer], votes, rtol=1e-5)
    assert want.stopped > 0  # some traces stopped early: the online path ran
