"""Attention for the decoder: the full-sequence path and the one-token decode path, portable
code and backend kernels side by side.

    softmax(q k^T / sqrt(D)) v,  query head h reading key/value head h // G  (G = H / K)

Layouts. A full-sequence call takes q [B, T, H, D] and k, v [B, T, K, D]. Decode works per key/
value head on grouped queries q [B, K, Q, D]: the Q queries of (row b, kv head k) are its G query
heads, or in cascade attention the n x G query heads of the n traces sharing one prompt. The
cache holds keys [B, K, D, S] and values [B, K, S, D] (each (row, head) a plain matrix in the
layout its product wants), in the compute dtype or int8 with float32 scales [B, K, S]
(key = int8 * scale). The live slots of row b are start[b] <= s < end[b].

  full_attention      causal + padding mask through `jax.nn.dot_product_attention` (fused
                      kernels where the backend has them; no [B, H, T, S] float32 tensor then)
  block_attention     portable flash-decoding over the live blocks only: returns (out, lse)
  pallas_gpu_attention  the Pallas GPU decode kernel shipped with JAX, same contract
  merge               two attentions over disjoint key sets combined by their log-sum-exps
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxlab.config import require

try:  # Pallas' Triton ops are deprecated after JAX 0.11 (their successor lives in tokamax)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from jax.experimental.pallas.ops.gpu import decode_attention as _pallas_gpu
except ImportError:  # pragma: no cover - depends on the JAX build
    _pallas_gpu = None

HAS_PALLAS_GPU = _pallas_gpu is not None  # the Pallas GPU decode kernel can be called


def full_attention(q, k, v, mask):
    """Attention of T queries over T keys under mask [B, T, T] bool (query t sees key s):
    q [B, T, H, D], k, v [B, T, K, D] -> [B, T, H, D] in q's dtype. Logits and softmax in
    float32. A query that sees no key (padding) gets a finite average instead of NaN."""
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=q.shape[-1] ** -0.5)


def block_attention(q, keys, values, key_scale, value_scale, start, end, *, block: int):
    """Flash-decoding over the live blocks of a cache, reading nothing past the longest row.

    q [B, K, Q, D]; keys [B, K, D, S]; values [B, K, S, D] (int8 with float32 scales [B, K, S],
    else scales None); start, end int32 [B]: slot s of row b is attended iff start[b] <= s <
    end[b]. Blocks j = min(start) // block .. ceil(max(end) / block) - 1 are visited in a
    `fori_loop` with a traced trip count; per (row, head, query), with s the block's scaled
    scores (-inf outside the live range):

        m' = max(m, max s),  p = exp(s - m'),  l = exp(m - m') l + sum p,
        o = exp(m - m') o + p v_block

    Returns (out float32 [B, K, Q, D] = o / l, lse float32 [B, K, Q] = m + log l); a row with no
    live slot gets out 0 and lse -inf, so `merge` ignores it. S must be a multiple of `block`
    (a clamped slice would re-read keys).
    """
    b, k, nq, d = q.shape
    size = keys.shape[-1]
    require(size % block == 0, f"cache size {size} must be a multiple of the block {block}")
    q = q * jnp.asarray(1 / math.sqrt(d), q.dtype)

    def visit(j, carry):
        m, total, o = carry
        first = j * block
        kb = jax.lax.dynamic_slice_in_dim(keys, first, block, axis=3)          # [B, K, D, blk]
        vb = jax.lax.dynamic_slice_in_dim(values, first, block, axis=2)        # [B, K, blk, D]
        s = jnp.einsum("bkqd,bkds->bkqs", q, kb.astype(q.dtype),
                       preferred_element_type=jnp.float32)                     # [B, K, Q, blk]
        if key_scale is not None:
            s = s * jax.lax.dynamic_slice_in_dim(key_scale, first, block, axis=2)[:, :, None]
        slot = first + jnp.arange(block)
        live = (slot >= start[:, None]) & (slot < end[:, None])                # [B, blk]
        s = jnp.where(live[:, None, None], s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        shift = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # nothing live yet: exp(-inf) = 0
        alpha = jnp.exp(m - shift)
        p = jnp.exp(s - shift[..., None])
        total = alpha * total + jnp.sum(p, axis=-1)
        if value_scale is not None:
            p = p * jax.lax.dynamic_slice_in_dim(value_scale, first, block, axis=2)[:, :, None]
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


def pallas_gpu_attention(q, keys, values, start, end, *, block: int = 128, k_splits: int = 16,
                         interpret: bool = False):
    """`block_attention`'s contract (float caches) through JAX's Pallas GPU decode kernel
    (`jax.experimental.pallas.ops.gpu.decode_attention.gqa`), whose splits past `end` are
    skipped. The kernel takes q [B, Nq, D] and k, v [B, S, Nkv, D], so the cache is transposed
    into its layout here. Needs S divisible by `k_splits` with S / k_splits >= 16.
    `interpret=True` runs it on any backend (slowly), for tests."""
    require(HAS_PALLAS_GPU, "this JAX has no Pallas GPU decode-attention kernel")
    b, k, nq, d = q.shape
    size = keys.shape[-1]
    require(size % k_splits == 0 and size // k_splits >= 16,
            f"cache size {size} must be a multiple of k_splits={k_splits} with at least 16 "
            "slots per split")
    out, (total, m) = _pallas_gpu.gqa(
        q.reshape(b, k * nq, d), keys.transpose(0, 3, 1, 2), values.transpose(0, 2, 1, 3),
        start_idx=start, kv_seq_len=end, sm_scale=1 / math.sqrt(d), block_k=min(block, size //
        k_splits), k_splits=k_splits, interpret=interpret, return_residuals=True)
    lse = _lse(m.astype(jnp.float32), total.astype(jnp.float32))
    return out.reshape(b, k, nq, d).astype(jnp.float32), lse.reshape(b, k, nq)


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
