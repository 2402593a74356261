"""critical-n(d): the smallest number of documents whose top-k patterns d-dimensional free
embeddings cannot all realize (LIMIT, Weller et al. 2025; section 1 of `papers/limit.md`).

Two protocols:
- `search` (the stronger measurement) evaluates windows of candidate n, every seed of every
  candidate in one batched `free_embedding.solve` call; a candidate is solved if any seed solves it.
- `paper_search` follows the official script (google-deepmind/limit,
  `code/free_embedding_experiment.py`), which produced the paper's table: one seed per n, a
  galloping search, a binary search, then a sweep of n - 4 .. n + 5 around its answer;
  critical-n is the first n of that record that failed.
`sweep` runs either over many d, each d started from the previous answer; `cubic_fit` fits
n(d) = a0 + a1 d + a2 d^2 + a3 d^3 as the paper does.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from jaxlab import parallel
from jaxlab.config import require
from jaxlab.limit import free_embedding

# The paper's cubic fit over d = 4..45 (coefficients of d^0..d^3, r^2 = 0.999) and its
# published values: three measured points and the extrapolation to real embedding sizes.
PAPER_FIT = (-10.5322, 4.0309, 0.0520, 0.0037)
PAPER_POINTS = {4: 10, 20: 120, 45: 626}
PAPER_EXTRAPOLATION = {512: 500e3, 768: 1.7e6, 1024: 4e6, 3072: 107e6, 4096: 250e6}

# The official script's settings (its DEFAULT_EXPERIMENT_PARAMS): what `paper_search` is run with
# for the paper's protocol. Its early stop counts steps without a loss improvement of 1e-5; success
# at any check (every 50 steps) counts.
PAPER_SOLVER = free_embedding.SolverConfig(
    k=2, loss="per_positive", temperature=0.1, learning_rate=0.01, check_every=50,
    patience=1000, min_improvement=1e-5, steps=100_000)
PAPER_SWEEP = range(-4, 6)  # the official sweep: n - 4 .. n + 5 around the binary search's n
PAPER_SEED = 42             # the official script's default seed, the same for every n


@dataclasses.dataclass(frozen=True)
class CriticalN:
    """The answer for one d, in the record format of `results.json`."""

    d: int
    k: int
    critical_n: int        # smallest n no seed solved (every smaller candidate tried was solved)
    largest_solved_n: int  # largest n some seed solved (can exceed critical_n - 1 by chance)
    seeds: int             # seeds tried per candidate n
    steps: int             # optimizer steps summed over every run of this search
    seconds: float         # wall-clock time of this search
    peak_bytes: int = 0    # estimated peak device memory of its largest batch, per device
    tried: dict[int, bool] = dataclasses.field(default_factory=dict)  # n -> solved by some seed
    protocol: str = "multi_seed"  # "multi_seed" (`search`), "paper" (`paper_search`), or
    #                               "paper (modified: ...)" naming the settings that differ

    def record(self) -> dict:
        return {"d": self.d, "k": self.k, "critical_n": self.critical_n,
                "largest_solved_n": self.largest_solved_n, "seeds": self.seeds,
                "protocol": self.protocol, "steps": self.steps,
                "seconds": round(self.seconds, 3),
                "peak_gib": round(self.peak_bytes / 2**30, 4),
                "tried": {str(n): ok for n, ok in sorted(self.tried.items())}}


def _next_window(tried: dict[int, bool], start: int, window: int, k: int) -> list[int] | None:
    """The candidates to evaluate next, or None when critical-n is known.

    critical-n is known when the smallest unsolved n tried has its predecessor solved (or is the
    smallest meaningful n, k + 1). Otherwise look below it, or above everything tried.
    """
    lowest = k + 1
    if not tried:
        first = max(lowest, start)
        return list(range(first, first + window))
    unsolved = [n for n, ok in tried.items() if not ok]
    if not unsolved:
        first = max(tried) + 1
        return list(range(first, first + window))
    u = min(unsolved)
    if u == lowest or tried.get(u - 1):
        return None
    below = [n for n in range(max(lowest, u - window), u) if n not in tried]
    return below


def search(d: int, *, start: int, seeds: int, window: int, config: free_embedding.SolverConfig,
           mesh: Mesh | None = None, memory_bytes: int | None = None, segment_steps: int = 500,
           on_segment: Callable[[dict[int, bool], int], None] | None = None) -> CriticalN:
    """critical-n for one d: evaluates windows of `window` candidate n, `seeds` runs each, until the
    smallest unsolved n is found with its predecessor solved.

    A window's runs share one compiled batch (see `evaluate`), which stops runs whose answer no
    longer matters and shrinks as they stop.

    Args:
      d: embedding dimension.
      start: the first candidate (e.g. a prediction from smaller d).
      seeds: independent restarts per candidate; a candidate is solved if any seed solves it.
      window: candidates per batch.
      segment_steps: steps between looks from the host (multiple of config.check_every).
      on_segment: progress callback, called after each segment with (what is known, steps).
    """
    free_embedding.check_problem(start, config.k, d)
    for name, value in (("seeds", seeds), ("window", window), ("segment_steps", segment_steps)):
        require(isinstance(value, int) and value >= 1,
                f"{name} must be an integer >= 1, got {value!r}")
    require(segment_steps % config.check_every == 0,
            f"segment_steps={segment_steps} must be a multiple of check_every={config.check_every}")
    clock = time.perf_counter()
    tried: dict[int, bool] = {}
    steps = peak = 0
    devices = 1 if mesh is None else mesh.size
    memory_bytes = free_embedding.available_bytes(mesh, memory_bytes)
    while (candidates := _next_window(tried, start, window, config.k)) is not None:
        candidates, per_device = _fitting(candidates, seeds, d, config.k, memory_bytes, devices)
        peak = max(peak, per_device)
        known, used = evaluate(candidates, seeds, d, config, mesh=mesh, memory_bytes=memory_bytes,
                               segment_steps=segment_steps, on_segment=on_segment)
        tried.update(known)
        steps += used
    critical = min(n for n, ok in tried.items() if not ok)
    largest = max((n for n, ok in tried.items() if ok), default=config.k)
    return CriticalN(d=d, k=config.k, critical_n=critical, largest_solved_n=largest, seeds=seeds,
                     steps=steps, seconds=time.perf_counter() - clock, peak_bytes=peak,
                     tried=tried)


def _fitting(candidates: Sequence[int], seeds: int, d: int, k: int, memory_bytes: int,
             devices: int) -> tuple[Sequence[int], int]:
    """The first candidates whose runs (all seeds each, in their `free_embedding.by_slots`
    batches) memory holds at once (at least one candidate), and the estimated bytes per device
    of those batches. Which candidates share a call changes no run's result."""
    def per_device(batch: Sequence[int]) -> int:
        runs = [n for n in batch for _ in range(seeds)]
        return sum(free_embedding.batch_size(len(index), devices) // devices
                   * free_embedding.run_bytes(slots, d, k)
                   for slots, index in free_embedding.by_slots(runs).items())

    count = 1
    while count < len(candidates) and per_device(candidates[:count + 1]) <= memory_bytes:
        count += 1
    return candidates[:count], per_device(candidates[:count])


