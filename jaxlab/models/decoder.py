"""A decoder-only transformer in Flax NNX covering the Qwen3, Qwen2 and Llama families.

The families differ only in a few switches of one architecture, all read from their Hugging Face
configs (`DecoderConfig.from_hf`): RMSNorm, rotary position embeddings (RoPE) with the config's
theta and scaling, grouped-query attention, a SwiGLU MLP, Qwen3's per-head q/k RMSNorm, Qwen2's
q/k/v biases, and tied or untied input/output embeddings.

Three entry points share one layer stack:
  model(input_ids, attention_mask)             full forward, logits [B, T, V]
  model.prefill(input_ids, attention_mask, S)  logits [B, T, V] and a KV cache of S slots
  model.decode(tokens, cache, prefix)          one token per row: logits [B, V], updated cache;
                                               with a prefix, rows share their prompt's KV

Attention itself (the fused full-sequence path, flash-decoding over the live blocks, the Pallas
kernel, the log-sum-exp merge) lives in `jaxlab.models.attention`, the KV cache (its struct,
writes, int8, pages, the cascade over a shared prefix) in `jaxlab.models.kv_cache`, every
platform-dependent choice in the model's backend policy (`jaxlab.models.backend`).

Batches are left-padded: row b's real tokens are the last sum(attention_mask[b]) ones; positions
count real tokens only, so padding never changes a row's result. Shapes: B batch, T new tokens,
S cache slots, H query heads, K key/value heads, D head dim, E hidden size, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from jaxlab.config import dtype_name, require, require_positive_ints
from jaxlab.models import attention, kv_cache
from jaxlab.models.backend import BackendPolicy
from jaxlab.models.backend import resolve as resolve_policy
from jaxlab.models.kv_cache import KVCache

FAMILIES = ("qwen3", "qwen2", "llama")
ROPE_TYPES = ("default", "linear", "llama3")
# What the backward pass of a training forward (`Decoder.hidden`) keeps of each layer: "none"
# keeps every activation; "full" keeps only the layer's input and recomputes the rest
# (`jax.checkpoint`); "dots" keeps also the results of the projections (matrix products
# without batch dimensions: q/k/v/o and the MLP's) and recomputes norms, RoPE and attention.
REMAT_POLICIES = {"none": None, "full": jax.checkpoint_policies.nothing_saveable,
                  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


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
    param_dtype: str = "float32"    # dtype the weights are stored in
    compute_dtype: str = "float32"  # dtype activations are computed in (softmax/norms in float32)

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
        for name in ("param_dtype", "compute_dtype"):
            object.__setattr__(self, name, dtype_name(getattr(self, name), name))

    @classmethod
    def from_hf(cls, hf: Any, *, param_dtype: str = "float32",
                compute_dtype: str | None = None) -> DecoderConfig:
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
            param_dtype=param_dtype, compute_dtype=compute_dtype or param_dtype)


@struct.dataclass
class LayerStack:
    """The parameters of every layer stacked along a new leading axis [L, ...]
    (`Decoder.layer_stack`), with the layers' common graph: what a scan over the layers runs."""

    params: Any
    graphdef: Any = struct.field(pytree_node=False)


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
    def __init__(self, c: DecoderConfig, rngs: nnx.Rngs, policy: BackendPolicy):
        linear = _linear_factory(c, rngs, policy)
        self.q_proj = linear(c.hidden_size, c.num_heads * c.head_dim, c.qkv_bias)
        self.k_proj = linear(c.hidden_size, c.num_kv_heads * c.head_dim, c.qkv_bias)
        self.v_proj = linear(c.hidden_size, c.num_kv_heads * c.head_dim, c.qkv_bias)
        self.o_proj = linear(c.num_heads * c.head_dim, c.hidden_size, c.o_bias)
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, c.param_dtype)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, c.param_dtype)
        self.config = c

    def __call__(self, x, cos, sin, attend):
        """x [B, T, E] -> (out [B, T, E], what `attend` returns beside its output).

        Projects x to q [B, T, H, D] and k, v [B, T, K, D] (q/k normed per head for Qwen3,
        rotated by RoPE) and calls attend(q, k, v) -> (attended [B, T, H, D], extra): the
        attention of the pass at hand (full sequence, prefill into a cache, or one decode step).
        """
        c = self.config
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, c.num_heads, c.head_dim)
        k = self.k_proj(x).reshape(b, t, c.num_kv_heads, c.head_dim)
        v = self.v_proj(x).reshape(b, t, c.num_kv_heads, c.head_dim)
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        out, extra = attend(_rotate(q, cos, sin), _rotate(k, cos, sin), v)
        return self.o_proj(out.reshape(b, t, c.num_heads * c.head_dim)), extra


