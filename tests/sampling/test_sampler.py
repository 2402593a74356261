import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlab.models import hf, zoo
from jaxlab.models.decoder import Decoder
from jaxlab.sampling import confidence as cf
from jaxlab.sampling import sampler
from jaxlab.sampling.memory import decode_memory, kv_cache_bytes
from jaxlab.sampling.sampler import SamplingConfig

PROMPTS = [[5, 9, 17, 3, 44], [7, 8], [100, 200, 300]]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return hf.load_pretrained(zoo.create("qwen3", tmp_path_factory.mktemp("q3")))


def _full_logits(model, prompt, tokens):
    ids = jnp.asarray([list(prompt) + list(tokens)])
    return np.asarray(model(ids))[0, len(prompt) - 1: len(prompt) + len(tokens) - 1]


def test_in_loop_confidence_equals_full_forward_reference(model):
    config = SamplingConfig(max_new_tokens=12, group_size=2, window=4, tail=7, temperature=0.7)
    s = jax.device_get(sampler.sample(model, PROMPTS, jax.random.key(0), config))
    for i in range(len(s.lengths)):
        length = s.lengths[i]
        tokens = s.tokens[i, :length]
        logits = _full_logits(model, PROMPTS[s.prompt_index[i]], tokens)
        z = logits - logits.max(-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        conf = -np.sort(logp, axis=-1)[:, ::-1][:, :20].mean(-1)
        np.testing.assert_allclose(s.confidence[i, :length], conf, rtol=1e-4)
        # Confidence reads the raw distribution; log-probs the tempered one the tokens came from.
        zt = z / 0.7
        logp_t = zt - np.log(np.exp(zt).sum(-1, keepdims=True))
        np.testing.assert_allclose(s.logprobs[i, :length], logp_t[np.arange(length), tokens],
                                   atol=1e-4)
        groups = [conf[max(0, t - 3):t + 1].mean() for t in range(length)]
        np.testing.assert_allclose(s.group_confidence[i, :length], groups, rtol=1e-4)
        np.testing.assert_allclose(s.tail_confidence[i], conf[-7:].mean(), rtol=1e-4)
        want_lowest = cf.lowest_group_confidence(conf[None], np.array([length]), 4)[0]
        np.testing.assert_allclose(s.lowest_group_confidence[i], want_lowest, rtol=1e-4)
    assert (s.lengths == 12).all() and (s.finish_reason == sampler.LENGTH).all()
    np.testing.assert_array_equal(s.prompt_index, [0, 0, 1, 1, 2, 2])


def test_early_stop_fires_exactly_when_the_full_window_drops_below_threshold(model):
    # The threshold splits the traces of an unstopped run (same key, so the same traces up to
    # their stop): the median of their lowest full-window group confidences.
    # A tail of 5 apart from the window of 3: traces stopped at lengths 3 and 4 have a tail
    # shorter than 5 (their mean), longer ones their last 5 tokens.
    window, base = 3, dict(max_new_tokens=20, group_size=4, window=3, tail=5, temperature=1.0)
    free = sampler.sample(model, PROMPTS, jax.random.key(1), SamplingConfig(**base))
    threshold = float(np.median(free.lowest_group_confidence))
    config = SamplingConfig(stop_threshold=threshold, **base)
    s = jax.device_get(sampler.sample(model, PROMPTS, jax.random.key(1), config))
    reasons = set()
    for i in range(len(s.lengths)):
        groups = s.group_confidence[i, :s.lengths[i]]
        conf = s.confidence[i, :s.lengths[i]]
        np.testing.assert_allclose(s.tail_confidence[i], conf[-5:].mean(), rtol=1e-5)
        np.testing.assert_allclose(s.tail_confidence[i], cf.tail_confidence(
            s.confidence[i:i + 1], s.lengths[i:i + 1], 5)[0], rtol=1e-5)
        below = [t for t in range(len(groups)) if t >= window - 1 and groups[t] < threshold]
        if s.finish_reason[i] == sampler.LOW_CONFIDENCE:
            assert below and below[0] == s.lengths[i] - 1  # stopped at the first full-window dip
        else:
            assert not below and s.lengths[i] == 20
        reasons.add(int(s.finish_reason[i]))
    assert reasons == {sampler.LENGTH, sampler.LOW_CONFIDENCE}  # the test exercises both


def test_refill_spends_exactly_the_budget_and_returns_every_trace_once(model):
    config = SamplingConfig(max_new_tokens=10, group_size=2, budget=5, window=2,
                            stop_threshold=5.875,
                            temperature=1.0)
    s = jax.device_get(sampler.sample(model, PROMPTS, jax.random.key(2), config))
    assert s.tokens.shape == (15, 10)
    np.testing.assert_array_equal(np.bincount(s.prompt_index), [5, 5, 5])
    assert (s.lengths >= 1).all() and (s.finish_reason != 0).all()
    # Slots restart as traces finish: fewer steps than 5 rounds of 2 slots each run to the end,
    # and at least as many as the longest chain of traces a slot could hold.
    assert s.steps < 3 * 10 and s.steps >= 10
    # Each trace is a proper sample of its prompt: tokens past its length are untouched.
    for i in range(15):
        assert not s.tokens[i, s.lengths[i]:].any()


def test_refill_turns_early_stops_into_fewer_steps(model):
    base = dict(max_new_tokens=16, window=2, stop_threshold=5.875, temperature=1.0)
    all_at_once = sampler.sample(model, PROMPTS, jax.random.key(3),
                                 SamplingConfig(group_size=8, **base))
    refilled = sampler.sample(model, PROMPTS, jax.random.key(3),
                              SamplingConfig(group_size=2, budget=8, **base))
    assert refilled.tokens.shape == all_at_once.tokens.shape
    # Same traces' worth of work with a quarter of the slots: the loop needs more steps than one
    # round but far fewer than four rounds of full-length traces.
    assert int(all_at_once.steps) <= 16 < int(refilled.steps) < 4 * 16


@pytest.mark.parametrize("temperature", [0.0, 1e-30])  # below the floor (1e-5): greedy too
def test_greedy_equals_argmax_decoding(model, temperature):
    config = SamplingConfig(max_new_tokens=10, temperature=temperature)
    s = jax.device_get(sampler.sample(model, PROMPTS[:1], jax.random.key(0), config))
    # The reference: full forward passes over the text so far, right-padded to one length (the
    # causal mask keeps padding out of every earlier position), so one compiled forward serves.
    forward = jax.jit(lambda ids: model(ids))
    ids = np.zeros((1, len(PROMPTS[0]) + 10), np.int32)
    ids[0, :len(PROMPTS[0])] = PROMPTS[0]
    for t in range(len(PROMPTS[0]), ids.shape[1]):
        ids[0, t] = int(np.argmax(np.asarray(forward(jnp.asarray(ids)))[0, t - 1]))
    np.testing.assert_array_equal(s.tokens[0], ids[0, len(PROMPTS[0]):])


def test_same_key_same_output_and_stop_ids_end_traces(model):
    config = SamplingConfig(max_new_tokens=15, group_size=3, temperature=1.0)
    a = jax.device_get(sampler.sample(model, PROMPTS, jax.random.key(4), config))
    b = jax.device_get(sampler.sample(model, PROMPTS, jax.random.key(4), config))
    c = jax.device_get(sampler.sample(model, PROMPTS, jax.random.key(5), config))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert (a.tokens != c.tokens).any()
    stop = int(a.tokens[0, 4])  # a token the first trace emits at step 5
    s = jax.device_get(sampler.sample(model, PROMPTS, jax.random.key(4),
                                      SamplingConfig(max_new_tokens=15, group_size=3,
                                                     temperature=1.0,
                                                     stop_ids=(stop,))))
    first = list(a.tokens[0]).index(stop)
    assert s.lengths[0] == first + 1 and s.finish_reason[0] == sampler.STOP
    for i in range(len(s.lengths)):
        assert stop not in s.tokens[i, :s.lengths[i] - 1]


def test_a_key_per_prompt_makes_each_prompts_traces_its_own(model):
    # With a key per prompt, a prompt's traces depend on its key, threshold and budget alone:
    # not on the other prompts of the call, the slot count, or the other prompts' settings.
    keys = jax.random.split(jax.random.key(12), 3)
    base = dict(max_new_tokens=10, window=2, temperature=1.0, stop_threshold=0.0)
    together = jax.device_get(sampler.sample(
        model, PROMPTS, keys, SamplingConfig(group_size=2, budget=5, **base),
        stop_thresholds=[5.875, 0.0, 5.9], budgets=[5, 3, 0]))
    np.testing.assert_array_equal(together.prompt_index, [0] * 5 + [1] * 3)
    assert (together.finish_reason != 0).all()
    for p, threshold, budget in ((0, 5.875, 5), (1, 0.0, 3)):
        alone = jax.device_get(sampler.sample(
            model, PROMPTS[p:p + 1], keys[p:p + 1],
            SamplingConfig(group_size=3, budget=budget, **{**base, "stop_threshold": threshold})))
        rows = together.prompt_index == p
        np.testing.assert_array_equal(together.tokens[rows], alone.tokens)
        np.testing.assert_array_equal(together.lengths[rows], alone.lengths)
        np.testing.assert_array_equal(together.finish_reason[rows], alone.finish_reason)
        np.testing.assert_allclose(together.tail_confidence[rows], alone.tail_confidence,
                                   rtol=1e-5)
    assert (together.finish_reason[:5] == sampler.LOW_CONFIDENCE).any()  # the threshold acted
    with pytest.raises(ValueError, match="budgets"):
        sampler.sample(model, PROMPTS, keys, SamplingConfig(group_size=2, budget=5, **base),
                       budgets=[6, 1, 1])
    with pytest.raises(ValueError, match="stop_thresholds"):
        sampler.sample(model, PROMPTS, keys, SamplingConfig(**base), stop_thresholds=[1.0])
    with pytest.raises(ValueError, match="one per prompt"):
        sampler.sample(model, PROMPTS, keys[:2], SamplingConfig(**base))


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.5), (8, 0.7)])
def test_top_k_and_top_p_never_leave_the_allowed_set(top_k, top_p):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 64)).astype(np.float32) * 2
    config = SamplingConfig(temperature=0.8, top_k=top_k, top_p=top_p)
    allowed = []
    for row in logits / 0.8:
        order = np.argsort(-row)
        keep = order[:top_k] if top_k else order
        probs = np.exp(row[keep] - row[keep].max())
        probs /= probs.sum()
        before = np.cumsum(probs) - probs
        allowed.append(set(keep[before < top_p].tolist()))
    strategy = sampler.sampling_strategy(config)
    draws = jax.vmap(lambda k: strategy(jnp.asarray(logits), k).tokens)(
        jax.random.split(jax.random.key(0), 400))
    for b in range(4):
        seen = set(np.asarray(draws[:, b]).tolist())
        assert seen <= allowed[b]
        assert len(seen) == len(allowed[b])  # 400 draws reach every allowed token here


