"""Sampling many traces per prompt in one compiled decode loop that measures DeepConf confidence
as it goes, stops weak traces, and refills their slots (section 1 of `papers/deepconf.md`).

    samples = sample(model, prompts, key, SamplingConfig(group_size=16, budget=64,
                                                         stop_threshold=12.0))

One jitted prefill runs each prompt once and keeps its KV once ([P, ...], the prefix,
`prefill`). One jitted `lax.while_loop` then decodes every slot until all traces are done
(`decode_loop`); slot b = p G + i continues prompt p, and its attention reads the prompt's KV
together with the other G - 1 slots of that prompt (their queries batched, cascade attention,
`Decoder.decode(prefix=)`) and its own generated KV, only up to the longest live trace
(`attention.decode_attention`: the Pallas kernel on a GPU, flash-decoding in blocks elsewhere),
in slots of `max_new_tokens` each or in pages of a shared pool handed out as traces grow
(`kv_pages`, `paging`).

The loop's body is one pure function of its state, `decode_step(state, params, shape) -> state`:

    state   `DecodeState`, a pytree: what changes per step (the generated cache, each slot's
            logits, confidence windows and output row, the outputs, the step, the free pages)
            and the `Request`, what the call fixes for the whole loop, traced (the prompts' KV
            and last logits, the key, the strategy's temperature and top-p, the thresholds
            and budgets per prompt); `init_state` builds the first one
    params  `DecodeParams`: the model and, with scan_layers, its layers' stacked weights
    shape   `DecodeShape`, static and hashable: slots per prompt, output capacity, T, stop ids,
            window and tail sizes, early stop on or off, the decode kernel

A step is a chain of sub-steps, each pure: pages for the slots starting one, evicting a trace
when every live slot waits (`page_in`); the next token, its log-prob and its token confidence
from one top-k search (`draw`, through `strategies.Nucleus`), the group window and the tail
(`update_confidence`), the output row (`record`) and whether the trace ends (`finish`,
`record_final`), together `advance`; the tokens through the model (`feed`); the ended traces'
pages back (`release_pages`); and the slots that start a new trace of their prompt while its
budget is not spent (`restart_slots`, `refill`; the prompt KV stays in place, the slot's
generated KV is overwritten from slot 0), so stopping early saves wall-clock time, not only
tokens.

No recompiles for what a user sweeps: prompt lengths are padded up to a multiple of
`SamplingConfig.prompt_bucket`, and the early-stop threshold and the budget, one of each per
prompt, are traced (the output rows are sized for the budget rounded up to a power of two), and
so are the temperature and top-p.

Randomness: one key draws every slot's tokens of a step from `fold_in(key, step)`; a key per
prompt ([P]) gives each trace its own stream instead (`draw_keys`: token t of trace j of prompt
p comes from `fold_in(fold_in(keys[p], j), t)`), so a prompt's traces do not depend on the other
prompts of the call, on the slot count or on when a slot was refilled: DeepConf online runs many
problems in one call and gets what it gets one problem at a time (`deepconf.online.solve_many`).

How much device memory a request needs, asked of the compiled programs without allocating
it, is `jaxlab.sampling.memory`'s question; `sample` asks it before it allocates anything
(`memory.require_fits`: a shape estimate, and the compiled programs only when that estimate
passes half of the device's memory) and refuses a request that does not fit with
`parallel.DoesNotFit`, naming the smaller settings that do.

Shapes: P prompts, L padded prompt length, G = group_size slots per prompt, B = P x G slots,
N = P x budget traces (the sum of the per-prompt budgets when given), T = max_new_tokens (the
generated KV holds T_gen >= T slots), V vocabulary, W window, S = min(tail, T) tail. The
confidence state is two ring buffers of float32, B x (W + S) x 4 bytes (256 slots with W = S =
2048: 4 MiB), updated in O(1) per token.
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
from jaxlab.models import attention, backend
from jaxlab.models.backend import BackendPolicy
from jaxlab.models.decoder import Decoder, LayerStack
from jaxlab.models.kv_cache import DECODE_BLOCK, KVCache
from jaxlab.sampling import paging, strategies
from jaxlab.sampling.confidence import GroupWindow

FINISH_REASONS = ("unfinished", "stop", "length", "low_confidence")
STOP, LENGTH, LOW_CONFIDENCE = 1, 2, 3


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to sample (hashable). The compiled loop's static settings are drawn from it
    (`DecodeShape.of`), its traced values too (`sampling_strategy`, thresholds, budgets)."""

    max_new_tokens: int = 256
    temperature: float = 0.6        # below strategies.TEMPERATURE_FLOOR (1e-5): greedy
    top_k: int = 0                  # keep the k most likely tokens (0: all)
    top_p: float = 1.0              # keep the smallest set of tokens with this much mass
    group_size: int = 1             # G: traces decoded at once per prompt (slots)
    budget: int | None = None       # traces per prompt in all; > group_size refills slots
    stop_ids: tuple[int, ...] = ()  # EOS and any other token that ends a trace (kept in it)
    confidence: bool = True         # measure token and group confidence while decoding
    confidence_k: int = 20          # C_i averages the top-k log-probs
    window: int = 2048              # group confidence window (tokens); longer than the trace:
    #                                 the whole trace is one group (never full: no early stop)
    tail: int = 2048                # tail confidence: mean C over the last `tail` tokens (longer
    #                                 than the trace: the whole trace)
    stop_threshold: float | None = None  # stop a trace once its full-window group conf < this
    int8_cache: bool = False        # keys/values in int8 with per-token, per-head scales
    kv_pages: int | None = None     # the generated KV in a pool of this many pages of
    #                                 `kv_page_slots` tokens, handed to traces as they grow
    #                                 (`paging`; None: each slot holds max_new_tokens)
    prompt_bucket: int = 64         # prompts padded to a multiple of this many tokens (one
    #                                 compiled prefill and loop per bucket, not per length)
    decode_kernel: str = "auto"     # decode attention (`attention.DECODE_KERNELS`): "auto" is
    #                                 the model's backend policy's kernel where it applies (the
    #                                 GPU/TPU Pallas kernel; else portable, logged); "pallas"
    #                                 that kernel or an error naming why it cannot run
    scan_layers: bool = False       # the layers in one scan over a stacked copy of their
    #                                 weights and a stacked cache: compiled once whatever the
    #                                 depth (docs/deepconf.md)

    def __post_init__(self):
        require_positive_ints(self, "max_new_tokens", "group_size", "confidence_k", "window",
                              "tail", "prompt_bucket")
        require(self.temperature >= 0,
                f"SamplingConfig.temperature must be >= 0, got {self.temperature}")
        require(0 < self.top_p <= 1, f"SamplingConfig.top_p must lie in (0, 1], got {self.top_p}")
        require(isinstance(self.top_k, int) and self.top_k >= 0,
                f"SamplingConfig.top_k must be an integer >= 0, got {self.top_k!r}")
        require(self.budget is None or self.budget >= self.group_size,
                f"SamplingConfig.budget={self.budget} must be >= group_size={self.group_size}")
        require(self.stop_threshold is None or self.confidence,
                "SamplingConfig.stop_threshold needs confidence=True")
        if self.kv_pages is not None:
            least = 1 + self.pages_per_trace
            require(isinstance(self.kv_pages, int) and self.kv_pages >= least,
                    f"SamplingConfig.kv_pages={self.kv_pages!r} cannot hold one trace of "
                    f"max_new_tokens={self.max_new_tokens}: it needs at least {least} pages "
                    f"of {self.kv_page_slots} tokens (one is scratch)")
        require(self.decode_kernel in attention.DECODE_KERNELS,
                f"SamplingConfig.decode_kernel must be one of {attention.DECODE_KERNELS}, got "
                f"{self.decode_kernel!r}")
        require(self.decode_kernel != "pallas" or not self.int8_cache,
                "SamplingConfig.decode_kernel='pallas' takes a float cache, not int8_cache=True")
        object.__setattr__(self, "stop_ids", tuple(int(i) for i in self.stop_ids))

    @property
    def traces_per_prompt(self) -> int:
        return self.group_size if self.budget is None else self.budget

    @property
    def kv_page_slots(self) -> int:
        """Tokens per page of a paged cache: a block of decode attention."""
        return min(DECODE_BLOCK, generated_slots(self.max_new_tokens))

    @property
    def pages_per_trace(self) -> int:
        """Pages of a trace of `max_new_tokens` tokens."""
        return generated_slots(self.max_new_tokens) // self.kv_page_slots


