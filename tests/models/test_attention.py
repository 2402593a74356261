"""Attention paths against independent references: dense attention in NumPy, the einsum
attention the decoder used before the fused path, and a per-slot copy of the prompt's KV."""

import functools
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.models import attention, backend, hf, zoo
from jaxlab.models.backend import POLICIES, backend_policy
from jaxlab.models.kv_cache import KVCache

RNG = np.random.default_rng(0)


def _dense(q, keys, values, start, end, key_scale=None, value_scale=None):
    """NumPy float64 softmax attention of q [B, K, Q, D] over slots start <= s < end of
    keys, values [B, K, S, D] (times their scales): (out, lse)."""
    q, keys, values = (np.asarray(x, np.float64) for x in (q, keys, values))
    if key_scale is not None:
        keys = keys * np.asarray(key_scale)[..., None]
        values = values * np.asarray(value_scale)[..., None]
    s = np.einsum("bkqd,bksd->bkqs", q, keys) / math.sqrt(q.shape[-1])
    slot = np.arange(keys.shape[2])
    live = (slot >= np.asarray(start)[:, None]) & (slot < np.asarray(end)[:, None])
    s = np.where(live[:, None, None], s, -np.inf)
    m = np.max(s, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0)
    p = np.exp(s - m)
    total = p.sum(-1, keepdims=True)
    out = np.einsum("bkqs,bksd->bkqd", p / np.where(total > 0, total, 1), values)
    lse = np.where(total > 0, m + np.log(np.where(total > 0, total, 1)), -np.inf)[..., 0]
    return out, lse


def _case(b=4, k=2, q=6, d=16, s=96, int8=False):
    keys = RNG.normal(size=(b, k, s, d)).astype(np.float32)
    values = RNG.normal(size=(b, k, s, d)).astype(np.float32)
    scales = None, None
    if int8:
        keys = RNG.integers(-127, 128, size=keys.shape).astype(np.int8)
        values = RNG.integers(-127, 128, size=values.shape).astype(np.int8)
        scales = tuple(RNG.uniform(0.001, 0.02, size=(b, k, s)).astype(np.float32)
                       for _ in range(2))
    return RNG.normal(size=(b, k, q, d)).astype(np.float32), keys, values, scales


@pytest.mark.parametrize("layout", attention.KEY_LAYOUTS)
@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("block", [8, 32])
@pytest.mark.parametrize("stacked", [False, True], ids=["layer", "stack"])
def test_block_attention_equals_dense_attention(int8, block, layout, stacked):
    q, keys, values, (ks, vs) = _case(int8=int8)
    start = np.array([0, 5, 40, 0])
    end = np.array([1, 37, 41, 0])      # one slot; crossing blocks; one slot late; empty row
    laid_out = keys if layout == "slots" else keys.swapaxes(2, 3)   # [B, K, D, S]
    cache, layer = (laid_out, values, ks, vs), None
    if stacked:  # the case as layer 1 of a stack of 3 layers, the others random
        cache = tuple(None if x is None else np.stack([RNG.permutation(x), x, x[::-1]])
                      for x in cache)
        layer = jnp.int32(1)
    out, lse = jax.jit(attention.block_attention, static_argnames=("block", "key_layout"))(
        q, *cache, start, end, block=block, key_layout=layout, layer=layer)
    want_out, want_lse = _dense(q, keys, values, start, end, ks, vs)
    np.testing.assert_allclose(out, want_out, atol=2e-6)
    np.testing.assert_allclose(lse, want_lse, atol=2e-6)
    assert np.all(np.asarray(out)[3] == 0) and np.all(np.isneginf(lse[3]))


