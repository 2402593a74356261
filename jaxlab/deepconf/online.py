"""DeepConf online: stop weak traces while they decode, sample adaptively until the vote agrees
(section 3 of `papers/deepconf.md`).

For one problem:
  1. Warmup: N_init traces decoded to the end. Their lowest group confidences set the threshold s
     by a named rule (`voting.RULES`): deepconf-low keeps the top 10% (s = 90th percentile),
     deepconf-high the top 90% (s = 10th percentile).
  2. Rounds of `batch` more traces, each stopped by the sampler as soon as its full-window group
     confidence drops below s (finished slots start the next trace of the round: refill).
  3. After each round the survivors (warmup included) vote weighted by their lowest group
     confidence; sampling stops once the winner holds `consensus` of the vote (tau) or the budget
     of traces is spent. Traces stopped early do not vote.

Many problems at once (`solve_many`): the warmups of all problems are one sampler call; then
each round is one call holding every unfinished problem's traces, each problem with its own
threshold (`sampler.sample(stop_thresholds=)`), its own number of traces (`budgets=`) and its
own consensus stop. Each problem's traces come from its own key streams (a key per prompt), so
the answers, traces and tokens equal those of `solve` on each problem alone (tested;
confidences and thresholds to float rounding, as batched matrix products may round otherwise);
the device decodes one batch instead of one small call after another.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import numpy as np

from jaxlab.config import require, require_positive_ints
from jaxlab.deepconf import answers as answers_lib
from jaxlab.deepconf import voting
from jaxlab.models.decoder import Decoder
from jaxlab.sampling import sampler
from jaxlab.sampling.sampler import SamplingConfig


@dataclasses.dataclass(frozen=True)
class OnlineConfig:
    rule: str = "deepconf-low"   # threshold rule: "deepconf-low" (top 10%) or "deepconf-high"
    warmup: int = 16             # N_init traces decoded to the end
    budget: int = 512            # traces per problem at most, warmup included
    batch: int = 16              # traces per round after the warmup
    consensus: float = 0.95      # tau: stop once the winner holds this share of the vote

    def __post_init__(self):
        require(self.rule in voting.RULES,
                f"OnlineConfig.rule must be one of {sorted(voting.RULES)}, got {self.rule!r}")
        require_positive_ints(self, "warmup", "budget", "batch")
        require(self.budget >= self.warmup,
                f"OnlineConfig.budget={self.budget} must be >= warmup={self.warmup}")
        require(0 < self.consensus <= 1,
                f"OnlineConfig.consensus must lie in (0, 1], got {self.consensus}")


@dataclasses.dataclass
class Traces:
    """Finished traces of one problem, host-side."""

    texts: list[str]
    lengths: np.ndarray          # int [N]
    lowest: np.ndarray           # float [N], lowest group confidence
    stopped: np.ndarray          # bool [N], stopped early for low confidence
    confidence: np.ndarray       # float [N, T], token confidences (0 past the length)

    @classmethod
    def from_samples(cls, samples: sampler.Samples, decode: Callable[[np.ndarray], str]):
        s = jax.device_get(samples)
        return cls(texts=[decode(s.tokens[i, :s.lengths[i]]) for i in range(len(s.lengths))],
                   lengths=np.asarray(s.lengths), lowest=np.asarray(s.lowest_group_confidence),
                   stopped=np.asarray(s.finish_reason) == sampler.LOW_CONFIDENCE,
                   confidence=np.asarray(s.confidence))

    def select(self, rows: np.ndarray) -> Traces:
        """The traces at `rows` (int [M])."""
        return Traces([self.texts[i] for i in rows], self.lengths[rows], self.lowest[rows],
                      self.stopped[rows], self.confidence[rows])

    def by_prompt(self, prompt_index: np.ndarray, prompts: int) -> list[Traces]:
        """The traces of each of `prompts` prompts, in order (prompt_index int [N])."""
        return [self.select(np.flatnonzero(prompt_index == p)) for p in range(prompts)]

    def __add__(self, other: Traces) -> Traces:
        width = max(self.confidence.shape[1], other.confidence.shape[1])

        def padded(c):
            return np.pad(c, ((0, 0), (0, width - c.shape[1])))

        return Traces(self.texts + other.texts, np.concatenate([self.lengths, other.lengths]),
                      np.concatenate([self.lowest, other.lowest]),
                      np.concatenate([self.stopped, other.stopped]),
                      np.concatenate([padded(self.confidence), padded(other.confidence)]))


@dataclasses.dataclass
class OnlineResult:
    answer: str | None
    votes: dict[str, float]      # V(a) of every answer that received votes
    solution: str | None         # the most confident surviving trace giving the answer
    threshold: float             # s
    launched: int                # traces started (warmup included)
    stopped: int                 # traces stopped early
    tokens: int                  # tokens generated in all
    consensus: float             # V(a*) / sum_a V(a) at the end
    rounds: int                  # rounds after the warmup
    traces: Traces | None = None  # every trace launched, warmup first


# One compiled vote per trace count (a handful in a run: the warmup, then each round's total),
# instead of dozens of small dispatches per vote.
_weighted_vote = jax.jit(voting.weighted_vote)


def weighted_vote(traces: Traces) -> tuple[str | None, dict[str, float], str | None, float]:
    """Survivors vote weighted by lowest group confidence: (answer, votes, solution, consensus)."""
    extracted = [answers_lib.boxed_answer(t) for t in traces.texts]
    groups = answers_lib.group_answers(extracted)
    result = _weighted_vote(groups.ids, ~traces.stopped, traces.lowest)
    votes = np.asarray(result.votes)
    tally = {groups.labels[g]: float(votes[g]) for g in range(len(groups.labels)) if votes[g]}
    answer = groups.label(int(result.answer))
    solution = traces.texts[int(result.trace)] if int(result.trace) >= 0 else None
    return answer, tally, solution, float(result.consensus)


def solve(model: Decoder, prompt: Sequence[int], key: jax.Array, sampling: SamplingConfig,
          online: OnlineConfig, decode: Callable[[np.ndarray], str]) -> OnlineResult:
    """DeepConf online for one tokenized prompt (see the module docstring): `solve_many` of one
    problem.

    `sampling` sets how tokens are drawn (its `group_size` is the number of slots); `decode` turns a
    trace's token ids into text.
    """
    return solve_many(model, [prompt], sampler.prompt_keys(key, 1)[None], sampling, online,
                      decode)[0]


def solve_many(model: Decoder, prompts: Sequence[Sequence[int]], keys: jax.Array,
               sampling: SamplingConfig, online: OnlineConfig,
               decode: Callable[[np.ndarray], str],
               max_prompt_tokens: int | None = None) -> list[OnlineResult]:
    """DeepConf online for many tokenized prompts at once, a key each (`keys` [P]); equal,
    problem by problem, to `solve(model, prompts[p], keys[p], ...)` (floats to rounding).

    One sampler call decodes every warmup; then each round is one call over the problems still
    sampling (fewer traces than the budget and a consensus below tau), each with its threshold
    and its count of traces (the batch, or what is left of the budget). Problem p's warmup uses
    its key split(keys[p], 1 + budget)[0], its round r the key [r + 1], as `solve` does alone.
    `sampling.group_size` slots per problem; prompts are padded to `max_prompt_tokens` (default: the
    longest) in every call, so the rounds reuse one compiled prefill.
    """
    count = len(prompts)
    empty = [p for p, prompt in enumerate(prompts) if len(prompt) == 0]
    require(count > 0 and not empty, f"no prompts given or prompts {empty[:5]} are empty")
    keys = sampler.prompt_keys(keys, count)
    require(keys.shape == (count,), f"keys has shape {keys.shape}: want one per prompt "
                                    f"({count},)")
    round_keys = jax.vmap(lambda k: jax.random.split(k, 1 + online.budget))(keys)  # [P, R]
    length = max_prompt_tokens or max(len(p) for p in prompts)
    warm = dataclasses.replace(sampling, group_size=min(sampling.group_size, online.warmup),
                               budget=online.warmup,
                               stop_threshold=None)
    samples = sampler.sample(model, prompts, round_keys[:, 0], warm, max_prompt_tokens=length)
    traces = Traces.from_samples(samples, decode).by_prompt(
        np.asarray(samples.prompt_index), count)
    thresholds = [float(voting.threshold_for(online.rule, t.lowest)) for t in traces]
    votes = [weighted_vote(t) for t in traces]
    rounds = [0] * count
    while True:
        active = [p for p in range(count) if len(traces[p].texts) < online.budget
                  and votes[p][3] < online.consensus]
        if not active:
            break
        counts = [min(online.batch, online.budget - len(traces[p].texts)) for p in active]
        most = max(counts)
        config = dataclasses.replace(sampling, group_size=min(sampling.group_size, most),
                                     budget=most,
                                     stop_threshold=None)
        samples = sampler.sample(
            model, [prompts[p] for p in active],
            round_keys[np.asarray(active), np.asarray([rounds[p] + 1 for p in active])], config,
            max_prompt_tokens=length, stop_thresholds=[thresholds[p] for p in active],
            budgets=counts)
        new = Traces.from_samples(samples, decode).by_prompt(
            np.asarray(samples.prompt_index), len(active))
        for p, more in zip(active, new, strict=True):
            traces[p] = traces[p] + more
            votes[p] = weighted_vote(traces[p])
            rounds[p] += 1
    results = []
    for p in range(count):
        answer, tally, solution, consensus = votes[p]
        t = traces[p]
        results.append(OnlineResult(
            answer=answer, votes=tally, solution=solution, threshold=thresholds[p],
            launched=len(t.texts), stopped=int(t.stopped.sum()), tokens=int(t.lengths.sum()),
            consensus=consensus, rounds=rounds[p], traces=t))
    return results
