"""DeepConf's confidence measures (Fu et al. 2025, section 1 of `papers/deepconf.md`), pure.

Token confidence C_i is computed from the raw logits of step i; the sliding-window group
confidence and the tail are kept incrementally while decoding (`GroupWindow`, a ring buffer, O(1)
per token); trace statistics (mean, lowest group, bottom-q% groups, tail) are computed offline
from stored token confidences. Where the paper is silent, the official implementation's
conventions are followed (facebookresearch/deepconf, `deepconf/utils.py`): the bottom-q% groups
are the lowest max(1, floor(q x #windows)) window means, a trace shorter than the window has one
group (its mean), and the tail of a trace shorter than `tail` is the whole trace.
Shapes: B traces, T tokens, V vocabulary, W window, S tail.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxlab.config import is_int, require


def require_length(name: str, value) -> None:
    """ValueError naming `name` unless `value` is an integer >= 1 (a window or tail length)."""
    require(is_int(value) and value >= 1, f"{name} must be an integer >= 1, got {value!r}")


def token_confidence(logits: jax.Array, k: int = 20) -> jax.Array:
    """C_i = -(1/k) sum_{j=1..k} log P_i(j) over the k most likely tokens of the full
    distribution P_i = softmax(raw logits) (before temperature or truncation); with
    log P(j) = z_j - logsumexp(z) this is logsumexp(z) - mean of the k largest logits.

    Larger is more confident: a peaked distribution puts very negative log-probs on ranks 2..k.

    Args:
      logits: [..., V] (any float dtype; computed in float32).
    Returns:
      float32 [...].
    """
    z = logits.astype(jnp.float32)
    top = top_k_values(z.reshape(-1, z.shape[-1]), k).reshape(*z.shape[:-1], k)
    return jax.nn.logsumexp(z, axis=-1) - jnp.mean(top, axis=-1)


def top_k_values(x: jax.Array, k: int, block: int = 64) -> jax.Array:
    """The k largest entries of each row of x [B, V], descending, [B, k] (= lax.top_k(x, k)[0]).

    They lie in the k blocks of `block` consecutive entries with the largest maxima: a block
    whose maximum reaches the k-th largest value holds one of the k largest of its own, so at
    most k blocks qualify (ties included). One pass of block maxima and two small top-k's replace
    a partial sort of every row, several times faster on CPU for V in the thousands.
    """
    b, v = x.shape
    if k * block >= v:
        return jax.lax.top_k(x, k)[0]
    blocks = jnp.pad(x, ((0, 0), (0, -v % block)), constant_values=-jnp.inf).reshape(b, -1, block)
    _, chosen = jax.lax.top_k(jnp.max(blocks, axis=-1), k)                    # [B, k]
    candidates = jnp.take_along_axis(blocks, chosen[:, :, None], axis=1)      # [B, k, block]
    return jax.lax.top_k(candidates.reshape(b, k * block), k)[0]


@struct.dataclass
class GroupWindow:
    """The last W token confidences of each trace in a ring buffer, with their running sum
    (4 W bytes per trace). The sampler keeps two: the group window (W = `window`) and the tail
    (W = `tail`)."""

    ring: jax.Array   # float32 [B, W]; slot t % W holds C_t (stale past count)
    total: jax.Array  # float32 [B], sum of the ring's filled slots
    count: jax.Array  # int32 [B], tokens pushed so far

    @classmethod
    def create(cls, batch: int, window: int) -> GroupWindow:
        return cls(ring=jnp.zeros((batch, window), jnp.float32),
                   total=jnp.zeros((batch,), jnp.float32), count=jnp.zeros((batch,), jnp.int32))

    @property
    def size(self) -> int:
        return self.ring.shape[1]

    @property
    def full(self) -> jax.Array:
        """bool [B]: at least W tokens pushed, so the group is a whole window."""
        return self.count >= self.size

    @property
    def mean(self) -> jax.Array:
        """float32 [B]: the group confidence, mean of the last min(count, W) tokens (the running
        mean while the trace is shorter than the window; 0 before any token)."""
        return self.total / jnp.maximum(jnp.minimum(self.count, self.size), 1)

    def push(self, confidence: jax.Array, active: jax.Array) -> GroupWindow:
        """Appends C [B] to the traces where `active` [B]: total += C_t - C_{t-W} (one slot of
        the ring written per trace)."""
        rows = jnp.arange(self.ring.shape[0])
        slot = self.count % self.size
        current = self.ring[rows, slot]
        evicted = jnp.where(self.full, current, 0.0)
        confidence = confidence.astype(jnp.float32)
        return GroupWindow(
            ring=self.ring.at[rows, slot].set(jnp.where(active, confidence, current)),
            total=jnp.where(active, self.total + confidence - evicted, self.total),
            count=self.count + active.astype(jnp.int32))

    def reset(self, rows: jax.Array) -> GroupWindow:
        """Empties the windows of the traces where `rows` [B] is True (their ring slots are
        overwritten before they are read again: a slot is evicted only once the window is full)."""
        return self.replace(total=jnp.where(rows, 0.0, self.total),
                            count=jnp.where(rows, 0, self.count))


# --------------------------------------------------------------------------------------------
# Offline trace statistics


def _window_means(confidence: jax.Array, lengths: jax.Array, window: int):
    """Means of every full window inside each trace: (means [B, T], valid [B, T]); entry t is the
    window ending at token t. A trace shorter than the window has one group, its overall mean,
    stored at its last token."""
    require_length("window", window)
    b, t = confidence.shape
    inside = jnp.arange(t) < lengths[:, None]
    csum = jnp.cumsum(jnp.where(inside, confidence, 0.0), axis=1)              # [B, T]
    before = jnp.pad(csum, ((0, 0), (window, 0)))[:, :t]                       # csum[t - W]
    means = (csum - before) / window
    valid = inside & (jnp.arange(t) >= window - 1)
    short = lengths < window
    last = jnp.maximum(lengths - 1, 0)
    overall = csum[jnp.arange(b), last] / jnp.maximum(lengths, 1)
    is_last = jnp.arange(t) == last[:, None]
    means = jnp.where(short[:, None] & is_last, overall[:, None], means)
    valid = jnp.where(short[:, None], is_last & (lengths[:, None] > 0), valid)
    return means, valid


def mean_confidence(confidence: jax.Array, lengths: jax.Array) -> jax.Array:
    """float32 [B]: the average trace confidence, mean of C_i over each trace's tokens."""
    inside = jnp.arange(confidence.shape[1]) < lengths[:, None]
    return jnp.sum(jnp.where(inside, confidence, 0.0), axis=1) / jnp.maximum(lengths, 1)


