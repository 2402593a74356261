"""Sampling strategies: how a decode step draws its next tokens from the logits, at a fixed cost.

    strategy = Nucleus(temperature=0.6, top_p=0.95, top_k=20)
    draw = strategy(logits, key)   # logits [B, V] -> Draw(tokens [B], logprobs [B], ...)

A strategy is a frozen pytree (`flax.struct.dataclass`): `temperature` and `top_p` are traced
leaves, so one compiled decode step serves every value of them; `top_k`, `cap` and
`num_top_logits` are static fields (shapes), and a new value compiles anew.

The order is the usual one (temperature, then top-k, then top-p over the renormalised top-k
survivors), computed on k candidates instead of the vocabulary: one top-k search finds the k
largest logits, already sorted, and the nucleus is a prefix of them. With `top_k` = 0 the nucleus
is looked for among the `cap` most likely tokens; a row whose nucleus is wider than that is drawn
exactly over the whole vocabulary by a fallback that runs only in the steps that need it.

Shapes: B rows, V vocabulary, n candidates (max(top_k or cap, num_top_logits), at most V).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct

from jaxlab.config import is_int, require

TEMPERATURE_FLOOR = 1e-5  # a temperature below this draws greedily (argmax)
CAP = 256                 # top_k = 0: the nucleus is looked for among this many tokens first


@struct.dataclass
class Draw:
    """One step's tokens and what the decode loop records of them, without another pass over V."""

    tokens: jax.Array          # int32 [B]
    logprobs: jax.Array        # float32 [B], log-prob of each token under softmax(logits / t)
    #                            before top-k/top-p truncation (raw logits when greedy)
    top_logits: jax.Array      # float32 [B, n], the n largest raw logits, descending
    log_normalizer: jax.Array  # float32 [B], logsumexp of the raw logits


