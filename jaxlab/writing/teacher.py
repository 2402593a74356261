"""The rubric teacher: a strong judge that writes pairwise judge traces for the GenRM's cold
start (section 1 of `papers/writing_zero.md`), in the writing world's vocabulary.

The judge reads (`TEMPLATE`, through `genrm.judge_prompt`)

    query write sun river night : first <response 1> second <response 2> verdict

and the teacher writes the rubric's criteria, both responses' scores on each, their totals and
its verdict, showing its work on coverage (each required word: 1 if the response's answer
proper holds it, for the first and the second response):

    coverage sun 1 0 river 1 1 night 1 0 , 4 1 ; repeats 2 2 ; length 2 0 ; ending 2 1 ;
    total 10 4 ; \\boxed{ 10 , 4 }

When unsure (totals within `unsure_margin`), the verdict prefers the response shown first with
probability `first_bias` (0.6, as the paper reports for its teacher) and the other one
otherwise; the boxed scores are then the two totals (or t and t - 1 for equal totals) in the
order of that preference.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxlab.config import require
from jaxlab.rl import genrm
from jaxlab.writing import world

TEMPLATE = genrm.JudgeTemplate(
    text="query {prompt} first {response_1} second {response_2} verdict")


@dataclasses.dataclass(frozen=True)
class Teacher:
    unsure_margin: int = 1    # totals this close (or closer) leave the teacher unsure
    first_bias: float = 0.6   # when unsure: P(the verdict prefers the first-shown response)
    rubric: world.Rubric = dataclasses.field(default_factory=world.Rubric)

    def __post_init__(self):
        require(self.unsure_margin >= 0,
                f"Teacher.unsure_margin must be >= 0, got {self.unsure_margin}")
        require(0 <= self.first_bias <= 1,
                f"Teacher.first_bias must lie in [0, 1], got {self.first_bias}")


def judge_prompt(prompt: str, response_1: str, response_2: str) -> str:
    """The judge's input in the world's vocabulary."""
    return genrm.judge_prompt(prompt, response_1, response_2, TEMPLATE)


def verdict(total_1: int, total_2: int, first_wins: bool) -> tuple[int, int]:
    """Boxed scores that prefer the first response iff `first_wins`, made of the two totals
    (t and t - 1 when they are equal; 1 and 0 for two zeros)."""
    high, low = max(total_1, total_2), min(total_1, total_2)
    if high == low:
        high, low = (high, high - 1) if high > 0 else (1, 0)
    return (high, low) if first_wins else (low, high)


def judge_trace(rng: np.random.Generator, prompt: str, response_1: str, response_2: str,
                teacher: Teacher = Teacher()) -> str:
    """The teacher's judge text for one ordered pair (module docstring)."""
    required = world.required_words(prompt)
    scores = [world.criteria(required, r, teacher.rubric) for r in (response_1, response_2)]
    totals = [sum(s.values()) for s in scores]
    if abs(totals[0] - totals[1]) <= teacher.unsure_margin:
        first_wins = bool(rng.uniform() < teacher.first_bias)
    else:
        first_wins = totals[0] > totals[1]
    s1, s2 = verdict(*totals, first_wins)
    answers = [set(world.split_answer(r.split())[0]) for r in (response_1, response_2)]
    marks = " ".join(f"{w} {int(w in answers[0])} {int(w in answers[1])}" for w in required)
    parts = [f"{name} {marks + ' , ' if name == 'coverage' else ''}"
             f"{scores[0][name]} {scores[1][name]} ;" for name in world.CRITERIA]
    return " ".join([*parts, f"total {totals[0]} {totals[1]} ;", f"\\boxed{{ {s1} , {s2} }}"])


def judge_records(pairs: list[dict], seed: int, teacher: Teacher = Teacher()) -> list[dict]:
    """Each preference pair judged in both orders: records {prompt, response_1, response_2,
    preferred, judge} with `preferred` the shown position (1 or 2) of the pair's chosen
    response; record 2k shows pair k's chosen first, record 2k + 1 shows it second."""
    rng = np.random.default_rng(seed)
    records = []
    for pair in pairs:
        for first, second, preferred in ((pair["chosen"], pair["rejected"], 1),
                                         (pair["rejected"], pair["chosen"], 2)):
            records.append({"prompt": pair["prompt"], "response_1": first, "response_2": second,
                            "preferred": preferred,
                            "judge": judge_trace(rng, pair["prompt"], first, second, teacher)})
    return records


def parse_criteria(text: str) -> dict[str, tuple[int, int]]:
    """The per-criterion scores a judge text states, {criterion: (first shown, second shown)}:
    the last two integers of the first `;`-ended segment that starts with the criterion's name.
    A criterion the text does not state so is absent (never an exception)."""
    found = {}
    for segment in text.split(";"):
        words = segment.split()
        if (words and words[0] in world.CRITERIA and words[0] not in found and len(words) >= 3
                and all(w.isdigit() for w in words[-2:])):
            found[words[0]] = (int(words[-2]), int(words[-1]))
    return found


def verdict_label(record: dict) -> dict | None:
    """A judge-trace record as the preference its verdict states, {prompt, chosen, rejected}
    (None when the verdict does not parse or ties): the teacher's label of the pair, the data of
    a scalar RM trained on the teacher's judgements."""
    scores = genrm.parse_scores(record["judge"])
    if scores is None or scores[0] == scores[1]:
        return None
    first, second = record["response_1"], record["response_2"]
    chosen, rejected = (first, second) if scores[0] > scores[1] else (second, first)
    return {"prompt": record["prompt"], "chosen": chosen, "rejected": rejected}


@dataclasses.dataclass(frozen=True)
class TeacherJudge:
    """The rubric teacher as BRPO's judge (no model call): `verdicts` takes requests
    (prompt text, first response text, second response text) where `genrm.Judge` takes judge
    prompt tokens, and returns the same arrays, its verdicts drawn from `judge_trace` with a
    generator seeded by the key."""

    teacher: Teacher = dataclasses.field(default_factory=Teacher)

    def verdicts(self, requests: list[tuple[str, str, str]], key
                 ) -> tuple[np.ndarray, np.ndarray, int]:
        """scores float32 [P, 1, 2], valid bool [P, 1], and 0 judge tokens."""
        import jax

        rng = np.random.default_rng(np.asarray(jax.random.key_data(key)))
        scores, valid = genrm.scores_array([
            genrm.parse_scores(judge_trace(rng, *request, self.teacher))
            for request in requests])
        return scores.reshape(-1, 1, 2), valid.reshape(-1, 1), 0
