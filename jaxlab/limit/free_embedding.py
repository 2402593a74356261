"""Free embeddings: can d-dimensional vectors realize every top-k relevance pattern of n documents?

LIMIT (Weller et al. 2025, arXiv 2508.21038), section 1 of `papers/limit.md`. Query and document
vectors are free parameters, optimized directly (no text, no model) with full-batch Adam and a unit
norm projection after every step, until every query's top-k documents are exactly its relevant
ones ("solved"), the loss stops improving, or a step limit is reached.

Everything here is a pure function of arrays and explicit keys. `solve` runs many independent runs
(seeds x candidate n) in few compiled calls: runs are vmapped, padded and masked, and spread over
the devices of a mesh with `jax.shard_map`.

Reproducible by construction: optimization is chaotic, so a one-ulp difference in a reduction can
turn a solved run into a failed one, and XLA's kernels (Eigen's contraction blocking on CPU, the
batched-matmul choice) change their summation order with the operand shapes. A run is therefore
only ever computed in one shape that its own n fixes: its documents padded to `doc_slots(n)`
(whatever its batch partners), in a batch of at least `MIN_RUNS_PER_DEVICE` runs per device (a
batch of one is compiled differently). Its result is then a function of (seed, n, d, config, device
count) alone: not of the other runs, the batch size, or the memory that sized the batch
(tests/limit/test_determinism.py).

Shapes: m queries (one per k-subset, m = C(n, k)), n documents, d dimensions, R runs.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, PartitionSpec

from jaxlab import parallel
from jaxlab.config import is_int, require, require_positive_ints

LOSSES = ("per_positive", "log_sum")

# Float32 [m, n] buffers alive at once in one run's step (logits, log-softmax, their gradient,
# masks); checked against XLA's own memory analysis in the tests.
_LIVE_SCORE_BUFFERS = 4



def check_problem(num_docs: int, k: int, dim: int | None = None) -> None:
    """Raises ValueError naming the first bad value of a free-embedding problem."""
    require(is_int(k) and k >= 1, f"k must be an integer >= 1, got k={k!r}")
    require(is_int(num_docs) and num_docs >= k,
            f"the number of documents must be an integer >= k={k}, got n={num_docs!r}")
    if dim is not None:
        require(is_int(dim) and dim >= 1, f"the dimension must be an integer >= 1, got d={dim!r}")


@dataclasses.dataclass(frozen=True)
class SolverConfig:
    """Static settings of a free-embedding run (hashable: a static argument of compiled loops)."""

    k: int = 2                      # relevant documents per query
    loss: str = "per_positive"      # "per_positive" (official code) or "log_sum" (paper's formula)
    temperature: float = 0.1        # scores are <q, d> / temperature
    learning_rate: float = 0.01     # Adam
    check_every: int = 50           # steps between exact solved checks
    patience: int = 1000            # stop after this many steps without a loss improvement ...
    min_improvement: float = 1e-5   # ... of at least this much
    steps: int = 100_000            # the run's length at most; a multiple of check_every

    def __post_init__(self):
        require_positive_ints(self, "k", "check_every", "patience", "steps")
        require(self.loss in LOSSES,
                f"SolverConfig.loss must be one of {LOSSES}, got {self.loss!r}")
        for name in ("temperature", "learning_rate"):
            value = getattr(self, name)
            require(value > 0, f"SolverConfig.{name} must be > 0, got {value!r}")
        require(self.min_improvement >= 0,
                f"SolverConfig.min_improvement must be >= 0, got {self.min_improvement!r}")
        require(self.steps % self.check_every == 0,
                f"SolverConfig.steps={self.steps} must be a multiple of "
                f"check_every={self.check_every}")


# --------------------------------------------------------------------------------------------
# Ground truth


def ground_truth(num_docs: int, k: int) -> np.ndarray:
    """Every k-subset of the documents range(n), one query each: int32 [C(n, k), k].

    Subsets are listed in colexicographic order (by largest element, then the next largest...),
    each sorted ascending. Colex order lists the subsets of range(n') first for every n' <= n, so
    the ground truth of n' documents is the prefix of length C(n', k): a batch of runs padded to
    its largest n shares one array, and a run with fewer documents masks the rest.
    """
    check_problem(num_docs, k)
    flat = itertools.chain.from_iterable(itertools.combinations(range(num_docs), k))
    subsets = np.fromiter(flat, dtype=np.int32, count=math.comb(num_docs, k) * k).reshape(-1, k)
    return subsets[np.lexsort(subsets.T)]


# --------------------------------------------------------------------------------------------
# The pure math of one run


class Embeddings(NamedTuple):
    queries: jax.Array  # [m, d] unit rows
    docs: jax.Array     # [n, d] unit rows


def exact_scores(queries: jax.Array, docs: jax.Array) -> jax.Array:
    """s_ij = <q_i, d_j> for queries [m, d] and docs [n, d] -> float32 [m, n], computed in full
    float32 (`precision=HIGHEST`: no TF32 pass on NVIDIA GPUs, no single bf16 pass on TPU), so
    that a solved check or a top-k at the critical n does not depend on the backend."""
    return jnp.matmul(queries, docs.T, precision=jax.lax.Precision.HIGHEST)


def _unit_rows(x: jax.Array) -> jax.Array:
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def init_embeddings(key: jax.Array, num_queries: int, num_docs: int, dim: int) -> Embeddings:
    """Rows drawn from N(0, I_d) and L2-normalized.

    JAX's counter-based (partitionable) threefry draws element i of a flat shape from counter i,
    so the first r rows do not depend on how many rows follow: a run padded to a larger batch
    starts from exactly the vectors it would start from alone.
    """
    key_q, key_d = jax.random.split(key)
    return Embeddings(_unit_rows(jax.random.normal(key_q, (num_queries, dim))),
                      _unit_rows(jax.random.normal(key_d, (num_docs, dim))))


def _valid_relevant(relevant: jax.Array, num_queries: jax.Array) -> jax.Array:
    """Padded queries (row >= num_queries) point at documents 0..k-1, which always exist."""
    m, k = relevant.shape
    return jnp.where(jnp.arange(m)[:, None] < num_queries, relevant, jnp.arange(k))


def loss_fn(emb: Embeddings, relevant: jax.Array, num_docs: jax.Array, num_queries: jax.Array,
            *, temperature: float, kind: str) -> jax.Array:
    """Full-batch softmax loss over all documents, averaged over the (unpadded) queries.

    With p_i = softmax_j(<q_i, d_j> / temperature) over the n documents and R_i query i's set:
      kind="log_sum"      (the paper's formula):   L_i = -log sum_{j in R_i} p_ij
      kind="per_positive" (the official code):     L_i = -(1/k) sum_{j in R_i} log p_ij

    Args:
      emb: queries [m, d] and documents [n, d] (rows >= num_queries / num_docs are padding).
      relevant: int [m, k], each query's relevant documents (`ground_truth`).
      num_docs, num_queries: [] int, how many documents and queries are real.
    Returns:
      [] float32, the mean of L_i over real queries.
    """
    m, n = relevant.shape[0], emb.docs.shape[0]
    logits = exact_scores(emb.queries, emb.docs) / temperature           # [m, n]
    logits = jnp.where(jnp.arange(n) < num_docs, logits, -jnp.inf)
    logp = jax.nn.log_softmax(logits, axis=-1)                           # [m, n]
    positive = jnp.take_along_axis(logp, _valid_relevant(relevant, num_queries), axis=-1)  # [m, k]
    if kind == "log_sum":
        per_query = -jax.nn.logsumexp(positive, axis=-1)
    elif kind == "per_positive":
        per_query = -jnp.mean(positive, axis=-1)
    else:
        raise ValueError(f"unknown loss kind {kind!r}; expected one of {LOSSES}")
    per_query = jnp.where(jnp.arange(m) < num_queries, per_query, 0.0)   # [m]
    return jnp.sum(per_query) / num_queries


def query_correct(emb: Embeddings, relevant: jax.Array, num_docs: jax.Array,
                  num_queries: jax.Array) -> jax.Array:
    """bool [m]: query i's top-k documents are exactly its relevant set.

    Exactly: min_{j in R_i} <q_i, d_j>  >  max_{j not in R_i} <q_i, d_j>. A tie at the boundary
    is a failure (a retriever could return either document). Padded queries are False.
    """
    m, n = relevant.shape[0], emb.docs.shape[0]
    relevant = _valid_relevant(relevant, num_queries)
    scores = exact_scores(emb.queries, emb.docs)                         # [m, n]
    lowest_relevant = jnp.min(jnp.take_along_axis(scores, relevant, axis=-1), axis=-1)  # [m]
    others = scores.at[jnp.arange(m)[:, None], relevant].set(-jnp.inf)
    others = jnp.where(jnp.arange(n) < num_docs, others, -jnp.inf)
    return (lowest_relevant > jnp.max(others, axis=-1)) & (jnp.arange(m) < num_queries)


def accuracy(emb, relevant, num_docs, num_queries) -> jax.Array:
    """[] float32: the fraction of real queries whose top-k is exactly right."""
    correct = query_correct(emb, relevant, num_docs, num_queries)
    return jnp.sum(correct) / num_queries


# --------------------------------------------------------------------------------------------
# One run: Adam + projection inside one compiled loop


class RunState(NamedTuple):
    emb: Embeddings
    opt_state: optax.OptState
    num_docs: jax.Array          # [] int32, the run's n (rows past it are padding)
    num_queries: jax.Array       # [] int32, its m (rows past it are padding)
    step: jax.Array              # [] int32, optimizer steps taken
    loss: jax.Array              # [] float32, loss before the last step
    best_loss: jax.Array         # [] float32
    last_improvement: jax.Array  # [] int32, step of the last improvement by min_improvement
    accuracy: jax.Array          # [] float32, at the last check
    solved: jax.Array            # [] bool


class RunResult(NamedTuple):
    solved: jax.Array    # [...] bool
    steps: jax.Array     # [...] int32
    accuracy: jax.Array  # [...] float32, at the last check
    loss: jax.Array      # [...] float32, at the last step


def _optimizer(config: SolverConfig) -> optax.GradientTransformation:
    return optax.adam(config.learning_rate)


def _num_subsets(n: jax.Array, k: int) -> jax.Array:
    """C(n, k) for a traced int32 n (exact for the sizes that fit in memory)."""
    count = jnp.ones((), jnp.int32)
    for i in range(k):  # C(n, k) = prod_{i<k} (n - i) / (i + 1); each partial quotient is exact
        count = count * (n - i) // (i + 1)
    return count


def _problem(state: RunState, relevant: jax.Array):
    return relevant, state.num_docs, state.num_queries


def finished(state: RunState, config: SolverConfig) -> jax.Array:
    """Solved, or `patience` steps without improvement, or `steps` reached."""
    stale = state.step - state.last_improvement >= config.patience
    return state.solved | stale | (state.step >= config.steps)


def result(state: RunState) -> RunResult:
    return RunResult(state.solved, state.step, state.accuracy, state.loss)


def _checked(state: RunState, relevant: jax.Array) -> RunState:
    acc = accuracy(state.emb, *_problem(state, relevant))
    return state._replace(accuracy=acc, solved=acc >= 1.0)


def _train_step(state: RunState, relevant: jax.Array, config: SolverConfig) -> RunState:
    """One Adam step on the full batch, then every row projected back to unit length."""
    loss, grads = jax.value_and_grad(loss_fn)(
        state.emb, *_problem(state, relevant),
        temperature=config.temperature, kind=config.loss)
    updates, opt_state = _optimizer(config).update(grads, state.opt_state, state.emb)
    emb = Embeddings(*map(_unit_rows, optax.apply_updates(state.emb, updates)))
    step = state.step + 1
    improved = loss < state.best_loss - config.min_improvement
    return state._replace(
        emb=emb, opt_state=opt_state, step=step, loss=loss,
        best_loss=jnp.where(improved, loss, state.best_loss),
        last_improvement=jnp.where(improved, step, state.last_improvement))


def init_run(key: jax.Array, relevant: jax.Array, num_docs: jax.Array, *, num_doc_slots: int,
             dim: int, config: SolverConfig, num_queries: int | None = None) -> RunState:
    """A run at step 0: random unit vectors, already checked (n = k is solved at once).

    Args:
      key: PRNG key of the run (folded with num_docs, so each n starts from its own vectors).
      relevant: int32 [m_max, k], each query's relevant documents: ground_truth(num_doc_slots, k)
        or any other relevance pattern.
      num_docs: [] int32, the run's n <= num_doc_slots.
      num_doc_slots: static, the padded number of documents.
      num_queries: the run's m; default C(n, k), the first rows of the ground truth.
    """
    num_docs = jnp.asarray(num_docs, jnp.int32)
    if num_queries is None:
        num_queries = _num_subsets(num_docs, config.k)
    emb = init_embeddings(jax.random.fold_in(key, num_docs), relevant.shape[0], num_doc_slots, dim)
    inf = jnp.asarray(jnp.inf, jnp.float32)
    zero = jnp.zeros((), jnp.int32)
    state = RunState(emb=emb, opt_state=_optimizer(config).init(emb), num_docs=num_docs,
                     num_queries=jnp.asarray(num_queries, jnp.int32), step=zero, loss=inf,
                     best_loss=inf, last_improvement=zero,
                     accuracy=jnp.zeros((), jnp.float32), solved=jnp.zeros((), bool))
    return _checked(state, relevant)


def advance(state: RunState, relevant: jax.Array, *, steps: int, config: SolverConfig) -> RunState:
    """Continues a run until it is `finished` or has taken `steps` more steps, in one
    `lax.while_loop`: each iteration takes `check_every` Adam steps (`lax.fori_loop`), then the
    exact solved check. With steps >= config.steps this runs it to the end."""
    require(steps % config.check_every == 0,
            f"steps={steps} must be a multiple of check_every={config.check_every}")
    limit = state.step + steps

    def chunk(state):
        state = jax.lax.fori_loop(
            0, config.check_every, lambda _, s: _train_step(s, relevant, config), state)
        return _checked(state, relevant)

    return jax.lax.while_loop(
        lambda s: ~finished(s, config) & (s.step < limit), chunk, state)


# --------------------------------------------------------------------------------------------
# Many runs in one call


MIN_RUNS_PER_DEVICE = 2  # a vmapped batch of one run compiles to other kernels than two or more


def doc_slots(num_docs: int) -> int:
    """The padded document count of a run of n documents: n rounded up to a multiple of
    g = 2^max(0, bit_length(n) - 4), i.e. exact below 16, then steps of 2, 4, 8, ... (less than
    1/8 padding). A function of n alone, so a run computes in the same shape whatever its batch
    partners, while neighbouring n share one compiled program."""
    step = 1 << max(0, num_docs.bit_length() - 4)
    return -(-num_docs // step) * step


def batch_size(num_runs: int, devices: int) -> int:
    """Slots of a batch of `num_runs` runs: at least MIN_RUNS_PER_DEVICE per device, a multiple of
    the device count (the padding repeats a run; its copies are dropped)."""
    return -(-max(num_runs, MIN_RUNS_PER_DEVICE * devices) // devices) * devices


def run_bytes(num_docs: int, dim: int, k: int, num_queries: int | None = None) -> int:
    """Device bytes of one run: its live [m, n] score buffers, parameters and Adam moments
    (m = num_queries, default C(n, k))."""
    m = math.comb(num_docs, k) if num_queries is None else num_queries
    return 4 * (_LIVE_SCORE_BUFFERS * m * num_docs + 3 * 2 * (m + num_docs) * dim + m * k)


def max_runs_per_call(num_docs: int, dim: int, k: int, memory_bytes: int, num_devices: int) -> int:
    """The most runs of size (n, d) one call holds in `memory_bytes` per device."""
    return (memory_bytes // run_bytes(num_docs, dim, k)) * num_devices


def available_bytes(mesh: Mesh | None, memory_bytes: int | None = None) -> int:
    """Memory one device may use: `memory_bytes` if given, else what a device of `mesh`
    (default: this process's first device) has free, the least over processes
    (`parallel.free_bytes`)."""
    return parallel.free_bytes(mesh) if memory_bytes is None else memory_bytes


def _require_runs_fit(num_runs: int, num_docs: int, dim: int, k: int, mesh: Mesh | None,
                      memory_bytes: int | None = None, num_queries: int | None = None) -> None:
    """Raises `parallel.DoesNotFit` (a ValueError), before anything is allocated, if
    `num_runs` runs of size (n, d) do not fit in `available_bytes(mesh, memory_bytes)` per
    device, by `run_bytes`: an upper bound of the compiled loop's own figure (XLA's
    `memory_analysis`, within a factor 2: tests/limit/test_free_embedding.py), so a batch it
    admits fits as compiled and nothing is compiled to check it."""
    devices = 1 if mesh is None else mesh.size
    memory_bytes = available_bytes(mesh, memory_bytes)
    per_run = run_bytes(num_docs, dim, k, num_queries)
    need = math.ceil(num_runs / devices) * per_run
    if need > memory_bytes:
        raise parallel.DoesNotFit(
            f"{num_runs} free-embedding runs at n={num_docs}, d={dim}, k={k} need "
            f"{parallel.gib(need)} per device ({devices} device(s): "
            f"{math.ceil(num_runs / devices)} run(s) of {parallel.gib(per_run)}"
            f") but {parallel.gib(memory_bytes)} are available; use fewer runs per call (at "
            f"most {max_runs_per_call(num_docs, dim, k, memory_bytes, devices)}: fewer seeds or "
            f"candidate n per call, a smaller critical_n window) or a smaller n")


def _split_runs(fn, mesh: Mesh | None, batched_args: tuple[bool, ...]):
    """fn over a batch of runs, split over the mesh's first axis with shard_map (the arguments
    flagged in `batched_args` lead with the run axis; the others are replicated).

    Runs never communicate, so each device loops over its own runs until they stop; with no
    collectives there is nothing for the varying-axes check to verify (check_vma=False).
    """
    if mesh is None:
        return fn
    runs = PartitionSpec(mesh.axis_names[0])
    return jax.shard_map(fn, mesh=mesh, out_specs=runs, check_vma=False,
                         in_specs=tuple(runs if b else PartitionSpec() for b in batched_args))


@functools.partial(jax.jit, static_argnames=("num_doc_slots", "dim", "config", "mesh"))
def init_runs(keys, relevant, num_docs, *, num_doc_slots: int, dim: int, config: SolverConfig,
              mesh: Mesh | None = None) -> RunState:
    """`init_run` for keys [R] and num_docs [R]: a RunState whose leaves lead with R.

    Runs are initialized one after another (`lax.map`): a one-off, and vmapped random draws
    take seconds to compile.
    """
    def init_all(keys, relevant, num_docs):
        return jax.lax.map(
            lambda run: init_run(run[0], relevant, run[1], num_doc_slots=num_doc_slots,
                                 dim=dim, config=config), (keys, num_docs))

    return _split_runs(init_all, mesh, (True, False, True))(keys, relevant, num_docs)


# The state is replaced by its continuation, so its buffers are donated.
@functools.partial(jax.jit, static_argnames=("steps", "config", "mesh"), donate_argnames="state")
def advance_runs(state: RunState, relevant, *, steps: int, config: SolverConfig,
                 mesh: Mesh | None = None) -> RunState:
    """`advance` for a batch of runs [R]; returns once every run is finished or `steps` further."""
    fn = jax.vmap(functools.partial(advance, steps=steps, config=config), in_axes=(0, None))
    return _split_runs(fn, mesh, (True, False))(state, relevant)


def start_runs(seeds: Sequence[int], num_docs: Sequence[int], dim: int, config: SolverConfig,
               mesh: Mesh | None = None, memory_bytes: int | None = None,
               ) -> tuple[RunState, jax.Array]:
    """Checks and starts runs that share one padded shape: returns their state [R'] and the
    shared ground truth [m_slots, k].

    Every n must have the same `doc_slots(n)` (`solve` groups runs so). R' = `batch_size(R,
    devices)`: R padded with copies of the last run (their results are to be dropped). Raises
    ValueError on a bad n, k or d, on mixed slots, or when the batch would not fit in memory,
    before anything is allocated.
    """
    seeds, num_docs = [int(s) for s in seeds], list(num_docs)
    require(len(seeds) == len(num_docs) > 0,
            f"seeds and num_docs must be non-empty and of equal length, got {len(seeds)} "
            f"and {len(num_docs)}")
    for n in num_docs:
        check_problem(n, config.k, dim)
    slots = {doc_slots(n) for n in num_docs}
    require(len(slots) == 1, f"runs of one batch must share doc_slots(n); n={sorted(set(num_docs))}"
                             f" pad to {sorted(slots)} (group them with doc_slots)")
    num_doc_slots = slots.pop()
    padded = batch_size(len(seeds), 1 if mesh is None else mesh.size)
    _require_runs_fit(padded, num_doc_slots, dim, config.k, mesh, memory_bytes)
    seeds += [seeds[-1]] * (padded - len(seeds))
    num_docs += [num_docs[-1]] * (padded - len(num_docs))
    relevant = jnp.asarray(ground_truth(num_doc_slots, config.k))
    keys = jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))
    state = init_runs(keys, relevant, jnp.asarray(num_docs, jnp.int32),
                      num_doc_slots=num_doc_slots, dim=dim, config=config, mesh=mesh)
    return state, relevant


def by_slots(num_docs: Sequence[int]) -> dict[int, list[int]]:
    """Indices of `num_docs` grouped by `doc_slots(n)`: the runs that may share a batch."""
    groups: dict[int, list[int]] = {}
    for i, n in enumerate(num_docs):
        groups.setdefault(doc_slots(int(n)), []).append(i)
    return groups


def solve(seeds: Sequence[int], num_docs: Sequence[int], dim: int, config: SolverConfig,
          mesh: Mesh | None = None, memory_bytes: int | None = None) -> RunResult:
    """Runs independent free-embedding problems to the end: run r has seed seeds[r] and
    n = num_docs[r]. Runs of equal `doc_slots(n)` share one compiled loop (padded and masked,
    vmapped, and with a mesh split over its first axis), one call per such group. A run's result
    does not depend on the other runs, bit for bit (see the module docstring).

    Args:
      seeds, num_docs: one entry per run.
      dim: d, the embedding dimension.
      mesh: spread runs over this mesh's first axis (None: one device, no shard_map).
      memory_bytes: device memory a call may use (default: what the first device has free).
    Returns:
      RunResult of NumPy arrays [R].
    """
    require(len(seeds) == len(num_docs) > 0,
            f"seeds and num_docs must be non-empty and of equal length, got {len(seeds)} "
            f"and {len(num_docs)}")
    out = RunResult(np.zeros(len(seeds), bool), np.zeros(len(seeds), np.int32),
                    np.zeros(len(seeds), np.float32), np.zeros(len(seeds), np.float32))
    for index in by_slots(num_docs).values():
        state, relevant = start_runs([seeds[i] for i in index], [num_docs[i] for i in index], dim,
                                     config, mesh, memory_bytes)
        state = advance_runs(state, relevant, steps=config.steps, config=config, mesh=mesh)
        for field, x in zip(out, result(state), strict=True):
            field[index] = parallel.host_array(x)[:len(index)]
    return out


# --------------------------------------------------------------------------------------------
# Any relevance pattern (e.g. a dataset's qrels)


@functools.partial(jax.jit, static_argnames=("num_docs", "dim", "config"))
def _fit(key, relevant, *, num_docs: int, dim: int, config: SolverConfig):
    state = init_run(key, relevant, num_docs, num_doc_slots=num_docs, dim=dim, config=config,
                     num_queries=relevant.shape[0])
    state = advance(state, relevant, steps=config.steps, config=config)
    return result(state), state.emb


def fit(relevant: np.ndarray, num_docs: int, dim: int, config: SolverConfig,
        seed: int = 0) -> tuple[RunResult, Embeddings]:
    """Free embeddings optimized for an arbitrary relevance pattern, the best any d-dimensional
    single-vector retriever could do on it: one run, the same loop as `solve`.

    Args:
      relevant: int [m, k] with k = config.k: query i's relevant documents, distinct, in
        range(num_docs).
    Returns:
      (RunResult of scalars, the final Embeddings: queries [m, d], docs [n, d]).
    """
    relevant = np.asarray(relevant)
    check_problem(num_docs, config.k, dim)
    require(relevant.ndim == 2 and relevant.shape[1] == config.k and len(relevant) > 0,
            f"relevant must have shape [queries, k={config.k}], got {relevant.shape}")
    require(np.issubdtype(relevant.dtype, np.integer), f"relevant must hold integer ids, "
            f"got {relevant.dtype}")
    require(relevant.min() >= 0 and relevant.max() < num_docs,
            f"relevant ids must lie in [0, {num_docs}), got [{relevant.min()}, {relevant.max()}]")
    repeated = np.flatnonzero((np.diff(np.sort(relevant, axis=1), axis=1) == 0).any(axis=1))
    require(len(repeated) == 0, f"queries {repeated[:5].tolist()} repeat a relevant document")
    _require_runs_fit(1, num_docs, dim, config.k, None, num_queries=len(relevant))
    scores, emb = _fit(jax.random.key(seed), jnp.asarray(relevant, jnp.int32),
                       num_docs=num_docs, dim=dim, config=config)
    return RunResult(*(np.asarray(x) for x in scores)), emb