@struct.dataclass
class Nucleus:
    """Top-k, then top-p sampling at a temperature (greedy below `TEMPERATURE_FLOOR`).

    Token j survives top-k when it is among the k largest logits (exactly k tokens: of several
    tied at the k-th value, as many as fit, chosen by the search, `block_top_k`); it survives
    top-p when the survivors strictly more likely than it hold less than `top_p` of their
    renormalised mass (so tokens tied with the least likely kept one are kept too: `nucleus`).
    The token is drawn from softmax(logits / temperature) restricted to the survivors and
    renormalised; greedy draws the first most likely token (jnp.argmax).

    Cost per step: three reads of the logits [B, V] and no [B, V] write: block maxima (the top-k
    search, `block_top_k`) and the sums of exp(z - max) and exp((z - max) / t) behind the two
    log-normalisers (raw: confidence and greedy log-probs; tempered: log-probs), which XLA may
    fuse into one pass. Everything else works on the n candidates [B, n]. With top_k = 0, a step
    where some row's nucleus is wider than its `cap` candidates also runs, for the whole batch,
    the exact fallback over the vocabulary: a softmax, the bisection of `nucleus_floor` (about 30
    masked sums; none when top_p = 1) and the two-level draw of `inverse_cdf`.
    """

    temperature: float | jax.Array = 1.0  # [] traced; >= 0, below TEMPERATURE_FLOOR: greedy
    top_p: float | jax.Array = 1.0        # [] traced; in (0, 1], 1: no nucleus truncation
    top_k: int = struct.field(pytree_node=False, default=0)    # 0: no top-k truncation
    cap: int = struct.field(pytree_node=False, default=CAP)    # top_k = 0: candidates searched
    num_top_logits: int = struct.field(pytree_node=False, default=0)  # Draw.top_logits holds at
    #                                     least this many (e.g. the confidence k): one search

    def __post_init__(self):
        for name in ("top_k", "num_top_logits"):
            value = getattr(self, name)
            require(is_int(value) and value >= 0,
                    f"Nucleus.{name} must be an integer >= 0, got {value!r}")
        require(is_int(self.cap) and self.cap >= 1,
                f"Nucleus.cap must be an integer >= 1, got {self.cap!r}")
        t, p = _concrete(self.temperature), _concrete(self.top_p)
        require(t is None or t >= 0, f"Nucleus.temperature must be >= 0, got {t}")
        require(p is None or 0 < p <= 1, f"Nucleus.top_p must lie in (0, 1], got {p}")

    def __call__(self, logits: jax.Array, key: jax.Array) -> Draw:
        """Draws one token per row of logits [B, V] (any float dtype; computed in float32) with
        one key [] for the whole batch, or a key per row [B] (a row's draw then depends on its
        own key and logits alone: the sampler's per-trace streams)."""
        z = logits.astype(jnp.float32)                                           # [B, V]
        v = z.shape[1]
        n = min(max(self.top_k or self.cap, self.num_top_logits), v)
        top, index = block_top_k(z, n)                                           # [B, n]
        temperature = jnp.asarray(self.temperature, jnp.float32)
        greedy = temperature < TEMPERATURE_FLOOR                                 # []
        t = jnp.maximum(temperature, TEMPERATURE_FLOOR)
        top_p = jnp.asarray(self.top_p, jnp.float32)
        high = top[:, :1]                                                        # [B, 1] max
        # No term shared by the two sums, so that each reads z itself (a shared z - high would
        # be stored and read twice on CPU); XLA may fuse the two into one pass.
        log_sum = jnp.log(jnp.sum(jnp.exp(z - high), axis=-1))                   # [B]
        log_sum_t = jnp.log(jnp.sum(jnp.exp(z / t - high / t), axis=-1))         # [B]
        sample_key, fallback_key = _split(key)
        if self.top_k:
            survivors = (top[:, :self.top_k] - high) / t     # renormalised over the k survivors
            kept = nucleus(jax.nn.softmax(survivors, axis=-1), top_p)
        else:
            survivors = (top - high) / t - log_sum_t[:, None]  # log-probs of the full softmax
            kept = nucleus(jnp.exp(survivors), top_p)
        rank = _categorical(sample_key, jnp.where(kept, survivors, -jnp.inf))
        rank = jnp.where(greedy, 0, rank)[:, None]                               # [B, 1]
        picked = jnp.take_along_axis(top, rank, axis=1)[:, 0]                    # [B] its logit
        first = jnp.min(jnp.where(top == high, index, v), axis=-1)   # argmax: first of ties
        tokens = jnp.where(greedy, first, jnp.take_along_axis(index, rank, axis=1)[:, 0])
        if not self.top_k and n < v:
            # The candidates decide the nucleus when their least likely one is left out of it.
            fits = ~kept[:, -1] | greedy

            def fallback():
                drawn = _full_vocabulary_draw(z, high, t, log_sum_t, top_p, fallback_key)
                drawn = jnp.where(fits, tokens, drawn)
                return drawn, jnp.take_along_axis(z, drawn[:, None], axis=1)[:, 0]

            tokens, picked = jax.lax.cond(jnp.any(~fits), fallback, lambda: (tokens, picked))
        picked = picked - high[:, 0]
        logprobs = jnp.where(greedy, picked - log_sum, picked / t - log_sum_t)
        return Draw(tokens=tokens, logprobs=logprobs, top_logits=top,
                    log_normalizer=high[:, 0] + log_sum)


