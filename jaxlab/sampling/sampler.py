"""Sampling many traces per prompt in one compiled decode loop that measures DeepConf confidence
as it goes, stops weak traces, and refills their slots (section 1 of `papers/deepconf.md`).

    samples = sample(model, prompts, key, SamplingConfig(n=16, budget=64, stop_threshold=12.0))

One jitted prefill runs the prompts once; their KV cache is broadcast to `n` slots per prompt. One
jitted `lax.while_loop` then decodes every slot until all traces are done: per step it computes
each slot's token confidence from the raw logits, pushes it into the slot's sliding window, samples
the next token, writes both into the output row of the slot's trace, and decides whether the trace
is finished (stop token, length, or low group confidence). A finished slot starts a new trace of
the same prompt while that prompt's `budget` is not spent (its prompt KV is still in place), so
stopping early saves wall-clock time, not only tokens.

Shapes: P prompts, L padded prompt length, B = P x n slots, N = P x budget traces, T =
max_new_tokens, S = L + T cache slots, V vocabulary, W window.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlab import parallel
from jaxlab.config import require, require_positive_ints
from jaxlab.models.decoder import Decoder, DecoderConfig, KVCache
from jaxlab.sampling.confidence import GroupWindow, token_confidence, top_k_values

FINISH_REASONS = ("unfinished", "stop", "length", "low_confidence")
STOP, LENGTH, LOW_CONFIDENCE = 1, 2, 3


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to sample (hashable: a static argument of the compiled loop)."""

    max_new_tokens: int = 256
    temperature: float = 0.6        # 0: greedy (argmax)
    top_k: int = 0                  # keep the k most likely tokens (0: all)
    top_p: float = 1.0              # keep the smallest set of tokens with this much mass
    n: int = 1                      # traces decoded at once per prompt (slots)
    budget: int | None = None       # traces per prompt in all; > n refills finished slots
    stop_ids: tuple[int, ...] = ()  # EOS and any other token that ends a trace (kept in it)
    confidence: bool = True         # measure token and group confidence while decoding
    confidence_k: int = 20          # C_i averages the top-k log-probs
    window: int = 2048              # group confidence window (tokens)
    stop_threshold: float | None = None  # stop a trace once its full-window group conf < this
    int8_cache: bool = False        # keys/values in int8 with per-token, per-head scales

    def __post_init__(self):
        require_positive_ints(self, "max_new_tokens", "n", "confidence_k", "window")
        require(self.temperature >= 0,
                f"SamplingConfig.temperature must be >= 0, got {self.temperature}")
        require(0 < self.top_p <= 1, f"SamplingConfig.top_p must lie in (0, 1], got {self.top_p}")
        require(isinstance(self.top_k, int) and self.top_k >= 0,
                f"SamplingConfig.top_k must be an integer >= 0, got {self.top_k!r}")
        require(self.budget is None or self.budget >= self.n,
                f"SamplingConfig.budget={self.budget} must be >= n={self.n}")
        require(self.stop_threshold is None or self.confidence,
                "SamplingConfig.stop_threshold needs confidence=True")
        object.__setattr__(self, "stop_ids", tuple(int(i) for i in self.stop_ids))

    @property
    def traces_per_prompt(self) -> int:
        return self.n if self.budget is None else self.budget


@struct.dataclass
class Samples:
    """Every trace, one row each; trace i belongs to prompt `prompt_index[i]`."""

    tokens: jax.Array                   # int32 [N, T], 0 past `lengths`
    lengths: jax.Array                  # int32 [N], generated tokens (stop token included)
    logprobs: jax.Array                 # float32 [N, T], log-prob of each sampled token under
    #                                     softmax(logits / temperature) (raw logits when greedy),
    #                                     before top-k/top-p truncation: the policy an RL step
    #                                     evaluates (`jaxlab.rl.train.TrainConfig.temperature`)
    confidence: jax.Array               # float32 [N, T], token confidence C_i
    group_confidence: jax.Array         # float32 [N, T], mean C over the last min(i + 1, W)
    lowest_group_confidence: jax.Array  # float32 [N], min over full windows (mean if shorter)
    tail_confidence: jax.Array          # float32 [N], mean C over the last min(length, W) tokens
    finish_reason: jax.Array            # int32 [N], index into FINISH_REASONS
    prompt_index: jax.Array             # int32 [N]
    steps: jax.Array                    # int32 [], decode steps the loop took