@dataclasses.dataclass
class _Batch:
    """Runs of one `doc_slots` shape in flight: their state and, per slot, the index of its run
    in `evaluate`'s list (-1: a padding copy or a stopped run)."""

    state: free_embedding.RunState
    relevant: jax.Array
    slot_run: np.ndarray


def evaluate(candidates: Sequence[int], seeds: int, d: int, config: free_embedding.SolverConfig,
             *, mesh: Mesh | None = None, memory_bytes: int | None = None,
             segment_steps: int = 500,
             on_segment: Callable[[dict[int, bool], int], None] | None = None,
             every_candidate: bool = False, first_seed: int = 0,
             ) -> tuple[dict[int, bool], int]:
    """Which candidate n some seed solves, running only what can change the answer.

    All `seeds` x `candidates` runs (seeds first_seed, first_seed + 1, ...) start at once, one
    batch per `free_embedding.doc_slots` shape. Every `segment_steps` the host looks at which
    runs finished and stops those that no longer matter: the other seeds of a solved candidate,
    and (unless `every_candidate`) every candidate above one that all seeds failed (critical-n
    is at most that one). A batch's survivors are gathered into a smaller one (at least
    MIN_RUNS_PER_DEVICE per device, sizes x 4) so stopped runs cost nothing; no run's result
    depends on its batch (the module docstring of `free_embedding`).

    Returns:
      ({n: solved by some seed} for every candidate decided, total optimizer steps taken).
    """
    devices = 1 if mesh is None else mesh.size
    runs = [(n, s) for n in candidates for s in range(first_seed, first_seed + seeds)]
    batches = []
    for index in free_embedding.by_slots([n for n, _ in runs]).values():
        state, relevant = free_embedding.start_runs(
            [runs[i][1] for i in index], [runs[i][0] for i in index], d, config, mesh,
            memory_bytes)
        slot_run = np.full(state.step.shape[0], -1)
        slot_run[:len(index)] = index
        batches.append(_Batch(state, relevant, slot_run))
    solved = dict.fromkeys(candidates, False)
    failed_seeds = dict.fromkeys(candidates, 0)
    steps = 0
    while True:
        for batch in batches:  # dispatched together; read back below
            batch.state = free_embedding.advance_runs(batch.state, batch.relevant,
                                                      steps=segment_steps, config=config,
                                                      mesh=mesh)
        seen = []
        for batch in batches:
            done = parallel.host_array(free_embedding.finished(batch.state, config))
            run_solved = parallel.host_array(batch.state.solved)
            run_steps = parallel.host_array(batch.state.step)
            live = batch.slot_run >= 0
            for slot in np.flatnonzero(live & done):
                n = runs[batch.slot_run[slot]][0]
                solved[n] |= bool(run_solved[slot])
                failed_seeds[n] += not run_solved[slot]
            seen.append((live, done, run_steps))
        failed = [n for n in candidates if failed_seeds[n] == seeds and not solved[n]]
        ceiling = math.inf if every_candidate else min(failed, default=math.inf)
        decided = {n: solved[n] for n in candidates if solved[n] or failed_seeds[n] == seeds}
        moot = np.array([n in decided or n > ceiling for n, _ in runs])
        kept = []
        for batch, (live, done, run_steps) in zip(batches, seen, strict=True):
            keep = live & ~done & ~moot[np.maximum(batch.slot_run, 0)]
            steps += int(np.sum(run_steps[live & ~keep]))
            batch.slot_run[live & ~keep] = -1
            if not keep.any():
                continue
            size = _bucket(int(keep.sum()), devices)
            if size < len(batch.slot_run):
                index = np.flatnonzero(keep)
                index = np.concatenate([index, np.full(size - len(index), index[0])])
                batch.state = jax.tree.map(lambda x, index=index: x[index], batch.state)
                batch.slot_run = np.concatenate([batch.slot_run[index[:keep.sum()]],
                                                 np.full(size - keep.sum(), -1)])
            kept.append(batch)
        batches = kept
        if on_segment is not None:
            on_segment(decided, steps)
        if not batches:
            return {n: ok for n, ok in decided.items() if n <= ceiling}, steps