@pytest.mark.parametrize("layout", attention.KEY_LAYOUTS)
@pytest.mark.parametrize("block", [32, 96], ids=["blocks", "one-block"])
def test_a_bfloat16_cache_held_as_bits_reads_as_its_floats(layout, block):
    # a 16-bit float cache is held as its bit patterns (uint16, `attention.stored`): a layer
    # read from it, alone or from a stack, is exactly the layer read from the floats
    q, keys, values = (jnp.asarray(x, jnp.bfloat16) for x in _case()[:3])
    keys = keys if layout == "slots" else keys.swapaxes(2, 3)
    start, end = np.array([0, 5, 40, 3]), np.array([1, 37, 90, 96])
    run = jax.jit(attention.block_attention, static_argnames=("block", "key_layout"))
    want = run(q, keys, values, None, None, start, end, block=block, key_layout=layout)
    bits = [jax.lax.bitcast_convert_type(x, jnp.uint16) for x in (keys, values)]  # any backend
    np.testing.assert_array_equal(jax.lax.bitcast_convert_type(bits[1], jnp.bfloat16), values)
    alone = run(q, *bits, None, None, start, end, block=block, key_layout=layout)
    for kv in ((keys, values), bits):
        stack = [jnp.stack([x[::-1], x, x[:, ::-1]]) for x in kv]
        stacked = run(q, *stack, None, None, start, end, block=block, key_layout=layout,
                      layer=jnp.int32(1))
        for got, expected in zip(stacked, want, strict=True):
            np.testing.assert_array_equal(got, expected)
    for got, expected in zip(alone, want, strict=True):
        np.testing.assert_array_equal(got, expected)


def test_bits_are_read_only_with_queries_of_their_float_type():
    q, keys, values = _case()[:3]
    bits = [jax.lax.bitcast_convert_type(jnp.asarray(x, jnp.bfloat16), jnp.uint16)
            for x in (keys, values)]
    with pytest.raises(ValueError, match="float32"):  # float32 queries: which 16 bits?
        attention.block_attention(q, *bits, None, None, np.zeros(4, np.int32),
                                  np.full(4, 9, np.int32), block=32)
    # bits under the CPU policy only, for 16-bit floats only
    cpu, gpu, tpu = (POLICIES[name] for name in ("cpu", "gpu", "tpu"))
    for half in (jnp.bfloat16, jnp.float16):
        assert attention.stored_dtype(half, cpu) == jnp.uint16
        assert attention.stored_dtype(half, gpu) == attention.stored_dtype(half, tpu) == half
    for policy in (cpu, gpu, tpu):
        assert attention.stored_dtype(jnp.float32, policy) == jnp.float32
        assert attention.stored_dtype(jnp.int8, policy) == jnp.int8


def test_block_attention_reads_nothing_past_the_longest_row():
    q, keys, values, _ = _case()
    start, end = np.array([0, 3, 10, 20]), np.array([9, 30, 17, 33])
    keys[:, :, 64:] = np.nan    # blocks past ceil(33 / 32) = 2 blocks hold NaN: never read
    values[:, :, 64:] = np.nan
    keys[1:, :, :3] = np.nan  # slots before every later row's start
    out, _ = attention.block_attention(q, keys, values, None, None, start, end, block=32)
    assert np.isfinite(out).all()
    # Scores of dead slots inside a live block are replaced, not multiplied: their NaN keys do
    # not leak either, and the result is the dense one.
    np.testing.assert_allclose(out, _dense(q, np.nan_to_num(keys), np.nan_to_num(values),
                                           start, end)[0], atol=2e-6)


def test_merge_of_two_key_ranges_equals_attention_over_their_union():
    q, keys, values, _ = _case()
    start, split, end = np.array([0, 4, 0, 9]), np.array([0, 30, 50, 9]), np.array([20, 60, 50, 9])
    a = attention.block_attention(q, keys, values, None, None, start, split, block=16)
    b = attention.block_attention(q, keys, values, None, None, split, end, block=16)
    out, lse = attention.merge(a, b)
    want_out, want_lse = _dense(q, keys, values, start, end)
    np.testing.assert_allclose(out, want_out, atol=2e-6)
    np.testing.assert_allclose(lse, want_lse, atol=2e-6)


