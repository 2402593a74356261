"""Token-level policy losses over `[batch, time]` arrays (section 2, step 5 of
`papers/writing_zero.md`: PPO-clip on token log-prob ratios, optional KL to a reference policy,
token-level averaging).

Per-token terms (`ppo_clip`, `kl_k1`, `kl_k3`, `entropy`) are combined by `policy_loss_per_token`
and reduced by an aggregation. An aggregation is a weighting: `weights [B, T]` and a `count`, the
loss being sum(weights * x) / count. Written this way a loss over a batch split across devices
(or micro-batches) is exact: each part sums its weighted terms and divides by the count of the
whole batch. Every function stays finite when a mask is empty (the loss is then 0).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxlab.config import require


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log pi(target_t | context_t) in float32.

    Args:
      logits: [B, T, V], the model's next-token logits at each position.
      targets: int [B, T], the token that followed each position.
    Returns:
      float32 [B, T].
    """
    require(logits.shape[:-1] == targets.shape,
            f"logits {logits.shape} and targets {targets.shape} must agree on [B, T]")
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)      # [B, T, V]
    return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def entropy(logits: jax.Array) -> jax.Array:
    """H_t = -sum_v pi(v | context_t) log pi(v | context_t). float32 [B, T] from [B, T, V]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def head_logprobs(hidden: jax.Array, unembedding: jax.Array, targets: jax.Array, *,
                  temperature: float = 1.0, chunk: int = 512, entropy_grad: bool = False,
                  ) -> tuple[jax.Array, jax.Array]:
    """Token log-probs and entropies of the tempered policy pi_T = softmax(h W / T), without a
    [B, T, V] array:

      logp_t = z_t[target_t] - logsumexp(z_t),   H_t = logsumexp(z_t) - sum_v pi_T(v) z_t[v]
      with z_t = h_t W / T in float32.

    The sequence runs in chunks of `chunk` positions (`lax.map`); each chunk's logits are
    recomputed in the backward pass (`jax.checkpoint`), so at most [B, chunk, V] float32 logits
    and their softmax live at once, forward or backward. A sequence of at most `chunk`
    positions is one chunk, computed once and kept for the backward pass. The entropy is
    differentiated only with `entropy_grad` (an entropy bonus); otherwise it is a metric under
    stop_gradient.

    Args:
      hidden: [B, T, E], the model's final hidden states (`Decoder.hidden`).
      unembedding: [E, V], the output head (`Decoder.unembedding`).
      targets: int [B, T], the token that followed each position.
      temperature: the sampling temperature T > 0 (1: the raw distribution).
    Returns:
      logp, entropy: float32 [B, T] each.
    """
    b, t, _ = hidden.shape
    require(targets.shape == (b, t),
            f"hidden {hidden.shape} and targets {targets.shape} must agree on [B, T]")
    require(temperature > 0, f"temperature must be > 0, got {temperature}")
    chunk = min(chunk, t)
    pad = -t % chunk

    def one(w, h, y):                                       # h [B, c, E], y [B, c]
        z = jnp.dot(h, w.astype(h.dtype), preferred_element_type=jnp.float32) / temperature
        lse = jax.nn.logsumexp(z, axis=-1)                                    # [B, c]
        logp = jnp.take_along_axis(z, y[..., None], axis=-1)[..., 0] - lse
        z_h = z if entropy_grad else jax.lax.stop_gradient(z)
        lse_h = lse if entropy_grad else jax.lax.stop_gradient(lse)
        ent = lse_h - jnp.sum(jnp.exp(z_h - lse_h[..., None]) * z_h, axis=-1)
        return logp, ent

    def split(x):                                           # [B, T, ...] -> [n, B, c, ...]
        x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(b, -1, chunk, *x.shape[2:]), 1, 0)

    if chunk == t:  # one chunk: keeping its logits for the backward pass costs no more
        return one(unembedding, hidden, targets)
    one = jax.checkpoint(one)
    logp, ent = jax.lax.map(lambda xs: one(unembedding, *xs), (split(hidden), split(targets)))
    return tuple(jnp.moveaxis(x, 0, 1).reshape(b, -1)[:, :t] for x in (logp, ent))


def ppo_clip(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, *,
             clip_low: float = 0.2, clip_high: float = 0.2,
             dual_clip: float | None = None) -> jax.Array:
    """Per-token PPO-clip loss (Schulman et al. 2017; asymmetric bounds as in DAPO; dual clip of
    Ye et al. 2020):

      rho_t = exp(logp_t - old_logp_t)
      l_t = -min(rho_t A, clip(rho_t, 1 - clip_low, 1 + clip_high) A)
      with dual_clip = c > 1, for A < 0:  l_t = min(l_t, -c A)

    Args:
      logp, old_logp: [B, T], log-probs of the sampled tokens under the current and the sampling
        policy (no gradient flows into old_logp).
      advantages: [B], one per sequence, broadcast to its tokens.
    Returns:
      float32 [B, T], the loss of every token (mask it with an aggregation).
    """
    require(logp.shape == old_logp.shape,
            f"logp {logp.shape} and old_logp {old_logp.shape} must have equal shapes")
    require(advantages.shape == logp.shape[:1],
            f"advantages must have shape [B]={logp.shape[:1]}, got {advantages.shape}")
    advantages = advantages.astype(jnp.float32)[:, None]                 # [B, 1]
    ratio = jnp.exp(logp - jax.lax.stop_gradient(old_logp))              # [B, T]
    clipped = jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = -jnp.minimum(ratio * advantages, clipped * advantages)
    if dual_clip is not None:
        loss = jnp.where(advantages < 0, jnp.minimum(loss, -dual_clip * advantages), loss)
    return loss


def clipped_fraction(logp: jax.Array, old_logp: jax.Array, *, clip_low: float = 0.2,
                     clip_high: float = 0.2) -> jax.Array:
    """float32 [B, T]: 1 where the ratio lies outside [1 - clip_low, 1 + clip_high]."""
    ratio = jnp.exp(logp - old_logp)
    return ((ratio < 1.0 - clip_low) | (ratio > 1.0 + clip_high)).astype(jnp.float32)


def kl_k1(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    """k1 estimator of KL(pi || pi_ref) on tokens sampled from pi (Schulman 2020):
    k1_t = logp_t - ref_logp_t. Unbiased, can be negative. float32 [B, T]."""
    return logp - ref_logp


def kl_k3(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    """k3 estimator of KL(pi || pi_ref) (Schulman 2020): with d_t = ref_logp_t - logp_t,
    k3_t = exp(d_t) - d_t - 1. Unbiased and >= 0. float32 [B, T]."""
    d = ref_logp - logp
    return jnp.expm1(d) - d


KL_ESTIMATORS: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "k1": kl_k1, "k3": kl_k3}


# --------------------------------------------------------------------------------------------
# Aggregations: (weights [B, T], count []) with loss = sum(weights * x) / count


def token_mean_weights(mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Token mean over the batch: every unmasked token weighs 1, count = number of such tokens."""
    mask = mask.astype(jnp.float32)
    return mask, jnp.sum(mask)


