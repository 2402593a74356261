import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxlab.deepconf import voting as vt
from jaxlab.deepconf.answers import NO_ANSWER, group_answers

# --------------------------------------------------------------------------------------------
# A pure-Python reference of the documented rules


def _ref_vote(answers, voters, weights, confidence):
    """(winner, its most confident trace, {answer: V(a)}) by the documented rules."""
    votes, best = {}, {}
    for t in voters:
        a = answers[t]
        votes[a] = votes.get(a, 0.0) + weights[t]
        best[a] = max(best.get(a, -math.inf), confidence[t])
    if not votes:
        return NO_ANSWER, NO_ANSWER, votes
    winner = min(votes, key=lambda a: (-votes[a], -best[a], a))
    trace = min((t for t in voters if answers[t] == winner), key=lambda t: (-confidence[t], t))
    return winner, trace, votes


def _ref_percentile(values, percent):
    """The linear-interpolation percentile, exactly (fractions): np.percentile's definition."""
    x = sorted(Fraction(v) for v in values)
    pos = Fraction(percent) * (len(x) - 1) / 100
    lo = math.floor(pos)
    return x[lo] + (x[min(lo + 1, len(x) - 1)] - x[lo]) * (pos - lo)


def _ref_filtered(answers, valid, scores, keep_percent, weighted):
    """The official filter: the voters whose score reaches the (100 - eta)-th percentile."""
    voters = [t for t in range(len(answers)) if valid[t] and answers[t] >= 0]
    cut = _ref_percentile([scores[t] for t in voters], 100 - keep_percent) if voters else 0
    kept = [t for t in voters if scores[t] >= cut]
    weights = scores if weighted else [1.0] * len(scores)
    return _ref_vote(answers, sorted(kept), weights, scores), kept


def _check(result, expected, n):
    winner, trace, votes = expected
    assert int(result.answer) == winner and int(result.trace) == trace
    dense = np.zeros(n)
    for a, v in votes.items():
        dense[a] = v
    np.testing.assert_array_equal(np.asarray(result.votes), dense)
    total = sum(votes.values())
    np.testing.assert_allclose(float(result.consensus),
                               votes[winner] / total if total > 0 else 0.0, rtol=1e-6)


@st.composite
def _traces(draw):
    """12 random traces (one shape: one compilation) with few answers, many ties and exactly
    summable (dyadic) scores; the number of voters varies from 0 to 12 with `valid`."""
    n = 12
    groups = draw(st.integers(1, 4))
    answers = draw(st.lists(st.integers(-1, groups - 1), min_size=n, max_size=n))
    valid = draw(st.just([True] * n) | st.lists(st.booleans(), min_size=n, max_size=n))
    scores = draw(st.lists(st.integers(0, 160).map(lambda k: k / 8), min_size=n, max_size=n))
    return answers, valid, scores


def _arrays(answers, valid, scores):
    return (jnp.asarray(answers, jnp.int32), jnp.asarray(valid, bool),
            jnp.asarray(scores, jnp.float32))


@settings(max_examples=120, deadline=None)
@given(traces=_traces(), keep_percent=st.sampled_from([1, 10, 33, 50, 90, 100, 12.5]),
       weighted=st.booleans())
def test_filtered_vote_matches_the_reference(traces, keep_percent, weighted):
    answers, valid, scores = traces
    expected, kept = _ref_filtered(answers, valid, scores, keep_percent, weighted)
    a, v, s = _arrays(answers, valid, scores)
    result = vt.filtered_vote(a, v, s, keep_percent, weighted)
    assert np.flatnonzero(np.asarray(result.voters)).tolist() == sorted(kept)
    _check(result, expected, len(answers))


@settings(max_examples=80, deadline=None)
@given(traces=_traces())
def test_majority_and_weighted_votes_match_the_reference(traces):
    answers, valid, scores = traces
    voters = [t for t in range(len(answers)) if valid[t] and answers[t] >= 0]
    a, v, s = _arrays(answers, valid, scores)
    _check(vt.majority_vote(a, v, s), _ref_vote(answers, voters, [1.0] * len(a), scores), len(a))
    _check(vt.majority_vote(a, v), _ref_vote(answers, voters, [1.0] * len(a), [0.0] * len(a)),
           len(a))
    _check(vt.weighted_vote(a, v, s), _ref_vote(answers, voters, scores, scores), len(a))


def test_votes_match_numpy_on_continuous_scores():
    rng = np.random.default_rng(0)
    answers = rng.integers(-1, 6, size=300)
    valid = rng.random(300) < 0.8
    scores = rng.uniform(5, 20, size=300).astype(np.float32)
    result = vt.weighted_vote(*_arrays(answers, valid, scores))
    voters = valid & (answers >= 0)
    expected = np.bincount(answers[voters], scores[voters], minlength=300)
    np.testing.assert_allclose(np.asarray(result.votes), expected, rtol=1e-5)
    assert int(result.answer) == int(np.argmax(expected))


# --------------------------------------------------------------------------------------------
# Hand-computed cases