def _einsum_attention(q, k, v, visible):
    """The decoder's attention before the fused path: scores in float32, masked with -1e30,
    softmax, weights cast back; q [B, T, H, D], k, v [B, T, K, D], visible [B, T, T]."""
    b, t, h, d = q.shape
    g = h // k.shape[2]
    qg = q.reshape(b, t, k.shape[2], g, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = jnp.where(visible[:, None, None], scores / math.sqrt(d), -1e30)
    weights = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", weights, v)
    return out.reshape(b, t, h, d)


def _padded_case(dtype):
    b, t, h, k, d = 3, 12, 4, 2, 16
    q, keys, values = (jnp.asarray(RNG.normal(size=(b, t, n, d)), dtype) for n in (h, k, k))
    mask = np.ones((b, t), bool)
    mask[1, :5] = False
    mask[2, :11] = False
    return q, keys, values, mask, mask[:, None, :] & np.tril(np.ones((t, t), bool))


@pytest.mark.parametrize("dtype,atol", [(jnp.float32, 2e-6), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("policy", ["cpu", "gpu", "tpu"])
def test_full_attention_equals_the_einsum_path_with_causal_and_left_padding(dtype, atol, policy):
    # the CPU policy's grouped products and the accelerators' dot_product_attention
    q, keys, values, mask, visible = _padded_case(dtype)
    ours = np.asarray(attention.full_attention(q, keys, values, jnp.asarray(visible),
                                               POLICIES[policy]), np.float32)
    theirs = np.asarray(_einsum_attention(q, keys, values, visible), np.float32)
    np.testing.assert_allclose(ours[mask], theirs[mask], atol=atol)
    assert np.isfinite(ours).all()  # padding queries see no key and stay finite


def test_grouped_attention_has_the_values_and_gradients_of_dot_product_attention():
    # the CPU's path against the one every other backend takes
    q, keys, values, mask, visible = _padded_case(jnp.float32)
    weights = jnp.asarray(RNG.normal(size=q.shape), jnp.float32)

    def loss(fn):
        return lambda q, k, v: jnp.sum(weights * jnp.sin(fn(q, k, v)) * mask[..., None, None])

    def fused(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, mask=jnp.asarray(visible)[:, None],
                                            scale=q.shape[-1] ** -0.5)

    def grouped(q, k, v):
        return attention.grouped_attention(q, k, v, jnp.asarray(visible))

    want = jax.value_and_grad(loss(fused), argnums=(0, 1, 2))(q, keys, values)
    got = jax.value_and_grad(loss(grouped), argnums=(0, 1, 2))(q, keys, values)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for ours, theirs in zip(got[1], want[1], strict=True):
        np.testing.assert_allclose(ours, theirs, atol=2e-5)


def test_pallas_gpu_kernel_equals_the_portable_path_in_interpret_mode():
    if not attention.HAS_PALLAS_GPU:
        pytest.skip("this JAX has no jax.experimental.pallas.ops.gpu.decode_attention")
    # 4 queries per head (one tile of block_h = 16) and 96 (two tiles of 64: the shared
    # prompt's n x G queries); 8 splits of 48 slots, blocks of 16
    for queries in (4, 96):
        q, keys, values, _ = _case(b=3, q=queries, s=384)
        start, end = np.array([0, 5, 100]), np.array([17, 330, 101])
        ours = attention.pallas_gpu_attention(q, keys, values, start, end, interpret=True)
        want = attention.block_attention(q, keys, values, None, None, start, end, block=32)
        np.testing.assert_allclose(ours[0], want[0], atol=2e-5)
        np.testing.assert_allclose(ours[1], want[1], atol=2e-5)


@pytest.mark.parametrize("queries,kernel", [(2, "tpu"), (8, "tpu"), (6, "gpu_paged"),
                                            (20, "gpu_paged")])
def test_pallas_paged_kernels_equal_the_portable_path_in_interpret_mode(queries, kernel):
    # the TPU kernel's two q layouts (G % 8); the GPU kernel's queries in one block of 16, and
    # in two with padding
    if not (attention.HAS_PALLAS_TPU if kernel == "tpu" else attention.HAS_PALLAS_GPU_PAGED):
        pytest.skip(f"this JAX has no Pallas {kernel} paged-attention kernel")
    # Keys and values rounded to bfloat16 (the TPU kernel computes with them so). Starts inside
    # a page, on a page boundary and past the end; an empty row; a stack of 3 layers read at
    # layer 1; a paged pool read through a shuffled table.
    pool_attention = functools.partial(
        attention.pallas_tpu_attention if kernel == "tpu"
        else attention.pallas_gpu_paged_attention, interpret=True)
    b, k, d, page, blocks = 4, 2, 128, 16, 4
    size = page * blocks
    q, keys, values, _ = _case(b=b, k=k, q=queries, d=d, s=size)
    keys, values = (np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))
                    for x in (keys, values))
    start, end = np.array([5, 16, 0, 40]), np.array([50, 64, 0, 41])
    want = attention.block_attention(q, keys, values, None, None, start, end, block=page)
    got = pool_attention(q, keys, values, start, end, block=page)
    stack = [np.stack([x[::-1], x, x[:, ::-1]]) for x in (keys, values)]
    stacked = pool_attention(q, *stack, start, end, block=page, layer=1)
    table = (1 + RNG.permutation(4 * blocks)[:b * blocks]).reshape(b, blocks).astype(np.int32)

    def pool(x):  # [B, K, S, D] -> [1 + 4 blocks x ..., K, page, D] in the table's pages
        out = np.zeros((1 + 4 * blocks, k, page, d), x.dtype)
        out[table.reshape(-1)] = x.reshape(b, k, blocks, page, d).swapaxes(1, 2).reshape(
            b * blocks, k, page, d)
        return out

    paged = pool_attention(q, pool(keys), pool(values), start, end, block=page, pages=table)
    layer = jax.jit(lambda layer, *pools: pool_attention(
        q, *pools, start, end, block=page, pages=table, layer=layer))
    stacked_pool = layer(jnp.int32(1), *[np.stack([pool(x)[::-1], pool(x)])
                                        for x in (keys, values)])
    for ours in (got, stacked, paged, stacked_pool):
        np.testing.assert_allclose(ours[0], want[0], atol=1e-5)
        np.testing.assert_allclose(ours[1], want[1], atol=1e-5)
    assert np.all(np.asarray(got[0])[2] == 0) and np.all(np.isneginf(got[1][2]))


def test_pallas_tpu_kernel_over_several_compute_blocks_and_its_routing(monkeypatch):
    if not attention.HAS_PALLAS_TPU:
        pytest.skip("this JAX has no jax.experimental.pallas.ops.tpu.paged_attention")
    # pages of 128 slots, 8 per row, visited 4 at a time: two compute blocks per row
    q, keys, values, _ = _case(b=2, k=2, q=2, d=128, s=1024)
    keys, values = (np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))
                    for x in (keys, values))
    start, end = np.array([130, 0]), np.array([1000, 700])
    want = attention.block_attention(q, keys, values, None, None, start, end, block=128)
    calls, tpu_kernel = [], attention.pallas_tpu_attention

    def kernel(*args, **kwargs):  # the TPU kernel, in interpret mode off a TPU
        calls.append(kwargs)
        return tpu_kernel(*args, **kwargs)

    monkeypatch.setattr(attention, "pallas_tpu_attention", kernel)
    tpu = backend_policy(name="tpu")
    assert tpu.interpret  # the TPU policy on CPU devices
    for request in ("pallas", "auto"):
        got = attention.decode_attention(q, keys, values, None, None, start, end, block=128,
                                         key_layout="slots", policy=tpu, decode_kernel=request)
        np.testing.assert_allclose(got[0], want[0], atol=1e-5)
        np.testing.assert_allclose(got[1], want[1], atol=1e-5)
    assert len(calls) == 2 and all(c["interpret"] for c in calls)
    attention.decode_attention(q, keys, values, None, None, start, end, block=128,
                               key_layout="slots", policy=tpu, decode_kernel="portable")
    assert len(calls) == 2
    with pytest.raises(ValueError, match="tpu policy cannot take an int8 cache"):
        attention.decode_attention(q, keys.astype(np.int8), values.astype(np.int8),
                                   *[np.ones(keys.shape[:-1], np.float32)] * 2, start, end,
                                   block=128, key_layout="slots", policy=tpu,
                                   decode_kernel="pallas")