def _split(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Two keys from one key [] or from each of a key per row [B]."""
    if key.ndim == 0:
        return tuple(jax.random.split(key))
    pairs = jax.vmap(jax.random.split)(key)                                    # [B, 2]
    return pairs[:, 0], pairs[:, 1]


def _categorical(key: jax.Array, logits: jax.Array) -> jax.Array:
    """int32 [B]: one draw per row of logits [B, n], from one key [] or a key per row [B]."""
    if key.ndim == 0:
        return jax.random.categorical(key, logits)
    return jax.vmap(jax.random.categorical)(key, logits)


def _uniform(key: jax.Array, rows: int) -> jax.Array:
    """float32 [rows] uniforms on [0, 1), from one key [] or a key per row [rows]."""
    if key.ndim == 0:
        return jax.random.uniform(key, (rows,))
    return jax.vmap(jax.random.uniform)(key)


def _concrete(x) -> float | None:
    """x as a float when it holds one known value; None for a traced value or a placeholder that
    a tree transformation puts in a leaf (so that `__post_init__` checks only real settings)."""
    try:
        return float(x)
    except TypeError:  # tracers raise ConcretizationTypeError, a TypeError
        return None


def token_confidence_from_top(top_logits: jax.Array, log_normalizer: jax.Array,
                              k: int) -> jax.Array:
    """DeepConf's token confidence C_i = logsumexp(z) - (1/k) sum_{j<=k} z_(j) (as
    `confidence.token_confidence`) from the largest raw logits top_logits [B, n] (descending,
    `Draw.top_logits`) and logsumexp(z) [B] (`Draw.log_normalizer`): float32 [B], no pass over V.
    """
    require(k <= top_logits.shape[-1],
            f"confidence over the top {k} log-probs needs Nucleus.num_top_logits >= {k}; "
            f"the draw holds {top_logits.shape[-1]}")
    return log_normalizer - jnp.mean(top_logits[:, :k], axis=-1)


def nucleus(probs: jax.Array, top_p: jax.Array) -> jax.Array:
    """Which candidates the top-p nucleus keeps, for probs [B, n] sorted in decreasing order: bool
    [B, n].

    Token j is kept when the tokens strictly more likely than it hold less than `top_p` of the
    mass: g(p_j) < top_p with g(p_j) = sum_{p_i > p_j} p_i (the definition of `nucleus_floor`).
    In sorted order the mass before position i is an exclusive cumulative sum, below top_p on a
    prefix; every token at least as likely as the prefix's last one is kept, so tokens tied with
    it are kept too. top_p = 1 keeps every candidate.
    """
    before = jnp.pad(jnp.cumsum(probs, axis=-1)[:, :-1], ((0, 0), (1, 0)))     # [B, n]
    inside = (before < top_p) | (top_p >= 1)
    floor = jnp.min(jnp.where(inside, probs, jnp.inf), axis=-1, keepdims=True)   # [B, 1]
    return probs >= floor


def block_top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The k largest entries of each row of x [B, V] and their indices: (values [B, k] in
    decreasing order, int32 indices [B, k]), as `jax.lax.top_k(x, k)`. The values are exact; of
    several entries tied at the k-th value, which ones are returned is the search's choice
    (`jax.lax.top_k` on CPU does not always return the lowest indices when k is a large part of
    the row).

    With tau the k-th largest value, a block of `block` consecutive entries holding an entry
    above tau has a maximum above tau, and fewer than k blocks do; the other chosen blocks have
    maxima equal to tau, each holding a tied entry, as many as the k largest need. So the k
    largest lie in the k blocks with the largest maxima: one pass of block maxima, a top-k of the
    V / block maxima and a top-k of the k x block entries of the chosen blocks replace a search
    of the whole row; block ~ sqrt(V / k) balances the two searches.
    """
    b, v = x.shape
    block = 2 ** round(math.log2(math.sqrt(v / k)))
    if block < 2 or k * block >= v:
        values, indices = jax.lax.top_k(x, k)
        return values, indices.astype(jnp.int32)
    blocks = jnp.pad(x, ((0, 0), (0, -v % block)), constant_values=-jnp.inf).reshape(b, -1, block)
    _, chosen = jax.lax.top_k(jnp.max(blocks, axis=-1), k)                    # [B, k]
    chosen = jnp.sort(chosen, axis=-1)                                       # vocabulary order
    candidates = jnp.take_along_axis(blocks, chosen[:, :, None], axis=1)      # [B, k, block]
    # The barrier keeps XLA from rewriting this top-k as a sort of all candidates (it does on
    # CPU when only slices of the values are read).
    values, at = jax.lax.optimization_barrier(
        jax.lax.top_k(candidates.reshape(b, k * block), k))                   # [B, k]
    index = jnp.take_along_axis(chosen, at // block, axis=1) * block + at % block
    # A row with fewer than k entries above -inf may take padding for some: kept in range.
    return values, jnp.minimum(index, v - 1).astype(jnp.int32)


def _full_vocabulary_draw(z: jax.Array, high: jax.Array, t: jax.Array, log_sum_t: jax.Array,
                          top_p: jax.Array, key: jax.Array) -> jax.Array:
    """Tokens int32 [B] drawn from softmax(z / t) over the whole vocabulary z [B, V], truncated to
    the top-p nucleus (`nucleus_floor`; all of it when top_p = 1) and renormalised."""
    probs = jnp.exp((z - high) / t - log_sum_t[:, None])                      # [B, V]
    floor = jax.lax.cond(top_p < 1, lambda: nucleus_floor(probs, top_p),
                         lambda: jnp.zeros(z.shape[:1], jnp.float32))
    weights = jnp.where(probs >= floor[:, None], probs, 0.0)
    return inverse_cdf(weights, _uniform(key, z.shape[0]))


def inverse_cdf(weights: jax.Array, u: jax.Array, block: int = 128) -> jax.Array:
    """Index j drawn with probability w_j / sum(w) per row of weights [B, V] >= 0 from one
    uniform u [B] in [0, 1): the first j whose cumulative weight exceeds r = u * sum(w) (one
    uniform per row instead of V Gumbel draws).

    Two levels, so that no cumulative sum runs over the whole vocabulary: the block of `block`
    tokens where the cumulative block sums pass r, then the token inside it where the running
    sum passes what is left of r. Zero-weight tokens are never drawn: a cumulative sum does not
    rise at them, and where rounding puts r at either end of the chosen block the draw is moved
    to the block's first or last token with weight.
    """
    b, v = weights.shape
    blocks = jnp.pad(weights, ((0, 0), (0, -v % block))).reshape(b, -1, block)  # [B, nb, block]
    sums = jnp.sum(blocks, axis=-1)                                              # [B, nb]
    through = jnp.cumsum(sums, axis=-1)             # weight up to and including each block
    r = u * through[:, -1]
    chosen = jnp.sum(through <= r[:, None], axis=-1)
    chosen = jnp.minimum(chosen, _last_positive(sums))                           # [B]
    inside = jnp.take_along_axis(blocks, chosen[:, None, None], axis=1)[:, 0]    # [B, block]
    before = jnp.take_along_axis(through - sums, chosen[:, None], axis=1)[:, 0]
    rest = jnp.maximum(r - before, 0.0)
    drawn = jnp.sum(jnp.cumsum(inside, axis=-1) <= rest[:, None], axis=-1)
    return (chosen * block + jnp.minimum(drawn, _last_positive(inside))).astype(jnp.int32)


def _last_positive(x: jax.Array) -> jax.Array:
    """Index of the last positive entry of each row of x [B, n] (0 if none), int32 [B]."""
    return jnp.max(jnp.where(x > 0, jnp.arange(x.shape[-1]), 0), axis=-1)


def nucleus_floor(probs: jax.Array, top_p: float | jax.Array) -> jax.Array:
    """The smallest probability the top-p nucleus keeps, per row of probs [B, V] -> [B].

    Token j is kept when the tokens strictly more likely than it hold less than `top_p` of the
    mass: g(p_j) < top_p with g(t) = sum_{p_i > t} p_i. g decreases in t, so the kept tokens are
    those with p_j >= t*, the smallest float32 t with g(t) < top_p. t* is found exactly by
    bisection over the bit patterns of non-negative float32 (which order like the values),
    between the float just below the row's smallest probability (g = all the mass) and its
    largest (g = 0), until every row's bracket is one pattern wide: masked sums over V instead
    of a sort of the vocabulary, fewer of them the closer the probabilities are to each other.
    """
    def mass_above(bits):                                                    # [B] -> [B]
        t = jax.lax.bitcast_convert_type(bits, jnp.float32)
        return jnp.sum(jnp.where(probs > t[:, None], probs, 0.0), axis=-1)

    def halve(bounds):
        low, high = bounds                    # g(low) >= top_p (or low = -1), g(high) < top_p
        mid = low + (high - low) // 2
        below = mass_above(jnp.maximum(mid, 0)) < top_p
        return jnp.where(below, low, mid), jnp.where(below, mid, high)

    def as_bits(x):
        return jax.lax.bitcast_convert_type(x, jnp.int32)

    bounds = (as_bits(jnp.min(probs, axis=-1)) - 1, as_bits(jnp.max(probs, axis=-1)))
    _, high = jax.lax.while_loop(lambda b: jnp.any(b[1] - b[0] > 1), halve, bounds)
    return jax.lax.bitcast_convert_type(high, jnp.float32)