def test_hand_computed_votes():
    # Two confident traces say 0, three unsure ones say 1.
    a, v, s = _arrays([0, 0, 1, 1, 1], [True] * 5, [0.9, 0.8, 0.1, 0.1, 0.1])
    majority = vt.majority_vote(a, v, s)
    assert int(majority.answer) == 1 and int(majority.trace) == 2
    np.testing.assert_allclose(float(majority.consensus), 3 / 5)
    weighted = vt.weighted_vote(a, v, s)
    assert int(weighted.answer) == 0 and int(weighted.trace) == 0
    np.testing.assert_allclose(np.asarray(weighted.votes)[:2], [1.7, 0.3], rtol=1e-6)
    np.testing.assert_allclose(float(weighted.consensus), 1.7 / 2.0, rtol=1e-6)
    # the 60th percentile of [.1, .1, .1, .8, .9] is .1 + .7 x .4 = .38: traces 0 and 1 reach it
    top = vt.filtered_vote(a, v, s, 40.0, weighted=False)
    assert np.asarray(top.voters).tolist() == [True, True, False, False, False]
    assert int(top.answer) == 0 and float(top.consensus) == 1.0


def test_ties_go_to_the_most_confident_voter_then_the_first_answer():
    a, v = jnp.array([0, 1, 1, 0]), jnp.ones(4, bool)
    assert int(vt.majority_vote(a, v, jnp.array([1.0, 2.0, 0.5, 0.5])).answer) == 1
    assert int(vt.majority_vote(a, v, jnp.array([3.0, 2.0, 0.5, 0.5])).answer) == 0
    equal = vt.majority_vote(a, v, jnp.ones(4))
    assert int(equal.answer) == 0 and int(equal.trace) == 0
    assert int(vt.majority_vote(jnp.array([1, 0]), jnp.ones(2, bool)).answer) == 0
    # Weighted: V(0) = 1 + 2 = V(1) = 3; answer 1 holds the single most confident trace.
    tie = vt.weighted_vote(jnp.array([0, 0, 1]), jnp.ones(3, bool), jnp.array([1.0, 2.0, 3.0]))
    assert int(tie.answer) == 1 and int(tie.trace) == 2
    # Filtering keeps every trace tied with the cut (the median of [5, 5, 5, 7] is 5).
    kept = vt.top_percent(jnp.array([5.0, 7.0, 5.0, 5.0]), jnp.ones(4, bool), 50.0)
    assert np.asarray(kept).tolist() == [True, True, True, True]


def test_no_voter_gives_no_answer():
    for answers, valid in [([-1, -1, -1], [True] * 3), ([0, 1, 2], [False] * 3)]:
        a, v, s = _arrays(answers, valid, [1.0, 2.0, 3.0])
        for result in (vt.majority_vote(a, v, s), vt.weighted_vote(a, v, s),
                       vt.filtered_vote(a, v, s, 10.0)):
            assert int(result.answer) == NO_ANSWER and int(result.trace) == NO_ANSWER
            assert float(result.consensus) == 0.0 and not np.any(np.asarray(result.votes))


def test_unanimous_traces_have_full_consensus():
    a, v, s = _arrays([2, 2, 2, 2], [True] * 4, [4.0, 4.0, 4.0, 4.0])
    for result in (vt.majority_vote(a, v, s), vt.weighted_vote(a, v, s),
                   vt.filtered_vote(a, v, s, 50.0)):
        assert int(result.answer) == 2 and int(result.trace) == 0
        assert float(result.consensus) == 1.0


def _official_filter(confidences, top_percent):
    """facebookresearch/deepconf `filter_top_confidence`, transcribed: which traces it keeps."""
    threshold = np.percentile(confidences, (1 - top_percent) * 100)
    return [conf >= threshold for conf in confidences]


@pytest.mark.parametrize("n", [1, 2, 6, 7, 8, 10, 11, 30, 64, 101])
@pytest.mark.parametrize("keep_percent", [10, 90, 12.5, 100])
def test_top_percent_keeps_what_the_official_filter_keeps(n, keep_percent):
    scores = np.random.default_rng(n).uniform(5, 20, size=n).astype(np.float32)
    kept = vt.top_percent(jnp.asarray(scores), jnp.ones(n, bool), keep_percent)
    want = _official_filter(scores.astype(np.float64), keep_percent / 100)
    assert np.asarray(kept).tolist() == want
    # e.g. top 10% of 11 traces: 2, top 90% of 8: 7, always at least one
    assert 1 <= sum(want) <= n


def test_top_percent_without_voters_keeps_none():
    assert not np.asarray(vt.top_percent(jnp.ones(4), jnp.zeros(4, bool), 10.0)).any()


@pytest.mark.parametrize("keep_percent", [0, -1, 100.5, 200])
def test_filtering_rejects_a_bad_percentage(keep_percent):
    with pytest.raises(ValueError, match="keep_percent"):
        vt.filtered_vote(jnp.zeros(3, jnp.int32), jnp.ones(3, bool), jnp.ones(3), keep_percent)


# --------------------------------------------------------------------------------------------
# Online threshold


