"""A decoder-only transformer in Flax NNX covering the Qwen3, Qwen2 and Llama families.

The families differ only in a few switches of one architecture, all read from their Hugging Face
configs (`DecoderConfig.from_hf`): RMSNorm, rotary position embeddings (RoPE) with the config's
theta and scaling, grouped-query attention, a SwiGLU MLP, Qwen3's per-head q/k RMSNorm, Qwen2's
q/k/v biases, and tied or untied input/output embeddings.

Three entry points share one layer stack:
  model(input_ids, attention_mask)             full forward, logits [B, T, V]
  model.prefill(input_ids, attention_mask, S)  logits [B, T, V] and a KV cache of S slots
  model.decode(tokens, cache)                  one token per row: logits [B, V], updated cache

Batches are left-padded: row b's real tokens are the last sum(attention_mask[b]) ones; positions
count real tokens only, so padding never changes a row's result. Shapes: B batch, T new tokens,
S cache slots, H query heads, K key/value heads, D head dim, E hidden size, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from jaxlab.config import dtype_name, require, require_positive_ints

FAMILIES = ("qwen3", "qwen2", "llama")
ROPE_TYPES = ("default", "linear", "llama3")
_MASKED = -1e30  # finite, so a fully masked (padding) row stays finite


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding frequencies: theta and a scaling rule (`default`, `linear`, `llama3`)."""

    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0                 # llama3 only
    high_freq_factor: float = 4.0                # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 only

    def __post_init__(self):
        require(self.type in ROPE_TYPES,
                f"rope type {self.type!r} is not supported; supported: {ROPE_TYPES}")
        require(self.theta > 0 and self.factor > 0, f"bad rope parameters {self}")

    def inv_freq(self, head_dim: int) -> np.ndarray:
        """float64 [D / 2]: 1 / theta^(2i / D), scaled by the rule.

        linear: divided by `factor`. llama3 (Llama 3.1): wavelengths 2 pi / f longer than
        L / low_freq_factor (L = original_max_position_embeddings) are divided by `factor`, shorter
        than L / high_freq_factor kept, and in between interpolated with
        s = (L / wavelength - low) / (high - low): f' = (1 - s) f / factor + s f.
        """
        inv = 1.0 / self.theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
        if self.type == "linear":
            return inv / self.factor
        if self.type == "llama3":
            wavelength = 2 * math.pi / inv
            length = self.original_max_position_embeddings
            low, high = self.low_freq_factor, self.high_freq_factor
            smooth = (length / wavelength - low) / (high - low)
            mid = (1 - smooth) * inv / self.factor + smooth * inv
            return np.where(wavelength > length / low, inv / self.factor,
                            np.where(wavelength < length / high, inv, mid))
        return inv


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """The architecture of a decoder (hashable: usable as a static argument)."""

    family: str                    # "qwen3", "qwen2" or "llama"
    vocab_size: int
    hidden_size: int               # E
    intermediate_size: int         # the MLP's inner width
    num_layers: int
    num_heads: int                 # H
    num_kv_heads: int              # K, divides H
    head_dim: int                  # D
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    max_position_embeddings: int = 32768
    qkv_bias: bool = False         # biases on q/k/v projections (Qwen2; Llama/Qwen3 attention_bias)
    o_bias: bool = False           # bias on the output projection (Llama/Qwen3 attention_bias)
    mlp_bias: bool = False         # biases in the MLP (Llama mlp_bias)
    qk_norm: bool = False          # per-head RMSNorm of q and k before RoPE (Qwen3)
    tie_word_embeddings: bool = False
    param_dtype: str = "float32"   # dtype the weights are stored in
    dtype: str = "float32"         # dtype activations are computed in (softmax/norms in float32)

    def __post_init__(self):
        require(self.family in FAMILIES,
                f"model family {self.family!r} is not supported; supported: {FAMILIES}")
        require_positive_ints(self, "vocab_size", "hidden_size", "intermediate_size",
                              "num_layers", "num_heads", "num_kv_heads", "head_dim",
                              "max_position_embeddings")
        require(self.num_heads % self.num_kv_heads == 0,
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads="
                f"{self.num_kv_heads}")
        require(self.head_dim % 2 == 0, f"head_dim must be even for RoPE, got {self.head_dim}")
        for name in ("param_dtype", "dtype"):
            object.__setattr__(self, name, dtype_name(getattr(self, name), name))

    @classmethod
    def from_hf(cls, hf: Any, *, param_dtype: str = "float32",
                dtype: str | None = None) -> DecoderConfig:
        """From a transformers config of the Qwen3, Qwen2 or Llama family.

        Settings the model cannot honour (another architecture, activation, RoPE scaling,
        sliding-window attention, partial rotary embeddings) raise ValueError naming them.
        """
        family = getattr(hf, "model_type", None)
        require(family in FAMILIES, f"model_type {family!r} is not supported; supported: "
                f"{FAMILIES}")
        unsupported = []
        if getattr(hf, "hidden_act", "silu") != "silu":
            unsupported.append(f"hidden_act={hf.hidden_act!r} (only 'silu')")
        if getattr(hf, "use_sliding_window", False):
            unsupported.append("use_sliding_window=True")
        if any(t != "full_attention" for t in (getattr(hf, "layer_types", None) or [])):
            unsupported.append(f"layer_types={hf.layer_types} (only full_attention)")
        rope = dict(getattr(hf, "rope_parameters", None) or {})
        if "rope_theta" not in rope and hasattr(hf, "rope_theta"):  # older configs
            rope["rope_theta"] = hf.rope_theta
        scaling = getattr(hf, "rope_scaling", None) or {}
        rope = {**scaling, **rope}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            unsupported.append(f"rope_type={rope_type!r} (supported: {ROPE_TYPES})")
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            unsupported.append(f"partial_rotary_factor={rope['partial_rotary_factor']}")
        require(not unsupported, f"{family} config has settings this decoder does not support: "
                + "; ".join(unsupported))
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        attention_bias = bool(getattr(hf, "attention_bias", False))
        return cls(
            family=family, vocab_size=hf.vocab_size, hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size, num_layers=hf.num_hidden_layers,
            num_heads=hf.num_attention_heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
            head_dim=head_dim, rms_norm_eps=hf.rms_norm_eps,
            rope=RopeConfig(
                theta=float(rope.get("rope_theta", 10000.0)), type=rope_type,
                factor=float(rope.get("factor", 1.0)),
                low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
                high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
                original_max_position_embeddings=int(rope.get(
                    "original_max_position_embeddings", hf.max_position_embeddings))),
            max_position_embeddings=hf.max_position_embeddings,
            qkv_bias=True if family == "qwen2" else attention_bias,
            o_bias=False if family == "qwen2" else attention_bias,
            mlp_bias=bool(getattr(hf, "mlp_bias", False)), qk_norm=family == "qwen3",
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            param_dtype=param_dtype, dtype=dtype or param_dtype)