@pytest.mark.parametrize("size,want", [(384, (8, 16)), (4096, (16, 128)), (128, (8, 16)),
                                       (48, (1, 16)), (96, (2, 16)), (40, (0, 0))])
def test_pallas_splits_are_equal_whole_numbers_of_power_of_two_blocks(size, want):
    splits, block_k = attention.pallas_splits(size)
    assert (splits, block_k) == want
    if splits:
        per = size // splits
        assert per * splits == size and per % block_k == 0 and block_k & (block_k - 1) == 0


@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("name", ["cpu", "gpu", "tpu"])
def test_auto_decode_kernel_is_the_policys_where_it_applies_and_a_forced_one_names_what_it_lacks(
        name, int8, caplog):
    q, keys, values, (ks, vs) = _case(s=128, int8=int8)
    start, end = np.array([0, 5, 40, 0]), np.array([1, 37, 41, 0])
    policy = backend_policy(name=name)
    backend.explain.cache_clear()
    with caplog.at_level(logging.INFO, logger="jaxlab"):
        auto = attention.decode_attention(q, keys, values, ks, vs, start, end, block=32,
                                          key_layout="slots", policy=policy)
    portable = attention.block_attention(q, keys, values, ks, vs, start, end, block=32)
    if name == "gpu" and not int8:  # head dim 16: the GPU kernel's; the TPU's needs 128
        want = attention.pallas_gpu_attention(q, keys, values, start, end, block=32,
                                              interpret=True)
        np.testing.assert_allclose(auto[0], portable[0], atol=2e-6)
    else:
        want = portable
    np.testing.assert_array_equal(auto[0], want[0])
    logged = [r.getMessage() for r in caplog.records]
    if name == "gpu" and not int8:  # the choice and its fallbacks are logged
        assert logged == ["backend policy gpu (interpret): decode attention -> pallas_gpu"]
    elif name != "cpu":
        reason = "an int8 cache" if int8 else "head dim 16 (a multiple of 128)"
        assert logged == [f"backend policy {name} (interpret): decode attention -> portable "
                          f"({reason})"]
    else:
        assert logged == ["backend policy cpu: decode attention -> portable"]
    if name == "cpu" or int8 or name == "tpu":
        match = ("has no Pallas decode kernel" if name == "cpu" else
                 f"{name} policy cannot take " + ("an int8 cache" if int8 else "head dim 16"))
        with pytest.raises(ValueError, match=match):
            attention.decode_attention(q, keys, values, ks, vs, start, end, block=32,
                                       key_layout="slots", policy=policy, decode_kernel="pallas")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return hf.load_pretrained(zoo.create("qwen3", tmp_path_factory.mktemp("q3")))


