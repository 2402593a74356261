"""The pairwise generative reward model (GenRM) of Writing-Zero, section 1 of
`papers/writing_zero.md`.

The judge reads a query and two responses, reasons (criteria with weights, per-criterion scores for
both responses, weighted totals) and ends with `\\boxed{s1,s2}`, two scores in [0, 10]. This module
holds the judge prompt, the parser of its verdict, and the array functions built on verdicts: the
reward that trains the GenRM with RL, the position-consistency rule over a pair judged in both
orders, the cold-start filter, and the per-condition wins that BRPO turns into rewards.

Verdicts enter the array functions as `scores [..., 2]` (the scores of the response shown first
and second; NaN where unparsable) with `valid [...]` (the verdict parsed); `scores_array` builds
both from parsed texts.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import time
import zlib
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxlab.config import require
from jaxlab.rl import advantages as adv

MAX_SCORE = 10.0

DEFAULT_TEMPLATE = """\
You are an expert judge of writing. Compare two responses to the query below.

[Query]
{prompt}

[Response 1]
{response_1}

[Response 2]
{response_2}

{criteria}
For every criterion, score both responses from 0 to 10 and explain why. Then compute each \
response's weighted total (the sum of weight x score). Finish with the two totals, Response 1 \
first, as \\boxed{{s1,s2}}, for example \\boxed{{7.5,6}}."""

_ASK_FOR_CRITERIA = ("First write the criteria that matter most for this query, each with a "
                     "weight; the weights sum to 1.")


@dataclasses.dataclass(frozen=True)
class JudgeTemplate:
    """The pairwise judge prompt (section 1: criteria with weights, per-criterion scores, weighted
    totals, final box)."""

    # Format string with the fields {prompt}, {response_1}, {response_2} and {criteria};
    # literal braces are doubled.
    text: str = DEFAULT_TEMPLATE
    # Fixed criteria with weights summing to 1; empty: the judge writes query-specific ones.
    criteria: Mapping[str, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        try:
            self.text.format(prompt="", response_1="", response_2="", criteria="")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"JudgeTemplate.text is not a valid template ({e!r}); it may use "
                             f"only {{prompt}}, {{response_1}}, {{response_2}} and {{criteria}}, "
                             f"with literal braces doubled") from None
        for field in ("{prompt}", "{response_1}", "{response_2}"):
            require(field in self.text, f"JudgeTemplate.text must contain {field}")
        if self.criteria:
            weights = list(self.criteria.values())
            require(all(w > 0 for w in weights),
                    f"JudgeTemplate.criteria weights must be > 0, got {dict(self.criteria)}")
            require(math.isclose(sum(weights), 1.0, abs_tol=1e-6),
                    f"JudgeTemplate.criteria weights must sum to 1, got {sum(weights)}")

    def criteria_text(self) -> str:
        if not self.criteria:
            return _ASK_FOR_CRITERIA
        lines = [f"- {name} (weight {weight:g})" for name, weight in self.criteria.items()]
        return "Judge on these criteria:\n" + "\n".join(lines)


def judge_prompt(prompt: str, response_1: str, response_2: str,
                 template: JudgeTemplate = JudgeTemplate()) -> str:
    """The judge's input for one ordered pair (responses are inserted verbatim)."""
    return template.text.format(prompt=prompt, response_1=response_1, response_2=response_2,
                                criteria=template.criteria_text())


# --------------------------------------------------------------------------------------------
# Parsing verdicts

_BOX = "\\boxed{"
_NUMBER = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"  # ASCII digits only; no sign, no exponent
_PAIR = re.compile(rf"\s*({_NUMBER})\s*,\s*({_NUMBER})\s*", re.ASCII)