def test_draws_follow_the_truncated_distribution():
    # frequencies of 20k draws against the renormalized top-k/top-p probabilities (NumPy)
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(3, 32)).astype(np.float32) * 1.5
    config = SamplingConfig(temperature=0.7, top_k=12, top_p=0.9)
    strategy = sampler.sampling_strategy(config)
    draws = np.asarray(jax.vmap(lambda k: strategy(jnp.asarray(logits), k).tokens)(
        jax.random.split(jax.random.key(1), 20_000)))
    for b, row in enumerate(logits / 0.7):
        order = np.argsort(-row)[:12]
        probs = np.exp(row[order] - row[order].max())
        probs /= probs.sum()
        keep = order[np.cumsum(probs) - probs < 0.9]
        expected = np.zeros(32)
        expected[keep] = np.exp(row[keep] - row[keep].max())
        expected /= expected.sum()
        seen = np.bincount(draws[:, b], minlength=32) / len(draws)
        sigma = np.sqrt(expected * (1 - expected) / len(draws))
        assert np.all(np.abs(seen - expected) <= 5 * sigma + 1e-12)


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scanned"])
def test_sharded_sampling_equals_single_device(model, data_mesh8, scan_layers):
    # the reference: one device, the layers unrolled
    config = SamplingConfig(max_new_tokens=8, group_size=8, budget=10, window=2,
                            stop_threshold=5.875,
                            temperature=1.0)
    one = jax.device_get(sampler.sample(model, PROMPTS[:2], jax.random.key(6), config))
    many = jax.device_get(sampler.sample(
        model, PROMPTS[:2], jax.random.key(6),
        dataclasses.replace(config, scan_layers=scan_layers), mesh=data_mesh8))
    np.testing.assert_array_equal(one.tokens, many.tokens)
    np.testing.assert_array_equal(one.lengths, many.lengths)
    np.testing.assert_allclose(one.confidence, many.confidence, rtol=1e-5)