@pytest.mark.parametrize("int8", [False, True])
def test_cascade_decode_equals_decoding_with_a_copy_of_the_prompt_per_slot(model, int8):
    # 2 prompts x 3 slots: each slot continues its prompt with its own tokens; the reference
    # copies the prompt's KV into every slot's cache (the layout before cascade attention).
    ids = np.asarray([[0, 0, 5, 9, 17, 3], [7, 8, 2, 1, 4, 6]])
    mask = (np.arange(6) >= np.array([[2], [0]])).astype(np.int32)
    _, prefix = model.prefill(jnp.asarray(ids), jnp.asarray(mask), cache_size=8,
                              int8_cache=int8)
    n, steps = 3, 5
    tokens = RNG.integers(0, 512, size=(steps, 2 * n))
    own = model.init_cache(2 * n, 8, int8).replace(positions=jnp.repeat(prefix.positions, n))
    _, copied = model.prefill(jnp.asarray(np.repeat(ids, n, 0)), jnp.asarray(np.repeat(mask, n, 0)),
                              cache_size=16, int8_cache=int8)
    decode = jax.jit(lambda t, c, p: model.decode(t, c, p))
    for t in range(steps):
        ours, own = decode(jnp.asarray(tokens[t]), own, prefix)
        want, copied = decode(jnp.asarray(tokens[t]), copied, None)
        np.testing.assert_allclose(ours, want, atol=2e-5)
    assert isinstance(own, KVCache) and np.all(np.asarray(own.index) == steps)