def parse_scores(text: object) -> tuple[float, float] | None:
    """The two scores of the last `\\boxed{a,b}` in `text`, or None (section 1: format failure).

    None when there is no box, the last box is unclosed or holds anything other than two plain
    decimal numbers separated by a comma (nested braces, one or three numbers, signs, exponents,
    NaN, inf, non-ASCII digits), or a number lies outside [0, 10]. Never raises, whatever `text`
    is (a non-string gives None).
    """
    if not isinstance(text, str):
        return None
    start = text.rfind(_BOX)
    if start < 0:
        return None
    body_start = start + len(_BOX)
    end = text.find("}", body_start)
    if end < 0:
        return None
    match = _PAIR.fullmatch(text, body_start, end)
    if match is None:
        return None
    scores = float(match[1]), float(match[2])  # a huge digit string is inf: out of range below
    if not all(0.0 <= s <= MAX_SCORE for s in scores):
        return None
    return scores


def scores_array(verdicts: Sequence[tuple[float, float] | None]) -> tuple[np.ndarray, np.ndarray]:
    """`parse_scores` results as arrays: scores float32 [B, 2] (NaN where None), valid bool [B]."""
    valid = np.array([v is not None for v in verdicts], dtype=bool)
    scores = np.array([v if v is not None else (np.nan, np.nan) for v in verdicts],
                      dtype=np.float32).reshape(len(verdicts), 2)
    return scores, valid


# --------------------------------------------------------------------------------------------
# Array functions over verdicts


def _check_verdicts(name: str, scores: jax.Array, valid: jax.Array) -> None:
    require(scores.ndim >= 1 and scores.shape[-1] == 2,
            f"{name} must have shape [..., 2] (first and second shown), got {scores.shape}")
    require(valid.shape == scores.shape[:-1],
            f"the valid mask of {name} must have shape {scores.shape[:-1]}, got {valid.shape}")


def prefers(scores: jax.Array, valid: jax.Array, position: int | jax.Array) -> jax.Array:
    """bool [...]: the verdict parsed and the response shown at `position` (0 or 1) scored
    strictly higher than the other. Ties and format failures are not preferences.

    Args:
      scores: [..., 2] scores of the responses shown first and second (NaN where unparsable).
      valid: bool [...], the verdict parsed.
      position: int or int [...], which shown response to test.
    """
    _check_verdicts("scores", scores, valid)
    position = jnp.broadcast_to(jnp.asarray(position), valid.shape)[..., None]
    mine = jnp.take_along_axis(scores, position, axis=-1)[..., 0]       # [...]
    other = jnp.take_along_axis(scores, 1 - position, axis=-1)[..., 0]  # [...]
    return valid & (mine > other)


@dataclasses.dataclass(frozen=True)
class GenRMReward:
    """The GenRM's RL reward (section 1: correctness + format, optional score margin)."""

    correct: float = 1.0          # parsed, and the preferred response scored strictly higher
    incorrect: float = 0.0        # parsed, but the preferred response did not (ties included)
    format_failure: float = -1.0  # no valid \boxed{s1,s2}
    margin_weight: float = 0.0    # adds margin_weight * (s_preferred - s_other) / 10 when parsed
    consistency_weight: float = 0.0  # the share of "correct" that needs the twin verdict (the
    #                                  pair shown in the other order) right too

    def __post_init__(self):
        require(self.correct > self.incorrect,
                f"GenRMReward.correct={self.correct} must be > incorrect={self.incorrect}")
        require(self.margin_weight >= 0,
                f"GenRMReward.margin_weight must be >= 0, got {self.margin_weight}")
        require(0 <= self.consistency_weight <= 1,
                f"GenRMReward.consistency_weight must lie in [0, 1], got "
                f"{self.consistency_weight}")


