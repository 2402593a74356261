"""The judge report, its baselines and the GenRM's data, against hand-counted cases and the
rules that define them."""

import jax
import numpy as np
import pytest

from jaxlab.rl import genrm
from jaxlab.writing import judging, teacher, world

PROMPT = "write sun river night :"
BEST = "the sun over a river in quiet night ."         # 10: all words, 8 words, clean end
GOOD = "the sun over a river ."                         # 3 + 2 + 1 + 2 = 8
POOR = "sun sun sun"                                    # 1 + 0 + 1 + 0 = 2


def box(s1, s2, criteria=""):
    return f"{criteria}\\boxed{{ {s1} , {s2} }}"


def test_the_report_counts_verdicts_by_hand():
    """Three pairs: right in both orders; first-position bias (right first, wrong second); a
    format failure second. Gaps: 2, 8, 6."""
    pairs = [{"prompt": PROMPT, "chosen": BEST, "rejected": GOOD},
             {"prompt": PROMPT, "chosen": BEST, "rejected": POOR},
             {"prompt": PROMPT, "chosen": GOOD, "rejected": POOR}]
    first = [box(9, 2), box(9, 2), box(9, 2)]          # chosen shown first: all right
    second = [box(1, 7), box(9, 2), "no box"]          # chosen second: right, wrong, failure
    got = judging.report(pairs, first, second)
    assert got["accuracy_both"] == pytest.approx(1 / 3)
    assert got["accuracy_first"] == pytest.approx(1.0)
    assert got["accuracy_second"] == pytest.approx(1 / 3)
    assert got["first_position"] == pytest.approx(4 / 6)
    assert got["accuracy_soft"] == pytest.approx(1 / 3 + 0.5 * 2 / 3)
    assert got["format_failure"] == pytest.approx(1 / 6)
    assert got["by_gap"] == {"2": {"accuracy": 1.0, "pairs": 1},
                             "4+": {"accuracy": 0.0, "pairs": 2}}
    assert got["criteria"]["coverage"] == {"first": 0.0, "second": 0.0, "mean": 0.0}


def test_the_teachers_own_traces_state_every_criterion_right():
    pairs = world.preference_pairs(200, 3, world.WorldConfig(), rater=False)
    got = judging.report(pairs, *judging.teacher_texts(pairs, 0, teacher.Teacher()))
    for name in world.CRITERIA:
        assert got["criteria"][name] == {"first": 1.0, "second": 1.0, "mean": 1.0}
    # sure (gap > 1) verdicts are always right; unsure ones right in both orders with
    # probability 0.6 x 0.4
    assert got["by_gap"]["2"]["accuracy"] == got["by_gap"]["4+"]["accuracy"] == 1.0
    assert 0.1 < got["by_gap"]["1"]["accuracy"] < 0.4


def test_criteria_accuracy_by_position_by_hand():
    pair = {"prompt": PROMPT, "chosen": BEST, "rejected": POOR}
    truth = [world.criteria(("sun", "river", "night"), r) for r in (BEST, POOR)]

    def stated(first, second):
        return " ".join(f"{n} {first[n]} {second[n]} ;" for n in world.CRITERIA)

    chosen_first = stated(truth[0], truth[1])                         # all right
    chosen_second = stated({**truth[1], "coverage": 3}, truth[0])    # POOR's coverage is 1
    got = judging.criteria_accuracy([pair], [chosen_first], [chosen_second])
    assert got["coverage"] == {"first": 0.5, "second": 1.0, "mean": 0.75}
    assert got["ending"] == {"first": 1.0, "second": 1.0, "mean": 1.0}


def test_parse_criteria_takes_the_last_two_numbers_of_each_segment():
    text = ("coverage sun 1 0 river 1 1 night 0 1 , 3 3 ; repeats 2 0 ; length 2 ; "
            "total 7 6 ; \\boxed{ 6 , 7 }")
    assert teacher.parse_criteria(text) == {"coverage": (3, 3), "repeats": (2, 0)}
    assert teacher.parse_criteria("no criteria here") == {}


