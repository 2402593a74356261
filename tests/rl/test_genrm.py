import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxlab.rl import genrm


def examples(n):
    return settings(max_examples=n, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ASCII_SPACE = " \t\n\r\x0b\x0c"


def reference_parse(text):
    """An independent parser of the same rule: split on the last box, check each part by hand."""
    if not isinstance(text, str) or "\\boxed{" not in text:
        return None
    body, closed, _ = text.split("\\boxed{")[-1].partition("}")
    parts = body.split(",")
    if not closed or len(parts) != 2:
        return None
    values = []
    for part in parts:
        part = part.strip(ASCII_SPACE)
        digits = part.replace(".", "", 1)
        if not digits or not all(c in "0123456789" for c in digits):
            return None
        values.append(float(part))
    return tuple(values) if all(0 <= v <= 10 for v in values) else None


# ---------------------------------------------------------------- parse_scores

@pytest.mark.parametrize("text,want", [
    ("Weighted totals: 7.5 and 6.\n\\boxed{7.5,6}", (7.5, 6.0)),
    ("\\boxed{ 8 ,\t9.25 }", (8.0, 9.25)),
    ("\\boxed{10,0}", (10.0, 0.0)),
    ("\\boxed{10.000,0.0}", (10.0, 0.0)),
    ("\\boxed{.5,7.}", (0.5, 7.0)),
    ("draft \\boxed{1,2}, corrected: \\boxed{3,4} done", (3.0, 4.0)),
    ("\\boxed{7,8\n}", (7.0, 8.0)),
    ("\\boxed{" + "0" * 10000 + "1,2}3}", (1.0, 2.0)),  # leading zeros; text after the box
])
def test_parse_scores_hand_cases(text, want):
    assert genrm.parse_scores(text) == want


ADVERSARIAL = [
    "", "no verdict", "boxed{7,8}", "\\boxed{7,8", "\\boxed{}", "\\boxed{7}", "\\boxed{7,}",
    "\\boxed{,7}", "\\boxed{7,8,9}", "\\boxed{7,,8}", "\\boxed{7;8}", "\\boxed{7 8}",
    "\\boxed{{7,8}}", "\\boxed{7,{8}}", "\\boxed{\\frac{1}{2},3}", "\\boxed{nan,5}",
    "\\boxed{NaN,NaN}", "\\boxed{inf,5}", "\\boxed{5,-inf}", "\\boxed{infinity,1}",
    "\\boxed{-1,5}", "\\boxed{-0,5}", "\\boxed{+5,5}", "\\boxed{10.0001,5}", "\\boxed{11,5}",
    "\\boxed{1e1,5}", "\\boxed{1E0,5}", "\\boxed{5,5e-1}", "\\boxed{0x1,2}", "\\boxed{1_0,2}",
    "\\boxed{7.5.1,2}", "\\boxed{.,2}", "\\boxed{½,2}", "\\boxed{٣,٤}", "\\boxed{７,８}",
    "\\boxed{१,२}", "\\boxed{\u00a07,8}", "\\boxed{7,8\u2003}", "\\boxed{7\x00,8}",
    "\\boxed{\ud800,1}", "\\boxed{7,8}\\boxed{x,y}", "\\boxed{7,8} then \\boxed{",
    "\\boxed{7,8} then \\boxed{9,10", "\\boxed{" + "9" * 5000 + ",1}",
    "\\boxed{1," + "1" * 400 + "}", "\\boxed{1,2" + " " * 10000, "{" * 1000 + "}" * 1000,
    "\\boxed{" * 1000, "\\Boxed{7,8}", "\\boxed {7,8}", "\\boxed[7,8]",
]


@pytest.mark.parametrize("text", ADVERSARIAL)
def test_parse_scores_rejects_malformed(text):
    assert genrm.parse_scores(text) is None


@pytest.mark.parametrize("value", [None, b"\\boxed{1,2}", 7, ["\\boxed{1,2}"], math.nan])
def test_parse_scores_non_strings_are_none(value):
    assert genrm.parse_scores(value) is None


def _check(text):
    got = genrm.parse_scores(text)
    assert got == reference_parse(text), repr(text)
    if got is not None:
        assert all(math.isfinite(s) and 0 <= s <= 10 for s in got)


@examples(2500)
@given(st.text())
def test_parse_scores_matches_reference_on_any_text(text):
    _check(text)


BOX_ALPHABET = st.sampled_from(
    [*"\\boxed{},. 0123456789-+eEnaif\n", "\\boxed{", "٣", "１", "\u00a0", "10", "1e9"])


@examples(2500)
@given(st.lists(BOX_ALPHABET, max_size=40).map("".join))
def test_parse_scores_matches_reference_near_the_box_syntax(text):
    _check(text)


@examples(1000)
@given(st.text().filter(lambda t: "\\boxed{" not in t),
       st.floats(0, 10), st.floats(0, 10), st.sampled_from(["{:g}", "{:.3f}", "{:.0f}", "{:.6f}"]),
       st.sampled_from(["", " ", "\n"]))
def test_parse_scores_reads_any_valid_box(prefix, a, b, fmt, space):
    text = f"{prefix}\\boxed{{{space}{fmt.format(a)},{space}{fmt.format(b)}{space}}}"
    if "e" in fmt.format(a) + fmt.format(b):  # {:g} writes tiny numbers with an exponent
        assert genrm.parse_scores(text) is None
    else:
        assert genrm.parse_scores(text) == (float(fmt.format(a)), float(fmt.format(b)))


def test_parse_scores_on_random_fragment_strings():
    fragments = ["\\boxed{", "}", "{", ",", ".", " ", "7", "10", "11", "-", "nan", "inf", "e5",
                 "٣", "x", "\\", "9" * 50, "0.5", "\n"]
    rng = np.random.default_rng(0)
    for _ in range(4000):
        _check("".join(rng.choice(fragments, size=rng.integers(0, 12))))


# ---------------------------------------------------------------- judge prompt

def test_judge_prompt_inserts_text_verbatim_and_asks_for_criteria():
    text = genrm.judge_prompt("Write {a} poem", "Roses {are} red", "}{")
    assert "Write {a} poem" in text and "Roses {are} red" in text and "}{" in text
    assert text.index("Roses") < text.index("}{")  # response 1 is shown first
    assert genrm._ASK_FOR_CRITERIA in text and text.rstrip().endswith("\\boxed{7.5,6}.")


def test_judge_prompt_lists_fixed_criteria_with_weights():
    template = genrm.JudgeTemplate(criteria={"imagery": 0.25, "coherence": 0.75})
    text = genrm.judge_prompt("q", "a", "b", template)
    assert "- imagery (weight 0.25)\n- coherence (weight 0.75)" in text
    assert genrm._ASK_FOR_CRITERIA not in text


@pytest.mark.parametrize("kwargs,match", [
    ({"text": "{prompt} {response_1}"}, "response_2"),
    ({"text": "{prompt} {response_1} {response_2} {score}"}, "JudgeTemplate.text"),
    ({"text": "{prompt} {response_1} {response_2} \\boxed{s1,s2}"}, "JudgeTemplate.text"),
    ({"criteria": {"style": 0.5, "plot": 0.4}}, "sum to 1"),
    ({"criteria": {"style": 1.5, "plot": -0.5}}, "> 0"),
])
def test_bad_template_is_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        genrm.JudgeTemplate(**kwargs)


# ---------------------------------------------------------------- rewards and filters

def test_scores_array_marks_failures():
    scores, valid = genrm.scores_array([(8.0, 6.0), None, (0.0, 10.0)])
    np.testing.assert_array_equal(valid, [True, False, True])
    np.testing.assert_array_equal(scores[[0, 2]], [[8, 6], [0, 10]])
    assert np.isnan(scores[1]).all() and scores.dtype == np.float32
    assert genrm.scores_array([])[0].shape == (0, 2)


def test_genrm_rewards_hand_computed():
    scores = jnp.array([[8, 6], [6, 8], [5, 5], [np.nan, np.nan], [9, 1]], jnp.float32)
    valid = jnp.array([True, True, True, False, True])
    preferred = jnp.array([0, 0, 1, 0, 1])
    # correct + margin: 1 + 0.5 * 2/10; wrong: 0 + 0.5 * -2/10; tie: 0; unparsable: -1;
    # preferred shown second and scored 1 vs 9: 0 + 0.5 * -8/10.
    want = [1.1, -0.1, 0.0, -1.0, -0.4]
    got = genrm.genrm_rewards(scores, valid, preferred, genrm.GenRMReward(margin_weight=0.5))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    plain = jax.jit(genrm.genrm_rewards)(scores, valid, preferred)
    np.testing.assert_array_equal(plain, [1, 0, 0, -1, 0])


def test_genrm_reward_config_is_checked():
    with pytest.raises(ValueError, match="correct"):
        genrm.GenRMReward(correct=0.0, incorrect=0.0)
    with pytest.raises(ValueError, match="preferred"):
        genrm.genrm_rewards(jnp.zeros((3, 2)), jnp.ones(3, bool), jnp.zeros(4, jnp.int32))
    with pytest.raises(ValueError, match=r"\[\.\.\., 2\]"):
        genrm.genrm_rewards(jnp.zeros((3, 3)), jnp.ones(3, bool), jnp.zeros(3, jnp.int32))


# Rows: A wins both orders; position bias (the first shown wins both times); B wins both;
# a tie in one order; a format failure in one order.
AB = jnp.array([[8, 2], [8, 2], [2, 8], [5, 5], [8, 2]], jnp.float32)
BA = jnp.array([[3, 9], [8, 2], [9, 3], [1, 9], [np.nan, np.nan]], jnp.float32)
VALID_BA = jnp.array([True, True, True, True, False])


def test_consistent_preference_hand_cases():
    got = genrm.consistent_preference(AB, jnp.ones(5, bool), BA, VALID_BA)
    np.testing.assert_array_equal(got, [1, 0, -1, 0, 0])


def test_cold_start_keeps_pairs_right_in_both_orders():
    chosen = jnp.array([0, 0, 1, 0, 0])  # the right response is A, A, B, A, A
    keep = genrm.cold_start_keep(AB, jnp.ones(5, bool), BA, VALID_BA, chosen)
    np.testing.assert_array_equal(keep, [True, False, True, False, False])
    keep = genrm.cold_start_keep(AB, jnp.ones(5, bool), BA, VALID_BA, 1 - chosen)
    np.testing.assert_array_equal(keep, [False, False, False, False, False])


def test_pairwise_wins_matches_loops():
    rng = np.random.default_rng(0)
    shape = (3, 4, 2)  # groups, G, votes
    first = rng.integers(0, 4, (*shape, 2)).astype(np.float32)  # small range: many ties
    second = rng.integers(0, 4, (*shape, 2)).astype(np.float32)
    valid_first, valid_second = rng.random(shape) < 0.8, rng.random(shape) < 0.8
    got = np.asarray(genrm.pairwise_wins(first, valid_first, second, valid_second))
    assert got.shape == (3, 4, 4)
    for g, i, v in np.ndindex(*shape):
        assert got[g, i, v] == (valid_first[g, i, v] and first[g, i, v, 0] > first[g, i, v, 1])
        assert got[g, i, 2 + v] == (valid_second[g, i, v]
                                    and second[g, i, v, 1] > second[g, i, v, 0])


def test_verdict_functions_vmap():
    ab = jnp.stack([AB, AB[::-1]])
    ba = jnp.stack([BA, BA[::-1]])
    valid = jnp.ones((2, 5), bool)
    got = jax.vmap(genrm.consistent_preference)(ab, valid, ba, valid)
    want = [genrm.consistent_preference(ab[i], valid[i], ba[i], valid[i]) for i in range(2)]
    np.testing.assert_array_equal(got, np.stack(want))


# ---------------------------------------------------------------- reward functions, BRPO

class Prompt:
    def __init__(self, data, tokens=(1,)):
        self.data, self.tokens = data, tokens


def text_of(tokens):
    return "".join(chr(t) for t in tokens)


def test_genrm_reward_fn_of_a_fake_judge_reproduces_the_rule_table():
    """A fake judge (its text a function of the two responses): the reward is correct 1,
    incorrect or tie 0, unparsable -1, whichever position holds the preferred response."""
    verdicts = {"a": "\\boxed{8,3}", "b": "\\boxed{3,8}", "t": "\\boxed{5,5}", "x": "no box",
                "y": "\\boxed{8}"}
    responses = [[[ord(c)] for c in "abtxy"], [[ord(c)] for c in "abtxy"]]
    out = genrm.genrm_reward_fn(lambda ids: verdicts[text_of(ids)])(
        [Prompt(0), Prompt(1)], responses, np.zeros((2, 5), bool))
    # preferred first: a right, b wrong; preferred second: the reverse
    np.testing.assert_array_equal(out["reward"], [[1, 0, 0, -1, -1], [0, 1, 0, -1, -1]])
    np.testing.assert_array_equal(out["accuracy"], [[1, 0, 0, 0, 0], [0, 1, 0, 0, 0]])
    np.testing.assert_array_equal(out["format_failure"], [[0, 0, 0, 1, 1]] * 2)


def test_the_consistency_reward_needs_the_twin_verdict_right_too():
    """h = (1 - w) [right] + w [right and twin right], by hand for w = 0.5: a right verdict
    whose twin is wrong earns half; a wrong one nothing; a format failure -1 whatever its twin."""
    scores = jnp.array([[8, 2], [8, 2], [2, 8], [np.nan, np.nan]], jnp.float32)
    valid = jnp.array([True, True, True, False])
    preferred = jnp.zeros(4, jnp.int32)
    twin = jnp.array([True, False, True, True])
    got = genrm.genrm_rewards(scores, valid, preferred, genrm.GenRMReward(consistency_weight=0.5),
                              twin)
    np.testing.assert_allclose(got, [1.0, 0.5, 0.0, -1.0])
    scaled = genrm.genrm_rewards(scores, valid, preferred, genrm.GenRMReward(
        correct=2.0, incorrect=-1.0, consistency_weight=1.0), twin)
    np.testing.assert_allclose(scaled, [2.0, -1.0, -1.0, -1.0])   # incorrect + 3 h
    with pytest.raises(ValueError, match="consistency_weight"):
        genrm.GenRMReward(consistency_weight=1.5)


def test_the_consistency_reward_fn_pairs_rollout_j_with_its_twins_rollout_j():
    """Two pairs, each in both orders (data genrm.Shown), in a shuffled batch: rollout j is
    rewarded 1 only when it and rollout j of its twin group are both right (w = 1)."""
    verdicts = {"a": "\\boxed{8,3}", "b": "\\boxed{3,8}"}
    shown = [genrm.Shown(1, 7), genrm.Shown(0, 4), genrm.Shown(0, 7), genrm.Shown(1, 4)]
    responses = [[[ord("b")], [ord("a")]], [[ord("a")], [ord("a")]],
                 [[ord("a")], [ord("a")]], [[ord("a")], [ord("b")]]]
    reward_fn = genrm.genrm_reward_fn(lambda ids: verdicts[text_of(ids)],
                                      genrm.GenRMReward(consistency_weight=1.0))
    out = reward_fn([Prompt(s) for s in shown], responses, np.zeros((4, 2), bool))
    # right: pair 7 second-order [1, 0], first-order [1, 1]; pair 4 first [1, 1], second [0, 1]
    np.testing.assert_array_equal(out["accuracy"], [[1, 0], [1, 1], [1, 1], [0, 1]])
    np.testing.assert_array_equal(out["reward"], [[1, 0], [0, 1], [1, 0], [0, 1]])
    np.testing.assert_array_equal(out["consistent"], out["reward"])
    assert genrm.twin_rows([Prompt(s) for s in shown]).tolist() == [2, 3, 0, 1]


@pytest.mark.parametrize("shown,match", [
    ([genrm.Shown(0, 1), genrm.Shown(0, 1)], "pair 1 must be shown once in each order"),
    ([genrm.Shown(0, 1), genrm.Shown(1, 2)], "pair 1 must be shown once in each order"),
    ([genrm.Shown(0, 1), 1], r"prompt 1: a consistency reward needs data genrm.Shown"),
])
def test_a_batch_without_every_twin_is_an_error(shown, match):
    with pytest.raises(ValueError, match=match):
        genrm.twin_rows([Prompt(s) for s in shown])


def test_brpo_pairs_are_every_non_reference_response_in_both_orders():
    pairs = genrm.brpo_pairs(np.asarray([2, 0]), 3)
    assert pairs.tolist() == [[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1],
                              [1, 1, 0], [1, 1, 1], [1, 2, 0], [1, 2, 1]]


@pytest.mark.parametrize("ref", [[-1, 0], [0, 3]])
def test_a_reference_outside_the_group_is_an_error(ref):
    with pytest.raises(ValueError, match="ref_index must lie in"):
        genrm.brpo_pairs(np.asarray(ref), 3)
    scores = np.zeros((8, 1, 2), np.float32)
    with pytest.raises(ValueError, match="ref_index must lie in"):
        genrm.brpo_rewards(scores, np.ones((8, 1), bool), np.zeros((8, 3), int),
                           np.asarray(ref), 3)


class FakeJudge:
    """Reads the judge prompt "first|second" back and scores the shorter response higher, and
    fails to parse when asked about a response of length 3; records what it was asked."""

    def __init__(self, votes=1):
        self.votes, self.asked = votes, []

    def verdicts(self, prompts, key):
        self.asked += [text_of(p) for p in prompts]
        scores, valid = [], []
        for p in prompts:
            first, second = text_of(p).split("|")
            ok = 3 not in (len(first), len(second))
            scores.append([[10 - len(first), 10 - len(second)]] * self.votes)
            valid.append([ok] * self.votes)
        return np.asarray(scores, np.float32), np.asarray(valid), 0


def render(prompt, first, second):
    return [*first, ord("|"), *second]


def test_brpo_reward_fn_judges_both_orders_and_parses_wins_back_to_their_rows():
    """Every non-reference response is judged against its group's reference in both orders,
    in one call; r_i = +1 exactly where response i is strictly shorter than the reference and
    neither has length 3 (a format failure), -1 elsewhere, 0 for the reference."""
    rng = np.random.default_rng(0)
    groups, size = 5, 4
    responses = [[[ord("a")] * int(n) for n in rng.integers(1, 6, size)] for _ in range(groups)]
    prompts = [Prompt(None, (g,)) for g in range(groups)]
    judge = FakeJudge(votes=2)
    out = genrm.brpo_reward_fn(judge, render)(prompts, responses, np.zeros((groups, size), bool))
    rewards = out["reward"]
    for g, group in enumerate(responses):
        (ref,) = np.flatnonzero(rewards[g] == 0)
        asked = {text_of(group[i]) + "|" + text_of(group[ref]) for i in range(size) if i != ref}
        asked |= {text_of(group[ref]) + "|" + text_of(group[i]) for i in range(size) if i != ref}
        assert asked <= set(judge.asked)
        for i in range(size):
            if i != ref:
                wins = len(group[i]) < len(group[ref]) and 3 not in (len(group[i]),
                                                                      len(group[ref]))
                assert rewards[g, i] == (1 if wins else -1), (g, i, ref)
    assert len(judge.asked) == groups * (size - 1) * 2
    again = genrm.brpo_reward_fn(FakeJudge(2), render)(prompts, responses,
                                                        np.zeros((groups, size), bool))
    np.testing.assert_array_equal(again["reward"], rewards)   # the same reference draws


def test_verdict_metrics_hand_computed():
    # pair 1: right in both orders; pair 2: always the first shown; pair 3: fails in ab, tie ba
    ab = jnp.asarray([[8.0, 2.0], [9.0, 1.0], [np.nan, np.nan]])
    ba = jnp.asarray([[1.0, 7.0], [6.0, 5.0], [4.0, 4.0]])
    m = genrm.verdict_metrics(ab, jnp.asarray([True, True, False]), ba, jnp.ones(3, bool))
    assert float(m["accuracy_first"]) == pytest.approx(2 / 3)
    assert float(m["accuracy_second"]) == pytest.approx(1 / 3)
    assert float(m["accuracy_both"]) == pytest.approx(1 / 3)
    assert float(m["first_position"]) == pytest.approx(3 / 6)
    assert float(m["format_failure"]) == pytest.approx(1 / 6)


def test_a_genrm_with_another_tokenizer_than_the_writer_is_refused(tmp_path):
    from jaxlab.deepconf import arithmetic
    from jaxlab.writing import world

    world.save_tokenizer(tmp_path / "writer")
    world.save_tokenizer(tmp_path / "judge")
    arithmetic.save_tokenizer(tmp_path / "other")
    genrm.check_same_tokenizer(tmp_path / "judge", tmp_path / "writer")
    with pytest.raises(ValueError, match="another tokenizer"):
        genrm.check_same_tokenizer(tmp_path / "other", tmp_path / "writer")