def official_search(solved: Callable[[Sequence[int]], Mapping[int, bool]], start: int,
                    lowest: int) -> int | None:
    """The official script's search (`_run_critical_n_search_for_config`), given `solved`, which
    decides a list of n at once.

    1. Gallop: if `start` is solved, try n + 1, n + 2, n + 4, ... from the last solved n (the step
       doubling after each success) until one fails; else try start - 1, - 2, - 4, ... (down to
       `lowest`) until one is solved.
    2. Binary search between the last solved and the first failed n of the gallop: a solved
       midpoint raises the answer, a failed one lowers the upper bound.
    3. Sweep: n - 4 .. n + 5 around the binary search's answer, decided in one call (the record
       the paper's critical-n is read from; see `paper_search`).

    Returns the binary search's answer, the largest n it saw solved (None if none was).
    """
    known: dict[int, bool] = {}

    def ok(n: int) -> bool:
        if n not in known:
            known.update(solved([n]))
        return known[n]

    n_low = n_high = None
    if ok(start):
        n_low, step = start, 1
        while ok(n_low + step):
            n_low, step = n_low + step, 2 * step
        n_high = n_low + step
    else:
        n_high, step = start, 1
        while n_high > lowest:
            n = max(n_high - step, lowest)
            if ok(n):
                n_low = n
                break
            n_high, step = n, 2 * step
    answer = n_low
    if n_low is not None:
        low, high = n_low, n_high
        while low <= high:
            mid = (low + high) // 2
            if ok(mid):
                answer, low = mid, mid + 1
            else:
                high = mid - 1
        around = sorted({max(answer + offset, lowest) for offset in PAPER_SWEEP} - known.keys())
        if around:
            known.update(solved(around))
    return answer


