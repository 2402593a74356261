"""Attention for the decoder: the full-sequence path and the one-token decode path, portable
code and backend kernels side by side.

    softmax(q k^T / sqrt(D)) v,  query head h reading key/value head h // G  (G = H / K)

Layouts. A full-sequence call takes q [B, T, H, D] and k, v [B, T, K, D]. Decode works per key/
value head on grouped queries q [B, K, Q, D]: the Q queries of (row b, kv head k) are its G query
heads, or in cascade attention the n x G query heads of the n traces sharing one prompt. The
cache holds values [B, K, S, D] and keys in one of two layouts (`KEY_LAYOUTS`): "slots"
[B, K, S, D], the layout of the kernels (the GPU and TPU policies'), or "dims" [B, K, D, S],
the plain q [Q, D] @ [D, S] product that XLA's CPU backend runs fastest (a transposed operand
costs it a repacking of every block: 12% of the whole decode step on a small Qwen3). Caches are
in the compute dtype or int8 with float32 scales [B, K, S] (key = int8 * scale); under the CPU
policy a 16-bit float cache is held as its bit patterns (`stored_dtype`: uint16, read as the
queries' dtype). The live slots of row b are start[b] <= s < end[b]. Which path runs is the
model's backend policy's choice (`jaxlab.models.backend`), passed in, never read from the
process.

  full_attention      causal + padding mask through `jax.nn.dot_product_attention` (fused
                      kernels where the backend has them; no [B, H, T, S] float32 tensor then),
                      under the CPU policy through `grouped_attention` (plain batched products)
  block_attention     portable flash-decoding over the live blocks only: returns (out, lse)
  pallas_gpu_attention  the Pallas GPU decode kernel shipped with JAX, same contract (plain
                      caches of rows)
  pallas_gpu_paged_attention  the body of JAX's Pallas GPU paged-attention kernel, same
                      contract (paged and layer-stacked caches)
  pallas_tpu_attention  the body of JAX's Pallas TPU paged-attention kernel, same contract
                      (plain, paged and layer-stacked caches)
  pool_attention      what the two paged kernels share: a cache viewed as a pool of pages
  decode_attention    one of them, by policy and request (`DECODE_KERNELS`)
  merge               two attentions over disjoint key sets combined by their log-sum-exps
"""

from __future__ import annotations

import functools
import math
import warnings

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jaxlab.config import require
from jaxlab.models import backend
from jaxlab.models.backend import BackendPolicy

try:  # Pallas' Triton ops are deprecated after JAX 0.11 (their successor lives in tokamax)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from jax.experimental.pallas.ops.gpu import decode_attention as _pallas_gpu
except ImportError:  # pragma: no cover - depends on the JAX build
    _pallas_gpu = None
try:  # the body of the GPU paged-attention kernel (its wrapper drops the log-sum-exp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from jax.experimental.pallas import triton as _triton
        from jax.experimental.pallas.ops.gpu import paged_attention as _pallas_gpu_paged
except ImportError:  # pragma: no cover - depends on the JAX build
    _pallas_gpu_paged = None
try:  # the body of the TPU paged-attention kernel (its wrapper drops the log-sum-exp)
    from jax.experimental.pallas import tpu as pltpu
    from jax.experimental.pallas.ops.tpu.paged_attention import (
        paged_attention_kernel as _pallas_tpu,
    )
except ImportError:  # pragma: no cover - depends on the JAX build
    _pallas_tpu = None

HAS_PALLAS_GPU = _pallas_gpu is not None  # the Pallas GPU decode kernel can be called
HAS_PALLAS_GPU_PAGED = hasattr(_pallas_gpu_paged, "paged_attention_kernel")
HAS_PALLAS_TPU = hasattr(_pallas_tpu, "paged_flash_attention_kernel_inline_seq_dim")
# Page-table entries the TPU kernel prefetches into scalar memory: half of the 1 MiB of SMEM of
# TPU v4 to v6e, as int32.
TPU_TABLE_ENTRIES = 2**17
KEY_LAYOUTS = ("slots", "dims")  # keys [B, K, S, D] or [B, K, D, S]
DECODE_KERNELS = ("auto", "portable", "pallas")