def genrm_rewards(scores: jax.Array, valid: jax.Array, preferred: jax.Array,
                  reward: GenRMReward = GenRMReward(), twin_correct: jax.Array | None = None
                  ) -> jax.Array:
    """Rewards of judge rollouts on pairs with a known preference (section 1, RL of the GenRM):

      r = format_failure                                                  if unparsable
      r = incorrect + (correct - incorrect) h + margin_weight (s_p - s_o) / 10   otherwise
      h = (1 - w) [s_p > s_o] + w [s_p > s_o and twin right]

    with s_p the score given to the preferred response, s_o the other's, and w =
    `consistency_weight`: the share of the reward that also needs the twin verdict, the same pair
    shown in the other order, to be right (the paper rewards position-consistent verdicts;
    w = 0 without `twin_correct`).

    Args:
      scores: [B, 2] verdict scores in shown order (NaN where unparsable).
      valid: bool [B], the verdict parsed.
      preferred: int [B], the shown position (0 or 1) of the response humans preferred.
      twin_correct: bool [B], the twin verdict preferred the right response (`prefers`).
    Returns:
      float32 [B].
    """
    _check_verdicts("scores", scores, valid)
    require(preferred.shape == valid.shape,
            f"preferred must have shape {valid.shape}, got {preferred.shape}")
    preferred = preferred[..., None]
    margin = (jnp.take_along_axis(scores, preferred, axis=-1)
              - jnp.take_along_axis(scores, 1 - preferred, axis=-1))[..., 0]  # [B]
    right = margin > 0
    if twin_correct is None:
        hit = right.astype(jnp.float32)
    else:
        require(twin_correct.shape == valid.shape,
                f"twin_correct must have shape {valid.shape}, got {twin_correct.shape}")
        w = reward.consistency_weight
        hit = (1 - w) * right + w * (right & twin_correct)
    parsed = (reward.incorrect + (reward.correct - reward.incorrect) * hit
              + reward.margin_weight * margin / MAX_SCORE)
    return jnp.where(valid, parsed, reward.format_failure).astype(jnp.float32)


def consistent_preference(scores_ab: jax.Array, valid_ab: jax.Array, scores_ba: jax.Array,
                          valid_ba: jax.Array) -> jax.Array:
    """The position-consistency rule over a pair (A, B) judged in both orders (section 1):
    +1 if A is preferred in both orders, -1 if B is, 0 otherwise (the verdicts disagree, tie, or
    fail to parse).

    Args:
      scores_ab, valid_ab: [..., 2] and [...], the verdict with A shown first.
      scores_ba, valid_ba: the verdict with B shown first.
    Returns:
      int32 [...] in {-1, 0, +1}.
    """
    _check_verdicts("scores_ba", scores_ba, valid_ba)
    require(scores_ab.shape == scores_ba.shape,
            f"scores_ab {scores_ab.shape} and scores_ba {scores_ba.shape} must have equal shapes")
    a_wins = prefers(scores_ab, valid_ab, 0) & prefers(scores_ba, valid_ba, 1)
    b_wins = prefers(scores_ab, valid_ab, 1) & prefers(scores_ba, valid_ba, 0)
    return a_wins.astype(jnp.int32) - b_wins.astype(jnp.int32)


def cold_start_keep(scores_ab: jax.Array, valid_ab: jax.Array, scores_ba: jax.Array,
                    valid_ba: jax.Array, chosen: jax.Array) -> jax.Array:
    """bool [...]: keep a cold-start judge trace pair only if the judge prefers the right response
    in both orders (section 1, positional-bias filter).

    Args:
      chosen: int [...], 0 if A is the right response, 1 if B is.
    """
    require(chosen.shape == valid_ab.shape,
            f"chosen must have shape {valid_ab.shape}, got {chosen.shape}")
    verdict = consistent_preference(scores_ab, valid_ab, scores_ba, valid_ba)
    return verdict == 1 - 2 * chosen


def pairwise_wins(scores_first: jax.Array, valid_first: jax.Array, scores_second: jax.Array,
                  valid_second: jax.Array) -> jax.Array:
    """BRPO's judged conditions (section 2, step 2): did response i beat the group's reference?

    Each response i is judged against the reference in both orders, `votes` times each.

    Args:
      scores_first, valid_first: [groups, G, votes, 2] and [groups, G, votes], verdicts with
        response i shown first and the reference second.
      scores_second, valid_second: the same with the reference shown first.
    Returns:
      bool [groups, G, 2 * votes]: True where response i won (the `wins` of
      `advantages.brpo_advantages`).
    """
    _check_verdicts("scores_first", scores_first, valid_first)
    _check_verdicts("scores_second", scores_second, valid_second)
    require(scores_first.ndim == 4 and scores_first.shape == scores_second.shape,
            f"scores_first and scores_second must both be [groups, G, votes, 2], got "
            f"{scores_first.shape} and {scores_second.shape}")
    return jnp.concatenate([prefers(scores_first, valid_first, 0),
                            prefers(scores_second, valid_second, 1)], axis=-1)