def paper_deviations(seeds: int, seed: int, config: free_embedding.SolverConfig) -> list[str]:
    """The settings that differ from the paper's protocol, as "name=value (paper: value)"."""
    ours = {"seeds": seeds, "seed": seed, **dataclasses.asdict(config)}
    paper = {"seeds": 1, "seed": PAPER_SEED, **dataclasses.asdict(PAPER_SOLVER)}
    return [f"{name}={ours[name]} (paper: {paper[name]})" for name in paper
            if ours[name] != paper[name]]


def paper_search(d: int, *, start: int, seeds: int = 1, seed: int = PAPER_SEED,
                 config: free_embedding.SolverConfig = PAPER_SOLVER, mesh: Mesh | None = None,
                 memory_bytes: int | None = None, segment_steps: int = 500,
                 on_segment: Callable[[dict[int, bool], int], None] | None = None) -> CriticalN:
    """critical-n for one d by the paper's protocol: `official_search` over runs of `seeds` seed
    (one, `seed`, as the official script runs; more is a stronger, non-paper measurement),
    critical-n the smallest n of the whole record that failed, every decided n kept in `tried`.
    Each n starts from its own vectors (the key is folded with n, `free_embedding.init_run`), so
    a single seed's answer is one draw of a random variable: see docs/limit.md for its spread.

    The gallop and the binary search decide one n per call; the sweep decides its n in as few
    batched calls as memory allows, each run to its end (`evaluate(..., every_candidate=True)`).
    """
    free_embedding.check_problem(start, config.k, d)
    require(isinstance(seeds, int) and seeds >= 1, f"seeds must be an integer >= 1, got {seeds!r}")
    clock = time.perf_counter()
    tried: dict[int, bool] = {}
    steps = peak = 0
    devices = 1 if mesh is None else mesh.size
    memory_bytes = free_embedding.available_bytes(mesh, memory_bytes)

    def solved(candidates: Sequence[int]) -> dict[int, bool]:
        nonlocal steps, peak
        known: dict[int, bool] = {}
        while candidates:  # as many candidates (all seeds each) per call as memory holds
            batch, per_device = _fitting(candidates, seeds, d, config.k, memory_bytes, devices)
            candidates = candidates[len(batch):]
            peak = max(peak, per_device)
            decided, used = evaluate(batch, seeds, d, config, mesh=mesh,
                                     memory_bytes=memory_bytes, segment_steps=segment_steps,
                                     on_segment=on_segment, every_candidate=True,
                                     first_seed=seed)
            known.update(decided)
            steps += used
        tried.update(known)
        return known

    official_search(solved, start, lowest=config.k)  # ends on a failure: tried has one
    changed = paper_deviations(seeds, seed, config)
    return CriticalN(d=d, k=config.k, critical_n=min(n for n, ok in tried.items() if not ok),
                     largest_solved_n=max((n for n, ok in tried.items() if ok), default=config.k),
                     seeds=seeds, steps=steps, seconds=time.perf_counter() - clock,
                     peak_bytes=peak, tried=dict(sorted(tried.items())),
                     protocol="paper" + (f" (modified: {', '.join(changed)})" if changed else ""))