@struct.dataclass
class KVCache:
    """Keys and values of every layer for S slots per row, filled left to right."""

    # One array per layer (so a step updates each in place, no stacking), in the model's dtype
    # or int8: keys L x [B, K, D, S], values L x [B, K, S, D], and for int8 L x float32 [B, K, S]
    # scales (key = keys * scale). Each (row, kv head) is then a plain matrix in the layout its
    # product with the queries wants: q [G T, D] @ keys [D, S], weights [G T, S] @ values [S, D]
    # (a transposed operand costs a repacking of the whole cache every step on CPU).
    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    key_scale: tuple[jax.Array, ...] | None
    value_scale: tuple[jax.Array, ...] | None
    valid: jax.Array      # [B, S] bool, slot holds a real token
    positions: jax.Array  # [B] int32, position of each row's next token (= real tokens so far)
    index: jax.Array      # [B] int32, each row's next slot to write

    @property
    def size(self) -> int:
        return self.values[0].shape[2]

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in jax.tree.leaves(
            (self.keys, self.values, self.key_scale, self.value_scale)))

    def map_rows(self, fn) -> KVCache:
        """Applies fn to every array of the cache; each one leads with the batch axis."""
        return jax.tree.map(fn, self)

    def layer(self, i: int) -> tuple:
        """Layer i's (keys, values, key_scale, value_scale) (scales None unless int8)."""
        return tuple(None if x is None else x[i]
                     for x in (self.keys, self.values, self.key_scale, self.value_scale))


def positions_of(mask) -> jax.Array:
    """int32 [B, T]: the RoPE position of each token of a mask [B, T] (1 = real token), the
    number of real tokens before it (padding gets 0), wherever the padding sits."""
    return jnp.maximum(jnp.cumsum(jnp.asarray(mask), axis=1, dtype=jnp.int32) - 1, 0)


class RMSNorm(nnx.Module):
    """y = w * x / sqrt(mean(x^2) + eps), computed in float32 and cast back to x's dtype."""

    def __init__(self, dim: int, eps: float, param_dtype):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * y.astype(x.dtype)


