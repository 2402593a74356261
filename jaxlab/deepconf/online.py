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


def weighted_vote(traces: Traces) -> tuple[str | None, dict[str, float], str | None, float]:
    """Survivors vote weighted by lowest group confidence: (answer, votes, solution, consensus)."""
    extracted = [answers_lib.boxed_answer(t) for t in traces.texts]
    groups = answers_lib.group_answers(extracted)
    result = voting.weighted_vote(groups.ids, ~traces.stopped, traces.lowest)
    votes = np.asarray(result.votes)
    tally = {groups.labels[g]: float(votes[g]) for g in range(len(groups.labels)) if votes[g]}
    answer = groups.label(int(result.answer))
    solution = traces.texts[int(result.trace)] if int(result.trace) >= 0 else None
    return answer, tally, solution, float(result.consensus)


def solve(model: Decoder, prompt: Sequence[int], key: jax.Array, sampling: SamplingConfig,
          online: OnlineConfig, decode: Callable[[np.ndarray], str]) -> OnlineResult:
    """DeepConf online for one tokenized prompt (see the module docstring).

    `sampling` sets how tokens are drawn (its `n` is the number of slots); `decode` turns a
    trace's token ids into text.
    """
    require(len(prompt) > 0, "the prompt is empty")
    keys = iter(jax.random.split(key, 1 + online.budget))
    warm = dataclasses.replace(sampling, n=min(sampling.n, online.warmup), budget=online.warmup,
                               stop_threshold=None)
    traces = Traces.from_samples(sampler.sample(model, [prompt], next(keys), warm), decode)
    threshold = float(voting.threshold_for(online.rule, traces.lowest))
    answer, tally, solution, consensus = weighted_vote(traces)
    rounds = 0
    while len(traces.texts) < online.budget and consensus < online.consensus:
        count = min(online.batch, online.budget - len(traces.texts))
        config = dataclasses.replace(sampling, n=min(sampling.n, count), budget=count,
                                     stop_threshold=threshold)
        traces = traces + Traces.from_samples(
            sampler.sample(model, [prompt], next(keys), config), decode)
        answer, tally, solution, consensus = weighted_vote(traces)
        rounds += 1
    return OnlineResult(answer=answer, votes=tally, solution=solution, threshold=threshold,
                        launched=len(traces.texts), stopped=int(traces.stopped.sum()),
                        tokens=int(traces.lengths.sum()), consensus=consensus, rounds=rounds)