def test_no_recompilation_for_the_same_shapes(model):
    config = SamplingConfig(max_new_tokens=6, group_size=2, temperature=1.0, stop_threshold=5.0)
    sampler.sample(model, PROMPTS, jax.random.key(7), config)
    before = sampler.decode_loop._cache_size(), sampler.prefill._cache_size()
    other = [[1, 2, 3, 4, 5], [9], [4, 4]]  # same padded length, another threshold
    sampler.sample(model, other, jax.random.key(8),
                   dataclasses.replace(config, stop_threshold=6.5))
    assert (sampler.decode_loop._cache_size(), sampler.prefill._cache_size()) == before


@pytest.mark.parametrize("int8", [False, True])
def test_scanned_layers_sample_the_same_traces_and_compile_one_layer(model, int8):
    base = dict(max_new_tokens=10, group_size=2, budget=3, temperature=1.0, int8_cache=int8,
                stop_ids=(3, 4, 5))
    unrolled = jax.device_get(sampler.sample(model, PROMPTS, jax.random.key(3),
                                             SamplingConfig(**base)))
    scanned = jax.device_get(sampler.sample(model, PROMPTS, jax.random.key(3),
                                            SamplingConfig(**base, scan_layers=True)))
    np.testing.assert_array_equal(scanned.tokens, unrolled.tokens)
    np.testing.assert_array_equal(scanned.lengths, unrolled.lengths)
    np.testing.assert_allclose(scanned.logprobs, unrolled.logprobs, atol=1e-5)
    np.testing.assert_allclose(scanned.confidence, unrolled.confidence, atol=1e-5)

    def products(layers, scan_layers):  # matrix products in the decode loop's program
        c = dataclasses.replace(model.config, num_layers=layers)
        config = SamplingConfig(**base, scan_layers=scan_layers)
        graphdef, state = nnx.split(nnx.eval_shape(lambda: Decoder(c, nnx.Rngs(0))))
        prefix, logits = jax.eval_shape(functools.partial(
            sampler.prefill, int8_cache=int8, scan_layers=scan_layers), graphdef, state,
            *[jax.ShapeDtypeStruct((3, 8), jnp.int32)] * 2)
        text = sampler.decode_loop.lower(
            graphdef, state, prefix, logits,
            jax.eval_shape(lambda: sampler.init_generated(nnx.merge(graphdef, state), 3,
                                                          config)),
            jax.eval_shape(lambda: sampler.Samples.empty(3, 4, 10)), jax.random.key(0),
            sampler.sampling_strategy(config), jnp.zeros(3), jnp.full(3, 3, jnp.int32),
            shape=sampler.DecodeShape.of(config)).as_text()
        return text.count("dot_general")

    assert products(2, True) == products(6, True)       # one layer's program, whatever the depth
    assert products(6, False) > products(2, False) + 10


