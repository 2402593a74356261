import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.rl import losses

# Two sequences with advantages +1 and -1; the four tokens have ratios 1.5, 0.5, 1.0 and 5.0.
RATIOS = np.array([1.5, 0.5, 1.0, 5.0], np.float32)
LOGP = jnp.log(jnp.asarray(np.stack([RATIOS, RATIOS])))
OLD = jnp.zeros((2, 4))
ADV = jnp.array([1.0, -1.0])


def test_ppo_clip_hand_computed():
    # A = +1: -min(r, clip(r, 0.8, 1.2)); A = -1: -min(-r, -clip(r, 0.8, 1.2)).
    got = losses.ppo_clip(LOGP, OLD, ADV)
    np.testing.assert_allclose(got, [[-1.2, -0.5, -1.0, -1.2], [1.5, 0.8, 1.0, 5.0]], rtol=1e-6)
    # The dual clip bounds the loss of negative advantages by -c A = 3.
    got = losses.ppo_clip(LOGP, OLD, ADV, dual_clip=3.0)
    np.testing.assert_allclose(got, [[-1.2, -0.5, -1.0, -1.2], [1.5, 0.8, 1.0, 3.0]], rtol=1e-6)
    # Asymmetric bounds (clip-higher): the ratio may rise to 1.28.
    got = losses.ppo_clip(LOGP, OLD, ADV, clip_low=0.2, clip_high=0.28)
    np.testing.assert_allclose(got[0], [-1.28, -0.5, -1.0, -1.28], rtol=1e-6)


def test_ppo_clip_gradient_hand_computed():
    # d l / d logp = -A r where the unclipped term is the minimum, 0 where the clip is active.
    grad = jax.grad(lambda lp: jnp.sum(losses.ppo_clip(lp, OLD, ADV, dual_clip=3.0)))(LOGP)
    np.testing.assert_allclose(grad, [[0, -0.5, -1.0, 0], [1.5, 0, 1.0, 0]], rtol=1e-6)
    grad_old = jax.grad(lambda old: jnp.sum(losses.ppo_clip(LOGP, old, ADV)))(OLD)
    np.testing.assert_array_equal(grad_old, 0.0)  # the sampling policy is a constant


def test_clipped_fraction_hand_computed():
    np.testing.assert_array_equal(losses.clipped_fraction(LOGP, OLD), [[1, 1, 0, 1]] * 2)
    np.testing.assert_array_equal(losses.clipped_fraction(LOGP, OLD, clip_low=0.6, clip_high=3),
                                  [[0, 0, 0, 1]] * 2)


def test_kl_estimators_hand_computed():
    logp, ref = jnp.log(0.5), jnp.log(0.25)
    np.testing.assert_allclose(losses.kl_k1(logp, ref), math.log(2), rtol=1e-6)
    np.testing.assert_allclose(losses.kl_k3(logp, ref), 0.5 + math.log(2) - 1, rtol=1e-6)
    assert losses.kl_k3(logp, logp) == 0.0


def test_kl_estimators_are_unbiased():
    p = np.array([0.5, 0.3, 0.15, 0.05])
    q = np.array([0.25, 0.25, 0.25, 0.25])
    exact = float(np.sum(p * np.log(p / q)))
    samples = jax.random.categorical(jax.random.key(0), jnp.log(p), shape=(400_000,))
    logp, ref = jnp.log(p)[samples], jnp.log(q)[samples]
    for estimator in losses.KL_ESTIMATORS.values():
        np.testing.assert_allclose(jnp.mean(estimator(logp, ref)), exact, rtol=0.01)
    assert jnp.all(losses.kl_k3(logp, ref) >= 0)


def test_token_logprobs_and_entropy_match_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 7)).astype(np.float32) * 3
    targets = rng.integers(0, 7, (3, 5))
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = np.log(np.take_along_axis(p, targets[..., None], -1))[..., 0]
    np.testing.assert_allclose(losses.token_logprobs(logits, targets), want, rtol=1e-5)
    np.testing.assert_allclose(losses.entropy(logits), -(p * np.log(p)).sum(-1), rtol=1e-5)
    np.testing.assert_allclose(losses.entropy(jnp.zeros((1, 1, 8))), [[math.log(8)]], rtol=1e-6)


X = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = jnp.array([[1, 1, 0], [0, 0, 1]])


def test_aggregations_hand_computed():
    np.testing.assert_allclose(losses.token_mean(X, MASK), (1 + 2 + 6) / 3)
    np.testing.assert_allclose(losses.sequence_mean(X, MASK), ((1 + 2) / 2 + 6) / 2)
    # An empty sequence does not count in the sequence mean.
    mask = MASK.at[1].set(0)
    np.testing.assert_allclose(losses.sequence_mean(X, mask), 1.5)


@pytest.mark.parametrize("aggregate", [losses.token_mean, losses.sequence_mean])
def test_empty_mask_gives_zero_and_finite_gradients(aggregate):
    empty = jnp.zeros((2, 4))

    def loss(lp):
        per_token = (losses.ppo_clip(lp, OLD, ADV, dual_clip=3.0)
                     + losses.kl_k3(lp, OLD) + losses.kl_k1(lp, OLD))
        return aggregate(per_token, empty)

    value, grad = jax.value_and_grad(loss)(LOGP)
    assert value == 0.0
    np.testing.assert_array_equal(grad, 0.0)


def test_split_batch_aggregation_is_exact():
    # Summing weighted parts and dividing by the whole count gives the whole-batch mean.
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, 5)).astype(np.float32)
    mask = (rng.random((6, 5)) < 0.5).astype(np.float32)
    for name, weights_fn in losses.AGGREGATIONS.items():
        _, count = weights_fn(mask)
        parts = sum(jnp.sum(weights_fn(mask[i:i + 2])[0] * x[i:i + 2]) for i in range(0, 6, 2))
        want = {"token_mean": losses.token_mean, "sequence_mean": losses.sequence_mean}[name]
        np.testing.assert_allclose(parts / count, want(x, mask), rtol=1e-6)


def _numpy_policy_loss(logits, targets, old, ref, adv, mask, c):
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    logp = np.log(np.take_along_axis(p, targets[..., None], -1))[..., 0]
    ratio = np.exp(logp - old)
    a = adv[:, None]
    ppo = -np.minimum(ratio * a, np.clip(ratio, 1 - c.clip_low, 1 + c.clip_high) * a)
    kl = np.exp(ref - logp) - (ref - logp) - 1
    ent = -(p * np.log(p)).sum(-1)
    per_token = ppo + c.kl_coef * kl - c.entropy_coef * ent
    return (per_token * mask).sum() / mask.sum()


def test_policy_loss_matches_numpy():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(4, 6, 9)).astype(np.float32)
    targets = rng.integers(0, 9, (4, 6))
    old = np.log(rng.uniform(0.05, 0.3, (4, 6))).astype(np.float32)
    ref = np.log(rng.uniform(0.05, 0.3, (4, 6))).astype(np.float32)
    adv = rng.normal(size=4).astype(np.float32)
    mask = (rng.random((4, 6)) < 0.7).astype(np.float32)
    config = losses.PolicyLossConfig(clip_low=0.2, clip_high=0.28, kl_coef=0.05,
                                     entropy_coef=0.01)
    logp, ent = losses.token_logprobs(logits, targets), losses.entropy(logits)
    per_token, terms = jax.jit(losses.policy_loss_per_token, static_argnums=5)(
        logp, ent, old, adv, ref, config)
    want = _numpy_policy_loss(logits, targets, old, ref, adv, mask, config)
    np.testing.assert_allclose(losses.token_mean(per_token, mask), want, rtol=1e-5)
    assert set(terms) == {"policy", "kl", "entropy", "clipped"}
    _, terms = losses.policy_loss_per_token(logp, ent, old, adv, None, losses.PolicyLossConfig())
    assert "kl" not in terms