def _grouped(q, num_kv_heads):
    """[B, T=1, H, D] -> [B, K, G, D]: query head h = k G + g reads key/value head k."""
    b, _, h, d = q.shape
    return q.reshape(b, num_kv_heads, h // num_kv_heads, d)


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, c: DecoderConfig, rngs: nnx.Rngs, policy: BackendPolicy):
        linear = _linear_factory(c, rngs, policy)
        self.gate_proj = linear(c.hidden_size, c.intermediate_size, c.mlp_bias)
        self.up_proj = linear(c.hidden_size, c.intermediate_size, c.mlp_bias)
        self.down_proj = linear(c.intermediate_size, c.hidden_size, c.mlp_bias)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, c: DecoderConfig, rngs: nnx.Rngs, policy: BackendPolicy):
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, c.param_dtype)
        self.self_attn = Attention(c, rngs, policy)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, c.param_dtype)
        self.mlp = MLP(c, rngs, policy)

    def __call__(self, x, cos, sin, attend):
        h, extra = self.self_attn(self.input_layernorm(x), cos, sin, attend)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), extra


def row_dot_general(x, w, dimension_numbers, precision=None, preferred_element_type=None,
                    **kwargs):
    """`lax.dot_general` in the CPU backend policy's product form (`BackendPolicy.row_products`),
    for the linear layers and the output head: two changes of form that keep the values (up to
    float32 rounding) and spare XLA's CPU backend copies:

    - x [..., E] is multiplied as a matrix of rows [N, E]: from more axes that backend computes
      the weight gradient (contracting N = B x T over two axes) through transposed copies and
      a slower product (a Qwen3 MLP of width 256 at [8, 255]: 61 ms forward + backward, 45 ms
      as rows);
    - a 16-bit float product is asked for in float32 and rounded to the operands' dtype: asked
      for in 16 bits, that backend converts both operands to float32 first (it multiplies in
      float32 either way), and a decode loop hoists those copies of the weights and keeps them
      all (60 MiB per Qwen3-0.6B layer in bfloat16). Its cost: under `remat="dots"` the saved
      products are the float32 ones (twice a bfloat16 product's bytes).

    The GPU and TPU policies run `lax.dot_general` as written: they multiply 16-bit floats
    natively."""
    (x_axes, w_axes), batch = dimension_numbers
    if x.ndim > 2 and tuple(x_axes) == (x.ndim - 1,) and not any(batch):  # x [..., E]: as rows
        out = row_dot_general(x.reshape(-1, x.shape[-1]), w, (((1,), tuple(w_axes)), ((), ())),
                              precision, preferred_element_type, **kwargs)
        return out.reshape(*x.shape[:-1], *out.shape[1:])
    if preferred_element_type is None and x.dtype == w.dtype and attention.is_half(x.dtype):
        return jax.lax.dot_general(x, w, dimension_numbers, precision,
                                   preferred_element_type=jnp.float32, **kwargs).astype(x.dtype)
    return jax.lax.dot_general(x, w, dimension_numbers, precision,
                               preferred_element_type=preferred_element_type, **kwargs)


def _product(policy: BackendPolicy):
    """The `dot_general` of the linear layers under `policy` (a module-level function, so that
    models of one policy share one graph)."""
    return row_dot_general if policy.row_products else jax.lax.dot_general