def verdict_metrics(scores_ab: jax.Array, valid_ab: jax.Array, scores_ba: jax.Array,
                    valid_ba: jax.Array) -> dict[str, jax.Array]:
    """The GenRM's evaluation on pairs (A, B) whose right answer is A, judged with A shown
    first (`ab`) and second (`ba`); each a float32 [] share of the N pairs:

      accuracy_first      A preferred when shown first
      accuracy_second     A preferred when shown second
      accuracy_both       A preferred in both orders (`consistent_preference` = +1)
      accuracy_soft       accuracy_both + half the pairs that neither response wins in both
                          orders (`consistent_preference` = 0: inconsistent, tied or unparsed)
      first_position      verdicts (of 2N) preferring the response shown first
      format_failure      verdicts (of 2N) that did not parse

    Args:
      scores_ab, valid_ab, scores_ba, valid_ba: [N, 2] and [N], as in `consistent_preference`.
    """
    first = jnp.concatenate([prefers(scores_ab, valid_ab, 0), prefers(scores_ba, valid_ba, 0)])
    share = functools.partial(jnp.mean, dtype=jnp.float32)
    verdict = consistent_preference(scores_ab, valid_ab, scores_ba, valid_ba)
    return {
        "accuracy_first": share(prefers(scores_ab, valid_ab, 0)),
        "accuracy_second": share(prefers(scores_ba, valid_ba, 1)),
        "accuracy_both": share(verdict == 1),
        "accuracy_soft": share(verdict == 1) + 0.5 * share(verdict == 0),
        "first_position": share(first),
        "format_failure": share(~jnp.concatenate([valid_ab, valid_ba])),
    }


# --------------------------------------------------------------------------------------------
# BRPO against a GenRM (section 2)


def check_reference(ref_index: np.ndarray, group_size: int) -> None:
    """Raises ValueError naming the first group whose reference index lies outside [0, G)."""
    ref_index = np.asarray(ref_index)
    bad = np.flatnonzero((ref_index < 0) | (ref_index >= group_size))
    if len(bad):
        raise ValueError(f"ref_index must lie in [0, G={group_size}), got {ref_index[bad[0]]} "
                         f"for group {bad[0]}")


def brpo_pairs(ref_index: np.ndarray, group_size: int) -> np.ndarray:
    """The judge requests of BRPO step 2: every non-reference response against its group's
    reference, in both orders.

    Returns:
      int [groups x (G - 1) x 2, 3] rows (group, response i, order), in group, response, order
      order; order 0 shows response i first and the reference second, order 1 the reverse.
    """
    check_reference(ref_index, group_size)
    return np.asarray([(g, i, order) for g, ref in enumerate(np.asarray(ref_index).tolist())
                       for i in range(group_size) if i != ref for order in (0, 1)],
                      np.int64).reshape(-1, 3)


def brpo_rewards(scores: np.ndarray, valid: np.ndarray, pairs: np.ndarray,
                 ref_index: np.ndarray, group_size: int) -> np.ndarray:
    """BRPO's rewards from the verdicts on `brpo_pairs` (section 2, step 2):

      r_i = +1 if response i won every verdict (both orders x votes), else -1;  r_ref = 0

    Args:
      scores: [R, votes, 2] scores in shown order of the R = len(pairs) judge requests (NaN
        where unparsable); valid: bool [R, votes], the verdict parsed.
      pairs: int [R, 3], `brpo_pairs(ref_index, group_size)`.
      ref_index: int [groups], each group's reference, in [0, G).
    Returns:
      float32 [groups, G] in {-1, 0, +1}.
    """
    check_reference(ref_index, group_size)
    groups, votes = len(ref_index), scores.shape[1]
    require(scores.shape == (len(pairs), votes, 2) and valid.shape == scores.shape[:2],
            f"scores [R, votes, 2] and valid [R, votes] must match the {len(pairs)} pairs, got "
            f"{scores.shape} and {valid.shape}")
    # [groups, G, order, votes, 2]: the reference's own row stays a (never read) failure
    full = np.full((groups, group_size, 2, votes, 2), np.nan, np.float32)
    ok = np.zeros((groups, group_size, 2, votes), bool)
    full[pairs[:, 0], pairs[:, 1], pairs[:, 2]] = scores
    ok[pairs[:, 0], pairs[:, 1], pairs[:, 2]] = valid
    wins = pairwise_wins(jnp.asarray(full[:, :, 0]), jnp.asarray(ok[:, :, 0]),
                         jnp.asarray(full[:, :, 1]), jnp.asarray(ok[:, :, 1]))
    return np.asarray(adv.brpo_rewards(wins, jnp.asarray(ref_index, jnp.int32)))


