"""The writing world's rubric, rater and teacher against hand-computed cases and their rules."""

import numpy as np
import pytest

from jaxlab.rl import genrm
from jaxlab.writing import teacher, world

REQUIRED = ("sun", "river", "night")


@pytest.mark.parametrize("response,want", [
    # all three words, 8 answer words, clean ending
    ("the sun over a river in quiet night .", dict(coverage=4, repeats=2, length=2, ending=2)),
    # two words (round(8/3) = 3), 4 words (2 short of the band: 1), explanation after "."
    ("sun and the river . note this", dict(coverage=3, repeats=2, length=1, ending=1)),
    # one word, one repeated bigram ("the sun" twice), no "."
    ("the sun the sun a", dict(coverage=1, repeats=1, length=1, ending=0)),
    # "the" three times: overused; 16 words (4 above the band: 0)
    ("the sun and the river and the night bird fish cloud hill road sea star sky .",
     dict(coverage=4, repeats=0, length=0, ending=2)),
    ("a . sun river night", dict(coverage=0, repeats=2, length=0, ending=1)),
])
def test_rubric_hand_cases(response, want):
    assert world.criteria(REQUIRED, response) == want
    assert world.quality(REQUIRED, response) == sum(want.values())


def test_redundant_words_and_distinct_bigrams():
    assert world.redundant_words("a b . note this text") == 3
    assert world.redundant_words("a b c") == 0
    assert world.distinct_bigrams("a b a b") == pytest.approx(2 / 3)
    assert world.distinct_bigrams("a") == 1.0


def test_tokens_round_trip_and_unknown_words_are_named():
    text = "write sun river night : the sun . \\boxed{ 10 , 4 }"
    assert world.decode(world.encode(text)) == text
    tok = world.tokenizer()
    assert tok.encode(text, add_special_tokens=False) == world.encode(text)
    with pytest.raises(ValueError, match="banana"):
        world.encode("the banana")


def test_true_quality_pairs_prefer_the_better_response():
    pairs = world.preference_pairs(300, 0, world.WorldConfig(), rater=False)
    for p in pairs:
        required = world.required_words(p["prompt"])
        assert world.quality(required, p["chosen"]) > world.quality(required, p["rejected"])


def test_the_rater_has_a_length_confound_and_label_noise():
    """Without noise or confound the rater follows quality; with a strong length bias it picks
    the longer response far more often than quality does; label_noise=1 flips every label."""
    def share(config, fn):
        pairs = world.preference_pairs(600, 1, config)
        return np.mean([fn(world.required_words(p["prompt"]), p["chosen"], p["rejected"])
                        for p in pairs])

    def better(r, a, b):
        return world.quality(r, a) > world.quality(r, b)

    def longer(r, a, b):
        return len(a.split()) > len(b.split())

    sharp = world.WorldConfig(temperature=0.01, length_bias=0.0, label_noise=0.0)
    assert share(sharp, lambda r, a, b: world.quality(r, a) >= world.quality(r, b)) == 1.0
    flipped = world.WorldConfig(temperature=0.01, length_bias=0.0, label_noise=1.0)
    assert share(flipped, lambda r, a, b: world.quality(r, a) <= world.quality(r, b)) == 1.0
    confounded = world.WorldConfig(length_bias=2.0, label_noise=0.0)
    assert share(confounded, longer) > 0.9 > share(confounded, better) + 0.2


def test_teacher_traces_state_the_rubric_and_parse():
    rng = np.random.default_rng(0)
    prompt = world.prompt_text(REQUIRED)
    good, bad = "the sun over a river in quiet night .", "sun sun sun"
    text = teacher.judge_trace(rng, prompt, good, bad)
    assert text == ("coverage sun 1 1 river 1 0 night 1 0 , 4 1 ; repeats 2 0 ; length 2 1 ; "
                    "ending 2 0 ; total 10 2 ; "
                    "\\boxed{ 10 , 2 }")
    assert genrm.parse_scores(text) == (10.0, 2.0)
    world.encode(text)   # in the vocabulary
    world.encode(teacher.judge_prompt(prompt, good, bad))


def test_an_unsure_teacher_prefers_the_first_response_60_percent_of_the_time():
    rng = np.random.default_rng(0)
    prompt = world.prompt_text(REQUIRED)
    a, b = "sun river .", "sun night ."    # equal quality
    first = [genrm.parse_scores(teacher.judge_trace(rng, prompt, a, b)) for _ in range(4000)]
    share = np.mean([s1 > s2 for s1, s2 in first])
    assert abs(share - 0.6) < 0.025                       # 4 standard errors
    sure = teacher.judge_trace(rng, prompt, "the sun over a river in quiet night .", "a")
    assert genrm.parse_scores(sure)[0] > genrm.parse_scores(sure)[1]


@pytest.mark.parametrize("args,want", [
    ((7, 5, True), (7, 5)), ((7, 5, False), (5, 7)), ((5, 7, True), (7, 5)),
    ((4, 4, True), (4, 3)), ((4, 4, False), (3, 4)), ((0, 0, True), (1, 0)),
])
def test_verdict_boxes(args, want):
    assert teacher.verdict(*args) == want