def lowest_group_confidence(confidence: jax.Array, lengths: jax.Array,
                            window: int) -> jax.Array:
    """float32 [B]: min over the sliding windows (stride 1) of the window mean (the trace's mean
    when it is shorter than the window)."""
    means, valid = _window_means(confidence, lengths, window)
    return jnp.min(jnp.where(valid, means, jnp.inf), axis=1)


def bottom_group_confidence(confidence: jax.Array, lengths: jax.Array, window: int,
                            fraction: float = 0.1) -> jax.Array:
    """float32 [B]: mean of the lowest max(1, floor(fraction x #windows)) window means.

    The count is the official implementation's (`calculate_bottom_window_confidence`:
    `max(1, int(len(window_means) * bottom_percent))`): 10% of 25 windows is 2, of 9 windows 1.
    """
    means, valid = _window_means(confidence, lengths, window)
    ordered = jnp.sort(jnp.where(valid, means, jnp.inf), axis=1)               # [B, T]
    count = jnp.sum(valid, axis=1).astype(jnp.float32)
    # floor, guarded against float32 rounding just below an integer (0.1 x 70 -> 6.9999995)
    keep = jnp.maximum(jnp.floor(fraction * count * (1 + 1e-6)), 1).astype(jnp.int32)  # [B]
    chosen = jnp.arange(ordered.shape[1]) < keep[:, None]
    return jnp.sum(jnp.where(chosen, ordered, 0.0), axis=1) / keep


def tail_confidence(confidence: jax.Array, lengths: jax.Array, tail: int = 2048) -> jax.Array:
    """float32 [B]: mean of C_i over the last min(tail, length) tokens (the whole trace when it
    is shorter than `tail`; tail = 2048 in the paper, a setting apart from the window)."""
    require_length("tail", tail)
    position = jnp.arange(confidence.shape[1])
    inside = (position < lengths[:, None]) & (position >= lengths[:, None] - tail)
    count = jnp.maximum(jnp.minimum(lengths, tail), 1)
    return jnp.sum(jnp.where(inside, confidence, 0.0), axis=1) / count
