"""DeepConf's votes over finished traces and its online threshold (sections 2 and 3 of
`papers/deepconf.md`), pure.

Traces arrive as arrays: `answers` int32 [N], the answer group of each trace (ids in [0, N), as
`answers.group_answers` numbers them; NO_ANSWER = -1 for none), `valid` bool [N] (the traces
allowed to vote, e.g. not stopped early) and a per-trace score [N] (a confidence metric). A trace
votes when it is valid and has an answer. Everything is jittable (`keep_percent` static) and
vmappable over problems.

Ties are broken deterministically: among the answers with the most votes, the one whose best
voting trace has the higher confidence wins, then the smaller group id (the answer seen first).
When no trace votes the result is NO_ANSWER.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import struct

from jaxlab.config import require
from jaxlab.deepconf.answers import NO_ANSWER
from jaxlab.sampling import confidence as cf

# keep_percent of each named online rule: the share of warmup traces whose lowest group
# confidence clears the threshold.
RULES = {"deepconf-low": 10.0, "deepconf-high": 90.0}

# Trace metrics for filtering and weighting, each
# (confidence [N, T], lengths [N], window, tail) -> [N]: group metrics use windows of `window`
# tokens (bottom group: the lowest 10% of them), tail confidence averages the last `tail` tokens.
METRICS: dict[str, Callable[[jax.Array, jax.Array, int, int], jax.Array]] = {
    "mean": lambda c, lengths, window, tail: cf.mean_confidence(c, lengths),
    "lowest_group": lambda c, lengths, window, tail: cf.lowest_group_confidence(c, lengths,
                                                                                window),
    "bottom_group": lambda c, lengths, window, tail: cf.bottom_group_confidence(c, lengths,
                                                                                window, 0.1),
    "tail": lambda c, lengths, window, tail: cf.tail_confidence(c, lengths, tail),
}


def trace_metric(name: str, confidence: jax.Array, lengths: jax.Array, window: int = 2048,
                 tail: int = 2048) -> jax.Array:
    """float32 [N]: the named metric of `METRICS` from token confidences [N, T] and lengths [N],
    with group windows of `window` tokens and a tail of `tail` tokens (the paper: 2048 each;
    either longer than a trace covers the whole trace)."""
    require(name in METRICS, f"unknown trace metric {name!r}; choose one of {sorted(METRICS)}")
    cf.require_length("window", window)
    cf.require_length("tail", tail)
    return METRICS[name](confidence, lengths, window, tail)


@struct.dataclass
class Vote:
    """The outcome of one vote over N traces."""

    answer: jax.Array  # int32 [], the winning group id a*, NO_ANSWER when no trace voted
    trace: jax.Array   # int32 [], the most confident voter for a* (the smallest index among
    #                    equals), NO_ANSWER when no trace voted
    votes: jax.Array   # float32 [N], V(a) for every group id a
    voters: jax.Array  # bool [N], the traces that voted

    @property
    def consensus(self) -> jax.Array:
        """float32 [] (or the batch shape of a vmapped vote): V(a*) / sum_a V(a), the share of
        the vote the winner holds (0 when nothing voted)."""
        total = jnp.sum(self.votes, axis=-1)
        won = jnp.take_along_axis(self.votes, jnp.maximum(self.answer, 0)[..., None], axis=-1)
        won = jnp.where(self.answer >= 0, won[..., 0], 0.0)
        return jnp.where(total > 0, won / jnp.where(total > 0, total, 1.0), 0.0)


def group_votes(answers: jax.Array, voters: jax.Array, weights: jax.Array) -> jax.Array:
    """float32 [N]: V(a) = sum_t w_t 1[answer_t = a] over the voters, for every group id a."""
    n = answers.shape[0]
    counted = jnp.where(voters, weights.astype(jnp.float32), 0.0)
    return jnp.zeros(n, jnp.float32).at[jnp.where(voters, answers, 0)].add(counted)


def vote(answers: jax.Array, valid: jax.Array, weights: jax.Array,
         confidence: jax.Array) -> Vote:
    """The answer with the largest V(a) = sum_t w_t 1[answer_t = a] over the voting traces.

    Args:
      answers: int32 [N] group ids, NO_ANSWER for none.
      valid: bool [N], the traces allowed to vote.
      weights: [N] vote weights w_t (ones for a majority vote).
      confidence: [N] trace confidences that break ties: among the answers with the most votes,
        the one with the most confident voter wins, then the smallest group id.
    """
    n = answers.shape[0]
    voters = valid & (answers >= 0)
    votes = group_votes(answers, voters, weights)
    ids = jnp.where(voters, answers, 0)
    conf = jnp.where(voters, confidence.astype(jnp.float32), -jnp.inf)
    present = jnp.zeros(n, bool).at[ids].max(voters)                        # [N] groups
    best = jnp.full(n, -jnp.inf).at[ids].max(conf)                          # [N] groups
    leading = present & (votes == jnp.max(jnp.where(present, votes, -jnp.inf)))
    leading &= best == jnp.max(jnp.where(leading, best, -jnp.inf))
    answer = jnp.where(jnp.any(voters), jnp.argmax(leading), NO_ANSWER).astype(jnp.int32)
    backers = voters & (answers == answer)                                  # [N] traces
    top = backers & (conf == jnp.max(jnp.where(backers, conf, -jnp.inf)))
    trace = jnp.where(jnp.any(voters), jnp.argmax(top), NO_ANSWER).astype(jnp.int32)
    return Vote(answer=answer, trace=trace, votes=votes, voters=voters)


def majority_vote(answers: jax.Array, valid: jax.Array,
                  confidence: jax.Array | None = None) -> Vote:
    """Every voting trace counts once: V(a) = #{t : answer_t = a}. Ties go to the answer with the
    most confident voter when `confidence` [N] is given, else to the answer seen first."""
    ones = jnp.ones(answers.shape, jnp.float32)
    return vote(answers, valid, ones, ones if confidence is None else confidence)


def weighted_vote(answers: jax.Array, valid: jax.Array, confidence: jax.Array) -> Vote:
    """Confidence-weighted vote: V(a) = sum_t c_t 1[answer_t = a], c [N] (e.g. lowest group)."""
    return vote(answers, valid, confidence, confidence)


def percentile_of(scores: jax.Array, members: jax.Array, percent: float) -> jax.Array:
    """float32 []: the `percent`-th percentile of scores [N] over the `members` (bool [N]) by
    linear interpolation between order statistics, as `np.percentile(scores[members], percent)`:
    position pos = percent x (n - 1) / 100 in the sorted members, value x[lo] + (x[lo + 1] -
    x[lo]) (pos - lo) for lo = floor(pos) (numpy's form: x[lo + 1] - (...)(1 - (pos - lo)) past
    the midpoint). +inf without members. pos is computed as (percent x (n - 1)) / 100, exact for
    whole percentages, so a whole position picks its order statistic itself."""
    n = jnp.sum(members).astype(jnp.int32)
    ordered = jnp.sort(jnp.where(members, scores.astype(jnp.float32), jnp.inf))      # [N]
    pos = jnp.float32(percent) * jnp.maximum(n - 1, 0).astype(jnp.float32) / 100.0
    lo = jnp.floor(pos).astype(jnp.int32)
    hi = jnp.minimum(lo + 1, jnp.maximum(n - 1, 0))
    a, b, t = ordered[lo], ordered[hi], pos - lo
    diff = jnp.where(hi > lo, b - a, 0.0)
    value = jnp.where(t >= 0.5, b - diff * (1 - t), a + diff * t)
    return jnp.where(n > 0, jnp.where(hi > lo, value, a), jnp.inf)


def top_percent(scores: jax.Array, voters: jax.Array, keep_percent: float) -> jax.Array:
    """bool [N]: the voters whose score [N] reaches the (100 - eta)-th percentile of the voters'
    scores (`percentile_of`, linear), eta = keep_percent: the official implementation's filter
    (facebookresearch/deepconf `filter_top_confidence`: `conf >= np.percentile(confs,
    (1 - top) * 100)`). About eta% of the voters, at least one; ties with the cut are all kept
    (top 10% of 11 traces: 2; top 90% of 8: 7).
    """
    require(0 < keep_percent <= 100, f"keep_percent must lie in (0, 100], got {keep_percent}")
    cut = percentile_of(scores, voters, 100.0 - keep_percent)
    return voters & (scores.astype(jnp.float32) >= cut)


def filtered_vote(answers: jax.Array, valid: jax.Array, scores: jax.Array,
                  keep_percent: float, weighted: bool = True) -> Vote:
    """DeepConf's offline vote: keep the top keep_percent% of the voting traces by `scores` [N]
    (any trace metric), then vote among them, weighted by the same scores (or one vote each when
    `weighted` is False). Ties as in `vote`, with `scores` as the confidence."""
    kept = top_percent(scores, valid & (answers >= 0), keep_percent)
    weights = scores if weighted else jnp.ones(scores.shape, jnp.float32)
    return vote(answers, kept, weights, scores)


# --------------------------------------------------------------------------------------------
# Online: the early-stop threshold


def threshold(warmup_scores: jax.Array, keep_percent: float) -> jax.Array:
    """float32 []: s = the (100 - eta)-th percentile (linear interpolation, as `np.percentile`) of
    the warmup traces' lowest group confidences [N_init], eta = keep_percent in (0, 100).

    About eta% of the warmup traces lie at or above s; a later trace stops once its full-window
    group confidence drops below s. So keeping the top 10% (DeepConf-low, aggressive) uses the
    90th percentile, keeping the top 90% (DeepConf-high, conservative) the 10th.
    """
    require(0 < keep_percent < 100, f"keep_percent must lie in (0, 100), got {keep_percent}")
    scores = jnp.asarray(warmup_scores, jnp.float32)
    require(scores.ndim == 1 and scores.shape[0] >= 1,
            f"warmup_scores must be a non-empty vector, got shape {scores.shape}")
    return jnp.percentile(scores, 100.0 - keep_percent)


def threshold_for(rule: str, warmup_scores: jax.Array) -> jax.Array:
    """The `threshold` of a named rule: "deepconf-low" keeps the top 10% of warmup traces (90th
    percentile), "deepconf-high" the top 90% (10th percentile)."""
    require(rule in RULES, f"unknown threshold rule {rule!r}; choose one of {sorted(RULES)}")
    return threshold(warmup_scores, RULES[rule])
