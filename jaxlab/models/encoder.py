"""A BERT-family text encoder in Flax NNX, and a batched sentence encoder on top of it.

The architecture of BERT (Devlin et al. 2019) as Hugging Face's `BertModel` computes it, float32:
word + absolute position + token-type embeddings and LayerNorm, then post-LN layers
  x = LN(x + Attention(x)),  x = LN(x + W_2 GELU(W_1 x)),
with exact (erf) GELU and attention masked to the real tokens. Sentence embeddings are the mean of
the last hidden states over the real tokens, L2-normalized (sentence-transformers' mean pooling +
Normalize, e.g. all-MiniLM-L6-v2):
  e = h / max(|h|, 1e-12),  h = sum_t mask_t x_t / max(sum_t mask_t, 1e-9).

`SentenceEncoder` tokenizes, sorts texts by length and runs fixed-size batches padded to a few
bucket lengths (multiples of 32 tokens), so a whole corpus compiles at most len(buckets)
shapes. Loading real weights lives in `jaxlab.models.hf`.

Shapes: B batch, L tokens, H hidden size, N heads, F feed-forward size.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from jaxlab.config import require, require_positive_ints

log = logging.getLogger("jaxlab")


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Static shape of a BERT-family encoder (defaults: all-MiniLM-L6-v2)."""

    vocab_size: int = 30522
    hidden_size: int = 384          # H
    num_layers: int = 6
    num_heads: int = 12             # N; H must be a multiple of N
    intermediate_size: int = 1536   # F
    max_position_embeddings: int = 512  # longest input, in tokens
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    def __post_init__(self):
        require_positive_ints(self, "vocab_size", "hidden_size", "num_layers", "num_heads",
                              "intermediate_size", "max_position_embeddings",
                              "type_vocab_size")
        require(self.hidden_size % self.num_heads == 0,
                f"EncoderConfig.hidden_size={self.hidden_size} must be a multiple of "
                f"num_heads={self.num_heads}")
        require(self.layer_norm_eps > 0, f"EncoderConfig.layer_norm_eps must be > 0, got "
                                         f"{self.layer_norm_eps!r}")


def _layer_norm(config: EncoderConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # exact variance (the fast E[x^2] - E[x]^2 form loses digits that parity needs)
    return nnx.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps,
                         use_fast_variance=False, rngs=rngs)


class Embeddings(nnx.Module):
    def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
        self.word = nnx.Embed(config.vocab_size, config.hidden_size, rngs=rngs)
        self.position = nnx.Embed(config.max_position_embeddings, config.hidden_size,
                                  rngs=rngs)
        self.token_type = nnx.Embed(config.type_vocab_size, config.hidden_size, rngs=rngs)
        self.norm = _layer_norm(config, rngs)

    def __call__(self, ids: jax.Array, token_types: jax.Array) -> jax.Array:
        """ids, token_types: int [B, L] -> [B, L, H]."""
        positions = jnp.arange(ids.shape[1])                              # [L]
        x = self.word(ids) + self.position(positions)[None] + self.token_type(token_types)
        return self.norm(x)


class SelfAttention(nnx.Module):
    def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
        h = config.hidden_size
        self.num_heads = config.num_heads
        self.query, self.key, self.value, self.out = (nnx.Linear(h, h, rngs=rngs)
                                                      for _ in range(4))

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """softmax(Q K^T / sqrt(d_head) over real keys) V, heads concatenated, projected.

        x: [B, L, H]; mask: bool [B, L] (True: a real token) -> [B, L, H].
        """
        b, length, h = x.shape
        split = lambda y: y.reshape(b, length, self.num_heads, h // self.num_heads)
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))  # [B, L, N, h/N]
        logits = jnp.einsum("bqnd,bknd->bnqk", q, k) / math.sqrt(h // self.num_heads)
        logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(logits.dtype).min)
        weights = jax.nn.softmax(logits, axis=-1)                         # [B, N, L, L]
        context = jnp.einsum("bnqk,bknd->bqnd", weights, v).reshape(b, length, h)
        return self.out(context)