@pytest.mark.parametrize("int8", [False, True])
def test_decode_memory_counts_the_prompt_once_and_the_generated_kv_the_loop_builds(model, int8):
    config = SamplingConfig(max_new_tokens=10, group_size=4, int8_cache=int8, prompt_bucket=8)
    memory = decode_memory(model.config, 3, 5, config)
    # 3 prompts x 8 padded tokens once; 3 x n slots x 16 generated slots (10 rounded up)
    assert memory.prefix == model.init_cache(3, 8, int8).nbytes
    assert memory.generated == model.init_cache(3 * 4, 16, int8).nbytes
    assert kv_cache_bytes(model.config, 3, 5, config) == memory.prefix + memory.generated
    weights = sum(x.nbytes for x in jax.tree.leaves(model))
    assert memory.weights == weights
    assert memory.samples == 3 * 4 * (10 * 4 * 4 + 5 * 4) + 4  # capacity 4 = n traces; steps
    assert memory.arguments >= weights + memory.prefix + memory.generated + memory.samples
    assert memory.aliased >= memory.generated + memory.samples  # donated, updated in place
    assert memory.peak >= weights + memory.prefix + memory.generated + memory.samples


@pytest.mark.parametrize("prompts,config,match", [
    ([[1], []], SamplingConfig(), "empty"),
    ([[1]], SamplingConfig(max_new_tokens=50000), "max_position_embeddings"),
    ([[1]], SamplingConfig(confidence_k=1000), "confidence_k=1000"),
    ([[1]], SamplingConfig(stop_ids=(600,)), "stop_ids"),
    ([[1, 9999]], SamplingConfig(), "token id 9999"),
])
def test_bad_requests_are_refused_before_compiling(model, prompts, config, match):
    with pytest.raises(ValueError, match=match):
        sampler.sample(model, prompts, jax.random.key(0), config)