def _bucket(count: int, devices: int) -> int:
    """The smallest devices * MIN_RUNS_PER_DEVICE * 4^j >= count: few distinct batch sizes, so
    few compilations."""
    size = devices * free_embedding.MIN_RUNS_PER_DEVICE
    while size < count:
        size *= 4
    return size


def predict_start(previous: Sequence[CriticalN], d: int, window: int) -> int | None:
    """A first candidate for d from earlier answers: the mean growth over the last three answers,
    extrapolated, placed so the prediction falls mid-window (None without earlier answers)."""
    if not previous:
        return None
    recent = sorted(previous, key=lambda r: r.d)[-3:]
    first, last = recent[0], recent[-1]
    slope = (last.critical_n - first.critical_n) / (last.d - first.d) if len(recent) > 1 else 0.0
    predicted = last.critical_n + max(slope, 0.0) * (d - last.d)
    return round(predicted) - window // 2


PROTOCOLS = ("multi_seed", "paper")


def sweep(dims: Iterable[int], *, start: int, seeds: int, window: int,
          config: free_embedding.SolverConfig, mesh: Mesh | None = None,
          memory_bytes: int | None = None, segment_steps: int = 500,
          done: Sequence[CriticalN] = (), on_result: Callable[[CriticalN], None] | None = None,
          on_segment=None, protocol: str = "multi_seed") -> list[CriticalN]:
    """`search` ("multi_seed") or `paper_search` ("paper") over `dims` in order, each d started
    from the earlier answers (`done` included, so a resumed sweep continues where it stopped):
    the multi-seed search's window centred on the extrapolation, the paper's gallop started at
    it (`window` is then unused). `on_result` sees each new answer at once."""
    require(protocol in PROTOCOLS, f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    results = list(done)
    finished = {r.d for r in results}
    for d in dims:
        if d in finished:
            continue
        if protocol == "paper":
            first = predict_start(results, d, window=1) or start
            answer = paper_search(d, start=max(first, config.k + 1), seeds=seeds, config=config,
                                  mesh=mesh, memory_bytes=memory_bytes,
                                  segment_steps=segment_steps, on_segment=on_segment)
        else:
            first = predict_start(results, d, window) or start
            answer = search(d, start=max(first, config.k + 1), seeds=seeds, window=window,
                            config=config, mesh=mesh, memory_bytes=memory_bytes,
                            segment_steps=segment_steps, on_segment=on_segment)
        results.append(answer)
        if on_result is not None:
            on_result(answer)
    return results


# --------------------------------------------------------------------------------------------
# The cubic fit


def cubic(coefficients: Sequence[float], d) -> np.ndarray:
    """n(d) = a0 + a1 d + a2 d^2 + a3 d^3 for coefficients (a0, a1, a2, a3)."""
    return np.polynomial.polynomial.polyval(np.asarray(d, np.float64), coefficients)


def cubic_fit(d: Sequence[float], n: Sequence[float]) -> tuple[tuple[float, ...], float]:
    """Least-squares cubic through (d, n): (a0, a1, a2, a3) and r^2 = 1 - SS_res / SS_tot."""
    d, n = np.asarray(d, np.float64), np.asarray(n, np.float64)
    require(len(d) >= 4, f"a cubic fit needs at least 4 points, got {len(d)}")
    coefficients = np.polynomial.polynomial.polyfit(d, n, 3)
    residual = np.sum((n - cubic(coefficients, d)) ** 2)
    total = np.sum((n - n.mean()) ** 2)
    r2 = 1.0 - residual / total if total > 0 else math.nan
    return tuple(float(c) for c in coefficients), float(r2)