def _rotate(x, cos, sin):
    """RoPE in the rotate-half layout: x * cos + [-x2, x1] * sin; x [B, T, N, D], cos [B, T, D]."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x * cos[:, :, None, :] + rotated * sin[:, :, None, :]).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, c: DecoderConfig, rngs: nnx.Rngs):
        linear = _linear_factory(c, rngs)
        self.q_proj = linear(c.hidden_size, c.num_heads * c.head_dim, c.qkv_bias)
        self.k_proj = linear(c.hidden_size, c.num_kv_heads * c.head_dim, c.qkv_bias)
        self.v_proj = linear(c.hidden_size, c.num_kv_heads * c.head_dim, c.qkv_bias)
        self.o_proj = linear(c.num_heads * c.head_dim, c.hidden_size, c.o_bias)
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, c.param_dtype)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, c.param_dtype)
        self.config = c

    def __call__(self, x, cos, sin, kv, index, visible):
        """x [B, T, E]; kv this layer's (keys, values, key_scale, value_scale) (`KVCache.layer`),
        or None for a forward pass without a cache; index [B]; visible [B, T, S] bool (S = T
        without a cache).

        With a cache, writes row b's new keys/values (int8 with per-token, per-head absmax scales
        when the cache is int8) at slots index[b]..index[b]+T-1. Attends to the visible slots:
        softmax(q k^T / sqrt(D)) v per head, query head h reading key/value head h // (H / K).
        Returns (out [B, T, E], the layer's updated kv, or None without a cache).
        """
        c = self.config
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, c.num_heads, c.head_dim)
        k = self.k_proj(x).reshape(b, t, c.num_kv_heads, c.head_dim)
        v = self.v_proj(x).reshape(b, t, c.num_kv_heads, c.head_dim)
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        if kv is None:  # the new tokens are all there is: [B, K, D, T] and [B, K, T, D]
            out = _attend(q, k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3), None, None,
                          visible)
        else:
            keys, values, key_scale, value_scale = kv
            if key_scale is not None:
                (k, k_scale), (v, v_scale) = _quantize(k), _quantize(v)
                key_scale = _write_slots(key_scale, k_scale, index, axis=2)
                value_scale = _write_slots(value_scale, v_scale, index, axis=2)
            keys = _write_slots(keys, k, index, axis=3)
            values = _write_slots(values, v, index, axis=2)
            kv = (keys, values, key_scale, value_scale)
            out = _attend(q, keys, values, key_scale, value_scale, visible)   # [B, T, H, D]
        return self.o_proj(out.reshape(b, t, c.num_heads * c.head_dim)), kv


def _attend(q, keys, values, key_scale, value_scale, visible):
    """softmax(q k^T / sqrt(D)) v over the visible slots, query head h reading key/value head
    h // G: q [B, T, H, D], keys [B, K, D, S], values [B, K, S, D] (int8 with [B, K, S] scales, or
    scales None), visible [B, T, S] -> [B, T, H, D]. Each (row, kv head) is one matrix product
    over its G x T queries."""
    b, t, h, d = q.shape
    k = keys.shape[1]
    q = q.reshape(b, t, k, h // k, d).transpose(0, 2, 3, 1, 4).reshape(b, k, -1, d)
    scores = jnp.einsum("bkqd,bkds->bkqs", q, keys.astype(q.dtype),
                        preferred_element_type=jnp.float32) / math.sqrt(d)   # [B, K, G T, S]
    if key_scale is not None:
        scores = scores * key_scale[:, :, None, :]
    scores = scores.reshape(b, k, h // k, t, -1)
    scores = jnp.where(visible[:, None, None], scores, _MASKED)             # [B, K, G, T, S]
    weights = jax.nn.softmax(scores, axis=-1).reshape(b, k, h // k * t, -1)
    if value_scale is not None:
        weights = weights * value_scale[:, :, None, :]
    out = jnp.einsum("bkqs,bksd->bkqd", weights.astype(q.dtype), values.astype(q.dtype))
    return out.reshape(b, k, h // k, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def _write_slots(cache, new, index, axis):
    """cache [B, ...] whose slots run along `axis` with row b's new [T, ...] (the cache's other
    axes in order) written at slots index[b]..index[b]+T-1: one scatter, in place when the cache
    buffer can be reused."""
    b, t = new.shape[:2]
    slots = index[:, None] + jnp.arange(t)                                    # [B, T]
    where = (jnp.arange(b)[:, None],) + (slice(None),) * (axis - 1) + (slots,)
    return cache.at[where].set(new.astype(cache.dtype), mode="promise_in_bounds")


def _quantize(x):
    """x [B, T, K, D] -> (int8 [B, T, K, D], float32 scale [B, T, K]) with x ~ q * scale and
    scale = max_d |x| / 127 per token and head."""
    scale = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1) / 127.0
    scale = jnp.where(scale > 0, scale, 1.0)
    return jnp.round(x / scale[..., None]).astype(jnp.int8), scale


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, c: DecoderConfig, rngs: nnx.Rngs):
        linear = _linear_factory(c, rngs)
        self.gate_proj = linear(c.hidden_size, c.intermediate_size, c.mlp_bias)
        self.up_proj = linear(c.hidden_size, c.intermediate_size, c.mlp_bias)
        self.down_proj = linear(c.intermediate_size, c.hidden_size, c.mlp_bias)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, c: DecoderConfig, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, c.param_dtype)
        self.self_attn = Attention(c, rngs)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, c.param_dtype)
        self.mlp = MLP(c, rngs)

    def __call__(self, x, cos, sin, kv, index, visible):
        h, kv = self.self_attn(self.input_layernorm(x), cos, sin, kv, index, visible)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), kv


def _linear_factory(c: DecoderConfig, rngs: nnx.Rngs):
    def linear(n_in, n_out, bias):
        return nnx.Linear(n_in, n_out, use_bias=bias, dtype=c.dtype, param_dtype=c.param_dtype,
                          kernel_init=nnx.initializers.normal(0.02), rngs=rngs)
    return linear


class Decoder(nnx.Module):
    """A causal LM. Weights follow the Hugging Face layout (`jaxlab.models.hf` maps them)."""

    def __init__(self, config: DecoderConfig, rngs: nnx.Rngs):
        c = self.config = config
        self.embed_tokens = nnx.Embed(c.vocab_size, c.hidden_size, dtype=c.dtype,
                                      param_dtype=c.param_dtype,
                                      embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
        self.layers = nnx.List([Block(c, rngs) for _ in range(c.num_layers)])
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, c.param_dtype)
        if not c.tie_word_embeddings:
            self.lm_head = nnx.Linear(c.hidden_size, c.vocab_size, use_bias=False, dtype=c.dtype,
                                      param_dtype=c.param_dtype,
                                      kernel_init=nnx.initializers.normal(0.02), rngs=rngs)

    # ---------------------------------------------------------------- entry points

    def __call__(self, input_ids, attention_mask=None):
        """Full forward pass without a cache: logits float32 [B, T, V].

        input_ids int [B, T]; attention_mask [B, T] (1 = real token, 0 = padding).
        """
        return self.logits(self.hidden(input_ids, attention_mask))

    def hidden(self, input_ids, attention_mask=None):
        """The final (normed) hidden states [B, T, E], in the activation dtype, of a full
        forward pass without a cache: what the output head, a reward head or a value head reads.

        Padding may sit anywhere (left of a prompt, right of a response): positions count the
        real tokens before each one, and each token attends to the real tokens up to itself.
        """
        t = input_ids.shape[1]
        self._check_tokens(input_ids)
        mask = self._mask(input_ids, attention_mask)
        causal = jnp.arange(t)[None, :] <= jnp.arange(t)[:, None]                # [T, T]
        x, _ = self._layers(input_ids, positions_of(mask), None, mask[:, None, :] & causal)
        return x

    def logits(self, hidden):
        """Next-token logits float32 [..., V] of hidden states [..., E] (the output head; the
        products accumulate and come out in float32, also under bfloat16 compute)."""
        return jnp.dot(hidden, self.unembedding().astype(hidden.dtype),
                       preferred_element_type=jnp.float32)

    def unembedding(self):
        """The output head's matrix [E, V] (the transposed input embedding when tied)."""
        if self.config.tie_word_embeddings:
            return self.embed_tokens.embedding[...].T
        return self.lm_head.kernel[...]

    def prefill(self, input_ids, attention_mask=None, *, cache_size: int, int8_cache=False):
        """Runs a left-padded prompt batch and returns (logits float32 [B, T, V], KVCache of
        `cache_size` slots with the prompt in slots 0..T-1; int8 if `int8_cache`)."""
        b, t = input_ids.shape
        require(t <= cache_size, f"the prompt ({t} tokens) is longer than the cache "
                f"({cache_size} slots)")
        require(cache_size <= self.config.max_position_embeddings,
                f"cache_size={cache_size} exceeds max_position_embeddings="
                f"{self.config.max_position_embeddings}")
        self._check_tokens(input_ids)
        mask = self._mask(input_ids, attention_mask)
        cache = self.init_cache(b, cache_size, int8_cache)
        cache = cache.replace(valid=cache.valid.at[:, :t].set(mask),
                              positions=jnp.sum(mask, axis=1, dtype=jnp.int32))
        return self._run(input_ids, positions_of(mask), cache)

    def decode(self, tokens, cache: KVCache):
        """One new token per row (tokens int [B]) at slots cache.index: (logits [B, V], cache)."""
        self._check_tokens(tokens)
        if not isinstance(cache.index, jax.core.Tracer):
            require(int(jnp.max(cache.index)) < cache.size,
                    f"the cache is full ({cache.size} slots)")
        rows = jnp.arange(tokens.shape[0])
        cache = cache.replace(valid=cache.valid.at[rows, cache.index].set(True),
                              positions=cache.positions + 1)
        logits, cache = self._run(tokens[:, None], (cache.positions - 1)[:, None], cache)
        return logits[:, 0], cache

    def init_cache(self, batch: int, size: int, int8: bool = False) -> KVCache:
        """An empty cache; `int8` stores keys and values as int8 with float32 scales per token
        and head (D + 4 bytes instead of 2 D or 4 D per token, head and tensor)."""
        c = self.config
        values = (batch, c.num_kv_heads, size, c.head_dim)
        dtype = jnp.int8 if int8 else c.dtype

        def per_layer(shape, dtype):
            return tuple(jnp.zeros(shape, dtype) for _ in range(c.num_layers))

        scale = per_layer(values[:-1], jnp.float32) if int8 else None
        return KVCache(keys=per_layer((batch, c.num_kv_heads, c.head_dim, size), dtype),
                       values=per_layer(values, dtype),
                       key_scale=scale, value_scale=scale, valid=jnp.zeros((batch, size), bool),
                       positions=jnp.zeros((batch,), jnp.int32),
                       index=jnp.zeros((batch,), jnp.int32))

    # ---------------------------------------------------------------- internals

    @staticmethod
    def _mask(input_ids, attention_mask):
        """bool [B, T]: the real tokens (all of them when no mask is given)."""
        if attention_mask is None:
            return jnp.ones(input_ids.shape, bool)
        return jnp.asarray(attention_mask).astype(bool)

    def _run(self, input_ids, positions, cache: KVCache):
        """input_ids [B, T] at positions [B, T], written at slots index[b]..index[b]+T-1 of a
        cache whose `valid` already marks them; returns (logits float32 [B, T, V], cache)."""
        t = input_ids.shape[1]
        slots = jnp.arange(cache.size)
        new_slots = cache.index[:, None] + jnp.arange(t)                          # [B, T]
        visible = cache.valid[:, None, :] & (slots[None, None, :] <= new_slots[:, :, None])
        x, cache = self._layers(input_ids, positions, cache, visible)
        return self.logits(x), cache.replace(index=cache.index + t)

    def _layers(self, input_ids, positions, cache: KVCache | None, visible):
        """The layer stack and final norm: (hidden [B, T, E], cache with every layer's new keys
        and values, or None without a cache); visible [B, T, S] bool."""
        inv_freq = jnp.asarray(self.config.rope.inv_freq(self.config.head_dim), jnp.float32)
        angles = positions[..., None].astype(jnp.float32) * inv_freq             # [B, T, D/2]
        angles = jnp.concatenate([angles, angles], axis=-1)
        cos, sin = (jnp.cos(angles).astype(self.config.dtype),
                    jnp.sin(angles).astype(self.config.dtype))
        x = self.embed_tokens(input_ids)
        layers = []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, cos, sin, None if cache is None else cache.layer(i),
                          None if cache is None else cache.index, visible)
            layers.append(kv)
        if cache is not None:
            keys, values, key_scale, value_scale = (
                None if parts[0] is None else parts for parts in zip(*layers, strict=True))
            cache = cache.replace(keys=keys, values=values, key_scale=key_scale,
                                  value_scale=value_scale)
        return self.norm(x), cache

    def _check_tokens(self, ids) -> None:
        """Token ids outside the vocabulary are an error (checked when the ids are concrete)."""
        if isinstance(ids, jax.core.Tracer):
            return
        ids = np.asarray(ids)
        bad = (ids < 0) | (ids >= self.config.vocab_size)
        if bad.any():
            where = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(f"token id {int(ids[where])} at {where} is outside the vocabulary "
                             f"[0, {self.config.vocab_size})")
