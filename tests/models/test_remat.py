"""Remat per decoder layer: the same values and gradients under every policy, less memory kept."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlab.models.decoder import REMAT_POLICIES, Decoder, DecoderConfig
from jaxlab.rl import train

CONFIG = DecoderConfig(family="qwen3", vocab_size=128, hidden_size=32, intermediate_size=64,
                       num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, qk_norm=True)


def _loss_fn(remat: str):
    graphdef, params = nnx.split(Decoder(CONFIG, nnx.Rngs(0)), nnx.Param)

    def loss(params, tokens, mask):
        hidden = nnx.merge(graphdef, params).hidden(tokens, mask, remat=remat)  # [B, T, E]
        weights = jnp.cos(jnp.arange(hidden.size, dtype=jnp.float32)).reshape(hidden.shape)
        return jnp.sum(weights * hidden * mask[..., None])

    return loss, params


def _batch(batch=3, length=10):
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, CONFIG.vocab_size, (batch, length)), jnp.int32)
    mask = np.ones((batch, length), np.int32)
    mask[1, :3] = 0    # left padding
    mask[2, -4:] = 0   # right padding
    return tokens, jnp.asarray(mask)


@functools.cache
def _value_and_grad(remat: str):
    loss, params = _loss_fn(remat)
    return jax.jit(jax.value_and_grad(loss))(params, *_batch())


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_gives_the_values_and_gradients_of_no_remat(remat):
    want, want_grad = _value_and_grad("none")
    got, got_grad = _value_and_grad(remat)
    # float32 throughout; the recomputed forward is fused differently, so the sums round
    # differently: agreement to 1e-6 of the loss and of each gradient's largest entry.
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for g, w in zip(jax.tree.leaves(got_grad), jax.tree.leaves(want_grad), strict=True):
        w = np.asarray(w)
        np.testing.assert_allclose(np.asarray(g), w, rtol=0,
                                   atol=1e-6 * np.max(np.abs(w)) + 1e-12)


def _residual_bytes(remat: str) -> int:
    """Bytes the forward pass keeps for the backward one (the residuals of jax.vjp)."""
    tokens, mask = _batch(length=64)
    loss, params = _loss_fn(remat)
    pullback = jax.jit(lambda p: jax.vjp(lambda p: loss(p, tokens, mask), p)[1])(params)
    kept = [x for x in jax.tree.leaves(pullback) if isinstance(x, jax.Array)]
    return sum(x.nbytes for x in kept)


def test_full_remat_keeps_less_than_dots_which_keeps_less_than_none():
    none, dots, full = (_residual_bytes(r) for r in ("none", "dots", "full"))
    assert full < dots < none, (full, dots, none)


def test_an_unknown_policy_is_named():
    tokens, mask = _batch()
    with pytest.raises(ValueError, match="remat='some'"):
        Decoder(CONFIG, nnx.Rngs(0)).hidden(tokens, mask, remat="some")
    with pytest.raises(ValueError, match=r"TrainConfig\.remat must be one of"):
        train.TrainConfig(remat="some")
    assert set(REMAT_POLICIES) == {"none", "full", "dots"}