@pytest.mark.parametrize("chunk", [1, 3, 4, 64])
def test_head_logprobs_in_chunks_equal_full_logits(chunk):
    """Chunked log-probs, entropies and their gradients equal those of the full [B, T, V]
    logits at a temperature, for chunk sizes that do and do not divide T."""
    rng = np.random.default_rng(5)
    hidden = jnp.asarray(rng.normal(size=(3, 7, 6)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(6, 11)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 11, (3, 7)))
    weights = jnp.asarray(rng.normal(size=(2, 3, 7)), jnp.float32)

    def full(h, w):
        logits = (h @ w) / 0.6
        return losses.token_logprobs(logits, targets), losses.entropy(logits)

    def chunked(h, w):
        return losses.head_logprobs(h, w, targets, temperature=0.6, chunk=chunk,
                                    entropy_grad=True)

    for got, want in zip(chunked(hidden, kernel), full(hidden, kernel), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

    def objective(fn):
        return lambda h, w: sum(jnp.sum(c * x) for c, x in zip(weights, fn(h, w), strict=True))

    grads = jax.grad(objective(chunked), argnums=(0, 1))(hidden, kernel)
    want = jax.grad(objective(full), argnums=(0, 1))(hidden, kernel)
    for got, w in zip(grads, want, strict=True):
        np.testing.assert_allclose(got, w, rtol=1e-4, atol=1e-5)
    # Without entropy_grad the entropy is a metric: only the log-probs carry a gradient.
    no_entropy = jax.grad(lambda h: jnp.sum(losses.head_logprobs(
        h, kernel, targets, temperature=0.6, chunk=chunk)[1]))(hidden)
    assert not np.any(no_entropy)


def test_head_logprobs_hold_no_batch_time_vocab_array():
    """The compiled gradient of chunked log-probs keeps its temporaries near [B, chunk, V]
    float32, far below one [B, T, V] float32 array (XLA's memory analysis)."""
    b, t, e, v, chunk = 2, 1024, 32, 4096, 128

    def loss(h, w, y):
        return jnp.sum(losses.head_logprobs(h, w, y, chunk=chunk)[0])

    args = (jax.ShapeDtypeStruct((b, t, e), jnp.float32),
            jax.ShapeDtypeStruct((e, v), jnp.float32), jax.ShapeDtypeStruct((b, t), jnp.int32))
    memory = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args).compile().memory_analysis()
    assert memory.temp_size_in_bytes < b * t * v * 4 / 2


def test_losses_vmap_over_an_extra_axis():
    logp = jnp.stack([LOGP, LOGP * 0.5])
    adv = jnp.stack([ADV, -ADV])
    first_row = jnp.array([[1, 1, 1, 1], [0, 0, 0, 0]])

    def loss(lp, a):
        return losses.token_mean(losses.ppo_clip(lp, OLD, a, dual_clip=2.0), first_row)

    want = [loss(logp[i], adv[i]) for i in range(2)]
    np.testing.assert_allclose(jax.jit(jax.vmap(loss))(logp, adv), want, rtol=1e-6)


@pytest.mark.parametrize("field,value", [
    ("clip_low", 1.0), ("clip_high", -0.1), ("dual_clip", 1.0), ("kl_coef", -1.0),
    ("entropy_coef", -0.1), ("kl_estimator", "k2"), ("aggregation", "sum")])
def test_bad_loss_config_is_named(field, value):
    with pytest.raises(ValueError, match=field):
        losses.PolicyLossConfig(**{field: value})


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="advantages"):
        losses.ppo_clip(LOGP, OLD, jnp.zeros(3))
    with pytest.raises(ValueError, match="old_logp"):
        losses.ppo_clip(LOGP, OLD[:, :3], ADV)
    with pytest.raises(ValueError, match="targets"):
        losses.token_logprobs(jnp.zeros((2, 4, 5)), jnp.zeros((2, 3), jnp.int32))
    with pytest.raises(ValueError, match="ref_logp"):
        losses.policy_loss_per_token(LOGP, LOGP, OLD, ADV, None,
                                     losses.PolicyLossConfig(kl_coef=0.1))
    with pytest.raises(ValueError, match="entropy"):
        losses.policy_loss_per_token(LOGP, LOGP[:, :2], OLD, ADV, None,
                                     losses.PolicyLossConfig())
    with pytest.raises(ValueError, match="targets"):
        losses.head_logprobs(jnp.zeros((2, 4, 3)), jnp.zeros((3, 5)), jnp.zeros((2, 3), int))