def test_threshold_rules_keep_the_top_10_and_90_percent():
    scores = np.random.default_rng(1).uniform(8, 16, size=16).astype(np.float32)
    low, high = vt.threshold_for("deepconf-low", scores), vt.threshold_for("deepconf-high", scores)
    np.testing.assert_allclose(float(low), np.percentile(scores, 90), rtol=1e-6)
    np.testing.assert_allclose(float(high), np.percentile(scores, 10), rtol=1e-6)
    assert low > high
    scores = np.arange(1.0, 101.0)  # 1..100: keeping 10% -> 10 traces at or above
    assert np.sum(scores >= float(vt.threshold(scores, 10.0))) == 10
    assert np.sum(scores >= float(vt.threshold(scores, 90.0))) == 90
    assert float(vt.threshold(np.array([5.0]), 10.0)) == 5.0


@pytest.mark.parametrize("keep_percent", [0, 100, -5, 150])
def test_threshold_rejects_a_percentile_outside_0_100(keep_percent):
    with pytest.raises(ValueError, match=r"\(0, 100\)"):
        vt.threshold(np.ones(4), keep_percent)


def test_threshold_rejects_bad_input():
    with pytest.raises(ValueError, match="non-empty"):
        vt.threshold(np.zeros(0), 10.0)
    with pytest.raises(ValueError, match="deepconf-high"):
        vt.threshold_for("deepconf-medium", np.ones(4))


# --------------------------------------------------------------------------------------------
# Metrics, compilation and the string layer


def test_trace_metrics_use_the_window_and_the_tail_apart():
    # window 4 and tail 7 against NumPy: a trace of 12 tokens, one of 5 (shorter than the tail:
    # its mean), one of 1 (shorter than the window: one group)
    c = np.random.default_rng(2).uniform(5, 20, size=(3, 12)).astype(np.float32)
    lengths = np.array([12, 5, 1])
    got = {name: np.asarray(vt.trace_metric(name, jnp.asarray(c), jnp.asarray(lengths),
                                            window=4, tail=7)) for name in vt.METRICS}
    for b, n in enumerate(lengths):
        x = c[b, :n].astype(np.float64)
        groups = np.sort([x[i:i + 4].mean() for i in range(n - 3)] if n >= 4 else [x.mean()])
        np.testing.assert_allclose(got["tail"][b], x[-7:].mean(), rtol=1e-5)
        np.testing.assert_allclose(got["mean"][b], x.mean(), rtol=1e-5)
        np.testing.assert_allclose(got["lowest_group"][b], groups[0], rtol=1e-5)
        np.testing.assert_allclose(got["bottom_group"][b],
                                   groups[:max(1, int(0.1 * len(groups)))].mean(), rtol=1e-5)
    with pytest.raises(ValueError, match="median"):
        vt.trace_metric("median", c, lengths, 4)
    for name in ("window", "tail"):
        with pytest.raises(ValueError, match=f"{name} must be an integer >= 1"):
            vt.trace_metric("tail", c, lengths, **{name: 0})


def test_filtered_vote_jits_and_vmaps_over_problems():
    rng = np.random.default_rng(3)
    answers = jnp.asarray(rng.integers(-1, 4, size=(5, 16)), jnp.int32)
    valid = jnp.asarray(rng.random((5, 16)) < 0.9)
    scores = jnp.asarray(rng.integers(0, 40, size=(5, 16)) / 4, jnp.float32)
    run = jax.jit(jax.vmap(lambda a, v, s: vt.filtered_vote(a, v, s, 10.0)))
    batched = run(answers, valid, scores)
    for p in range(5):
        single = vt.filtered_vote(answers[p], valid[p], scores[p], 10.0)
        assert int(batched.answer[p]) == int(single.answer)
        assert int(batched.trace[p]) == int(single.trace)
        np.testing.assert_array_equal(batched.votes[p], single.votes)
        np.testing.assert_allclose(batched.consensus[p], single.consensus, rtol=1e-6)


def _vote_on_strings(texts, scores, keep_percent=100.0, weighted=True):
    groups = group_answers(texts)
    ids = jnp.asarray(groups.ids)
    result = vt.filtered_vote(ids, jnp.ones(ids.shape, bool), jnp.asarray(scores, jnp.float32),
                              keep_percent, weighted)
    return groups.label(int(result.answer)), result, groups


def test_vote_on_answer_strings():
    texts = [r"\frac12", "2", "0.5", None, "2", "1/2", "3"]
    label, result, groups = _vote_on_strings(texts, np.ones(7), weighted=False)
    assert label == r"\frac12" and int(result.trace) == 0
    assert groups.ids.tolist() == [0, 1, 0, NO_ANSWER, 1, 0, 2]
    np.testing.assert_allclose(float(result.consensus), 3 / 6)
    scores = np.array([1.0, 9.0, 1.0, 9.0, 9.0, 1.0, 1.0])
    assert _vote_on_strings(texts, scores)[0] == "2"             # weighted: V(2) = 18 > 3
    assert _vote_on_strings(texts, scores, keep_percent=10)[0] == "2"
    assert _vote_on_strings([None, None], np.ones(2))[0] is None
