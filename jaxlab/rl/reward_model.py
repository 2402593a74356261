"""The scalar Bradley-Terry reward model of Writing-Zero (section 1 of `papers/writing_zero.md`):
used to filter the GenRM's training pairs and, in the ScalarRM-GRPO baseline, as the writer's
reward (section 3).

    P(y_chosen > y_rejected | x) = sigmoid(r(x, y_chosen) - r(x, y_rejected))
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlab.config import require


class ScalarRewardModel(nnx.Module):
    """r(x, y): a linear head on the backbone's hidden state at the sequence's last real token.

    The backbone is a `jaxlab.models.Decoder` loaded from any causal-LM checkpoint, or any Flax
    NNX module with its method `hidden(tokens int [B, T], mask [B, T]) -> [B, T, D]`.
    """

    def __init__(self, backbone: nnx.Module, hidden_size: int, *, rngs: nnx.Rngs):
        self.backbone = backbone
        self.head = nnx.Linear(hidden_size, 1, rngs=rngs)

    def __call__(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
        """Rewards float32 [B] of tokens int [B, T] whose real positions are mask [B, T] (each
        row with at least one)."""
        require(tokens.shape == mask.shape,
                f"tokens {tokens.shape} and mask {mask.shape} must have equal shapes")
        hidden = self.backbone.hidden(tokens, mask)                      # [B, T, D]
        positions = jnp.arange(tokens.shape[1])
        last = jnp.max(jnp.where(mask.astype(bool), positions, 0), axis=1)  # [B]
        final = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]  # [B, D]
        return self.head(final.astype(jnp.float32))[:, 0]


def _check_pair(chosen: jax.Array, rejected: jax.Array) -> None:
    require(chosen.ndim == 1 and chosen.shape == rejected.shape,
            f"chosen and rejected rewards must both have shape [N], got {chosen.shape} and "
            f"{rejected.shape}")


def bt_loss(chosen: jax.Array, rejected: jax.Array) -> jax.Array:
    """Bradley-Terry loss: mean_n -log sigmoid(r_chosen,n - r_rejected,n). [] from [N], [N]."""
    _check_pair(chosen, rejected)
    return -jnp.mean(jax.nn.log_sigmoid(chosen - rejected))


def bt_accuracy(chosen: jax.Array, rejected: jax.Array) -> jax.Array:
    """The fraction of pairs whose chosen response gets the strictly higher reward. []."""
    _check_pair(chosen, rejected)
    return jnp.mean((chosen > rejected).astype(jnp.float32))


@dataclasses.dataclass(frozen=True)
class PairFilter:
    """Which preference pairs to keep for GenRM training (section 1: a high chosen reward and a
    large reward gap; the paper keeps ~10K of ~200K pairs but gives no thresholds)."""

    chosen_quantile: float = 0.5  # keep pairs whose chosen reward is >= this quantile of all
    min_gap: float = 1.0          # ... and whose reward gap r_chosen - r_rejected is >= this

    def __post_init__(self):
        require(0 <= self.chosen_quantile <= 1,
                f"PairFilter.chosen_quantile must lie in [0, 1], got {self.chosen_quantile}")


class FilterCounts(NamedTuple):
    total: jax.Array        # [] int32, pairs seen
    high_chosen: jax.Array  # [] int32, pairs passing the chosen-reward quantile
    large_gap: jax.Array    # [] int32, pairs passing the gap threshold
    kept: jax.Array         # [] int32, pairs passing both


def filter_pairs(chosen: jax.Array, rejected: jax.Array, config: PairFilter = PairFilter(),
                 ) -> tuple[jax.Array, FilterCounts]:
    """keep_n = r_chosen,n >= quantile_q(r_chosen) and r_chosen,n - r_rejected,n >= min_gap.

    Args:
      chosen, rejected: [N] rewards of each pair's chosen and rejected response.
    Returns:
      keep bool [N] and the counts behind it.
    """
    _check_pair(chosen, rejected)
    high = chosen >= jnp.quantile(chosen, config.chosen_quantile)
    gap = chosen - rejected >= config.min_gap
    keep = high & gap
    counts = FilterCounts(*(jnp.sum(m, dtype=jnp.int32) for m in (jnp.ones_like(keep), high,
                                                                    gap, keep)))
    return keep, counts
