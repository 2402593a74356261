"""How well a judge judges the small world's pairs, and what it is measured against.

A pairwise judge reads each evaluation pair (chosen = the response of higher hidden quality) in
both orders and writes a text ending in `\\boxed{s1,s2}` (`genrm.parse_scores`). `report`
separates reading from judging: `genrm.verdict_metrics` (accuracy in both orders, in each
order, soft accuracy, first-position share, format failures) and

    by_gap      both-orders accuracy and pair count by quality gap (1, 2, 3, "4+")
    criteria    per criterion, the share of traces stating the rubric's score of the response
                shown first (`first`) and second (`second`), and their mean

`baselines` gives the same both-orders accuracy for judges that need no model, on the same
pairs, and the single-comparison accuracy of the ideal rater-RM (`world.ideal_rater_reward`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxlab.rl import genrm, loop
from jaxlab.writing import teacher as teacher_lib
from jaxlab.writing import world

GAP_BUCKETS = ("1", "2", "3", "4+")
RUBRIC = world.Rubric()


def report(pairs: Sequence[dict], chosen_first: Sequence[str], chosen_second: Sequence[str],
           rubric: world.Rubric = RUBRIC) -> dict:
    """The judge's measures (module docstring) from its texts on `pairs` with the chosen response
    shown first (`chosen_first[i]`) and second (`chosen_second[i]`)."""
    if not (len(pairs) == len(chosen_first) == len(chosen_second) > 0):
        raise ValueError(f"need one text per pair and order, got {len(pairs)} pairs and "
                         f"{len(chosen_first)} / {len(chosen_second)} texts")
    ab = genrm.scores_array([genrm.parse_scores(t) for t in chosen_first])
    ba = genrm.scores_array([genrm.parse_scores(t) for t in chosen_second])
    out = {k: float(v) for k, v in genrm.verdict_metrics(*ab, *ba).items()}
    both = np.asarray(genrm.consistent_preference(*ab, *ba)) == 1
    buckets = np.asarray([GAP_BUCKETS[min(world.quality_gap(p, rubric), 4) - 1] for p in pairs])
    out["by_gap"] = {b: {"accuracy": float(both[buckets == b].mean()),
                         "pairs": int((buckets == b).sum())}
                     for b in GAP_BUCKETS if (buckets == b).any()}
    out["criteria"] = criteria_accuracy(pairs, chosen_first, chosen_second, rubric)
    return out


def criteria_accuracy(pairs: Sequence[dict], chosen_first: Sequence[str],
                      chosen_second: Sequence[str], rubric: world.Rubric = RUBRIC
                      ) -> dict[str, dict[str, float]]:
    """Per criterion: the share of the 2N traces whose stated score of the response shown first
    (`first`) and second (`second`) is the rubric's (a criterion not stated is wrong), and
    `mean`, their average."""
    hits = {name: [[], []] for name in world.CRITERIA}
    for pair, text_1, text_2 in zip(pairs, chosen_first, chosen_second, strict=True):
        required = world.required_words(pair["prompt"])
        truth = {r: world.criteria(required, r, rubric) for r in (pair["chosen"],
                                                                  pair["rejected"])}
        for text, shown in ((text_1, (pair["chosen"], pair["rejected"])),
                            (text_2, (pair["rejected"], pair["chosen"]))):
            stated = teacher_lib.parse_criteria(text)
            for name in world.CRITERIA:
                for position in (0, 1):
                    hits[name][position].append(
                        name in stated and stated[name][position] == truth[shown[position]][name])
    return {name: {"first": float(np.mean(h[0])), "second": float(np.mean(h[1])),
                   "mean": float(np.mean(h[0] + h[1]))} for name, h in hits.items()}


def teacher_texts(pairs: Sequence[dict], seed: int, teacher: teacher_lib.Teacher
                  ) -> tuple[list[str], list[str]]:
    """The rubric teacher's traces of `pairs` with the chosen response shown first and second."""
    rng = np.random.default_rng(seed)
    first = [teacher_lib.judge_trace(rng, p["prompt"], p["chosen"], p["rejected"], teacher)
             for p in pairs]
    second = [teacher_lib.judge_trace(rng, p["prompt"], p["rejected"], p["chosen"], teacher)
              for p in pairs]
    return first, second


def ideal_rater_accuracy(pairs: Sequence[dict], config: world.WorldConfig) -> float:
    """The share of `pairs` whose chosen response has the higher `world.ideal_rater_reward` (a
    tie is wrong): on true-quality pairs the ideal rater-RM's accuracy, on the rater's own
    held-out labels the Bayes level of any reward model trained on them. Each reward must be a
    finite real number (`loop.finite_reals`; response 0 of a pair is the chosen one)."""
    rewards = loop.finite_reals(
        [[world.ideal_rater_reward(world.required_words(p["prompt"]), p[key], config)
          for key in ("chosen", "rejected")] for p in pairs],
        (len(pairs), 2), "world.ideal_rater_reward", labels=("pair", "response"))  # [N, 2]
    return float(np.mean(rewards[:, 0] > rewards[:, 1]))


def baselines(pairs: Sequence[dict], config: world.WorldConfig, teacher: teacher_lib.Teacher,
              seed: int) -> dict[str, float]:
    """Both-orders accuracy on `pairs` (chosen = better) of judges that need no model:

      random          0.25, the expectation for a coin flipped per verdict
      always_longer   prefers the response with more words in both orders (a tie: neither)
      always_shorter  the one with fewer words
      teacher         the rubric teacher with its position bias (`teacher_texts`, `seed`)
      teacher_without_position_bias   the teacher whose unsure verdicts (totals within
                      `unsure_margin`) are one coin per pair, the same in both orders

    and `ideal_rater_rm`, the single-comparison accuracy of `world.ideal_rater_reward`
    (r_chosen > r_rejected; a tie is wrong)."""
    rng = np.random.default_rng(seed + 1)
    sides = np.asarray([world.longer_side(p) for p in pairs])
    gaps = np.asarray([world.quality_gap(p, config.rubric) for p in pairs])
    unbiased = (gaps > teacher.unsure_margin) | (rng.uniform(size=len(pairs)) < 0.5)
    return {
        "random": 0.25,
        "always_longer": float(np.mean(sides == 1)),
        "always_shorter": float(np.mean(sides == -1)),
        "teacher": report(pairs, *teacher_texts(pairs, seed, teacher),
                          config.rubric)["accuracy_both"],
        "teacher_without_position_bias": float(unbiased.mean()),
        "ideal_rater_rm": ideal_rater_accuracy(pairs, config),
    }