def _content_key(prompts: Sequence, responses: list[list[list[int]]]) -> jax.Array:
    """A PRNG key that is a function of the prompts' and responses' tokens only (so a resumed
    run draws the same references and judge samples)."""
    crc = 0
    for prompt, group in zip(prompts, responses, strict=True):
        crc = zlib.crc32(np.asarray(prompt.tokens, np.int64).tobytes(), crc)
        for response in group:
            crc = zlib.crc32(np.asarray([-1, *response], np.int64).tobytes(), crc)
    return jax.random.key(crc)


@dataclasses.dataclass(frozen=True)
class Judge:
    """A GenRM sampling verdicts: its model, its sampling settings, how to read its text."""

    model: object                  # a jaxlab.models.Decoder
    decode: Callable[[Sequence[int]], str]     # token ids -> the judge's text
    sampling: object               # a jaxlab.sampling.sampler.SamplingConfig (n = votes)
    max_prompt_tokens: int         # judge prompts are left-padded to this

    def verdicts(self, prompts: list[list[int]], key: jax.Array
                 ) -> tuple[np.ndarray, np.ndarray, int]:
        """Every prompt judged `sampling.group_size` times in one sampler call: scores float32
        [P, votes, 2], valid bool [P, votes], and the judge tokens generated."""
        from jaxlab.sampling import sampler

        samples = jax.device_get(sampler.sample(self.model, prompts, key, self.sampling,
                                                max_prompt_tokens=self.max_prompt_tokens))
        texts = [self.decode(samples.tokens[i, :samples.lengths[i]])
                 for i in range(len(samples.lengths))]
        scores, valid = scores_array([parse_scores(t) for t in texts])
        votes = self.sampling.group_size
        return (scores.reshape(len(prompts), votes, 2), valid.reshape(len(prompts), votes),
                int(samples.lengths.sum()))


def brpo_reward_fn(judge: Judge, render: Callable[[object, list[int], list[int]], list[int]]):
    """The writer's reward function for BRPO (`loop.run` with advantage="brpo"), with
    `render(prompt, first response tokens, second response tokens)` the judge prompt's tokens:
    per group, a
    reference drawn uniformly (`advantages.choose_reference`, keyed by the batch's tokens), every
    other response judged against it in both orders and `votes` times, all judge prompts of the
    batch in one sampler call; rewards by `brpo_rewards`. Also returns `judge_seconds` and
    `judge_tokens_per_s` (the same value in every entry, so their logged means are the batch's)."""
    def reward_fn(prompts, responses, truncated):
        groups, size = truncated.shape
        key = _content_key(prompts, responses)
        ref_index = np.asarray(adv.choose_reference(jax.random.fold_in(key, 0), groups, size))
        pairs = brpo_pairs(ref_index, size)
        requests = [render(prompts[g], *((responses[g][i], responses[g][ref_index[g]])
                                               if order == 0 else
                                               (responses[g][ref_index[g]], responses[g][i])))
                    for g, i, order in pairs.tolist()]
        start = time.perf_counter()
        scores, valid, tokens = judge.verdicts(requests, jax.random.fold_in(key, 1))
        seconds = time.perf_counter() - start
        return {"reward": brpo_rewards(scores, valid, pairs, ref_index, size),
                "judge_format_failure": np.full(truncated.shape, 1 - valid.mean()),
                "judge_seconds": np.full(truncated.shape, seconds),
                "judge_tokens_per_s": np.full(truncated.shape, tokens / seconds)}
    return reward_fn