# --------------------------------------------------------------------------------------------
# Pure pieces


def next_tokens(logits: jax.Array, key: jax.Array, config: SamplingConfig) -> jax.Array:
    """Draws int32 [B] from logits [B, V]: argmax when temperature is 0, else softmax(logits / t)
    restricted to the top-k tokens and then to the top-p nucleus (the most likely tokens such
    that the mass of the tokens more likely than each is below p; `nucleus_floor`)."""
    if config.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits.astype(jnp.float32) / config.temperature
    if config.top_k:
        kth = top_k_values(scaled, config.top_k)[:, -1:]
        scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
    probs = jax.nn.softmax(scaled, axis=-1)                                   # [B, V]
    if config.top_p < 1:
        probs = jnp.where(probs < nucleus_floor(probs, config.top_p)[:, None], 0.0, probs)
    return inverse_cdf(probs, jax.random.uniform(key, probs.shape[:1]))


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


def nucleus_floor(probs: jax.Array, top_p: float) -> jax.Array:
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


def _first_free(finishing: jax.Array, prompt: jax.Array, launched: jax.Array,
                budget: int) -> tuple[jax.Array, jax.Array]:
    """Which finishing slots [B] start a new trace and its number within the prompt.

    Finishing slots of one prompt are ranked by slot; rank r takes trace launched[p] + r if that
    is below the budget. Returns (number within the prompt int32 [B], refilled bool [B]).
    """
    slots = jnp.arange(prompt.shape[0])
    earlier = (prompt[None, :] == prompt[:, None]) & (slots[None, :] < slots[:, None])
    rank = jnp.sum(earlier & finishing[None, :], axis=1)                      # [B]
    number = launched[prompt] + rank
    return number, finishing & (number < budget)


# --------------------------------------------------------------------------------------------
# The compiled prefill and decode loop


@struct.dataclass
class _Loop:
    cache: KVCache
    logits: jax.Array         # float32 [B, V], each slot's next-token logits
    window: GroupWindow       # [B]
    lowest: jax.Array         # float32 [B], min full-window group confidence so far
    trace: jax.Array          # int32 [B], the output row a slot writes; -1 when idle
    length: jax.Array         # int32 [B], tokens its trace has so far
    launched: jax.Array       # int32 [P], traces started per prompt
    out: Samples
    step: jax.Array           # int32 []


@functools.partial(jax.jit, static_argnames=("cache_size", "n", "int8_cache"))
def _prefill(graphdef, state, ids, mask, *, cache_size: int, n: int, int8_cache: bool):
    """The prompts' cache broadcast to n slots each, and their last logits [P, V]."""
    model = nnx.merge(graphdef, state)
    logits, cache = model.prefill(ids, mask, cache_size=cache_size, int8_cache=int8_cache)
    return cache.map_rows(lambda x: jnp.repeat(x, n, axis=0)), logits[:, -1]


