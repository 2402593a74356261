import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxlab.deepconf.answers import (
    NO_ANSWER,
    boxed_answer,
    equivalent,
    group_answers,
    is_correct,
    normalize,
)


@pytest.mark.parametrize("text, answer", [
    (r"so the answer is \boxed{42}.", "42"),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"\boxed{ \{1, 2\} }", r"\{1, 2\}"),           # escaped braces are characters
    (r"\boxed {x}", "x"),                            # space before the brace
    ("\\boxed\n{7}", "7"),
    (r"\boxed{1} then \boxed{2}", "2"),              # the last box
    (r"\boxed{1} then \boxed{2", "1"),               # an unterminated box is skipped
    (r"\boxed{\boxed{3}}", "3"),                     # nested: the box opened last
    (r"$\boxed{a_{n}^{2}}$ done", "a_{n}^{2}"),
    (r"}} \boxed{4}}", "4"),                         # stray closing braces are ignored
    (r"\boxed{5\}", None),                           # `\}` does not close the box
    (r"\boxed{}", None),                             # blank content is no answer
    (r"\boxed{   }", None),
    (r"\boxedx{3}", None),                           # another control word
    (r"\\boxed{3}", None),                           # `\\` then plain text "boxed"
    (r"\fbox{3}", None),
    ("no box here", None),
    ("", None),
    ("\\", None),
])
def test_boxed_answer(text, answer):
    assert boxed_answer(text) == answer


_TEX = st.lists(st.sampled_from([*"{}\\ab1 \n$", r"\boxed", r"\boxed{", "\\{", "\\}", "\\\\"]),
               max_size=40).map("".join)


@settings(max_examples=300, deadline=None)
@given(text=st.one_of(_TEX, st.text(max_size=80)))
def test_boxed_answer_never_raises_on_any_text(text):
    answer = boxed_answer(text)
    assert answer is None or (answer == answer.strip() and answer and answer in text)


def _balanced():
    """Brace-balanced strings without backslashes."""
    plain = st.text(alphabet="ab1+ ", max_size=4)
    return st.recursive(plain, lambda inner: st.builds(lambda a, b, c: a + "{" + b + "}" + c,
                                                       plain, inner, plain), max_leaves=6)


@settings(max_examples=150, deadline=None)
@given(prefix=_TEX, content=_balanced(), suffix=st.text(alphabet="ab1 .\n$", max_size=20))
def test_a_closing_box_at_the_end_wins_whatever_comes_before(prefix, content, suffix):
    answer = boxed_answer(prefix + r" \boxed{" + content + "}" + suffix)
    assert answer == (content.strip() or None)


def test_boxed_answer_is_linear_on_adversarial_text():
    assert boxed_answer(r"\boxed{" * 50_000) is None
    assert boxed_answer("{" * 50_000 + r"\boxed{9}") == "9"


def test_equivalent_answers_share_a_group_labelled_by_the_first():
    groups = group_answers([r"\frac12", "2", None, "1/2", "0.5", r"\dfrac{1}{2}", "3", "",
                            " 2 ", "2.0", r"\frac{4}{8}"])
    assert groups.ids.tolist() == [0, 1, NO_ANSWER, 0, 0, 0, 2, NO_ANSWER, 1, 1, 0]
    assert groups.labels == (r"\frac12", "2", "3")
    assert groups.label(NO_ANSWER) is None and groups.label(2) == "3"


def test_unparsable_answers_fall_back_to_normalized_strings():
    groups = group_answers(["}{", "}  {", "} {", r"\frac{", r"\frac{"])
    assert groups.ids.tolist() == [0, 1, 1, 2, 2]
    assert groups.labels == ("}{", "} {", r"\frac{")


def test_no_answers_at_all():
    groups = group_answers([None, "", "  "])
    assert groups.ids.tolist() == [NO_ANSWER] * 3 and groups.labels == ()
    assert group_answers([]).ids.shape == (0,)


_POOL = [r"\frac12", "1/2", "0.5", " 0.5 ", r"\dfrac{1}{2}", "0.50", "2", "2.0", "3",
         r"\sqrt{4}", "x", "x ", "}{", "hello world", "50\\%", "50", r"\{1,2\}", "(1, 2)", "a+b",
         "b+a", None, ""]


def _reference_groups(answers):
    """The documented rule, directly: join the first group whose label is equivalent."""
    labels, ids = [], []
    for a in answers:
        if a is None or not a.strip():
            ids.append(NO_ANSWER)
            continue
        group = next((g for g, label in enumerate(labels) if equivalent(label, a)), None)
        if group is None:
            group = len(labels)
            labels.append(normalize(a))
        ids.append(group)
    return ids, tuple(labels)


@settings(max_examples=40, deadline=None)
@given(answers=st.lists(st.sampled_from(_POOL), max_size=25))
def test_grouping_matches_the_pairwise_rule(answers):
    groups = group_answers(answers)
    assert (groups.ids.tolist(), groups.labels) == _reference_groups(answers)


def test_is_correct():
    assert is_correct("0.5", r"\frac{1}{2}")
    assert is_correct(r"\dfrac{1}{2}", "1/2")
    assert is_correct("  42 ", "42")
    assert not is_correct("3", "2")
    assert not is_correct(None, "2")
    assert is_correct("} {", "}  {") and not is_correct("}{", "} {")