class Shown(NamedTuple):
    """What a GenRM RL prompt knows of its pair: the shown position (0 or 1) of the preferred
    response, and the pair's id (its two orders share it)."""

    preferred: int
    pair: int


def twin_rows(prompts: Sequence) -> np.ndarray:
    """int [P]: for each prompt (`data` a `Shown`), the index of its twin, the same pair shown
    in the other order; a pair not shown exactly once in each order is an error naming it."""
    rows: dict[int, dict[int, int]] = {}
    for i, prompt in enumerate(prompts):
        require(isinstance(prompt.data, Shown), f"prompt {i}: a consistency reward needs data "
                f"genrm.Shown(preferred, pair), got {prompt.data!r}")
        rows.setdefault(prompt.data.pair, {})[prompt.data.preferred] = i
    shown = Counter(p.data.pair for p in prompts)
    twins = np.zeros(len(prompts), np.int64)
    for i, prompt in enumerate(prompts):
        orders = rows[prompt.data.pair]
        require(sorted(orders) == [0, 1] and shown[prompt.data.pair] == 2,
                f"pair {prompt.data.pair} must be shown once in each order in a batch")
        twins[i] = orders[1 - prompt.data.preferred]
    return twins


def genrm_reward_fn(decode: Callable[[Sequence[int]], str], reward: GenRMReward = GenRMReward()):
    """The GenRM's own reward function for GRPO (`loop.run`): each prompt's `data` is the shown
    position (0 or 1) of the preferred response, or a `Shown` (position and pair id); rewards by
    `genrm_rewards`, with the share of correct verdicts (`accuracy`) and of format failures
    logged. With `reward.consistency_weight > 0` every prompt must be a `Shown` whose twin is in
    the batch (`twin_rows`): rollout j's twin verdict is rollout j of the twin's group, and
    `consistent` logs the share of rollouts right in both orders."""
    def reward_fn(prompts, responses, truncated):
        shape = truncated.shape
        verdicts = [parse_scores(decode(r)) for group in responses for r in group]
        scores, valid = scores_array(verdicts)
        positions = [p.data.preferred if isinstance(p.data, Shown) else int(p.data)
                     for p in prompts]
        preferred = np.repeat(positions, shape[1])
        correct = np.asarray(prefers(jnp.asarray(scores), jnp.asarray(valid),
                                     jnp.asarray(preferred))).reshape(shape)
        twin = None
        if reward.consistency_weight > 0:
            twin = correct[twin_rows(prompts)]                            # [P, G]
        rewards = genrm_rewards(jnp.asarray(scores), jnp.asarray(valid), jnp.asarray(preferred),
                                reward, None if twin is None else jnp.asarray(twin.reshape(-1)))
        out = {"reward": np.asarray(rewards).reshape(shape),
               "accuracy": correct.astype(np.float64),
               "format_failure": (~valid).astype(np.float64).reshape(shape)}
        if twin is not None:
            out["consistent"] = (correct & twin).astype(np.float64)
        return out
    return reward_fn


def check_same_tokenizer(judge_folder, writer_folder) -> None:
    """Raises ValueError unless the GenRM checkpoint's tokenizer has the writer's vocabulary
    (the judge reads the writer's tokens re-rendered as text, and BRPO compares their texts)."""
    from jaxlab.models import hf

    judge, writer = (hf.load_tokenizer(f).get_vocab() for f in (judge_folder, writer_folder))
    if judge != writer:
        differ = sorted(set(judge.items()) ^ set(writer.items()))[:3]
        raise ValueError(f"the GenRM at {judge_folder} has another tokenizer than the writer at "
                         f"{writer_folder} ({len(judge)} vs {len(writer)} tokens; first "
                         f"differences {differ})")