@struct.dataclass
class Samples:
    """Every trace, one row each; trace i belongs to prompt `prompt_index[i]`."""

    tokens: jax.Array                   # int32 [N, T], 0 past `lengths`
    lengths: jax.Array                  # int32 [N], generated tokens (stop token included)
    logprobs: jax.Array                 # float32 [N, T], log-prob of each sampled token under
    #                                     softmax(logits / temperature) (raw logits when greedy),
    #                                     before top-k/top-p truncation: the policy an RL step
    #                                     evaluates (`train_step`'s `temperature`)
    confidence: jax.Array               # float32 [N, T], token confidence C_i
    group_confidence: jax.Array         # float32 [N, T], mean C over the last min(i + 1, W)
    lowest_group_confidence: jax.Array  # float32 [N], min over full windows (mean if shorter)
    tail_confidence: jax.Array          # float32 [N], mean C over the last min(length, tail)
    finish_reason: jax.Array            # int32 [N], index into FINISH_REASONS
    prompt_index: jax.Array             # int32 [N]
    steps: jax.Array                    # int32 [], decode steps the loop took

    @classmethod
    def empty(cls, prompts: int, traces_per_prompt: int, max_new_tokens: int) -> Samples:
        """Zeros for prompts x traces_per_prompt traces of max_new_tokens tokens."""
        rows, t = prompts * traces_per_prompt, max_new_tokens
        zeros = functools.partial(jnp.zeros, dtype=jnp.float32)
        return cls(tokens=jnp.zeros((rows, t), jnp.int32), lengths=jnp.zeros(rows, jnp.int32),
                   logprobs=zeros((rows, t)), confidence=zeros((rows, t)),
                   group_confidence=zeros((rows, t)), lowest_group_confidence=zeros(rows),
                   tail_confidence=zeros(rows), finish_reason=jnp.zeros(rows, jnp.int32),
                   prompt_index=jnp.arange(rows, dtype=jnp.int32) // traces_per_prompt,
                   steps=jnp.zeros((), jnp.int32))