@functools.partial(jax.jit, static_argnames=("config",))
def _decode(graphdef, state, cache: KVCache, prompt_logits, key, threshold, *,
            config: SamplingConfig):
    """The decode loop; `threshold` [] float32 is the early-stop threshold, traced so that a new
    value does not recompile (config.stop_threshold only says whether early stop is on)."""
    model = nnx.merge(graphdef, state)
    num_prompts = prompt_logits.shape[0]
    num_slots = cache.valid.shape[0]
    budget, t_max = config.traces_per_prompt, config.max_new_tokens
    num_traces = num_prompts * budget
    prompt = jnp.arange(num_slots) // config.n                                # [B]
    start = cache.index                                                      # [B] = L
    prompt_positions = cache.positions                                       # [B]
    stop_ids = jnp.asarray(config.stop_ids or (-1,), jnp.int32)

    zeros = functools.partial(jnp.zeros, dtype=jnp.float32)
    out = Samples(
        tokens=jnp.zeros((num_traces, t_max), jnp.int32), lengths=jnp.zeros(num_traces, jnp.int32),
        logprobs=zeros((num_traces, t_max)), confidence=zeros((num_traces, t_max)),
        group_confidence=zeros((num_traces, t_max)), lowest_group_confidence=zeros(num_traces),
        tail_confidence=zeros(num_traces), finish_reason=jnp.zeros(num_traces, jnp.int32),
        prompt_index=jnp.arange(num_traces, dtype=jnp.int32) // budget,
        steps=jnp.zeros((), jnp.int32))
    first_logits = prompt_logits[prompt]  # [B, V]: where each trace of a slot starts
    loop = _Loop(cache=cache, logits=first_logits,
                 window=GroupWindow.create(num_slots, config.window),
                 lowest=jnp.full(num_slots, jnp.inf), trace=prompt * budget
                 + jnp.arange(num_slots) % config.n, length=jnp.zeros(num_slots, jnp.int32),
                 launched=jnp.full(num_prompts, config.n, jnp.int32), out=out,
                 step=jnp.zeros((), jnp.int32))

    def body(s: _Loop) -> _Loop:
        active = s.trace >= 0
        if config.confidence:
            conf = token_confidence(s.logits, config.confidence_k)            # [B]
        else:
            conf = jnp.zeros(num_slots, jnp.float32)
        token = next_tokens(s.logits, jax.random.fold_in(key, s.step), config)
        tempered = s.logits / (config.temperature or 1.0)                    # [B, V]
        logp = (jnp.take_along_axis(tempered, token[:, None], axis=-1)[:, 0]
                - jax.nn.logsumexp(tempered, axis=-1))
        window = s.window.push(conf, active)
        group = window.mean
        lowest = jnp.where(active & window.full, jnp.minimum(s.lowest, group), s.lowest)

        row = jnp.where(active, s.trace, num_traces)  # idle slots write out of bounds: dropped
        o = s.out

        def put(buffer, value):
            return buffer.at[row, s.length].set(value, mode="drop")

        o = o.replace(tokens=put(o.tokens, token), logprobs=put(o.logprobs, logp),
                      confidence=put(o.confidence, conf), group_confidence=put(
                          o.group_confidence, group))
        length = s.length + active
        stopped = jnp.isin(token, stop_ids)
        low = (window.full & (group < threshold)
               if config.stop_threshold is not None else jnp.zeros_like(active))
        finishing = active & (stopped | low | (length >= t_max))
        reason = jnp.where(stopped, STOP, jnp.where(low, LOW_CONFIDENCE, LENGTH))
        done_row = jnp.where(finishing, s.trace, num_traces)

        def put_final(buffer, value):
            return buffer.at[done_row].set(value, mode="drop")

        o = o.replace(lengths=put_final(o.lengths, length),
                      finish_reason=put_final(o.finish_reason, reason),
                      lowest_group_confidence=put_final(
                          o.lowest_group_confidence, jnp.where(window.full, lowest, group)),
                      tail_confidence=put_final(o.tail_confidence, group))

        logits, cache = model.decode(token, s.cache)
        # Finished slots restart from their prompt: a new trace if the budget allows, else idle.
        number, refilled = _first_free(finishing, prompt, s.launched, budget)
        launched = s.launched.at[prompt].add(refilled.astype(jnp.int32))
        cache = cache.replace(
            valid=jnp.where(finishing[:, None] & (jnp.arange(cache.size) >= start[:, None]),
                            False, cache.valid),
            positions=jnp.where(finishing, prompt_positions, cache.positions),
            index=jnp.where(finishing, start, cache.index))
        return _Loop(
            cache=cache, logits=jnp.where(finishing[:, None], first_logits, logits),
            window=window.reset(finishing), lowest=jnp.where(finishing, jnp.inf, lowest),
            trace=jnp.where(refilled, prompt * budget + number,
                            jnp.where(finishing, -1, s.trace)),
            length=jnp.where(finishing, 0, length), launched=launched, out=o, step=s.step + 1)

    final = jax.lax.while_loop(lambda s: jnp.any(s.trace >= 0), body, loop)
    return final.out.replace(steps=final.step)