def test_a_tail_and_window_longer_than_the_trace_cover_the_whole_trace(model):
    # window and tail beyond max_new_tokens are allowed: one group (no window is ever full, so
    # no early stop), and the tail is the whole trace
    config = SamplingConfig(max_new_tokens=6, group_size=2, window=50, tail=4096, temperature=1.0,
                            stop_threshold=1e9)
    s = jax.device_get(sampler.sample(model, PROMPTS[:2], jax.random.key(11), config))
    assert (s.lengths == 6).all() and (s.finish_reason == sampler.LENGTH).all()
    means = s.confidence.mean(axis=1)
    np.testing.assert_allclose(s.tail_confidence, means, rtol=1e-5)
    np.testing.assert_allclose(s.lowest_group_confidence, means, rtol=1e-5)


@pytest.mark.parametrize("field,value", [("top_p", 0.0), ("top_p", 1.5), ("temperature", -1.0),
                                          ("window", 0), ("tail", 0), ("tail", -3),
                                          ("group_size", 0), ("top_k", -1)])
def test_bad_settings_are_named(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingConfig(**{field: value})


def test_int8_cache_samples_like_the_float_cache(model):
    base = dict(max_new_tokens=10, group_size=2, temperature=0.0)
    exact = jax.device_get(sampler.sample(model, PROMPTS, jax.random.key(9),
                                          SamplingConfig(**base)))
    small = jax.device_get(sampler.sample(model, PROMPTS, jax.random.key(9),
                                          SamplingConfig(int8_cache=True, **base)))
    np.testing.assert_allclose(small.confidence, exact.confidence, atol=2e-3)
    assert (small.tokens == exact.tokens).mean() > 0.9  # greedy paths agree but for near ties


@pytest.mark.parametrize("dtype,prompts,length", [
    ("bfloat16", 256, 128), ("float32", 256, 128), ("bfloat16", 64, 512)])
def test_the_decode_loop_at_the_qwen3_0_6b_shape_peaks_near_its_weights_kv_and_outputs(
        dtype, prompts, length):
    # The loop of 256 prompts x (128 + 256 tokens) needs at most 1.15x what it must hold (the
    # target is 1.25x); in bfloat16 no float32 copy of the weights and no copy of a layer's KV
    # per layer, whether the prompt is one block or four. Its memory is affine in the layer
    # count: 1 and 2 layers compiled, extended to the released 28.
    from jaxlab.models.decoder import DecoderConfig

    c = DecoderConfig.from_hf(zoo.hf_config("qwen3", "released"), param_dtype=dtype)
    config = SamplingConfig(max_new_tokens=256)

    def held(layers):
        m = decode_memory(dataclasses.replace(c, num_layers=layers), prompts, length, config)
        return m.loop, m.weights + m.prefix + m.generated + m.samples

    (loop1, floor1), (loop2, floor2) = held(1), held(2)
    loop, floor = loop1 + 27 * (loop2 - loop1), floor1 + 27 * (floor2 - floor1)
    assert floor > 5 * 2**30  # the KV dominates: prompts x 768 or 384 x 28 x 2 x 8 x 128 values
    assert loop <= 1.15 * floor


def test_a_qwen3_0_6b_with_256_traces_of_2048_tokens_fits_40_gib_with_an_int8_cache():
    # The compiled programs' memory is affine in the layer count (each layer adds its weights
    # and its KV; the step's temporaries are shared): compile 1 and 2 layers of the released
    # shape and extend to its 28 (`bench_sampler.py --memory` compiles all 28).
    from jaxlab.models.decoder import DecoderConfig

    c = DecoderConfig.from_hf(zoo.hf_config("qwen3", "released"), param_dtype="bfloat16")
    assert c.num_layers == 28
    config = SamplingConfig(max_new_tokens=2048 - 128, group_size=256, int8_cache=True)
    one, two = (decode_memory(dataclasses.replace(c, num_layers=layers), 1, 128, config)
                for layers in (1, 2))
    assert two.generated == 2 * one.generated == 2 * 256 * 1920 * 8 * (128 + 4) * 2
    int8 = one.peak + 27 * (two.peak - one.peak)
    bf16_kv = 256 * 2048 * 28 * 2 * 8 * 128 * 2  # 56 GiB of bf16 KV alone: does not fit
    assert int8 < 40 * 2**30 < bf16_kv
