"""The paged KV cache: the free list against a slot-by-slot reference, paged attention against
the unpaged rows, and the sampler with a small pool against the unpaged sampler."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab import parallel
from jaxlab.models import attention, hf, zoo
from jaxlab.sampling import paging, sampler
from jaxlab.sampling.memory import decode_memory, kv_cache_bytes
from jaxlab.sampling.sampler import SamplingConfig

RNG = np.random.default_rng(0)


def test_allocate_and_release_keep_every_page_held_once_or_free():
    # 6 slots, pages of 4 slots, 8 blocks per slot, a pool of 12 pages (11 usable): random
    # steps of growth and endings, checked against a plain-Python ledger of who holds what.
    b, m, page, pages = 6, 8, 4, 12
    table, free = jnp.zeros((b, m), jnp.int32), paging.FreeList.full(pages)
    length = np.zeros(b, np.int64)
    allocate = jax.jit(paging.allocate, static_argnames="kv_page_slots")
    release = jax.jit(paging.release, static_argnames="kv_page_slots")
    for _ in range(200):
        need = (length % page == 0) & (length < m * page)
        count = int(free.count)
        table, free, granted = allocate(table, free, jnp.asarray(need),
                                        jnp.asarray(length, jnp.int32), kv_page_slots=page)
        granted = np.asarray(granted)
        # the longest traces first (ties: lower slot first) while pages last
        want = sorted(np.flatnonzero(need), key=lambda i: (-length[i], i))[:count]
        np.testing.assert_array_equal(np.flatnonzero(granted), sorted(want))
        length[granted | ((length % page != 0) & (length < m * page))] += 1
        finishing = RNG.random(b) < 0.1
        table, free = release(table, free, jnp.asarray(finishing),
                              jnp.asarray(length, jnp.int32), kv_page_slots=page)
        length[finishing] = 0
        held = np.concatenate([np.asarray(table)[i, :-(-length[i] // page)] for i in range(b)])
        listed = np.asarray(free.ids)[:int(free.count)]
        assert 0 not in held and 0 not in listed          # the scratch page is never handed out
        assert sorted(np.concatenate([held, listed]).tolist()) == list(range(1, pages))
        assert (np.asarray(table)[length == 0] == 0).all()  # empty slots point at scratch


def test_evict_gives_back_the_pages_of_the_shortest_holder_only_when_stuck():
    # slots 0..3: idle, 9 tokens (3 pages of 4), 5 tokens (2 pages), 0 tokens (holds none)
    table = jnp.asarray([[0, 0, 0], [3, 4, 5], [6, 7, 0], [0, 0, 0]], jnp.int32)
    free = paging.FreeList(ids=jnp.asarray([9, 0, 0, 0, 0, 0, 0, 0], jnp.int32),
                           count=jnp.int32(1))
    live = jnp.asarray([False, True, True, True])
    length = jnp.asarray([0, 9, 5, 0], jnp.int32)
    same = paging.evict(table, free, jnp.bool_(False), live, length, 4)
    np.testing.assert_array_equal(same[0], table)
    assert int(same[1].count) == 1 and not np.asarray(same[2]).any()
    table, free, evicted = paging.evict(table, free, jnp.bool_(True), live, length, 4)
    np.testing.assert_array_equal(evicted, [False, False, True, False])
    np.testing.assert_array_equal(table[2], [0, 0, 0])
    np.testing.assert_array_equal(table[1], [3, 4, 5])
    assert int(free.count) == 3 and np.asarray(free.ids)[:3].tolist() == [9, 6, 7]


def test_an_evicted_slots_output_row_is_cleared_and_no_other():
    # with one key for all slots a redone trace draws other tokens: its row must hold only them
    out = sampler.Samples.empty(1, 4, 5)
    out = out.replace(**{name: getattr(out, name) + 7 for name in
                         ("tokens", "logprobs", "confidence", "group_confidence")})
    cleared = sampler.clear_rows(out, trace=jnp.asarray([2, 0, -1]),
                                 evicted=jnp.asarray([True, False, False]))
    for name in ("tokens", "logprobs", "confidence", "group_confidence"):
        np.testing.assert_array_equal(getattr(cleared, name)[2], 0)
        np.testing.assert_array_equal(np.delete(np.asarray(getattr(cleared, name)), 2, 0), 7)
    untouched = sampler.clear_rows(out, jnp.asarray([2, 0, -1]), jnp.zeros(3, bool))
    np.testing.assert_array_equal(untouched.tokens, out.tokens)


@pytest.mark.parametrize("layout", attention.KEY_LAYOUTS)
@pytest.mark.parametrize("int8", [False, True])
def test_paged_attention_equals_attention_over_the_rows(layout, int8):
    b, k, q, d, page, blocks = 3, 2, 4, 8, 16, 4
    size = page * blocks
    keys = RNG.normal(size=(b, k, size, d)).astype(np.float32)
    values = RNG.normal(size=(b, k, size, d)).astype(np.float32)
    scales = (None, None)
    if int8:
        keys, values = (RNG.integers(-127, 128, x.shape).astype(np.int8) for x in (keys, values))
        scales = tuple(RNG.uniform(0.001, 0.02, (b, k, size)).astype(np.float32)
                       for _ in range(2))
    query = RNG.normal(size=(b, k, q, d)).astype(np.float32)
    start, end = np.array([0, 7, 20]), np.array([64, 30, 21])
    # the rows cut into pages and spread over a pool of 1 + 12 + 3 pages in random order
    table = (1 + RNG.permutation(15)[:b * blocks]).reshape(b, blocks).astype(np.int32)

    def pool(x):  # [B, K, S, ...] -> [16, K, page, ...]
        cut = x.reshape(b, k, blocks, page, *x.shape[3:]).swapaxes(1, 2)
        out = np.zeros((16, k, page, *x.shape[3:]), x.dtype)
        out[table.reshape(-1)] = cut.reshape(b * blocks, k, page, *x.shape[3:])
        return out

    def laid(x):  # keys in the layout: [..., slots, D] or [..., D, slots]
        return x if layout == "slots" else x.swapaxes(-1, -2)

    pooled = [pool(keys), pool(values)] + [None if x is None else pool(x) for x in scales]
    got = attention.block_attention(query, laid(pooled[0]), pooled[1], *pooled[2:],
                                    start, end, block=page, key_layout=layout, pages=table)
    want = attention.block_attention(query, laid(keys), values, *scales, start, end,
                                     block=page, key_layout=layout)
    np.testing.assert_allclose(got[0], want[0], atol=1e-6)
    np.testing.assert_allclose(got[1], want[1], atol=1e-6)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return hf.load_pretrained(zoo.create("qwen3", tmp_path_factory.mktemp("q3")))


@pytest.mark.parametrize("layout", attention.KEY_LAYOUTS)
@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("stacked", [False, True], ids=["unrolled", "scanned"])
def test_decode_steps_on_a_shuffled_page_table_equal_decode_steps_on_rows(model, layout, int8,
                                                                          stacked):
    # 3 prompts prefilled once (the prefix), then 40 decode steps of a row each: on rows of 64
    # slots (one array per layer) and on pages of 16 slots spread over a shuffled pool of 16
    # pages (per layer, or stacked: the layers then run in a scan)
    ids = jnp.asarray([[5, 6, 7, 8], [9, 10, 11, 12], [1, 2, 3, 4]])
    _, prefix = model.prefill(ids, cache_size=4, int8_cache=int8, key_layout=layout)
    _, stacked_prefix = model.prefill(ids, cache_size=4, int8_cache=int8, key_layout=layout,
                                      scan_layers=stacked)
    rows = model.init_cache(3, 64, int8, layout).replace(positions=prefix.positions)
    paged = model.init_paged_cache(3, 64, 16, 16, int8, layout, stacked).replace(
        positions=prefix.positions,
        pages=jnp.asarray(1 + RNG.permutation(15)[:12].reshape(3, 4), jnp.int32))
    step = jax.jit(lambda tokens, cache, prefix: model.decode(tokens, cache, prefix))
    tokens = jnp.asarray([3, 4, 5])
    for _ in range(40):
        want, rows = step(tokens, rows, prefix)
        got, paged = step(tokens, paged, stacked_prefix)
        np.testing.assert_allclose(got, want, atol=1e-5)
        tokens = jnp.argmax(want, axis=-1)


def test_a_stacked_cache_with_a_prefix_of_one_array_per_layer_is_refused(model):
    _, prefix = model.prefill(jnp.asarray([[5, 6, 7, 8]]), cache_size=4)
    cache = model.init_cache(1, 16, scan_layers=True).replace(positions=prefix.positions)
    with pytest.raises(ValueError, match="stacked cache needs a stacked prefix"):
        model.decode(jnp.asarray([3]), cache, prefix)


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scanned"])
def test_a_small_pool_gives_the_same_traces_as_unpaged_slots(model, scan_layers):
    # 2 prompts x 3 slots, 8 traces each, pages of 128 tokens, traces of up to 300 tokens (3
    # pages) on a pool of 6 usable pages: slots wait for pages, and with a key per prompt every
    # trace is the same token for token (also with the pool stacked over the layers, scanned).
    v = model.config.vocab_size
    base = dict(max_new_tokens=300, group_size=3, budget=8, temperature=1.0,
                stop_ids=tuple(range(3, 3 + v // 100)), window=16)
    keys = jax.random.split(jax.random.key(1), 2)
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13]]
    dense = sampler.sample(model, prompts, keys, SamplingConfig(**base))
    paged = sampler.sample(model, prompts, keys, SamplingConfig(**base, kv_pages=7,
                                                                scan_layers=scan_layers))
    assert int(paged.steps) > int(dense.steps)   # some slot waited for a page
    assert np.asarray(dense.lengths).max() > 128  # some trace needed a second page
    if not scan_layers:  # on a mesh of one device too; a pool is not split over more
        config = SamplingConfig(**base, kv_pages=7)
        one = sampler.sample(model, prompts, keys, config, mesh=parallel.single_device_mesh())
        np.testing.assert_array_equal(one.tokens, paged.tokens)
        with pytest.raises(ValueError, match=r"kv_pages.* is not split over a mesh: 8 devices"):
            sampler.sample(model, prompts, keys, config, mesh=parallel.make_mesh())
    np.testing.assert_array_equal(paged.tokens, dense.tokens)
    np.testing.assert_array_equal(paged.lengths, dense.lengths)
    np.testing.assert_allclose(paged.logprobs, dense.logprobs, atol=1e-5)
    np.testing.assert_allclose(paged.confidence, dense.confidence, atol=1e-5)


def test_when_every_slot_waits_the_shortest_trace_starts_over_and_the_traces_stay_the_same(
        model):
    # 3 slots of traces of 200 tokens (2 pages) on 2 usable pages: all three start, the first
    # two hold the pages and both need a second one, so every slot waits. The shortest holder
    # gives its page back and redoes its trace later; nothing stalls and, with a key per
    # prompt, every trace equals the unpaged one.
    base = dict(max_new_tokens=200, group_size=3, temperature=1.0)
    keys = jax.random.key(2)[None]
    dense = sampler.sample(model, [[5, 6, 7]], keys, SamplingConfig(**base))
    paged = sampler.sample(model, [[5, 6, 7]], keys, SamplingConfig(**base, kv_pages=3))
    assert int(paged.steps) > 2 * int(dense.steps)   # traces ran one after another, redone
    np.testing.assert_array_equal(paged.tokens, dense.tokens)
    np.testing.assert_array_equal(paged.lengths, dense.lengths)
    np.testing.assert_allclose(paged.lowest_group_confidence, dense.lowest_group_confidence,
                               atol=1e-5)
    with pytest.raises(ValueError, match="needs at least 3 pages of 128 tokens"):
        SamplingConfig(max_new_tokens=200, group_size=2, kv_pages=2)
    with pytest.raises(ValueError, match="'pallas' takes a float cache, not int8"):
        SamplingConfig(max_new_tokens=200, decode_kernel="pallas", kv_pages=5, int8_cache=True)


def test_decode_memory_of_a_paged_loop_holds_the_pool_not_the_slots(model):
    config = SamplingConfig(max_new_tokens=1000, group_size=16, kv_pages=20, prompt_bucket=8)
    memory = decode_memory(model.config, 1, 5, config)
    pool = model.init_paged_cache(16, 1024, 20, 128)
    assert memory.generated == pool.nbytes       # 20 pages of 128 tokens, not 16 x 1024
    assert kv_cache_bytes(model.config, 1, 5, config) == memory.prefix + memory.generated
    unpaged = decode_memory(model.config, 1, 5, SamplingConfig(
        max_new_tokens=1000, group_size=16, prompt_bucket=8))
    assert memory.loop < unpaged.loop - (unpaged.generated - memory.generated) / 2


def test_online_deepconf_on_a_small_pool_equals_unpaged(model):
    # 2 problems x 4 slots of up to 12 tokens (one page of 16 each) on 5 usable pages: rounds of
    # DeepConf online wait for pages and reach the same answers from the same traces
    from jaxlab.deepconf import online

    sampling = SamplingConfig(max_new_tokens=12, group_size=4, window=3, temperature=1.0)
    config = online.OnlineConfig(rule="deepconf-low", warmup=4, budget=10, batch=4,
                                 consensus=0.6)
    prompts = [[5, 9, 17, 3], [7, 8]]
    keys = jax.random.split(jax.random.key(7), len(prompts))

    def answer(ids):  # a stand-in for reading a trace: its first token mod 3
        return f"so \\boxed{{{int(ids[0]) % 3}}}"

    want = online.solve_many(model, prompts, keys, sampling, config, answer)
    got = online.solve_many(model, prompts, keys, dataclasses.replace(sampling, kv_pages=6),
                            config, answer)
    for a, b in zip(got, want, strict=True):
        assert (a.answer, a.launched, a.stopped, a.tokens, a.rounds) == (
            b.answer, b.launched, b.stopped, b.tokens, b.rounds)
        assert a.traces.texts == b.traces.texts