def _linear_factory(c: DecoderConfig, rngs: nnx.Rngs, policy: BackendPolicy):
    def linear(n_in, n_out, bias):
        return nnx.Linear(n_in, n_out, use_bias=bias, dtype=c.compute_dtype,
                          param_dtype=c.param_dtype,
                          kernel_init=nnx.initializers.normal(0.02),
                          dot_general=_product(policy), rngs=rngs)
    return linear


class Decoder(nnx.Module):
    """A causal LM. Weights follow the Hugging Face layout (`jaxlab.models.hf` maps them).

    `backend` is the backend policy its programs are compiled with (`jaxlab.models.backend`:
    attention path, decode kernel, cache layout and storage, product form): a `BackendPolicy`,
    a name ("auto", "cpu", "gpu", "tpu") or None (`JAXLAB_POLICY`, else "auto"), resolved
    against `devices` (default `jax.devices()`: the devices the model will run on). It is a
    static field of the model's graph; `set_backend` changes it."""

    def __init__(self, config: DecoderConfig, rngs: nnx.Rngs,
                 backend: BackendPolicy | str | None = None,
                 devices: Sequence[jax.Device] | None = None):
        c = self.config = config
        self.backend = policy = resolve_policy(backend, devices)
        self.embed_tokens = nnx.Embed(c.vocab_size, c.hidden_size, dtype=c.compute_dtype,
                                      param_dtype=c.param_dtype,
                                      embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
        self.layers = nnx.List([Block(c, rngs, policy) for _ in range(c.num_layers)])
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, c.param_dtype)
        if not c.tie_word_embeddings:
            self.lm_head = nnx.Linear(c.hidden_size, c.vocab_size, use_bias=False,
                                      dtype=c.compute_dtype,
                                      param_dtype=c.param_dtype,
                                      kernel_init=nnx.initializers.normal(0.02), rngs=rngs)

    def set_backend(self, backend: BackendPolicy | str | None,
                    devices: Sequence[jax.Device] | None = None) -> Decoder:
        """Runs the model under another backend policy (resolved as in the constructor): every
        program compiled from it afterwards is that policy's. Returns the model."""
        self.backend = policy = resolve_policy(backend, devices)
        for _, node in nnx.iter_graph(self.layers):
            if isinstance(node, nnx.Linear):
                node.dot_general = _product(policy)
        return self

    # ---------------------------------------------------------------- entry points

    def __call__(self, input_ids, attention_mask=None):
        """Full forward pass without a cache: logits float32 [B, T, V].

        input_ids int [B, T]; attention_mask [B, T] (1 = real token, 0 = padding).
        """
        return self.logits(self.hidden(input_ids, attention_mask))

    def hidden(self, input_ids, attention_mask=None, *, remat: str = "none",
               sharding: jax.sharding.Sharding | None = None):
        """The final (normed) hidden states [B, T, E], in the compute dtype, of a full
        forward pass without a cache: what the output head, a reward head or a value head reads.

        Padding may sit anywhere (left of a prompt, right of a response): positions count the
        real tokens before each one, and each token attends to the real tokens up to itself.
        `remat` (a key of `REMAT_POLICIES`) sets what a gradient of this pass keeps of each
        layer: the values and gradients are the same for every setting, the memory and the
        backward pass's compute are not. `sharding`, if given, is held by the activations
        [B, T, E] at every layer boundary (e.g. rows split over the data axes of a mesh whose
        weights are split over the same devices: XLA's partitioner then gathers each layer's
        weights instead of splitting activations along another dimension).
        """
        require(remat in REMAT_POLICIES,
                f"remat={remat!r} is not a remat policy; choose one of {list(REMAT_POLICIES)}")
        self.check_tokens(input_ids)
        mask = self._mask(input_ids, attention_mask)
        visible = _causal(mask)

        def attend(i, q, k, v, carry):
            return attention.full_attention(q, k, v, visible, self.backend), carry

        return self._layers(input_ids, positions_of(mask), attend, remat=remat,
                            sharding=sharding)[0]

    def grouped_hidden(self, prompt_ids, prompt_mask, response_ids, response_mask, *,
                       remat: str = "none", sharding: jax.sharding.Sharding | None = None):
        """`hidden` of the P x G rows `prompt p + response (p, g)`, with each prompt run once
        for its G responses: (prompt hidden [P, L, E], response hidden [P, G, T, E]), equal to
        the rows' `hidden` at their real tokens (padding may differ: it is never a key).

        prompt_ids, prompt_mask [P, L] (padding anywhere; left in a rollout); response_ids,
        response_mask [P, G, T] (right-padded). A group is one row of L + G T tokens: every
        per-token layer runs on the prompt once; the prompt attends to itself (causal), and
        response (p, g) to the real tokens of prompt p and, causally, to its own, through a
        [P G, T, L + T] mask over its keys (the prompt's keys broadcast to the G responses;
        their gradients sum over them). Positions continue from the prompt's real tokens.
        `remat` and `sharding` as in `hidden` (the activations are [P, L + G T, E])."""
        require(remat in REMAT_POLICIES,
                f"remat={remat!r} is not a remat policy; choose one of {list(REMAT_POLICIES)}")
        p, g, t = response_ids.shape
        length = prompt_ids.shape[1]
        for ids in (prompt_ids, response_ids):
            self.check_tokens(ids)
        prompt = jnp.asarray(prompt_mask).astype(bool)                          # [P, L]
        response = jnp.asarray(response_mask).astype(bool)                      # [P, G, T]
        causal = _causal(prompt)                                                 # [P, L, L]
        own = (response[..., None, :]
               & (jnp.arange(t)[None, :] <= jnp.arange(t)[:, None]))            # [P, G, T, T]
        seen = jnp.concatenate([jnp.broadcast_to(prompt[:, None, None, :], (p, g, t, length)),
                                own], axis=-1).reshape(p * g, t, length + t)    # [PG, T, L+T]

        def attend(i, q, k, v, carry):                   # q [P, L+GT, H, D]; k, v [P, L+GT, K, D]
            def per_response(x):                          # -> [PG, L+T, K, D]
                shared = jnp.broadcast_to(x[:, None, :length], (p, g, length, *x.shape[2:]))
                own_x = x[:, length:].reshape(p, g, t, *x.shape[2:])
                return jnp.concatenate([shared, own_x], axis=2).reshape(p * g, length + t,
                                                                        *x.shape[2:])

            out_prompt = attention.full_attention(q[:, :length], k[:, :length], v[:, :length],
                                                  causal, self.backend)            # [P, L, H, D]
            out_response = attention.full_attention(
                q[:, length:].reshape(p * g, t, *q.shape[2:]), per_response(k), per_response(v),
                seen, self.backend)                                               # [PG, T, H, D]
            return jnp.concatenate([out_prompt, out_response.reshape(p, g * t, *q.shape[2:])],
                                   axis=1), carry

        count = jnp.sum(prompt, axis=1, dtype=jnp.int32)[:, None, None]         # [P, 1, 1]
        positions = jnp.concatenate([
            positions_of(prompt),
            (count + positions_of(response.reshape(p * g, t)).reshape(p, g, t)).reshape(p, -1),
        ], axis=1)                                                               # [P, L+GT]
        ids = jnp.concatenate([prompt_ids, response_ids.reshape(p, g * t)], axis=1)
        hidden = self._layers(ids, positions, attend, remat=remat, sharding=sharding)[0]
        return hidden[:, :length], hidden[:, length:].reshape(p, g, t, hidden.shape[-1])

    def logits(self, hidden):
        """Next-token logits float32 [..., V] of hidden states [..., E] (the output head; the
        products accumulate and come out in float32, also under bfloat16 compute). A tied head
        contracts E with the embedding [V, E] as stored: through its transpose, XLA's CPU
        backend copies the whole embedding (transposed, and in float32)."""
        head, axis = self._head()
        return _product(self.backend)(hidden, head.astype(hidden.dtype),
                                      (((hidden.ndim - 1,), (axis,)), ((), ())),
                                      preferred_element_type=jnp.float32)

    def unembedding(self):
        """The output head's matrix [E, V] (the transposed input embedding when tied)."""
        head, axis = self._head()
        return head.T if axis == 1 else head

    def _head(self):
        """(the output head's matrix as stored, the axis of it that E is): the embedding
        [V, E] and 1 when tied, else the head's kernel [E, V] and 0."""
        if self.config.tie_word_embeddings:
            return self.embed_tokens.embedding[...], 1
        return self.lm_head.kernel[...], 0

    def prefill(self, input_ids, attention_mask=None, *, cache_size: int, int8_cache=False,
                last_only=False, key_layout: str | None = None, scan_layers: bool = False):
        """Runs a left-padded prompt batch and returns (logits float32 [B, T, V], or [B, V] of
        the last position only if `last_only`; KVCache of `cache_size` slots with the prompt in
        slots 0..T-1, int8 if `int8_cache`, keys in `key_layout`, the layers' arrays stacked if
        `scan_layers` (`init_cache`); a stacked cache runs the layers in one scan).

        The prompt attends to its own keys and values (`attention.full_attention`, before any
        int8 rounding); the cache keeps them for the decode steps.
        """
        b, t = input_ids.shape
        require(t <= cache_size, f"the prompt ({t} tokens) is longer than the cache "
                f"({cache_size} slots)")
        require(cache_size <= self.config.max_position_embeddings,
                f"cache_size={cache_size} exceeds max_position_embeddings="
                f"{self.config.max_position_embeddings}")
        self.check_tokens(input_ids)
        mask = self._mask(input_ids, attention_mask)
        if not isinstance(mask, jax.core.Tracer):
            late = np.flatnonzero(np.any(np.diff(np.asarray(mask, np.int8), axis=1) < 0, axis=1))
            require(late.size == 0, f"attention_mask rows {late[:5].tolist()} are not "
                    "left-padded (a padding token follows a real one)")
        cache = self.init_cache(b, cache_size, int8_cache, key_layout, scan_layers)
        lengths = jnp.sum(mask, axis=1, dtype=jnp.int32)
        visible = _causal(mask)
        zero = jnp.zeros((b,), jnp.int32)

        def attend(i, q, k, v, fields):
            return (attention.full_attention(q, k, v, visible, self.backend),
                    kv_cache.write_layer(fields, i, k, v, zero, cache.key_layout))

        x, fields = self._layers(input_ids, positions_of(mask), attend, cache.fields,
                                 layer_stack=self.layer_stack() if scan_layers else None)
        cache = kv_cache.with_fields(cache, fields).replace(
            start=t - lengths, positions=lengths, index=zero + t)
        return self.logits(x[:, -1] if last_only else x), cache

    def decode(self, tokens, cache: KVCache, prefix: KVCache | None = None,
               decode_kernel: str = "auto", layer_stack: LayerStack | None = None):
        """One new token per row (tokens int [B]) at slots cache.index, position
        cache.positions: (logits float32 [B, V], cache with the token's keys and values).
        `decode_kernel` picks the attention kernel (`attention.decode_attention`). A stacked
        cache runs the layers in one scan over `layer_stack` (default: `self.layer_stack()`, a
        copy of the weights made here: a loop of decode steps makes it once and passes it).

        With a `prefix` of P rows (P divides B), rows p n .. p n + n - 1 (n = B / P) continue
        prefix row p: they attend to its live slots and to their own, and their n x G queries
        per key/value head read the prefix once, batched (cascade attention: the two parts are
        merged by their log-sum-exps, `attention.merge`). The prefix is read, never written.
        """
        self.check_tokens(tokens)
        if not isinstance(cache.index, jax.core.Tracer):
            require(int(jnp.max(cache.index)) < cache.size,
                    f"the cache is full ({cache.size} slots)")
        b, k = tokens.shape[0], self.config.num_kv_heads
        if prefix is not None:
            require(b % prefix.start.shape[0] == 0, f"the prefix's {prefix.start.shape[0]} rows "
                    f"must divide the batch of {b} rows")
        require(layer_stack is None or cache.stacked,
                "a layer stack runs a stacked cache only")
        require(prefix is None or prefix.stacked or not cache.stacked,
                "a stacked cache needs a stacked prefix (prefill(..., scan_layers=True))")
        written = cache.replace(index=cache.index + 1)

        def attend(i, q, k_new, v_new, fields):
            fields = kv_cache.write_layer(fields, i, k_new, v_new, cache.index,
                                          cache.key_layout, cache.pages)
            q = _grouped(q, k)                                                    # [B, K, G, D]
            out, lse = kv_cache.with_fields(written, fields).attend(i, q, self.backend,
                                                                    decode_kernel)
            if prefix is not None:
                shared = kv_cache.shared_attention(prefix, i, q, self.backend, decode_kernel)
                out, lse = attention.merge((out, lse), shared)
            return out.astype(q.dtype).reshape(b, 1, -1, q.shape[-1]), fields

        if cache.stacked and layer_stack is None:
            layer_stack = self.layer_stack()
        x, fields = self._layers(tokens[:, None], cache.positions[:, None], attend,
                                 cache.fields, layer_stack=layer_stack)
        cache = kv_cache.with_fields(written, fields).replace(positions=cache.positions + 1)
        return self.logits(x[:, 0]), cache

    def layer_stack(self) -> LayerStack:
        """Every layer's parameters stacked along a new leading axis (a copy of the layers'
        weights), to run the layers in one `lax.scan`."""
        return LayerStack(
            params=jax.tree.map(lambda *xs: jnp.stack(xs),
                                *(nnx.state(layer) for layer in self.layers)),
            graphdef=nnx.graphdef(self.layers[0]))

    def init_cache(self, batch: int, size: int, int8_cache: bool = False,
                   key_layout: str | None = None, scan_layers: bool = False) -> KVCache:
        """An empty cache (16-bit floats held as their bits under the CPU policy:
        `attention.stored_dtype`); `int8_cache` stores keys and values as int8 with float32 scales
        per token and head (D + 4 bytes instead of 2 D or 4 D per token, head and tensor); keys in
        `key_layout` (default: the backend policy's); each field one array per layer, or one
        stack [L, ...] if `scan_layers`."""
        key_layout = key_layout or self.backend.key_layout
        attention.slot_axis(key_layout)  # checks it
        c = self.config
        values = (batch, c.num_kv_heads, size, c.head_dim)
        dtype = jnp.int8 if int8_cache else attention.stored_dtype(c.compute_dtype, self.backend)

        def per_layer(shape, dtype):
            if scan_layers:
                return jnp.zeros((c.num_layers, *shape), dtype)
            return tuple(jnp.zeros(shape, dtype) for _ in range(c.num_layers))

        def scale():
            return per_layer(values[:-1], jnp.float32) if int8_cache else None

        def zero():  # one buffer per field, so that a jitted loop may donate each of them
            return jnp.zeros((batch,), jnp.int32)

        keys = values if key_layout == "slots" else (batch, c.num_kv_heads, c.head_dim, size)
        return KVCache(keys=per_layer(keys, dtype), values=per_layer(values, dtype),
                       key_scale=scale(), value_scale=scale(), start=zero(), positions=zero(),
                       index=zero(), key_layout=key_layout, dtype=jnp.dtype(c.compute_dtype).name)

    def init_paged_cache(self, batch: int, size: int, kv_pages: int, kv_page_slots: int,
                         int8_cache: bool = False, key_layout: str | None = None,
                         scan_layers: bool = False) -> KVCache:
        """An empty paged cache of `batch` rows of `size` slots over a pool of `kv_pages` pages
        of `kv_page_slots` slots (per layer, values [kv_pages, K, kv_page_slots, D] and keys in
        `key_layout`, as `init_cache` lays out a row; the layers' arrays stacked if
        `scan_layers`);
        every entry of the page table is page 0, which whoever fills the table keeps as
        scratch (`jaxlab.sampling.paging`)."""
        require(size % kv_page_slots == 0, f"the cache size {size} must be a multiple of the "
                f"page size kv_page_slots={kv_page_slots}")
        pool = self.init_cache(kv_pages, kv_page_slots, int8_cache, key_layout, scan_layers)
        zero = functools.partial(jnp.zeros, (batch,), jnp.int32)
        return pool.replace(start=zero(), positions=zero(), index=zero(),
                            pages=jnp.zeros((batch, size // kv_page_slots), jnp.int32))

    # ---------------------------------------------------------------- internals

    @staticmethod
    def _mask(input_ids, attention_mask):
        """bool [B, T]: the real tokens (all of them when no mask is given)."""
        if attention_mask is None:
            return jnp.ones(input_ids.shape, bool)
        return jnp.asarray(attention_mask).astype(bool)

    def _layers(self, input_ids, positions, attend, carry=None, *,
                layer_stack: LayerStack | None = None, remat: str = "none",
                sharding: jax.sharding.Sharding | None = None):
        """The layer stack and final norm over input_ids [B, T] at positions [B, T]:
        (hidden [B, T, E], carry). Layer i's attention calls attend(i, q, k, v, carry) ->
        (attended, carry): the carry (a cache's arrays, or None) threads through the layers.

        Unrolled, layer by layer (i a Python int), unless a `layer_stack` is given or
        remat is not "none": then the layers run in one `lax.scan` over the stacked parameters
        (i traced; compiled once whatever the depth), each step under the
        `REMAT_POLICIES[remat]` checkpoint policy. The scan is also what bounds a checkpointed
        pass's memory: the backward scan recomputes one layer at a time, where with the layers
        unrolled XLA may schedule every layer's recomputation before the backward pass needs it
        (measured on the CPU backend: no memory saved at all). The activations between layers
        are constrained to `sharding` when given."""
        inv_freq = jnp.asarray(self.config.rope.inv_freq(self.config.head_dim), jnp.float32)
        angles = positions[..., None].astype(jnp.float32) * inv_freq             # [B, T, D/2]
        angles = jnp.concatenate([angles, angles], axis=-1)
        cos, sin = (jnp.cos(angles).astype(self.config.compute_dtype),
                    jnp.sin(angles).astype(self.config.compute_dtype))

        def constrain(x):
            return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)

        def run(layer, i, x, carry):
            def attend_i(q, k, v):
                return attend(i, q, k, v, carry)
            x, carry = layer(constrain(x), cos, sin, attend_i)
            return constrain(x), carry

        x = constrain(self.embed_tokens(input_ids))
        if layer_stack is None and remat == "none":
            for i, layer in enumerate(self.layers):
                x, carry = run(layer, i, x, carry)
            return self.norm(x), carry
        if layer_stack is None:
            layer_stack = self.layer_stack()

        def step(state, layer_params):
            params, i = layer_params
            return run(nnx.merge(layer_stack.graphdef, params), i, *state), None

        if remat != "none":
            step = jax.checkpoint(step, policy=REMAT_POLICIES[remat])
        (x, carry), _ = jax.lax.scan(step, (x, carry),
                                     (layer_stack.params, jnp.arange(len(self.layers))))
        return self.norm(x), carry

    def check_tokens(self, ids) -> None:
        """Token ids outside the vocabulary are an error (checked when the ids are concrete)."""
        if isinstance(ids, jax.core.Tracer):
            return
        ids = np.asarray(ids)
        bad = (ids < 0) | (ids >= self.config.vocab_size)
        if bad.any():
            where = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(f"token id {int(ids[where])} at {where} is outside the vocabulary "
                             f"[0, {self.config.vocab_size})")


def _causal(mask):
    """bool [B, T, T]: query t sees key s iff s <= t and s is a real token (mask [B, T])."""
    t = mask.shape[1]
    return mask[:, None, :] & (jnp.arange(t)[None, :] <= jnp.arange(t)[:, None])
