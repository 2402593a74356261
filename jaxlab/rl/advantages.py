"""Group advantages for policy-gradient training, on `[groups, G]` arrays: G responses sampled for
each of `groups` prompts.

GRPO (the ScalarRM-GRPO baseline, section 3 of `papers/writing_zero.md`), its mean-centred
variant (Dr. GRPO), RLOO, and BRPO (section 2), which compares every response with a reference
drawn from its own group. Every function is pure, jittable and vmappable (an extra leading axis,
e.g. over experiments, vmaps away); randomness comes in as an explicit key.

Non-finite rewards are refused: called on concrete arrays, a function raises ValueError naming the
first group with a NaN or an infinity; traced (under `jit` or `vmap`, where values are unknown),
that group's advantages are NaN, so that the policy step refuses them (`jaxlab.rl.train`) instead
of training on a made-up value.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxlab.config import require


def _check_rewards(rewards: jax.Array) -> None:
    require(rewards.ndim == 2, f"rewards must have shape [groups, G], got {rewards.shape}")
    require(rewards.shape[1] >= 2,
            f"rewards: the group size G must be >= 2 to compare responses, got "
            f"G={rewards.shape[1]}")
    values = _concrete(rewards)
    if values is not None and not np.isfinite(values).all():
        group, response = np.argwhere(~np.isfinite(values))[0]
        raise ValueError(f"rewards of group {group} are not finite (response {response}: "
                         f"{values[group, response]}); rewards must be finite numbers")


def _concrete(x: jax.Array) -> np.ndarray | None:
    """`x`'s values as a NumPy array, or None when they are not known (a tracer)."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _nan_unless_finite(rewards: jax.Array, advantages: jax.Array) -> jax.Array:
    """`advantages` [groups, G], NaN in every group whose rewards are not all finite."""
    finite = jnp.all(jnp.isfinite(rewards), axis=1, keepdims=True)          # [groups, 1]
    return jnp.where(finite, advantages, jnp.nan)


def has_variance(rewards: jax.Array) -> jax.Array:
    """bool [groups]: the group's rewards are not all equal.

    The dynamic-sampling mask (section 1, RL of the GenRM): a group whose rollouts all have the
    same reward carries no signal and is dropped. Exact comparison, so a group of equal rewards
    is degenerate whatever rounding the mean would suffer.
    """
    _check_rewards(rewards)
    return jnp.max(rewards, axis=1) > jnp.min(rewards, axis=1)


def grpo_advantages(rewards: jax.Array, eps: float = 1e-6) -> jax.Array:
    """GRPO's within-group z-score (section 3, ScalarRM-GRPO):

      A_i = (r_i - mean_j r_j) / (std_j r_j + eps)

    with the population std over the G responses of the group; a group of equal (finite)
    rewards gets A = 0 (not NaN).

    Args:
      rewards: [groups, G].
    Returns:
      float32 [groups, G], zero mean and (up to eps) unit std in every group with variance.
    """
    _check_rewards(rewards)
    rewards = rewards.astype(jnp.float32)
    centred = rewards - jnp.mean(rewards, axis=1, keepdims=True)        # [groups, G]
    std = jnp.sqrt(jnp.mean(jnp.square(centred), axis=1, keepdims=True))  # [groups, 1]
    advantages = jnp.where(has_variance(rewards)[:, None], centred / (std + eps), 0.0)
    return _nan_unless_finite(rewards, advantages)


def dr_grpo_advantages(rewards: jax.Array) -> jax.Array:
    """Mean-centred advantages without the std division (Dr. GRPO, Liu et al. 2025):

      A_i = r_i - mean_j r_j                                      float32 [groups, G]
    """
    _check_rewards(rewards)
    rewards = rewards.astype(jnp.float32)
    return _nan_unless_finite(rewards, rewards - jnp.mean(rewards, axis=1, keepdims=True))


def rloo_advantages(rewards: jax.Array) -> jax.Array:
    """REINFORCE leave-one-out (Ahmadian et al. 2024): each response's baseline is the mean reward
    of the other G - 1 responses of its group,

      A_i = r_i - 1/(G-1) sum_{j != i} r_j = G/(G-1) (r_i - mean_j r_j)   float32 [groups, G]
    """
    group_size = rewards.shape[-1]
    return dr_grpo_advantages(rewards) * (group_size / (group_size - 1))


def choose_reference(key: jax.Array, num_groups: int, group_size: int) -> jax.Array:
    """BRPO step 1 (section 2): the index of each group's reference response, uniform over the G
    responses. int32 [groups]."""
    require(group_size >= 2, f"group_size must be >= 2 to have a reference and a response to "
                             f"compare, got {group_size}")
    return jax.random.randint(key, (num_groups,), 0, group_size, dtype=jnp.int32)


def brpo_rewards(wins: jax.Array, ref_index: jax.Array) -> jax.Array:
    """BRPO's bootstrapped rewards (section 2, step 2):

      r_i = +1 if response i beat the reference under every judged condition, else -1
      r_ref = 0

    Ties, inconsistent votes and format failures are losses (-1).

    Args:
      wins: bool [groups, G, conditions], True where response i beat the reference under that
        condition (both orders x votes); the reference's own row is ignored.
      ref_index: int [groups], the reference of each group (`choose_reference`).
    Returns:
      float32 [groups, G] in {-1, 0, +1}, exactly one 0 per group.
    """
    require(wins.ndim == 3 and wins.shape[2] >= 1,
            f"wins must have shape [groups, G, conditions] with conditions >= 1, got {wins.shape}")
    require(wins.dtype == jnp.bool_, f"wins must be boolean, got {wins.dtype}")
    require(wins.shape[1] >= 2, f"wins: the group size G must be >= 2, got G={wins.shape[1]}")
    require(ref_index.shape == wins.shape[:1],
            f"ref_index must have shape [groups]={wins.shape[:1]}, got {ref_index.shape}")
    refs = _concrete(ref_index)
    if refs is not None and ((refs < 0) | (refs >= wins.shape[1])).any():
        group = int(np.flatnonzero((refs < 0) | (refs >= wins.shape[1]))[0])
        raise ValueError(f"ref_index of group {group} is {refs[group]}, outside [0, G="
                         f"{wins.shape[1]}): the group would have no reference")
    won = jnp.where(jnp.all(wins, axis=2), 1.0, -1.0)                     # [groups, G]
    is_ref = jnp.arange(wins.shape[1]) == ref_index[:, None]             # [groups, G]
    return jnp.where(is_ref, 0.0, won).astype(jnp.float32)


def brpo_advantages(wins: jax.Array, ref_index: jax.Array, outlier_threshold: float = 0.6,
                    ) -> tuple[jax.Array, jax.Array]:
    """BRPO advantages and the outlier filter (section 2, steps 3-4):

      A_i = r_i                         (no mean/std normalization; broadcast to every token)
      keep = |sum_i r_i| / G <= outlier_threshold

    A group whose reference was far too weak or too strong (almost every response beat it, or
    lost to it) is dropped.

    Args:
      wins, ref_index: as in `brpo_rewards`.
      outlier_threshold: drop groups with |sum_i r_i| / G above this.
    Returns:
      advantages float32 [groups, G] (= `brpo_rewards`) and keep bool [groups].
    """
    require(0 <= outlier_threshold <= 1,
            f"outlier_threshold must lie in [0, 1], got {outlier_threshold}")
    rewards = brpo_rewards(wins, ref_index)                              # [groups, G]
    imbalance = jnp.abs(jnp.sum(rewards, axis=1)) / rewards.shape[1]     # [groups]
    return rewards, imbalance <= outlier_threshold