class Layer(nnx.Module):
    def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
        self.attention = SelfAttention(config, rngs=rngs)
        self.attention_norm = _layer_norm(config, rngs)
        self.intermediate = nnx.Linear(config.hidden_size, config.intermediate_size, rngs=rngs)
        self.output = nnx.Linear(config.intermediate_size, config.hidden_size, rngs=rngs)
        self.output_norm = _layer_norm(config, rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """Post-LN: x = LN(x + Attn(x)); x = LN(x + W_2 GELU(W_1 x)). [B, L, H] -> [B, L, H]."""
        x = self.attention_norm(x + self.attention(x, mask))
        ffn = self.output(jax.nn.gelu(self.intermediate(x), approximate=False))  # [B, L, H]
        return self.output_norm(x + ffn)


class Encoder(nnx.Module):
    """BERT's encoder stack: token ids -> contextual hidden states."""

    def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embeddings = Embeddings(config, rngs=rngs)
        self.layers = nnx.List([Layer(config, rngs=rngs) for _ in range(config.num_layers)])

    def __call__(self, ids: jax.Array, mask: jax.Array,
                 token_types: jax.Array | None = None) -> jax.Array:
        """ids: int [B, L]; mask: [B, L] (nonzero: real token); token_types: int [B, L]
        (default 0) -> hidden states [B, L, H]."""
        mask = mask.astype(bool)
        x = self.embeddings(ids, jnp.zeros_like(ids) if token_types is None else token_types)
        for layer in self.layers:
            x = layer(x, mask)
        return x


def mean_pool(hidden: jax.Array, mask: jax.Array) -> jax.Array:
    """sum_t mask_t x_t / max(sum_t mask_t, 1e-9): [B, L, H], [B, L] -> [B, H]."""
    mask = mask.astype(hidden.dtype)[..., None]                          # [B, L, 1]
    return jnp.sum(hidden * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1e-9)


def l2_normalize(x: jax.Array) -> jax.Array:
    """x / max(|x|, 1e-12) along the last axis."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def sentence_embeddings(model: Encoder, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean-pooled, L2-normalized sentence embeddings: [B, L] ids and mask -> [B, H]."""
    return l2_normalize(mean_pool(model(ids, mask), mask))


@functools.partial(jax.jit, static_argnums=0)
def _embed_batch(graphdef: nnx.GraphDef, state: nnx.State, ids: jax.Array,
                 mask: jax.Array) -> jax.Array:
    return sentence_embeddings(nnx.merge(graphdef, state), ids, mask)


def bucket_lengths(max_length: int, step: int = 32) -> tuple[int, ...]:
    """Padded lengths a batch may take: multiples of `step` below max_length, then max_length
    (at most ceil(max_length / step) compiled shapes; padding adds fewer than `step` tokens)."""
    return (*range(step, max_length, step), max_length)


class SentenceEncoder:
    """Texts -> unit embeddings [N, H] with a tokenizer and an `Encoder`, in jitted batches of
    `batch_size` texts sorted by length and padded to `bucket_lengths(max_length, bucket_step)`.

    Texts longer than `max_length` tokens are cut to it, as sentence-transformers does (its
    max_seq_length); how many were cut is logged as a warning.
    """

    def __init__(self, model: Encoder, tokenizer, max_length: int, batch_size: int = 64,
                 bucket_step: int = 32):
        require(1 <= max_length <= model.config.max_position_embeddings,
                f"max_length must lie in [1, {model.config.max_position_embeddings}], got "
                f"{max_length}")
        require(batch_size >= 1, f"batch_size must be >= 1, got {batch_size}")
        self.graphdef, self.state = nnx.split(model)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.buckets = bucket_lengths(max_length, bucket_step)
        self.dim = model.config.hidden_size

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids with [CLS] ... [SEP], at most max_length each."""
        ids = self.tokenizer(list(texts), add_special_tokens=True)["input_ids"]
        long = [i for i, row in enumerate(ids) if len(row) > self.max_length]
        if long:
            log.warning("%d of %d texts exceed %d tokens and are truncated (e.g. text %d, %d "
                        "tokens)", len(long), len(texts), self.max_length, long[0],
                        len(ids[long[0]]))
            cut = self.tokenizer([texts[i] for i in long], add_special_tokens=True,
                                 truncation=True, max_length=self.max_length)["input_ids"]
            for i, row in zip(long, cut, strict=True):
                ids[i] = row
        return ids

    def encode(self, texts: Sequence[str], progress: str | None = None) -> np.ndarray:
        """float32 [N, H] unit embeddings, in the order of `texts` (progress: a bar label)."""
        require(len(texts) > 0, "encode needs at least one text")
        ids = self.tokenize(texts)
        order = np.argsort([len(row) for row in ids], kind="stable")
        out = np.zeros((len(texts), self.dim), np.float32)                # [N, H]
        starts = range(0, len(texts), self.batch_size)
        pending = None  # the batch in flight: its result is fetched once the next one is queued
        for start in tqdm(starts, desc=progress, unit="batch", disable=progress is None,
                          dynamic_ncols=True):
            rows = order[start:start + self.batch_size]
            batch_ids, batch_mask = self._pad([ids[i] for i in rows])     # [B, L_bucket]
            queued = (rows, _embed_batch(self.graphdef, self.state, batch_ids, batch_mask))
            if pending is not None:
                _fetch(out, *pending)
            pending = queued
        _fetch(out, *pending)
        return out

    def _pad(self, rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Rows padded to batch_size x the smallest bucket that holds the longest one."""
        length = next(b for b in self.buckets if b >= max(len(r) for r in rows))
        ids = np.zeros((self.batch_size, length), np.int32)
        mask = np.zeros((self.batch_size, length), np.int32)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = row
            mask[i, :len(row)] = 1
        return ids, mask


def _fetch(out: np.ndarray, rows: np.ndarray, embeddings: jax.Array) -> None:
    """Copies a batch's embeddings [B, H] (padding rows past len(rows) dropped) into out[rows]."""
    out[rows] = np.asarray(embeddings)[:len(rows)]