def slot_axis(key_layout: str) -> int:
    """The axis of the slots in keys [B, K, S, D] ("slots": 2) or [B, K, D, S] ("dims": 3)."""
    require(key_layout in KEY_LAYOUTS, f"key_layout {key_layout!r} is not one of {KEY_LAYOUTS}")
    return 2 if key_layout == "slots" else 3


def is_half(dtype) -> bool:
    """Whether `dtype` is a 16-bit float (bfloat16, float16)."""
    dtype = jnp.dtype(dtype)
    return dtype.itemsize == 2 and jnp.issubdtype(dtype, jnp.floating)


def stored_dtype(dtype, policy: BackendPolicy) -> jnp.dtype:
    """The dtype a cache of `policy` holds `dtype` in: a 16-bit float as its bit patterns
    (uint16) where `policy.half_as_bits` (the CPU's), anything else as it is. A cache's elements
    are only moved (written by a scatter, read by slices), and XLA's CPU backend converts 16-bit
    floats to float32 around such moves, whole caches at each step, where it moves bits as they
    are."""
    dtype = jnp.dtype(dtype)
    return jnp.dtype(jnp.uint16) if policy.half_as_bits and is_half(dtype) else dtype


def stored(x):
    """16-bit floats x as the bits a uint16 cache holds (a bit cast: nothing is rounded)."""
    require(is_half(x.dtype), f"a cache of 16-bit float bits takes 16-bit floats, not {x.dtype}")
    return jax.lax.bitcast_convert_type(x, jnp.uint16)


def loaded(x, dtype):
    """Part of a cache to compute with in `dtype` (the queries'): uint16 bits (`stored`) viewed
    as that 16-bit float, anything else as it is."""
    if x.dtype != jnp.uint16:
        return x
    require(is_half(dtype), "a cache of 16-bit float bits (uint16) is read with queries in its "
            f"16-bit float dtype, not {jnp.dtype(dtype)}")
    return jax.lax.bitcast_convert_type(x, dtype)


def full_attention(q, k, v, mask, policy: BackendPolicy):
    """Attention of T queries over S keys under mask [B, T, S] bool (query t sees key s):
    q [B, T, H, D], k, v [B, S, K, D] -> [B, T, H, D] in q's dtype. Logits and softmax in
    float32. A query that sees no key (padding) gets a finite average instead of NaN.

    Through `jax.nn.dot_product_attention` (its default implementation, XLA's: JAX 0.10.2 picks
    no fused cuDNN kernel by itself), or where `policy.attention` is "grouped" (the CPU's)
    through `grouped_attention`, which runs the same products about 3x faster there."""
    backend.explain(policy, "full-sequence attention", policy.attention)
    if policy.attention == "grouped":
        return grouped_attention(q, k, v, mask)
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=q.shape[-1] ** -0.5)


def grouped_attention(q, k, v, mask):
    """`full_attention` as two batched matrix products per (row, kv head) over heads-major
    operands: the G query heads of kv head k stacked into one [G T, D] operand,

        s = (q / sqrt(D)) k^T  [B, K, G T, S],  p = softmax(s masked),  out = p v

    (XLA's CPU backend runs these plain products about 3x faster than its
    `dot_product_attention`, which broadcasts the kv heads: 9 against 28 ms forward at
    [128, 80, 4, 24] with 2 kv heads). Masked logits are -1e30, so a query that sees no key
    averages all of them (finite)."""
    b, t, h, d = q.shape
    s_len, kv = k.shape[1], k.shape[2]
    g = h // kv
    heads = (q * jnp.asarray(d ** -0.5, q.dtype)).reshape(b, t, kv, g, d)
    heads = heads.transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, d)
    s = jnp.matmul(heads, k.transpose(0, 2, 3, 1), preferred_element_type=jnp.float32)
    s = jnp.where(mask[:, None, None], s.reshape(b, kv, g, t, s_len), -1e30)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype).reshape(b, kv, g * t, s_len)
    out = jnp.matmul(p, v.transpose(0, 2, 1, 3), preferred_element_type=jnp.float32)
    return out.reshape(b, kv, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d).astype(
        q.dtype)