def sequence_mean_weights(mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Sequence mean: each sequence's token mean, averaged over sequences with at least one
    unmasked token (token t of sequence b weighs 1 / n_b; count = number of such sequences)."""
    mask = mask.astype(jnp.float32)
    lengths = jnp.sum(mask, axis=1, keepdims=True)                       # [B, 1]
    return mask / jnp.maximum(lengths, 1.0), jnp.sum(lengths > 0).astype(jnp.float32)


AGGREGATIONS: dict[str, Callable[[jax.Array], tuple[jax.Array, jax.Array]]] = {
    "token_mean": token_mean_weights, "sequence_mean": sequence_mean_weights}


def weighted_mean(x: jax.Array, weights: jax.Array, count: jax.Array) -> jax.Array:
    """sum(weights * x) / max(count, 1): [] float32; 0 when nothing is weighted. Masked positions
    of x may hold anything finite."""
    require(x.shape == weights.shape, f"x {x.shape} and weights {weights.shape} must match")
    return jnp.sum(weights * x) / jnp.maximum(count, 1.0)


def token_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """sum_{b,t} mask x / sum_{b,t} mask (0 for an empty mask). [] float32."""
    return weighted_mean(x, *token_mean_weights(mask))


def sequence_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """mean over non-empty sequences b of (sum_t mask x / sum_t mask). [] float32."""
    return weighted_mean(x, *sequence_mean_weights(mask))


# --------------------------------------------------------------------------------------------
# The policy loss


@dataclasses.dataclass(frozen=True)
class PolicyLossConfig:
    """Settings of the token-level policy loss (hashable: a static argument of compiled steps)."""

    clip_low: float = 0.2            # ratio clipped below at 1 - clip_low
    clip_high: float = 0.2           # ... and above at 1 + clip_high
    dual_clip: float | None = None   # c > 1 bounds the loss of negative-advantage tokens by -c A
    kl_coef: float = 0.0             # weight of the KL to the reference policy (0: no KL)
    kl_estimator: str = "k3"         # one of KL_ESTIMATORS
    entropy_coef: float = 0.0        # weight of the entropy bonus
    aggregation: str = "token_mean"  # one of AGGREGATIONS

    def __post_init__(self):
        require(0 <= self.clip_low < 1, f"PolicyLossConfig.clip_low must lie in [0, 1), got "
                                        f"{self.clip_low}")
        require(self.clip_high >= 0, f"PolicyLossConfig.clip_high must be >= 0, got "
                                     f"{self.clip_high}")
        require(self.dual_clip is None or self.dual_clip > 1,
                f"PolicyLossConfig.dual_clip must be None or > 1, got {self.dual_clip}")
        require(self.kl_coef >= 0, f"PolicyLossConfig.kl_coef must be >= 0, got {self.kl_coef}")
        require(self.entropy_coef >= 0,
                f"PolicyLossConfig.entropy_coef must be >= 0, got {self.entropy_coef}")
        require(self.kl_estimator in KL_ESTIMATORS,
                f"PolicyLossConfig.kl_estimator must be one of {list(KL_ESTIMATORS)}, got "
                f"{self.kl_estimator!r}")
        require(self.aggregation in AGGREGATIONS,
                f"PolicyLossConfig.aggregation must be one of {list(AGGREGATIONS)}, got "
                f"{self.aggregation!r}")


def policy_loss_per_token(logp: jax.Array, entropy: jax.Array, old_logp: jax.Array,
                          advantages: jax.Array, ref_logp: jax.Array | None,
                          config: PolicyLossConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The per-token objective of the writer policy:

      l_t = ppo_clip_t + kl_coef * kl_t - entropy_coef * H_t

    Args:
      logp: [B, T] log-probs of the sampled tokens under the current policy; entropy: [B, T] its
        entropies (`head_logprobs` gives both; `token_logprobs` and `entropy` from logits).
      old_logp: [B, T] log-probs of the targets under the sampling policy.
      advantages: [B]. ref_logp: [B, T] under the reference policy (needed when kl_coef > 0).
    Returns:
      l [B, T] and the per-token terms {"policy", "entropy", "clipped", and "kl" when ref_logp
      is given} ([B, T] each) to be reduced with the same aggregation.
    """
    require(entropy.shape == logp.shape,
            f"entropy {entropy.shape} and logp {logp.shape} must have equal shapes")
    terms = {
        "policy": ppo_clip(logp, old_logp, advantages, clip_low=config.clip_low,
                           clip_high=config.clip_high, dual_clip=config.dual_clip),
        "entropy": entropy,
        "clipped": clipped_fraction(jax.lax.stop_gradient(logp), old_logp,
                                    clip_low=config.clip_low, clip_high=config.clip_high),
    }
    loss = terms["policy"]
    if config.entropy_coef > 0:
        loss = loss - config.entropy_coef * entropy
    require(ref_logp is not None or config.kl_coef == 0,
            "ref_logp is needed when kl_coef > 0")
    if ref_logp is not None:  # the KL is a metric even when it is not in the loss
        require(ref_logp.shape == logp.shape,
                f"ref_logp must have the shape of logp {logp.shape}, got {ref_logp.shape}")
        terms["kl"] = KL_ESTIMATORS[config.kl_estimator](logp, ref_logp)
    if config.kl_coef > 0:
        loss = loss + config.kl_coef * terms["kl"]
    return loss, terms