# --------------------------------------------------------------------------------------------
# Entry point


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0, width: int | None = None,
             ) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> (ids int32 [P, L], mask int32 [P, L]) with the padding on the left; L is
    `width` (a prompt longer than it is an error naming it) or the longest prompt's length."""
    require(len(prompts) > 0, "no prompts given")
    empty = [i for i, p in enumerate(prompts) if len(p) == 0]
    require(not empty, f"prompts {empty[:5]} are empty")
    if width is not None:
        long = [(i, len(p)) for i, p in enumerate(prompts) if len(p) > width]
        require(not long, f"prompts (index, tokens) {long[:5]} are longer than the prompt "
                          f"length {width}")
    width = width or max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    return ids, mask


def kv_cache_bytes(c: DecoderConfig, prompts: int, prompt_length: int,
                   config: SamplingConfig) -> int:
    """Bytes of the KV cache `sample` allocates for its slots (keys and values of every layer)
    for a model of architecture `c`."""
    slots = prompts * config.n
    size = prompt_length + config.max_new_tokens
    per_head = c.head_dim + 4 if config.int8_cache else c.head_dim * jnp.dtype(c.dtype).itemsize
    return 2 * c.num_layers * slots * size * c.num_kv_heads * per_head


def sample(model: Decoder, prompts: Sequence[Sequence[int]], key: jax.Array,
           config: SamplingConfig, mesh: Mesh | None = None,
           prompt_length: int | None = None) -> Samples:
    """Samples `config.traces_per_prompt` traces for each prompt (lists of token ids).

    Prompts are left-padded to `prompt_length` (default: the longest prompt; a fixed length
    keeps one compiled loop for every batch). With a mesh, the slots are split over its first
    axis (P x n must divide evenly) and the weights replicated. Bad settings raise ValueError
    before anything is compiled.
    """
    ids, mask = left_pad(prompts, width=prompt_length)
    c = model.config
    cache_size = ids.shape[1] + config.max_new_tokens
    require(cache_size <= c.max_position_embeddings,
            f"prompt ({ids.shape[1]} tokens) + max_new_tokens ({config.max_new_tokens}) = "
            f"{cache_size} exceeds the model's max_position_embeddings={c.max_position_embeddings}")
    for name in ("confidence_k",) * config.confidence + ("top_k",):
        require(getattr(config, name) <= c.vocab_size,
                f"SamplingConfig.{name}={getattr(config, name)} exceeds the vocabulary "
                f"({c.vocab_size})")
    bad = [t for t in config.stop_ids if not 0 <= t < c.vocab_size]
    require(not bad, f"stop_ids {bad} are outside the vocabulary [0, {c.vocab_size})")
    model._check_tokens(ids)
    graphdef, state = nnx.split(model)
    slots = len(prompts) * config.n
    if mesh is not None:
        require(slots % mesh.size == 0, f"{len(prompts)} prompts x n={config.n} = {slots} slots "
                f"must divide evenly over {mesh.size} devices")
        state = jax.device_put(state, parallel.replicated(mesh))
    cache, prompt_logits = _prefill(graphdef, state, jnp.asarray(ids), jnp.asarray(mask),
                                    cache_size=cache_size, n=config.n,
                                    int8_cache=config.int8_cache)
    if mesh is not None:
        axis = mesh.axis_names[0]
        cache = cache.map_rows(lambda x: jax.device_put(x, NamedSharding(mesh,
                                                                         PartitionSpec(axis))))
    threshold = jnp.float32(config.stop_threshold or 0.0)
    static = config if config.stop_threshold is None else dataclasses.replace(
        config, stop_threshold=0.0)
    return _decode(graphdef, state, cache, prompt_logits, key, threshold, config=static)