def block_attention(q, keys, values, key_scale, value_scale, start, end, *, block: int,
                    key_layout: str = "slots", pages=None, layer=None):
    """Flash-decoding over the live blocks of a cache, reading nothing past the longest row.

    q [B, K, Q, D]; keys in `key_layout`; values [B, K, S, D] (int8 with float32 scales [B, K, S],
    else scales None; 16-bit floats held as bits, `stored`, are read as q's dtype); start, end
    int32 [B]: slot s of row b is attended iff start[b] <= s < end[b]. A paged cache passes
    `pages` int32 [B, S / block] and pools in place of the rows: values [N, K, block, D] (keys
    and scales alike), block j of row b being page pages[b, j].
    With `layer` (an int, or an int32 scalar when traced), every cache array is a stack
    [L, ...] over the layers and the blocks are read from its layer `layer`.
    Blocks j = min(start) // block .. ceil(max(end) / block) - 1 are visited in a
    `fori_loop` with a traced trip count; per (row, head, query), with s the block's scaled
    scores (-inf outside the live range):

        m' = max(m, max s),  p = exp(s - m'),  l = exp(m - m') l + sum p,
        o = exp(m - m') o + p v_block

    Returns (out float32 [B, K, Q, D] = o / l, lse float32 [B, K, Q] = m + log l); a row with no
    live slot gets out 0 and lse -inf, so `merge` ignores it. S must be a multiple of `block`
    (a clamped slice would re-read keys).
    """
    key_axis = slot_axis(key_layout)
    scores = "bkqd,bksd->bkqs" if key_layout == "slots" else "bkqd,bkds->bkqs"
    b, k, nq, d = q.shape
    pages = None if pages is None else jnp.asarray(pages)
    size = values.shape[-2] if pages is None else pages.shape[1] * block
    require(pages is None or values.shape[-2] == block,
            f"a paged cache's pages hold {values.shape[-2]} slots, not the block {block}")
    require(size % block == 0, f"cache size {size} must be a multiple of the block {block}")
    q = q * jnp.asarray(1 / math.sqrt(d), q.dtype)

    def take(x, j, axis):  # block j of every row: [B, K, blk, D] (or [B, K, D, blk], [B, K, blk])
        if layer is not None:  # one slice of the stack [L, ...]
            if pages is not None:
                return x[layer, pages[:, j]]
            starts = [layer] + [0] * (x.ndim - 1)
            starts[axis + 1] = j * block
            sizes = (1, *x.shape[1:axis + 1], block, *x.shape[axis + 2:])
            return jax.lax.dynamic_slice(x, starts, sizes)[0]
        if pages is None:
            return jax.lax.dynamic_slice_in_dim(x, j * block, block, axis=axis)
        return jnp.take(x, pages[:, j], axis=0, mode="clip")

    def visit(j, carry):
        m, total, o = carry
        first = j * block
        kb = loaded(take(keys, j, key_axis), q.dtype)
        vb = loaded(take(values, j, 2), q.dtype)                               # [B, K, blk, D]
        s = jnp.einsum(scores, q, kb.astype(q.dtype),
                       preferred_element_type=jnp.float32)                     # [B, K, Q, blk]
        if key_scale is not None:
            s = s * take(key_scale, j, 2)[:, :, None]
        slot = first + jnp.arange(block)
        live = (slot >= start[:, None]) & (slot < end[:, None])                # [B, blk]
        s = jnp.where(live[:, None, None], s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        shift = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # nothing live yet: exp(-inf) = 0
        alpha = jnp.exp(m - shift)
        p = jnp.exp(s - shift[..., None])
        total = alpha * total + jnp.sum(p, axis=-1)
        if value_scale is not None:
            p = p * take(value_scale, j, 2)[:, :, None]
        o = alpha[..., None] * o + jnp.einsum("bkqs,bksd->bkqd", p.astype(q.dtype),
                                              vb.astype(q.dtype),
                                              preferred_element_type=jnp.float32)
        return m_new, total, o

    init = (jnp.full((b, k, nq), -jnp.inf), jnp.zeros((b, k, nq)), jnp.zeros((b, k, nq, d)))
    if size == block:  # one block: no loop to run
        m, total, o = visit(0, init)
    else:
        m, total, o = jax.lax.fori_loop(jnp.min(start) // block, -(-jnp.max(end) // block),
                                       visit, init)
    return o / jnp.where(total > 0, total, 1.0)[..., None], _lse(m, total)


def pallas_gpu_attention(q, keys, values, start, end, *, block: int = 128,
                         max_splits: int = 16, interpret: bool = False):
    """`block_attention`'s contract (float caches, keys in the "slots" layout) through JAX's
    Pallas GPU decode kernel (`jax.experimental.pallas.ops.gpu.decode_attention.gqa`): the cache
    is cut into at most `max_splits` splits (`pallas_splits`) run in parallel, a split past `end` is
    skipped, and the splits are merged by their log-sum-exps. The kernel takes q [B, Nq, D] and
    k, v [B, S, Nkv, D] and swaps the axes back, so no copy is made. `interpret=True` runs it
    on any backend (slowly), for tests."""
    require(HAS_PALLAS_GPU, "this JAX has no Pallas GPU decode-attention kernel")
    b, k, nq, d = q.shape
    size = values.shape[2]
    splits, block_k = pallas_splits(size, block, max_splits)
    require(splits > 0, f"cache size {size} cannot be split for the Pallas kernel (splits of "
            "a multiple of 16 slots)")
    out, (total, m) = _pallas_gpu.gqa(
        q.reshape(b, k * nq, d), keys.transpose(0, 2, 1, 3), values.transpose(0, 2, 1, 3),
        start_idx=start, kv_seq_len=end, sm_scale=1 / math.sqrt(d),
        block_h=max(16, min(64, 1 << (nq - 1).bit_length())),
        block_k=block_k, k_splits=splits, interpret=interpret,
        return_residuals=True)
    lse = _lse(m.astype(jnp.float32), total.astype(jnp.float32))
    return out.reshape(b, k, nq, d).astype(jnp.float32), lse.reshape(b, k, nq)


def pallas_tpu_attention(q, keys, values, start, end, *, block: int, pages=None, layer=None,
                         interpret: bool = False):
    """`block_attention`'s contract (float caches, keys in the "slots" layout; plain, paged or
    layer-stacked) through the body of JAX's TPU paged-attention kernel
    (`jax.experimental.pallas.ops.tpu.paged_attention`), called here so that it also returns
    its running max and sum, the log-sum-exp `merge` needs (the shipped wrapper drops them),
    over the cache viewed as a pool of pages (`pool_attention`). The kernel computes with keys
    and values in bfloat16 (a float32 cache loses precision there). Its scalar-prefetched page
    table, B K S / P int32, must fit the TPU's scalar memory (at most `TPU_TABLE_ENTRIES`).
    `interpret=True` runs it on any backend (slowly), for tests."""
    require(HAS_PALLAS_TPU, "this JAX has no Pallas TPU paged-attention kernel")
    b, k = q.shape[:2]
    entries = b * k * (values.shape[-2] // block if pages is None else pages.shape[1])
    require(entries <= TPU_TABLE_ENTRIES, f"the TPU kernel's page table would hold {entries} "
            f"entries (rows x kv heads x pages), more than the {TPU_TABLE_ENTRIES} that fit its "
            "scalar memory: decode fewer rows at once or use the portable kernel")
    return pool_attention(q, keys, values, start, end, block=block, pages=pages, layer=layer,
                          kernel=functools.partial(_paged_kernel, interpret=interpret))


def pallas_gpu_paged_attention(q, keys, values, start, end, *, block: int, pages=None,
                               layer=None, interpret: bool = False):
    """`block_attention`'s contract for the caches the Pallas GPU decode kernel (`gqa`) cannot
    read in place, paged or layer-stacked (float, "slots" keys), through the kernel body of
    JAX's Pallas GPU paged attention (`jax.experimental.pallas.ops.gpu.paged_attention`), called
    here so that it also returns each split's running max and sum (the shipped wrapper merges
    them away), over the cache viewed as a pool of pages (`pool_attention`): no layer is sliced
    out and no pool transposed, where the shipped kernel wants pools [K, N, P, D].
    `interpret=True` runs it on any backend (slowly), for tests."""
    require(HAS_PALLAS_GPU_PAGED, "this JAX has no Pallas GPU paged-attention kernel")
    return pool_attention(q, keys, values, start, end, block=block, pages=pages, layer=layer,
                          kernel=functools.partial(_gpu_paged_kernel, interpret=interpret))


def pool_attention(q, keys, values, start, end, *, block: int, pages, layer, kernel):
    """`block_attention`'s contract through a paged-attention `kernel` that reads a pool of
    pages: kernel(q [R, G, D] pre-scaled, k_pool, v_pool [1, M, P, D], lengths int32 [R], table
    int32 [R, pages]) -> (out float32 [R, G, D], lse float32 [R, G]), row r attending the first
    lengths[r] slots of its pages. Every cache here is such a pool, viewed without a copy (its
    trailing axes are [..., P, D], P = block), its kv heads folded into the rows: row b, head h,
    block j is page

        ((layer B + b) K + h) S / P + j      of a cache [(L,) B, K, S, D]
        (layer N + pages[b, j]) K + h        of a pool [(L,) N, K, P, D]

    The kernels have no start offset: they attend the whole pages from ceil(start / P) on (the
    table shifted), and `block_attention` attends the slots from start to that page boundary
    (one block); the two are merged."""
    b, k, g, d = q.shape
    p, rows = block, values.shape[-4]
    require(keys.shape == values.shape and values.shape[-2] % p == 0
            and (pages is None or values.shape[-2] == p),
            f"keys {keys.shape} and values {values.shape} must be one layout of slots in whole "
            f"blocks of {p} (a paged pool's pages hold one block)")
    layer = 0 if layer is None else layer
    if pages is None:
        per_row = values.shape[-2] // p
        base = (((layer * rows + jnp.arange(b)[:, None, None]) * k
                 + jnp.arange(k)[None, :, None]) * per_row + jnp.arange(per_row))
    else:
        per_row = pages.shape[1]
        base = (layer * rows + pages[:, None, :]) * k + jnp.arange(k)[None, :, None]
    base = base.astype(jnp.int32)                                             # [B, K, S / P]
    flat_k, flat_v = keys.reshape(1, -1, p, d), values.reshape(1, -1, p, d)
    first = -(-start // p)                                   # each row's first whole page
    shifted = jnp.minimum(first[:, None] + jnp.arange(per_row), per_row - 1)
    table = jnp.take_along_axis(base, jnp.broadcast_to(shifted[:, None], base.shape), axis=2)
    lengths = jnp.repeat(jnp.maximum(end - first * p, 0), k).astype(jnp.int32)   # [B K]
    scaled = (q * jnp.asarray(1 / math.sqrt(d), q.dtype)).reshape(b * k, g, d)
    out, lse = kernel(scaled, flat_k, flat_v, lengths, table.reshape(b * k, per_row))
    whole = (out.reshape(b, k, g, d), lse.reshape(b, k, g))  # nothing live: 0, -inf
    own = jnp.minimum(start // p, per_row - 1)            # the block holding slot start
    page = jnp.take_along_axis(base, jnp.broadcast_to(own[:, None, None], (b, k, 1)), axis=2)
    offset = own * p
    part = block_attention(q, flat_k[0, page[..., 0]], flat_v[0, page[..., 0]], None, None,
                           start - offset, jnp.minimum(end, first * p) - offset, block=p)
    return merge(whole, part)


def _gpu_paged_kernel(q, k_pool, v_pool, lengths, table, interpret: bool):
    """The GPU paged kernel's body over pools [1, M, P, D] of one kv head, q [R, G, D]
    pre-scaled, lengths int32 [R], table int32 [R, pages]: (out float32 [R, G, D], lse float32
    [R, G]). One program per (row, 16 queries, split of the pages), as the shipped wrapper
    launches it per row (`gpu_paged_splits`), its splits merged here by their running max and
    sum: m = max_s m_s, l = sum_s e^(m_s - m) l_s, out = sum_s e^(m_s - m) o_s / l."""
    r, g, d = q.shape
    p = k_pool.shape[2]
    pages = table.shape[1]
    splits, per_block = gpu_paged_splits(pages, p)
    per_split = pages // splits
    block_h = 16
    padded = -(-g // block_h) * block_h
    q = jnp.pad(q.astype(k_pool.dtype), ((0, 0), (0, padded - g), (0, 0)))
    kernel = functools.partial(_pallas_gpu_paged.paged_attention_kernel, num_heads=g,
                               pages_per_compute_block=per_block,
                               mask_value=_pallas_gpu_paged.DEFAULT_MASK_VALUE,
                               attn_logits_soft_cap=None)
    pool = pl.BlockSpec((None, *k_pool.shape[1:]), lambda i, h, s: (0, 0, 0, 0))
    o, total, m = pl.pallas_call(
        kernel, grid=(r, padded // block_h, splits),
        in_specs=[pl.BlockSpec((None, block_h, d), lambda i, h, s: (i, h, 0)), pool, None,
                  pool, None,
                  pl.BlockSpec((None, None, per_split), lambda i, h, s: (i, s, 0)),
                  pl.BlockSpec((None, 1), lambda i, h, s: (i, 0))],
        out_specs=[pl.BlockSpec((None, None, block_h, d), lambda i, h, s: (s, i, h, 0)),
                   pl.BlockSpec((None, None, block_h), lambda i, h, s: (s, i, h)),
                   pl.BlockSpec((None, None, block_h), lambda i, h, s: (s, i, h))],
        out_shape=[jax.ShapeDtypeStruct((splits, r, padded, d), jnp.float32),
                   jax.ShapeDtypeStruct((splits, r, padded), jnp.float32),
                   jax.ShapeDtypeStruct((splits, r, padded), jnp.float32)],
        interpret=interpret, name="jaxlab_gpu_paged_attention",
        # Triton, as the shipped wrapper (without it Pallas would lower to Mosaic GPU, which
        # copies each block, here the whole pool, into shared memory); its warps and stages
        compiler_params=_triton.CompilerParams(num_warps=8, num_stages=2),
    )(q, k_pool, None, v_pool, None, table.reshape(r, splits, per_split), lengths[:, None])
    o, total, m = o[:, :, :g], total[:, :, :g], m[:, :, :g]
    top = jnp.max(m, axis=0)                                                  # [R, G]
    weight = jnp.where(total > 0, jnp.exp(m - top), 0.0)                      # [splits, R, G]
    total = jnp.sum(weight * total, axis=0)
    out = jnp.sum(weight[..., None] * o, axis=0) / jnp.where(total > 0, total, 1.0)[..., None]
    return out, _lse(top, total)


def gpu_paged_splits(pages: int, page: int) -> tuple[int, int]:
    """(splits, pages per compute block) of the GPU paged kernel for rows of `pages` pages of
    `page` slots: the most splits of 16, 8, 4, 2, 1 dividing the pages, and per compute block
    the most pages (a power of two dividing a split's) up to 128 slots; (0, 0) if a compute
    block would hold fewer than 16 slots or a page is not a power of two (Triton's tiles)."""
    if page & (page - 1):
        return 0, 0
    splits = next(s for s in (16, 8, 4, 2, 1) if pages % s == 0)
    per_split = pages // splits
    per_block = 1
    while per_split % (2 * per_block) == 0 and 2 * per_block * page <= 128:
        per_block *= 2
    return (splits, per_block) if per_block * page >= 16 else (0, 0)


def _paged_kernel(q, k_pool, v_pool, lengths, table, interpret: bool):
    """The TPU kernel's body over pools [1, M, P, D] of one kv head, q [R, G, D] pre-scaled,
    lengths int32 [R], table int32 [R, pages]: (out float32 [R, G, D], lse float32 [R, G]), as
    `paged_attention` launches it (its q layout for G not a multiple of 8, one page block per
    at most 512 slots) but with q and out in float32 and the running max and sum kept."""
    r, g, d = q.shape
    _, _, p, _ = k_pool.shape
    pages = table.shape[1]
    per_block = math.gcd(pages, max(1, 512 // p))
    q = q.astype(jnp.float32)  # launched in float32, as the shipped wrapper does for G % 8
    if g % 8:  # the shipped wrapper's layout hint: a [1, D] row per query
        q = q.reshape(r, g, 1, d)
        spec = pl.BlockSpec((None, g, None, d), lambda core, b, h, *_: (b, h, 0, 0))
    else:
        spec = pl.BlockSpec((None, g, d), lambda core, b, h, *_: (b, h, 0))

    def scratch(pool):
        return pltpu.VMEM((2, per_block, p, d), pool.dtype)  # double-buffered pages

    out, m, total = pl.pallas_call(
        functools.partial(_pallas_tpu.paged_flash_attention_kernel_inline_seq_dim,
                          pages_per_sequence=pages, batch_size=r,
                          pages_per_compute_block=per_block,
                          mask_value=_pallas_tpu.DEFAULT_MASK_VALUE, attn_logits_soft_cap=None,
                          megacore_mode=None),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,  # lengths, table, buffer index, init flag
            in_specs=[spec, pl.BlockSpec(memory_space=pl.ANY), None,
                      pl.BlockSpec(memory_space=pl.ANY), None],
            out_specs=[spec, spec, spec], grid=(1, r, 1),
            scratch_shapes=(scratch(k_pool), None, scratch(v_pool), None,
                            pltpu.SemaphoreType.DMA((2,)), pltpu.SemaphoreType.DMA((2,)))),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        out_shape=[jax.ShapeDtypeStruct(q.shape, jnp.float32),
                   jax.ShapeDtypeStruct((*q.shape[:-1], 1), jnp.float32),
                   jax.ShapeDtypeStruct((*q.shape[:-1], 1), jnp.float32)],
        interpret=pltpu.InterpretParams() if interpret else False,
    )(lengths, table.reshape(-1), jnp.zeros((1,), jnp.int32), jnp.ones((1,), jnp.int32), q,
      k_pool, None, v_pool, None)
    return out.reshape(r, g, d), _lse(m.reshape(r, g), total.reshape(r, g))


def pallas_splits(size: int, block: int = 128, max_splits: int = 16) -> tuple[int, int]:
    """(k_splits, block_k) of the Pallas kernel for a cache of `size` slots: the most splits of
    16, 8, 4, 2, 1 (at most `max_splits`) dividing it into equal splits, each a whole number of
    blocks of block_k slots, the largest power of two dividing the split, at most `block`, at
    least 16 (Triton's tiles are powers of two); (0, 0) if there are none."""
    for splits in (s for s in (16, 8, 4, 2, 1) if s <= max_splits):
        per = size // splits
        block_k = min(block, per & -per)
        if size % splits == 0 and block_k >= 16:
            return splits, block_k
    return 0, 0


def pallas_gpu_unfit(q, values, key_scale, *, block: int, key_layout: str, pages=None,
                     layer=None) -> str:
    """Why the Pallas GPU kernels cannot take this cache ("" if they can): they read float
    caches in the "slots" layout with a power-of-two head dim >= 16; a plain cache of rows
    (`pallas_gpu_attention`) cut into splits (`pallas_splits`), a paged or stacked one
    (`pallas_gpu_paged_attention`) in compute blocks of at least 16 slots
    (`gpu_paged_splits`)."""
    d = q.shape[-1]
    pooled = pages is not None or layer is not None
    per_row = values.shape[-2] // block if pages is None else pages.shape[1]
    return _first_reason(
        (not HAS_PALLAS_GPU, "this JAX has no Pallas GPU decode kernel"),
        (pooled and not HAS_PALLAS_GPU_PAGED, "this JAX has no Pallas GPU paged kernel"),
        (key_scale is not None, "an int8 cache"),
        (key_layout != "slots", f"keys in the {key_layout!r} layout"),
        (d < 16 or d & (d - 1) != 0, f"head dim {d} (a power of two >= 16)"),
        (not pooled and pallas_splits(values.shape[-2], block)[0] == 0,
         f"{values.shape[-2]} slots (splits of a multiple of 16 slots)"),
        (pooled and gpu_paged_splits(per_row, block)[0] == 0,
         f"pages of {block} slots, {per_row} a row (compute blocks of >= 16 slots)"))


def pallas_tpu_unfit(q, values, key_scale, *, block: int, key_layout: str, pages=None,
                     layer=None) -> str:
    """Why the Pallas TPU kernel cannot take this cache ("" if it can): bfloat16 or float32
    caches in the "slots" layout (plain, paged or stacked), a head dim that is a multiple of
    128, blocks of a multiple of 16 slots, a page table that fits its scalar memory."""
    del layer
    d, dtype = q.shape[-1], q.dtype if values.dtype == jnp.uint16 else values.dtype
    b, k = q.shape[:2]
    entries = b * k * (values.shape[-2] // block if pages is None else pages.shape[1])
    return _first_reason(
        (not HAS_PALLAS_TPU, "this JAX has no Pallas TPU paged-attention kernel"),
        (key_scale is not None, "an int8 cache"),
        (key_layout != "slots", f"keys in the {key_layout!r} layout"),
        (dtype not in (jnp.bfloat16, jnp.float32), f"a {jnp.dtype(dtype)} cache"),
        (d % 128 != 0, f"head dim {d} (a multiple of 128)"),
        (block % 16 != 0, f"blocks of {block} slots (a multiple of 16)"),
        (entries > TPU_TABLE_ENTRIES, f"a page table of {entries} entries (at most "
         f"{TPU_TABLE_ENTRIES} fit the scalar memory)"))


def _first_reason(*checks) -> str:
    return next((reason for failed, reason in checks if failed), "")


def decode_attention(q, keys, values, key_scale, value_scale, start, end, *, block: int,
                     key_layout: str, policy: BackendPolicy, decode_kernel: str = "auto",
                     pages=None,
                     layer=None):
    """`block_attention`'s contract through the kernel `decode_kernel` names (`DECODE_KERNELS`):
    "portable" (`block_attention`), "pallas" (the policy's Pallas kernel:
    under the GPU policy `pallas_gpu_attention`, or `pallas_gpu_paged_attention` for a paged
    or stacked cache; `pallas_tpu_attention` under the TPU policy;
    an error naming what it cannot take), or "auto": `policy.decode_kernel` where it can take
    the cache, else the portable path, the reason logged once (`backend.explain`). Under a
    policy of another platform the kernels run in interpret mode (`policy.interpret`)."""
    require(decode_kernel in DECODE_KERNELS, f"decode_kernel={decode_kernel!r} is not one of "
            f"{DECODE_KERNELS}")
    unfit, choice = "", {"auto": policy.decode_kernel, "portable": "portable",
                         "pallas": policy.pallas}[decode_kernel]
    require(choice is not None, f"decode_kernel='pallas' under the {policy.name} policy: it "
            "has no Pallas decode kernel (JAXLAB_POLICY=gpu or tpu runs one, in interpret "
            "mode off its platform)")
    settings = dict(block=block, key_layout=key_layout, pages=pages, layer=layer)
    if choice != "portable":
        unfit = (pallas_gpu_unfit if choice == "pallas_gpu" else pallas_tpu_unfit)(
            q, values, key_scale, **settings)
        require(not unfit or decode_kernel == "auto", f"decode_kernel='pallas' under the "
                f"{policy.name} policy cannot take {unfit}")
        choice = "portable" if unfit else choice
    if decode_kernel == "auto":
        backend.explain(policy, "decode attention", choice, unfit)
    if choice == "portable":
        return block_attention(q, keys, values, key_scale, value_scale, start, end, **settings)
    keys, values = loaded(keys, q.dtype), loaded(values, q.dtype)  # the kernels read floats
    if choice == "pallas_gpu" and pages is None and layer is None:
        return pallas_gpu_attention(q, keys, values, start, end, block=block,
                                    interpret=policy.interpret)
    if choice == "pallas_gpu":
        return pallas_gpu_paged_attention(q, keys, values, start, end, block=block,
                                          pages=pages, layer=layer, interpret=policy.interpret)
    return pallas_tpu_attention(q, keys, values, start, end, block=block, pages=pages,
                                layer=layer, interpret=policy.interpret)


def _lse(m, total):
    """log-sum-exp m + log(total) of a running max m and sum total = sum exp(s - m); -inf
    where nothing was summed."""
    some = total > 0
    return jnp.where(some, m + jnp.log(jnp.where(some, total, 1.0)), -jnp.inf)


def merge(a, b):
    """Attention over the union of two disjoint key sets from each part's (out [..., D],
    lse [...]): lse = logaddexp(lse_a, lse_b), out = e^(lse_a - lse) out_a + e^(lse_b - lse)
    out_b. A part with lse = -inf (no keys) contributes nothing."""
    (out_a, lse_a), (out_b, lse_b) = a, b
    lse = jnp.logaddexp(lse_a, lse_b)
    safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
    weight_a, weight_b = jnp.exp(lse_a - safe), jnp.exp(lse_b - safe)
    return weight_a[..., None] * out_a + weight_b[..., None] * out_b, lse
