"""The decoder's KV cache: the struct, its writes (16-bit bits, int8 with per-token scales,
pages), a layer's attention over it and the cascade attention over a shared prefix.

A cache holds, per layer, keys and values for S slots per row (`KVCache`): row b's live slots
are start[b] <= s < index[b]. Its fields are tuples of L arrays (the layers run unrolled, each
array updated in place) or stacks [L, ...] (the layers run in one scan). A paged cache holds
pools of pages [N, ...] in place of rows and a page table. `jaxlab.models.decoder` makes and
fills caches (`Decoder.init_cache`, `prefill`, `decode`); the attention itself lives in
`jaxlab.models.attention`.

Shapes: B rows, L layers, K key/value heads, S slots, D head dim, T new tokens, P prompts.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import struct

from jaxlab.config import require
from jaxlab.models import attention
from jaxlab.models.backend import BackendPolicy

DECODE_BLOCK = 128  # cache slots per block of decode attention (the largest dividing the cache)


@struct.dataclass
class KVCache:
    """Keys and values of every layer for S slots per row; row b's live slots are
    start[b] <= s < index[b] (a left-padded prompt, then the tokens decoded after it)."""

    # In the model's dtype (under the CPU backend policy, 16-bit floats held as their bit
    # patterns, uint16: `attention.stored_dtype`) or int8: keys [B, K, S, D] or [B, K, D, S]
    # (`key_layout`, `attention.KEY_LAYOUTS`), values [B, K, S, D], and for int8 float32
    # [B, K, S] scales (key = keys * scale). Per layer, either one array each (a tuple of L:
    # a step updates each in place, the layers run unrolled) or one stack [L, ...] (`stacked`:
    # the layers run in one scan, which writes each token into the stack in place).
    keys: tuple[jax.Array, ...] | jax.Array
    values: tuple[jax.Array, ...] | jax.Array
    key_scale: tuple[jax.Array, ...] | jax.Array | None
    value_scale: tuple[jax.Array, ...] | jax.Array | None
    start: jax.Array      # [B] int32, each row's first live slot
    positions: jax.Array  # [B] int32, position of each row's next token (= real tokens so far)
    index: jax.Array      # [B] int32, each row's next slot to write (one past its last live one)
    # A paged cache (`Decoder.init_paged_cache`): keys, values and scales are pools of pages
    # [N, ...] of `block` slots in place of [B, ...] rows (start, positions and index stay
    # [B]), and slots j x block .. of row b live in page pages[b, j] (int32 [B, S / block]).
    pages: jax.Array | None = None
    key_layout: str = struct.field(pytree_node=False, default="slots")
    dtype: str = struct.field(pytree_node=False, default="float32")  # the model's compute dtype,
    #                                     in which keys and values are read (`attend`'s queries)

    @property
    def stacked(self) -> bool:
        """Whether each field is one stack [L, ...] over the layers (else a tuple of L)."""
        return not isinstance(self.values, tuple)

    @property
    def rows(self) -> int:
        """B, or the pages N of a paged cache's pool."""
        return self._layer_shape[0]

    @property
    def size(self) -> int:
        """S: slots per row."""
        if self.pages is not None:
            return self.pages.shape[1] * self._layer_shape[2]
        return self._layer_shape[2]

    @property
    def block(self) -> int:
        """The block of decode attention: a page, or the largest divisor of S up to
        `DECODE_BLOCK`."""
        if self.pages is not None:
            return self._layer_shape[2]
        return math.gcd(self.size, DECODE_BLOCK)

    @property
    def _layer_shape(self) -> tuple[int, ...]:
        """One layer's values shape: [B, K, S, D] (a pool: [N, K, page, D])."""
        return self.values.shape[1:] if self.stacked else self.values[0].shape

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in jax.tree.leaves(self.fields))

    @property
    def fields(self) -> tuple:
        """(keys, values, key_scale, value_scale): what the layers write."""
        return self.keys, self.values, self.key_scale, self.value_scale

    def as_floats(self) -> KVCache:
        """The cache with its keys and values in `dtype` where they are held as 16-bit float
        bits (`attention.stored_dtype`), for a cache that is only read from here on, each
        layer's array whole (a shared prefix of one block). Bits suit a cache that a loop
        writes or reads in blocks; of bits that a loop only reads whole, XLA's CPU backend
        converts every layer's array once, before the loop, and keeps the copies."""
        view = functools.partial(attention.loaded, dtype=self.dtype)
        return self.replace(keys=jax.tree.map(view, self.keys),
                            values=jax.tree.map(view, self.values))

    def attend(self, i, q, policy: BackendPolicy, decode_kernel: str = "auto"):
        """Layer i's attention of grouped queries q [B, K, Q, D] (in `dtype`) over the live
        slots: (out float32 [B, K, Q, D], lse float32 [B, K, Q])
        (`attention.decode_attention`, under `policy`)."""
        require(q.dtype == jnp.dtype(self.dtype), f"queries in {q.dtype} read a cache of a "
                f"{self.dtype} model")
        fields, layer = layer_of(self.fields, i)
        return attention.decode_attention(q, *fields, self.start, self.index, block=self.block,
                                          key_layout=self.key_layout, policy=policy,
                                          decode_kernel=decode_kernel, pages=self.pages,
                                          layer=layer)