# --------------------------------------------------------------------------------------------
# Pure pieces


def sampling_strategy(config: SamplingConfig) -> strategies.Nucleus:
    """How the loop draws tokens (`strategies.Nucleus`): temperature and top-p traced (a new value
    does not recompile), top-k static, and the largest logits it finds long enough for the token
    confidence, so that one top-k search serves both."""
    return strategies.Nucleus(
        temperature=jnp.float32(config.temperature), top_p=jnp.float32(config.top_p),
        top_k=config.top_k, num_top_logits=config.confidence_k if config.confidence else 0)


# --------------------------------------------------------------------------------------------
# The pieces of a decode step, each pure: [B] is one entry per slot


def draw(logits: jax.Array, key: jax.Array, strategy: strategies.Nucleus,
         confidence_k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The next tokens int32 [B] drawn by `strategy` from logits [B, V], their log-probs float32
    [B] under softmax(logits / temperature) (the raw logits when greedy) before truncation, and
    their token confidence C float32 [B] over the top `confidence_k` log-probs from the same
    top-k search (0 when `confidence_k` is 0: no confidence)."""
    d = strategy(logits, key)
    if confidence_k:
        conf = strategies.token_confidence_from_top(d.top_logits, d.log_normalizer,
                                                    confidence_k)
    else:
        conf = jnp.zeros(logits.shape[:1], jnp.float32)
    return d.tokens, d.logprobs, conf


def update_confidence(conf: jax.Array, window: GroupWindow, tail: GroupWindow,
                      lowest: jax.Array, active: jax.Array):
    """C [B] pushed into the group windows and the tails of the active slots. Returns (window,
    tail, group = window mean [B], lowest [B] = min(lowest, group) where the window is full)."""
    window, tail = window.push(conf, active), tail.push(conf, active)
    group = window.mean
    return (window, tail, group,
            jnp.where(active & window.full, jnp.minimum(lowest, group), lowest))


def record(out: Samples, row: jax.Array, length: jax.Array, token, logp, conf, group) -> Samples:
    """Writes each slot's token, log-prob, C and group confidence at [row, length] of the
    outputs (row [B] out of range for an idle slot: dropped)."""
    def put(buffer, value):
        return buffer.at[row, length].set(value, mode="drop")

    return out.replace(tokens=put(out.tokens, token), logprobs=put(out.logprobs, logp),
                       confidence=put(out.confidence, conf),
                       group_confidence=put(out.group_confidence, group))


def clear_rows(out: Samples, trace: jax.Array, evicted: jax.Array) -> Samples:
    """The output rows of the evicted slots' traces (bool [B]) back to zeros: the trace is
    decoded again from its first token. Runs only in a step that evicts (`lax.cond`)."""
    def clear(out):
        row = jnp.where(evicted, trace, out.lengths.shape[0])[:, None]       # [B, 1]
        return out.replace(**{name: getattr(out, name).at[row].set(0, mode="drop") for name in
                              ("tokens", "logprobs", "confidence", "group_confidence")})

    return jax.lax.cond(jnp.any(evicted), clear, lambda out: out, out)


def finish(token: jax.Array, length: jax.Array, window: GroupWindow, active: jax.Array,
           stop_ids: jax.Array, threshold: jax.Array | None, max_new_tokens: int):
    """Which slots' traces end after this token (length [B] tokens so far) and why: a stop token
    (STOP), a full window whose mean fell below `threshold` ([] or one per slot [B];
    LOW_CONFIDENCE; None: never), or the length limit (LENGTH). Returns (finishing bool [B],
    reason int32 [B])."""
    stopped = jnp.isin(token, stop_ids)
    low = (jnp.zeros_like(active) if threshold is None
           else window.full & (window.mean < threshold))
    finishing = active & (stopped | low | (length >= max_new_tokens))
    return finishing, jnp.where(stopped, STOP, jnp.where(low, LOW_CONFIDENCE, LENGTH))


def record_final(out: Samples, row: jax.Array, finishing: jax.Array, length, reason,
                 window: GroupWindow, tail: GroupWindow, lowest) -> Samples:
    """Writes the finishing traces' length, finish reason, lowest group confidence (the mean
    when the trace is shorter than the window) and tail confidence (the tail ring's mean: the
    last min(length, tail) tokens)."""
    done = jnp.where(finishing, row, out.lengths.shape[0])

    def put(buffer, value):
        return buffer.at[done].set(value, mode="drop")

    group = window.mean
    return out.replace(lengths=put(out.lengths, length),
                       finish_reason=put(out.finish_reason, reason),
                       lowest_group_confidence=put(out.lowest_group_confidence,
                                                   jnp.where(window.full, lowest, group)),
                       tail_confidence=put(out.tail_confidence, tail.mean))


def refill(finishing: jax.Array, prompt: jax.Array, trace: jax.Array, launched: jax.Array,
           budget: jax.Array, capacity: int):
    """Finishing slots start the next traces of their prompt while its budget is not spent.

    A prompt's slots are consecutive (slot b = p G + i). Finishing slots of one prompt are
    ranked by slot; rank r takes trace number launched[p] + r if that is below `budget` (traced,
    [] or one per prompt [P]), as output row p x capacity + number; the others go idle (trace
    -1). O(B): the rank is a running count of finishing slots minus its value at the prompt's
    first slot. Returns (trace int32 [B], launched int32 [P], refilled bool [B]).
    """
    slots = jnp.arange(prompt.shape[0])
    done = finishing.astype(jnp.int32)
    before = jnp.cumsum(done) - done                          # [B] finishing slots before b
    first = jnp.full(launched.shape, prompt.shape[0]).at[prompt].min(slots)   # [P]
    number = launched[prompt] + before - before[first[prompt]]               # [B]
    refilled = finishing & (number < jnp.broadcast_to(budget, launched.shape)[prompt])
    trace = jnp.where(refilled, prompt * capacity + number, jnp.where(finishing, -1, trace))
    return trace, launched.at[prompt].add(refilled.astype(jnp.int32)), refilled


def draw_keys(key: jax.Array, step: jax.Array, prompt: jax.Array, trace: jax.Array,
              length: jax.Array, capacity: int) -> jax.Array:
    """The keys of one step: `fold_in(key, step)` for one key []; for a key per prompt [P], one
    key per slot [B], fold_in(fold_in(key[p], j), t) for the slot's trace number j (its output
    row `trace` mod `capacity`) and token position t = `length`."""
    if key.ndim == 0:
        return jax.random.fold_in(key, step)
    number = jnp.maximum(trace, 0) % capacity
    return jax.vmap(lambda k, j, t: jax.random.fold_in(jax.random.fold_in(k, j), t))(
        key[prompt], number, length)


# --------------------------------------------------------------------------------------------
# The decode loop: a state pytree and one pure step over it, [B] one entry per slot, [P] per
# prompt


@dataclasses.dataclass(frozen=True)
class DecodeShape:
    """What fixes the compiled decode loop: shapes, loop bounds and switches (hashable: the
    static argument of `decode_loop`). What a user sweeps is traced and lives in `Request`
    instead: the temperature and top-p (in the strategy), the early-stop thresholds and the
    budgets, so a new value does not recompile. Int8 storage, paging and stacked layers are
    the generated cache's structure (`init_generated`) and top-k a static field of the
    strategy: they too select the compiled program, and are not repeated here."""

    group_size: int             # G, slots per prompt (slot b = p G + i continues prompt p)
    capacity: int               # output rows per prompt: the traces per prompt rounded up to a
    #                             power of two (a smaller budget, traced, uses fewer of them)
    max_new_tokens: int         # T: a trace ends at this length
    stop_ids: tuple[int, ...]   # tokens that end a trace (kept in it)
    confidence_k: int           # C_i averages the top-k log-probs (0: no confidence measured)
    window: int                 # W: the group window's tokens
    tail: int                   # S = min(tail, T): the tail ring's tokens (no trace is longer
    #                             than T, so a longer ring would hold the same tokens)
    early_stop: bool            # a trace stops once its full window's mean < its threshold
    decode_kernel: str          # decode attention (`attention.DECODE_KERNELS`)

    @classmethod
    def of(cls, config: SamplingConfig, early_stop: bool = False) -> DecodeShape:
        """The loop's static settings for `config`; early stop on when `early_stop` (thresholds
        given per prompt) or `config.stop_threshold` is set."""
        return cls(group_size=config.group_size,
                   capacity=1 << (config.traces_per_prompt - 1).bit_length(),
                   max_new_tokens=config.max_new_tokens, stop_ids=config.stop_ids,
                   confidence_k=config.confidence_k if config.confidence else 0,
                   window=config.window, tail=min(config.tail, config.max_new_tokens),
                   early_stop=early_stop or config.stop_threshold is not None,
                   decode_kernel=config.decode_kernel)


@struct.dataclass
class Request:
    """What one request fixes for the whole loop, traced (new values do not recompile)."""

    prefix: KVCache               # [P, ..., L] each prompt's KV, read by its G slots, never
    #                               written
    prompt_logits: jax.Array      # float32 [P, V], each prompt's last logits
    prompt: jax.Array             # int32 [B], the prompt a slot continues: b // G
    prompt_positions: jax.Array   # int32 [B], the position of its prompt's first new token
    key: jax.Array                # key [] (one stream per step) or [P] (one per trace)
    strategy: strategies.Nucleus  # how tokens are drawn (temperature and top-p traced)
    threshold: jax.Array | None   # float32 [B], early-stop threshold of the slot's prompt
    #                               (None: no early stop)
    budget: jax.Array             # int32 [P], traces per prompt, 0 to DecodeShape.capacity

    @classmethod
    def create(cls, prefix: KVCache, prompt_logits: jax.Array, key: jax.Array,
               strategy: strategies.Nucleus, threshold: jax.Array, budget: jax.Array,
               shape: DecodeShape) -> Request:
        """The request of P prompts (`prefill`'s prefix [P, ...] and logits [P, V]), one
        threshold float32 [P] (read when `shape.early_stop`) and budget int32 [P] per prompt,
        spread over their P x G slots."""
        prompt = (jnp.arange(prompt_logits.shape[0] * shape.group_size)
                  // shape.group_size)                                            # [B]
        return cls(prefix=prefix, prompt_logits=prompt_logits, prompt=prompt,
                   prompt_positions=prefix.positions[prompt], key=key, strategy=strategy,
                   threshold=threshold[prompt] if shape.early_stop else None, budget=budget)


@struct.dataclass
class DecodeState:
    """The decode loop's carry: what changes per step, and the request it serves."""

    cache: KVCache            # each slot's generated tokens (T_gen slots, or pages); index =
    #                           length
    logits: jax.Array         # float32 [B, V], each slot's next-token logits
    window: GroupWindow       # [B, W], the group window
    tail: GroupWindow         # [B, S], the tail
    lowest: jax.Array         # float32 [B], min full-window group confidence so far
    trace: jax.Array          # int32 [B], the output row a slot writes; -1 when idle
    launched: jax.Array       # int32 [P], traces started per prompt
    out: Samples              # [P x capacity, ...]
    step: jax.Array           # int32 []
    free: paging.FreeList | None  # the free pages of a paged cache (else None)
    request: Request          # fixed for the whole loop

    @property
    def live(self) -> jax.Array:
        """bool [B]: the slot decodes a trace (not idle)."""
        return self.trace >= 0

    @property
    def rows(self) -> int:
        """P x capacity: the output rows (a row index past them is dropped)."""
        return self.out.lengths.shape[0]


@dataclasses.dataclass(frozen=True)
class DecodeParams:
    """What the model contributes to a step: the model (`nnx.merge` of the graph and state
    `decode_loop` is given) and, for a stacked cache, one stacked copy of its layers' weights
    (`Decoder.layer_stack`), made once before the loop rather than at every step."""

    model: Decoder
    layer_stack: LayerStack | None = None


def init_state(request: Request, cache: KVCache, out: Samples, shape: DecodeShape,
               ) -> DecodeState:
    """The loop's first state over an empty generated cache (`init_generated`) and empty outputs
    (`Samples.empty`): slot i of prompt p starts trace i (output row p capacity + i) if
    i < budget[p], else sits idle; launched[p] = min(budget[p], G); every slot's logits are its
    prompt's last ones and its cache starts at its prompt's end."""
    num_slots, prompt = request.prompt.shape[0], request.prompt
    slot = jnp.arange(num_slots) % shape.group_size                           # [B]
    return DecodeState(
        cache=cache.replace(positions=request.prompt_positions),
        logits=request.prompt_logits[prompt],
        window=GroupWindow.create(num_slots, shape.window),
        tail=GroupWindow.create(num_slots, shape.tail),
        lowest=jnp.full(num_slots, jnp.inf),
        trace=jnp.where(slot < request.budget[prompt], prompt * shape.capacity + slot, -1),
        launched=jnp.minimum(request.budget, shape.group_size).astype(jnp.int32),
        out=out, step=jnp.zeros((), jnp.int32),
        free=None if cache.pages is None else paging.FreeList.full(cache.rows),
        request=request)


def page_in(state: DecodeState) -> tuple[DecodeState, jax.Array, jax.Array]:
    """A paged cache's pages for this step (`paging`): each live slot about to write the first
    token of a page takes one (`paging.allocate`) or waits; when every live slot waits, the
    shortest trace holding pages gives them back and starts over (`paging.evict`), its output
    row cleared (`clear_rows`). Returns (state, waiting bool [B], evicted bool [B]); both all
    False for an unpaged cache, which passes through."""
    live, cache, free = state.live, state.cache, state.free
    if free is None:
        return state, jnp.zeros_like(live), jnp.zeros_like(live)
    need = live & (cache.index % cache.block == 0)
    pages, free, granted = paging.allocate(cache.pages, free, need, cache.index, cache.block)
    waiting = need & ~granted
    stuck = jnp.any(waiting) & ~jnp.any(live & ~waiting)
    pages, free, evicted = paging.evict(pages, free, stuck, live, cache.index, cache.block)
    return (state.replace(cache=cache.replace(pages=pages), free=free,
                          out=clear_rows(state.out, state.trace, evicted)), waiting, evicted)


def advance(state: DecodeState, active: jax.Array, shape: DecodeShape,
            ) -> tuple[DecodeState, jax.Array, jax.Array, jax.Array]:
    """The active slots' (bool [B]) next tokens from their logits (`draw_keys`, `draw`), their
    confidence pushed into the window and tail (`update_confidence`), written at [trace,
    length] of the outputs (`record`), and the traces that end with them written whole
    (`finish`, `record_final`). The cache and logits are left for `feed`. Returns (state,
    token int32 [B], length int32 [B] = tokens of the trace with this one, finishing bool
    [B])."""
    r, length = state.request, state.cache.index                              # [B]
    keys = draw_keys(r.key, state.step, r.prompt, state.trace, length, shape.capacity)
    token, logp, conf = draw(state.logits, keys, r.strategy, shape.confidence_k)
    window, tail, group, lowest = update_confidence(conf, state.window, state.tail,
                                                    state.lowest, active)
    row = jnp.where(active, state.trace, state.rows)
    out = record(state.out, row, length, token, logp, conf, group)
    length = length + 1
    stop_ids = jnp.asarray(shape.stop_ids or (-1,), jnp.int32)
    finishing, reason = finish(token, length, window, active, stop_ids, r.threshold,
                               shape.max_new_tokens)
    out = record_final(out, row, finishing, length, reason, window, tail, lowest)
    return (state.replace(window=window, tail=tail, lowest=lowest, out=out), token, length,
            finishing)


def feed(state: DecodeState, params: DecodeParams, token: jax.Array, waiting: jax.Array,
         shape: DecodeShape) -> DecodeState:
    """Every slot's token int32 [B] through the model (`Decoder.decode` with the prompts'
    `prefix`): its KV written into the cache, the next logits [B, V]. A waiting slot (bool [B])
    keeps its place: its cache index, position and logits stay, and its step is redone once it
    has a page."""
    cache = state.cache
    logits, stepped = params.model.decode(token, cache, state.request.prefix,
                                          shape.decode_kernel, params.layer_stack)
    cache = stepped.replace(index=jnp.where(waiting, cache.index, stepped.index),
                            positions=jnp.where(waiting, cache.positions, stepped.positions))
    return state.replace(cache=cache, logits=jnp.where(waiting[:, None], state.logits, logits))


def release_pages(state: DecodeState, finishing: jax.Array, length: jax.Array) -> DecodeState:
    """The pages of the finishing slots' traces (bool [B], of `length` int32 [B] tokens) back on
    the free list (`paging.release`); an unpaged cache passes through."""
    if state.free is None:
        return state
    pages, free = paging.release(state.cache.pages, state.free, finishing, length,
                                 state.cache.block)
    return state.replace(cache=state.cache.replace(pages=pages), free=free)


def restart_slots(state: DecodeState, live: jax.Array, finishing: jax.Array,
                  evicted: jax.Array, shape: DecodeShape) -> DecodeState:
    """The finishing slots take their prompt's next traces while its budget lasts, or go idle
    (`refill`). A slot that starts over (a new trace, or its own trace again when evicted) or
    sits idle (not `live` at the step's start) goes back to the end of its prompt: its
    generated KV is rewritten from slot 0, its logits are the prompt's last ones; a slot that
    starts over also gets an empty window and tail and lowest = inf."""
    r = state.request
    trace, launched, _ = refill(finishing, r.prompt, state.trace, state.launched, r.budget,
                                shape.capacity)
    fresh = finishing | evicted
    restart = fresh | ~live
    cache = state.cache.replace(
        index=jnp.where(restart, 0, state.cache.index),
        positions=jnp.where(restart, r.prompt_positions, state.cache.positions))
    return state.replace(
        cache=cache, logits=jnp.where(restart[:, None], r.prompt_logits[r.prompt], state.logits),
        window=state.window.reset(fresh), tail=state.tail.reset(fresh),
        lowest=jnp.where(fresh, jnp.inf, state.lowest), trace=trace, launched=launched)


def decode_step(state: DecodeState, params: DecodeParams, shape: DecodeShape) -> DecodeState:
    """One step of the decode loop, pure: pages for the slots that need one (`page_in`), a
    token for every active slot (live, not waiting for a page) with its confidence and output
    (`advance`), the tokens through the model (`feed`), the pages of the ending traces back
    (`release_pages`), and the slots whose trace ended, was evicted or that sat idle started
    again (`restart_slots`). `decode_loop` runs it while any slot is live."""
    live = state.live                                                         # [B]
    state, waiting, evicted = page_in(state)
    state, token, length, finishing = advance(state, live & ~waiting, shape)
    state = feed(state, params, token, waiting, shape)
    state = release_pages(state, finishing, length)
    state = restart_slots(state, live, finishing, evicted, shape)
    return state.replace(step=state.step + 1)


# --------------------------------------------------------------------------------------------
# The compiled prefill and decode loop


@functools.partial(jax.jit, static_argnames=("int8_cache", "scan_layers"))
def prefill(graphdef, state, ids, mask, *, int8_cache: bool, scan_layers: bool = False):
    """Each prompt once: its KV cache [P, ..., L] (the prefix every slot of it reads, never
    writes; the layers stacked and run in a scan if `scan_layers`) and its last logits [P, V].

    A prefix of one block per layer, which the decode loop reads whole, is returned as floats
    (`KVCache.as_floats`); one read in blocks, or a layer at a time from a stack, as the cache
    holds it (bits of 16-bit floats on the CPU: `attention.stored_dtype`)."""
    model = nnx.merge(graphdef, state)
    logits, cache = model.prefill(ids, mask, cache_size=ids.shape[1], int8_cache=int8_cache,
                                  last_only=True, scan_layers=scan_layers)
    return (cache.as_floats() if cache.size == cache.block and not scan_layers else cache), logits


def generated_slots(max_new_tokens: int) -> int:
    """T_gen: slots of each slot's generated KV, T rounded up to a whole number of attention
    blocks (a power of two up to `DECODE_BLOCK`, then a multiple of it)."""
    if max_new_tokens >= DECODE_BLOCK:
        return -(-max_new_tokens // DECODE_BLOCK) * DECODE_BLOCK
    return 1 << (max_new_tokens - 1).bit_length()


# The generated KV and the outputs are donated: the loop updates them in place and returns them.
# (Built inside the program instead, XLA's CPU backend copies them at every step.)
@functools.partial(jax.jit, static_argnames=("shape",), donate_argnames=("cache", "out"))
def decode_loop(graphdef, state, prefix: KVCache, prompt_logits: jax.Array, cache: KVCache,
                out: Samples, key: jax.Array, strategy: strategies.Nucleus, threshold: jax.Array,
                budget: jax.Array, *, shape: DecodeShape) -> tuple[Samples, KVCache]:
    """`decode_step` in a `lax.while_loop` from `init_state` until no slot is live, over an
    empty generated cache (`init_generated`: T_gen slots per slot, or a page table over a pool)
    and empty outputs (`Samples.empty` with `shape.capacity` rows per prompt): (outputs,
    cache). The model is `nnx.merge(graphdef, state)`; the prompts' `prefix` and
    `prompt_logits` come from `prefill`. The strategy's temperature and top-p, `threshold`
    float32 [P] (read when `shape.early_stop`) and `budget` int32 [P] (traces per prompt, 0 to
    `shape.capacity`) are traced: new values do not recompile. `key` is one key [] or one per
    prompt [P] (`draw_keys`). A stacked cache (`SamplingConfig.scan_layers`) runs the layers in
    a scan over one stacked copy of their weights, made here before the loop."""
    model = nnx.merge(graphdef, state)
    params = DecodeParams(model, model.layer_stack() if cache.stacked else None)
    request = Request.create(prefix, prompt_logits, key, strategy, threshold, budget, shape)
    final = jax.lax.while_loop(lambda s: jnp.any(s.live),
                               functools.partial(decode_step, params=params, shape=shape),
                               init_state(request, cache, out, shape))
    return final.out.replace(steps=final.step), final.cache


def init_generated(model: Decoder, prompts: int, config: SamplingConfig) -> KVCache:
    """The empty generated KV of P x G slots of T_gen tokens each (`generated_slots`), or their
    page table over a pool of `config.kv_pages` pages."""
    slots, size = prompts * config.group_size, generated_slots(config.max_new_tokens)
    if config.kv_pages is not None:
        return model.init_paged_cache(slots, size, config.kv_pages, config.kv_page_slots,
                                      config.int8_cache, scan_layers=config.scan_layers)
    return model.init_cache(slots, size, config.int8_cache, scan_layers=config.scan_layers)


def cache_sharding(cache: KVCache, mesh: Mesh) -> KVCache:
    """The shardings of a cache's arrays with its rows split over the mesh's batch axes
    (`parallel.batch_sharding`): axis 0 of per-layer arrays and of start, positions, index,
    axis 1 of stacks [L, B, ...]."""
    rows = parallel.batch_sharding(mesh)
    shardings = jax.tree.map(lambda _: rows, cache)
    if not cache.stacked:
        return shardings
    stack = NamedSharding(mesh, PartitionSpec(None, *rows.spec))
    return shardings.replace(**{name: None if getattr(cache, name) is None else stack
                                for name in ("keys", "values", "key_scale", "value_scale")})


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


def padded_length(longest: int, config: SamplingConfig) -> int:
    """L: the prompt length rounded up to a multiple of `config.prompt_bucket`."""
    return -(-longest // config.prompt_bucket) * config.prompt_bucket


def check_mesh(prompts: int, config: SamplingConfig, mesh: Mesh) -> None:
    """What `sample` needs of a mesh: the P x G slots split evenly over its devices, and a paged
    cache on one device only (its pool of pages is not split)."""
    require(config.kv_pages is None or mesh.size == 1,
            f"a paged KV cache (kv_pages) is not split over a mesh: {mesh.size} devices")
    slots = prompts * config.group_size
    require(slots % mesh.size == 0,
            f"{prompts} prompts x group_size={config.group_size} = {slots} slots must "
            f"divide evenly over {mesh.size} devices")


def mesh_decode_kernel(shape: DecodeShape, policy: BackendPolicy, mesh: Mesh) -> DecodeShape:
    """`shape` for a decode loop split over `mesh`: the TPU policy's Pallas kernel runs on one
    device only (XLA cannot split a Mosaic kernel over a mesh), so "auto" becomes "portable"
    there (logged) and "pallas" is an error."""
    if policy.decode_kernel != "pallas_tpu" or mesh.size == 1:
        return shape
    require(shape.decode_kernel != "pallas",
            "decode_kernel='pallas' under the tpu policy runs on one device: XLA cannot "
            "split a Mosaic kernel over a mesh (use 'auto' or 'portable' with a mesh)")
    backend.explain(policy, "decode attention over a mesh", "portable",
                    f"XLA cannot split a Mosaic kernel over {mesh.size} devices")
    return dataclasses.replace(shape, decode_kernel="portable")


def sample(model: Decoder, prompts: Sequence[Sequence[int]], key: jax.Array,
           config: SamplingConfig, mesh: Mesh | None = None,
           max_prompt_tokens: int | None = None, *,
           stop_thresholds: Sequence[float] | None = None,
           budgets: Sequence[int] | None = None,
           device_bytes: int | None = None) -> Samples:
    """Samples `config.traces_per_prompt` traces for each prompt (lists of token ids).

    Prompts are left-padded to `max_prompt_tokens` (default: the longest prompt; a prompt longer
    than it is an error), rounded up to a multiple of `config.prompt_bucket`. With a mesh, the
    slots are split over its first axis (P x G must divide evenly) and the weights held in their
    `parallel.tree_shardings` (split over fsdp x tensor on a `make_train_mesh` mesh, as the train
    step holds them: tensor-parallel decode; replicated on a mesh without those axes).
    Bad settings raise ValueError before anything is compiled, and a request over the device's
    memory `parallel.DoesNotFit` (a ValueError naming what it needs and the smaller settings
    that fit) before anything is allocated: `memory.require_fits` against `device_bytes`
    (default: the free memory of a device of `mesh`, the least over processes, plus the weights
    already on it: `parallel.free_bytes`), which compiles the programs a second time only for a
    request whose shape estimate passes half of that memory.

    Per prompt, optionally: `key` of shape [P] (a key per prompt, each trace its own stream:
    `draw_keys`; one key [] draws all slots from one stream per step), `stop_thresholds` [P]
    (early stop with each prompt's own threshold, in place of `config.stop_threshold`) and
    `budgets` [P] (traces of each prompt, 0 to `config.traces_per_prompt`). The result holds
    the traces of prompt 0, then of prompt 1, ..., budgets[p] of them for prompt p.
    """
    count = len(prompts)
    ids, mask = left_pad(prompts, width=max_prompt_tokens)
    width = ids.shape[1]
    more = ((0, 0), (padded_length(ids.shape[1], config) - ids.shape[1], 0))
    ids, mask = np.pad(ids, more), np.pad(mask, more)                        # [P, L]
    longest = max(len(p) for p in prompts)
    c = model.config
    require(longest + config.max_new_tokens <= c.max_position_embeddings,
            f"prompt ({longest} tokens) + max_new_tokens ({config.max_new_tokens}) = "
            f"{longest + config.max_new_tokens} exceeds the model's max_position_embeddings="
            f"{c.max_position_embeddings}")
    for name in ("confidence_k",) * config.confidence + ("top_k",):
        require(getattr(config, name) <= c.vocab_size,
                f"SamplingConfig.{name}={getattr(config, name)} exceeds the vocabulary "
                f"({c.vocab_size})")
    bad = [t for t in config.stop_ids if not 0 <= t < c.vocab_size]
    require(not bad, f"stop_ids {bad} are outside the vocabulary [0, {c.vocab_size})")
    model.check_tokens(ids)
    key = prompt_keys(key, count)
    if stop_thresholds is None:
        threshold = np.full(count, config.stop_threshold or 0.0, np.float32)
    else:
        threshold = np.asarray(stop_thresholds, np.float32)
        require(threshold.shape == (count,), f"stop_thresholds has shape {threshold.shape}, "
                f"want one per prompt ({count},)")
        require(config.confidence, "stop_thresholds needs SamplingConfig.confidence=True")
    capacity = config.traces_per_prompt
    budget = np.full(count, capacity, np.int32) if budgets is None else np.asarray(budgets)
    require(budget.shape == (count,) and np.issubdtype(budget.dtype, np.integer)
            and ((budget >= 0) & (budget <= capacity)).all(),
            f"budgets must be {count} integers in [0, traces_per_prompt={capacity}], got "
            f"{budgets!r}")
    graphdef, state = nnx.split(model)
    shape = DecodeShape.of(config, early_stop=stop_thresholds is not None)
    if mesh is not None:
        check_mesh(count, config, mesh)
        shape = mesh_decode_kernel(shape, model.backend, mesh)
    from jaxlab.sampling import memory  # it lowers this module's programs
    memory.require_fits(c, count, width, config, parallel.free_bytes(mesh, held=state)
                        if device_bytes is None else device_bytes, mesh, model.backend,
                        weights=memory.placed_bytes(state, mesh))
    cache, out = init_generated(model, count, config), Samples.empty(
        count, shape.capacity, config.max_new_tokens)
    if mesh is not None:
        state = jax.device_put(state, parallel.tree_shardings(state, mesh))
        cache = jax.device_put(cache, cache_sharding(cache, mesh))
        out = jax.device_put(out, parallel.replicated(mesh))
    prefix, prompt_logits = prefill(graphdef, state, jnp.asarray(ids), jnp.asarray(mask),
                                    int8_cache=config.int8_cache, scan_layers=config.scan_layers)
    out, _ = decode_loop(graphdef, state, prefix, prompt_logits, cache, out, key,
                         sampling_strategy(config), jnp.asarray(threshold),
                         jnp.asarray(budget, jnp.int32), shape=shape)
    keep = np.concatenate([p * shape.capacity + np.arange(b)
                           for p, b in enumerate(budget)]).astype(np.int64)  # [N]
    steps = out.steps
    return jax.tree.map(lambda x: x[keep], out.replace(steps=None)).replace(steps=steps)


def prompt_keys(key: jax.Array, prompts: int) -> jax.Array:
    """`key` as a typed key: one key [] (also a raw uint32 [2]) or one per prompt [P] (also raw
    uint32 [P, 2]); any other shape is an error naming it."""
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    require(key.shape in ((), (prompts,)),
            f"key has shape {key.shape}: want one key () or one per prompt ({prompts},)")
    return key