def test_the_teacher_shows_its_coverage_work():
    trace = teacher.judge_trace(np.random.default_rng(0), PROMPT, BEST, POOR)
    assert trace.startswith("coverage sun 1 1 river 1 0 night 1 0 , 4 1 ; repeats 2 0 ;")
    assert genrm.parse_scores(trace) == (10.0, 2.0)


def test_verdict_labels_follow_the_box():
    record = {"prompt": PROMPT, "response_1": GOOD, "response_2": BEST, "judge": box(3, 8)}
    assert teacher.verdict_label(record) == {"prompt": PROMPT, "chosen": BEST, "rejected": GOOD}
    assert teacher.verdict_label({**record, "judge": box(5, 5)}) is None
    assert teacher.verdict_label({**record, "judge": "none"}) is None


def test_baselines_by_hand():
    """Pairs whose better response is the longer, of equal length, and the shorter; every gap
    exceeds the teacher's unsure margin, so both teachers are always right."""
    pairs = [{"prompt": PROMPT, "chosen": BEST, "rejected": GOOD},                # 9 vs 6
             {"prompt": PROMPT, "chosen": GOOD, "rejected": "sun sun sun a the old"},  # 6, 6
             {"prompt": PROMPT, "chosen": GOOD, "rejected": "sun sun sun the the the old old"}]
    assert [world.quality_gap(p) for p in pairs] == [2, 5, 5]
    got = judging.baselines(pairs, world.WorldConfig(), teacher.Teacher(), 0)
    assert got["random"] == 0.25
    assert got["always_longer"] == pytest.approx(1 / 3)
    assert got["always_shorter"] == pytest.approx(1 / 3)
    assert got["teacher"] == got["teacher_without_position_bias"] == 1.0
    # r = q + 0.25 n: 10 + 2.25 > 8 + 1.5; 8 + 1.5 > 3 + 1.5; 8 + 1.5 > 3 + 2
    assert got["ideal_rater_rm"] == 1.0
    assert judging.baselines(pairs, world.WorldConfig(length_bias=3.0), teacher.Teacher(),
                             0)["ideal_rater_rm"] == pytest.approx(2 / 3)   # 8 + 18 < 3 + 24


def test_the_ideal_rater_reward_is_the_raters_logit():
    cfg = world.WorldConfig(temperature=2.0, length_bias=0.5)
    required = ("sun", "river", "night")
    assert world.ideal_rater_reward(required, BEST, cfg) == pytest.approx(10 / 2 + 0.5 * 9)


def test_judge_pairs_are_balanced_unseen_and_weighted_to_small_gaps():
    cfg = world.WorldConfig()
    exclude = world.preference_pairs(300, 7, cfg, rater=False)
    pairs = world.judge_pairs(2000, 1, cfg, exclude=exclude)
    sides = np.asarray([world.longer_side(p) for p in pairs])
    assert abs(np.sum(sides == 1) - np.sum(sides == -1)) <= 1
    assert all(world.quality_gap(p) > 0 for p in pairs)
    keys = {world.pair_key(p) for p in pairs}
    assert len(keys) == len(pairs) and not keys & {world.pair_key(p) for p in exclude}
    drawn = world.preference_pairs(2000, 1, cfg, rater=False)
    assert np.mean(sides[:len(drawn)] == 1) > np.mean([world.longer_side(p) == 1
                                                       for p in drawn]) + 0.05
    small = world.judge_pairs(2000, 2, cfg, small_gaps=True)
    gaps, small_gaps = ([world.quality_gap(p) for p in x] for x in (pairs, small))
    assert np.mean(small_gaps) < np.mean(gaps) - 0.5
    assert np.mean(np.asarray(small_gaps) == 1) > 0.45


def test_the_teacher_judge_returns_the_teachers_verdicts():
    """BRPO's teacher judge: the verdicts of `judge_trace` with a generator seeded by the key."""
    requests = [(PROMPT, BEST, POOR), (PROMPT, POOR, BEST), (PROMPT, GOOD, BEST)]
    scores, valid, tokens = teacher.TeacherJudge().verdicts(requests, jax.random.key(3))
    assert scores.shape == (3, 1, 2) and valid.all() and tokens == 0
    np.testing.assert_array_equal(scores[:, 0], [[10, 2], [2, 10], [8, 10]])