def write_slots(cache, new, index, axis, rows=None, layer=None):
    """cache [B, ...] whose slots run along `axis` with row b's new [T, ...] (the cache's other
    axes in order) written at slots index[b]..index[b]+T-1 of cache row rows[b] (default b: a
    paged cache passes each row's page); with `layer`, cache is a stack [L, B, ...] and its
    layer `layer` is written. One scatter, in place when the cache buffer can be reused."""
    b, t = new.shape[:2]
    slots = index[:, None] + jnp.arange(t)                                    # [B, T]
    rows = jnp.arange(b) if rows is None else rows
    where = (rows[:, None],) + (slice(None),) * (axis - 1) + (slots,)
    if layer is not None:
        where = (layer, *where)
    if cache.dtype == jnp.uint16:  # a 16-bit float cache held as bits: new's bits go in
        new = attention.stored(new)
    new = new.astype(cache.dtype)
    return cache.at[where].set(new, mode="promise_in_bounds")


def layer_of(fields, i):
    """Layer i of a cache's (keys, values, key_scale, value_scale): (its arrays, None) from
    tuples of L arrays, or (the stacks [L, ...], i) from stacks, for the callee to index."""
    if isinstance(fields[1], tuple):
        return tuple(None if x is None else x[i] for x in fields), None
    return fields, i


def write_layer(fields, i, k, v, index, key_layout, pages=None):
    """A cache's (keys, values, key_scale, value_scale) (tuples of L arrays, or stacks [L,
    ...]) with layer i's k, v [B, T, K, D] written at slots index[b].. (quantized when the cache
    is int8), keys in `key_layout`. With `pages` [B, S / page] (a paged cache, T = 1), the
    token goes to slot index % page of page pages[b, index // page]."""
    (keys, values, key_scale, value_scale), layer = layer_of(fields, i)
    rows = None
    if pages is not None:
        require(k.shape[1] == 1, f"a paged cache takes one token per row, got {k.shape[1]}")
        page = values.shape[-2]
        rows = jnp.take_along_axis(pages, (index // page)[:, None], axis=1)[:, 0]
        index = index % page
    write = functools.partial(write_slots, index=index, rows=rows, layer=layer)
    if key_scale is not None:
        (k, k_scale), (v, v_scale) = quantize(k), quantize(v)
        key_scale = write(key_scale, k_scale, axis=2)
        value_scale = write(value_scale, v_scale, axis=2)
    written = (write(keys, k, axis=attention.slot_axis(key_layout)), write(values, v, axis=2),
               key_scale, value_scale)
    if layer is not None:
        return written
    return tuple(None if old is None else (*old[:i], new, *old[i + 1:])
                 for old, new in zip(fields, written, strict=True))


def quantize(x):
    """x [B, T, K, D] -> (int8 [B, T, K, D], float32 scale [B, T, K]) with x ~ q * scale and
    scale = max_d |x| / 127 per token and head."""
    scale = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1) / 127.0
    scale = jnp.where(scale > 0, scale, 1.0)
    return jnp.round(x / scale[..., None]).astype(jnp.int8), scale


def shared_attention(prefix: KVCache, i, q, policy: BackendPolicy, decode_kernel: str):
    """Layer i's attention of grouped queries q [B, K, G, D] over a prefix of P rows shared by
    n = B / P consecutive rows each: their n x G queries per head in one product,
    [P, K, n G, D], against the prefix row once. Returns (out [B, K, G, D], lse [B, K, G])."""
    b, k, g, d = q.shape
    p = prefix.start.shape[0]
    batched = q.reshape(p, b // p, k, g, d).transpose(0, 2, 1, 3, 4).reshape(p, k, -1, d)
    out, lse = prefix.attend(i, batched, policy, decode_kernel)

    def per_row(x):                                    # [P, K, n G, ...] -> [B, K, G, ...]
        x = x.reshape(p, k, b // p, g, *x.shape[3:])
        return jnp.moveaxis(x, 2, 1).reshape(b, k, g, *x.shape[4:])

    return per_row(out), per_row(lse)


def with_fields(cache: KVCache, fields) -> KVCache:
    """The cache with its (keys, values, key_scale, value_scale) replaced."""
    keys, values, key_scale, value_scale = fields
    return cache.replace(keys=keys, values=values, key_scale=key_scale, value_scale=value_scale)
