import dataclasses

import jax
import numpy as np
import pytest

from jaxlab.deepconf import online, voting
from jaxlab.models import hf, zoo
from jaxlab.sampling import sampler
from jaxlab.sampling.sampler import SamplingConfig

SAMPLING = SamplingConfig(max_new_tokens=12, group_size=4, window=3, temperature=1.0)
PROMPT = [5, 9, 17, 3]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return hf.load_pretrained(zoo.create("qwen3", tmp_path_factory.mktemp("q3")))


def by_first_token(ids) -> str:
    """A stand-in for reading a trace: its answer is its first token mod 3."""
    return f"so \\boxed{{{int(ids[0]) % 3}}}"


def test_only_surviving_traces_vote_weighted_by_lowest_group_confidence():
    # answer "7": two survivors (2 + 3 = 5); answer "9": one survivor (4) and one stopped trace
    # so confident (100) that it would win if it voted
    traces = online.Traces(
        texts=[r"\boxed{7}", r"\boxed{9}", r"\boxed{7}", r"\boxed{9}", "no answer"],
        lengths=np.array([3, 3, 3, 3, 3]), lowest=np.array([2.0, 4.0, 3.0, 100.0, 50.0]),
        stopped=np.array([False, False, False, True, False]), confidence=np.zeros((5, 3)))
    answer, votes, solution, consensus = online.weighted_vote(traces)
    assert answer == "7" and votes == {"7": 5.0, "9": 4.0}
    assert solution == r"\boxed{7}"  # the most confident "7" voter: trace 2
    np.testing.assert_allclose(consensus, 5 / 9)


def test_threshold_follows_the_rule_on_the_warmup(model):
    config = online.OnlineConfig(rule="deepconf-high", warmup=8, budget=8, batch=4)
    result = online.solve(model, PROMPT, jax.random.key(0), SAMPLING, config, by_first_token)
    # The warmup is the first sample call with the first key: redo it and apply the rule.
    first = jax.random.split(jax.random.key(0), 1 + config.budget)[0]
    warm = sampler.sample(model, [PROMPT], first[None],
                          dataclasses.replace(SAMPLING, budget=8, stop_threshold=None))
    want = np.percentile(np.asarray(warm.lowest_group_confidence), 10)
    np.testing.assert_allclose(result.threshold, want, rtol=1e-6)
    assert result.launched == 8 and result.rounds == 0 and result.stopped == 0


def test_rounds_stop_weak_traces_and_respect_the_budget(model):
    config = online.OnlineConfig(rule="deepconf-low", warmup=8, budget=22, batch=6,
                                 consensus=1.0)
    result = online.solve(model, PROMPT, jax.random.key(1), SAMPLING, config, by_first_token)
    # consensus 1.0 is out of reach with three answers around: every round runs, the last one
    # shortened to the budget; deepconf-low's high threshold stops most later traces.
    assert result.launched == 22 and result.rounds == 3
    assert 0 < result.stopped <= 14
    assert result.tokens < 22 * SAMPLING.max_new_tokens
    assert result.answer in {"0", "1", "2"} and set(result.votes) <= {"0", "1", "2"}
    assert result.solution.endswith(f"\\boxed{{{result.answer}}}")
    assert abs(sum(result.votes.values()) * result.consensus
               - result.votes[result.answer]) < 1e-3


def test_consensus_ends_sampling_early(model):
    config = online.OnlineConfig(warmup=4, budget=64, batch=4, consensus=0.01)
    result = online.solve(model, PROMPT, jax.random.key(2), SAMPLING, config, by_first_token)
    assert result.launched == 4 and result.rounds == 0 and result.consensus >= 0.01


def test_no_answers_give_no_answer_without_crashing(model):
    config = online.OnlineConfig(warmup=4, budget=8, batch=4)
    result = online.solve(model, PROMPT, jax.random.key(3), SAMPLING, config, lambda ids: "?")
    assert result.answer is None and result.solution is None and result.votes == {}
    assert result.launched == 8 and result.consensus == 0.0


def test_many_problems_at_once_equal_one_at_a_time(model):
    # prompts of different lengths; consensus 0.6 stops some problems after the warmup or a
    # round and lets others run to the budget: each keeps its own threshold and stop
    prompts = [PROMPT, [7, 8], [100, 200, 300, 11, 12, 13, 14], [42]]
    keys = jax.random.split(jax.random.key(7), len(prompts))
    config = online.OnlineConfig(rule="deepconf-low", warmup=4, budget=14, batch=4,
                                 consensus=0.6)
    many = online.solve_many(model, prompts, keys, SAMPLING, config, by_first_token)
    for prompt, key, got in zip(prompts, keys, many, strict=True):
        alone = online.solve(model, prompt, key, SAMPLING, config, by_first_token)
        assert (got.answer, got.votes.keys(), got.launched, got.stopped, got.tokens,
                got.rounds, got.solution) == (alone.answer, alone.votes.keys(), alone.launched,
                                              alone.stopped, alone.tokens, alone.rounds,
                                              alone.solution)
        np.testing.assert_allclose(got.threshold, alone.threshold, rtol=1e-6)
        np.testing.assert_allclose(list(got.votes.values()), list(alone.votes.values()),
                                   rtol=1e-5)
        assert got.traces.texts == alone.traces.texts
        np.testing.assert_array_equal(got.traces.lengths, alone.traces.lengths)
        np.testing.assert_array_equal(got.traces.stopped, alone.traces.stopped)
        np.testing.assert_allclose(got.traces.confidence, alone.traces.confidence, rtol=1e-5)
    assert len({r.rounds for r in many}) > 1  # problems stopped at different rounds


@pytest.mark.parametrize("fields,match", [
    (dict(warmup=16, budget=8), "budget=8 must be >= warmup=16"),
    (dict(rule="deepconf-mid"), "rule"), (dict(consensus=0.0), "consensus"),
    (dict(batch=0), "batch")])
def test_bad_online_settings_are_named(fields, match):
    with pytest.raises(ValueError, match=match):
        online.OnlineConfig(**fields)


def test_rules_keep_the_documented_share():
    scores = np.arange(100, dtype=np.float32)
    assert voting.threshold_for("deepconf-low", scores) == pytest.approx(89.1)
    assert voting.threshold_for("deepconf-high", scores) == pytest.approx(9.9)
