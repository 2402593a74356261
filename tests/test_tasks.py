"""jaxlab.tasks: problems read alike from JSON Lines, parquet and `datasets` folders, with
errors that locate the row; held-out splits; config checks; answers, rewards and the held-out
evaluation, each against a hand-computed case, a property or a recomputation of our own."""

import collections
import dataclasses
import json
import logging
import math
import re
import types

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxlab import tasks
from jaxlab.deepconf import answers
from jaxlab.jsonl import DataError
from jaxlab.rl import loop

# A GSM8K-like file: the reference is the text after the last "####", its comma kept.
ROWS = [{"question": "Tom has 2 apples and buys 3. How many?", "answer": "2 + 3 = 5\n#### 5",
         "uid": "a"},
        {"question": "A car costs 1,000 and tax is 234. Total?",
         "answer": "1,000 + 234 = 1,234 #### 1,234", "uid": "b"},
        {"question": "Half of one?", "answer": "\\frac{1}{2}", "uid": "c"}]
EXPECTED = [("a", ROWS[0]["question"], "5"), ("b", ROWS[1]["question"], "1,234"),
            ("c", ROWS[2]["question"], "\\frac{1}{2}")]
GSM = dict(problem_field="question", answer_field="answer")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_dataset(path, rows, split=None):
    import datasets

    data = datasets.Dataset.from_list(rows)
    (data if split is None else datasets.DatasetDict({split: data})).save_to_disk(str(path))
    return path


def at(path):
    """A path as a regular expression that matches it."""
    return re.escape(str(path))


def task(path, **fields):
    return tasks.TaskConfig(path=str(path), **{**GSM, **fields})


def triples(problems):
    return [(p.id, p.prompt, p.answer) for p in problems]


# ----------------------------------------------------------------------------- reading


@pytest.mark.parametrize("form", ["jsonl", "parquet", "dataset", "dataset_dict"])
def test_every_format_gives_the_same_problems_located_by_row(tmp_path, form):
    path, where = {
        "jsonl": lambda: (write_jsonl(tmp_path / "p.jsonl", ROWS), "{}:2"),
        "parquet": lambda: (write_parquet(tmp_path / "p.parquet", ROWS), "{} row 2"),
        "dataset": lambda: (write_dataset(tmp_path / "d", ROWS), "{} row 2"),
        "dataset_dict": lambda: (write_dataset(tmp_path / "d", ROWS, "dev"), "{} (dev) row 2"),
    }[form]()
    problems = tasks.load_problems(task(path, id_field="uid"), str(path), "dev")
    assert triples(problems) == EXPECTED
    assert problems[1].where == where.format(path)
    # Without id_field, ids are the row numbers from 1.
    assert [p.id for p in tasks.load_problems(task(path), str(path), "dev")] == ["1", "2", "3"]


def test_a_missing_split_is_named_with_the_ones_present(tmp_path):
    import datasets

    folder = tmp_path / "d"
    one = datasets.Dataset.from_list(ROWS)
    datasets.DatasetDict({"train": one, "validation": one}).save_to_disk(str(folder))
    with pytest.raises(ValueError, match=r"splits \['train', 'validation'\], not 'test'"):
        tasks.read_rows(folder, "test")


def test_a_gsm8k_reference_with_a_thousands_comma_matches_the_plain_number():
    assert tasks.reference_answer("48 / 2 = 24\n#### 72") == "72"
    assert tasks.reference_answer("a #### b #### 1,234 ") == "1,234"  # the last "####"
    assert tasks.reference_answer(" 3/4 ") == "3/4"
    for response in ("The total is 1234.", "so 1,234", "\\boxed{1234}"):
        assert tasks.math_correct(tasks.math_answer(response), "1,234"), response
    assert not tasks.math_correct("1235", "1,234")


def test_numeric_answers_and_ids_are_read_as_strings(tmp_path):
    rows = [{"problem": "p1", "answer": 72, "id": 10}, {"problem": "p2", "answer": 0.5, "id": 11}]
    problems = tasks.load_problems(tasks.TaskConfig(path="x", id_field="id"),
                                   str(write_jsonl(tmp_path / "n.jsonl", rows)), "train")
    assert triples(problems) == [("10", "p1", "72"), ("11", "p2", "0.5")]
    assert tasks.math_correct("1/2", problems[1].answer)
    ints = write_parquet(tmp_path / "n.parquet", [{"problem": "p", "answer": 7},
                                                  {"problem": "q", "answer": -3}])
    assert [p.answer for p in tasks.load_problems(tasks.TaskConfig(path="x"), str(ints),
                                                  "train")] == ["7", "-3"]


@pytest.mark.parametrize("rows, fields, line, words", [
    ([{"problem": "p", "answer": "1"}, {"text": "q", "answer": "2"}], {}, 2,
         ["no field 'problem'", "['answer', 'text']", "task.problem_field"]),
    ([{"problem": "p", "answer": "1"}, {"problem": ["q"], "answer": "2"}], {}, 2,
         ["'problem' must be str", "list"]),
    ([{"problem": "p", "answer": "1"}, {"problem": "q", "answer": ["2"]}], {}, 2,
         ["'answer' must be str or int or float", "list"]),
    ([{"problem": "p", "answer": True}], {}, 1, ["'answer' must be", "bool"]),
    ([{"problem": "p", "answer": "1"}, {"problem": "q", "answer": "2"},
          {"problem": " \n", "answer": "3"}], {}, 3, ["empty 'problem'"]),
    ([{"problem": "p", "answer": "1", "k": 1}, {"problem": "q", "answer": "2"}],
         {"id_field": "k"}, 2, ["no field 'k'", "task.id_field"]),
])
def test_a_bad_jsonl_row_is_named_by_file_and_line(tmp_path, rows, fields, line, words):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as error:
        tasks.load_problems(tasks.TaskConfig(path="x", **fields), str(path), "train")
    message = str(error.value)
    assert message.startswith(f"{path}:{line}: "), message
    assert all(w in message for w in words), message


def test_a_bad_parquet_row_is_named_by_row_number(tmp_path):
    path = write_parquet(tmp_path / "bad.parquet", [{"problem": "p", "answer": "1"},
                                                    {"problem": "", "answer": "2"}])
    with pytest.raises(DataError, match=rf"^{at(path)} row 2: empty 'problem'"):
        tasks.load_problems(tasks.TaskConfig(path="x"), str(path), "train")
    path = write_parquet(tmp_path / "list.parquet", [{"problem": ["p"], "answer": "1"}])
    with pytest.raises(DataError, match=rf"^{at(path)} row 1: 'problem' must be str, got list"):
        tasks.load_problems(tasks.TaskConfig(path="x"), str(path), "train")


def test_a_duplicate_id_names_both_lines(tmp_path):
    rows = [{"problem": "p", "answer": "1", "k": "a"}, {"problem": "q", "answer": "2", "k": 7},
            {"problem": "r", "answer": "3", "k": "a"}]
    path = write_jsonl(tmp_path / "dup.jsonl", rows)
    first = rf"\(first at {at(path)}:1\)"
    with pytest.raises(DataError, match=rf"{at(path)}:3: duplicate id 'a' {first}"):
        tasks.load_problems(tasks.TaskConfig(path="x", id_field="k"), str(path), "train")
    # an id written as a number is the same id as its digits
    path = write_jsonl(tmp_path / "dup2.jsonl", [{**rows[0], "k": 7}, {**rows[1], "k": "7"}])
    with pytest.raises(DataError, match=rf"{at(path)}:2: duplicate id '7'"):
        tasks.load_problems(tasks.TaskConfig(path="x", id_field="k"), str(path), "train")


def test_a_duplicate_id_in_a_dataset_split_is_named_by_row_and_split(tmp_path):
    rows = [{"problem": "p", "answer": "1", "k": "a"}, {"problem": "q", "answer": "2", "k": "a"}]
    folder = write_dataset(tmp_path / "d", rows, "test")
    with pytest.raises(DataError, match=r"\(test\) row 2: duplicate id 'a'"):
        tasks.load_problems(tasks.TaskConfig(path="x", id_field="k"), str(folder), "test")


def test_a_file_that_cannot_hold_problems_is_named(tmp_path):
    cfg = tasks.TaskConfig(path="x")
    csv = tmp_path / "p.csv"
    csv.write_text("problem,answer\np,1\n")
    with pytest.raises(DataError, match=rf"^{at(csv)}: .*parquet.* not \.csv"):
        tasks.load_problems(cfg, str(csv), "train")
    with pytest.raises(DataError, match=rf"^{at(tmp_path / 'nope.jsonl')} does not exist"):
        tasks.load_problems(cfg, str(tmp_path / "nope.jsonl"), "train")
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match=rf"^{at(empty)} holds no problems"):
        tasks.load_problems(cfg, str(empty), "train")
    schema = pa.schema([("problem", pa.string()), ("answer", pa.string())])
    no_rows = tmp_path / "e.parquet"
    pq.write_table(schema.empty_table(), no_rows)
    with pytest.raises(DataError, match=rf"^{at(no_rows)} holds no problems"):
        tasks.load_problems(cfg, str(no_rows), "train")
    garbage = tmp_path / "g.parquet"
    garbage.write_bytes(b"not parquet")
    with pytest.raises(DataError, match=rf"^{at(garbage)}: not a readable parquet file"):
        tasks.load_problems(cfg, str(garbage), "train")
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(DataError, match=rf"^{at(folder)}: not a folder written by datasets"):
        tasks.load_problems(cfg, str(folder), "train")


# ----------------------------------------------------------------------------- splits


def numbered(n, texts=None):
    return [{"problem": texts[i] if texts else f"problem {i + 1}", "answer": str(i + 1)}
            for i in range(n)]


@pytest.mark.parametrize("n, fraction, held", [(20, 0.25, 5), (20, 0.01, 1), (9, 0.3, 3),
                                               (8, 0.5, 4)])
def test_eval_fraction_holds_out_that_many_rows_drawn_by_the_seed(tmp_path, n, fraction, held):
    path = write_jsonl(tmp_path / "p.jsonl", numbered(n))

    def split(seed):
        train, held_out = tasks.load_splits(tasks.TaskConfig(
            path=str(path), eval_fraction=fraction, eval_seed=seed))
        return [p.id for p in train], [p.id for p in held_out]

    train, held_out = split(0)
    assert len(held_out) == held
    assert not set(train) & set(held_out)
    assert sorted(train + held_out, key=int) == [str(i) for i in range(1, n + 1)]
    assert train == sorted(train, key=int) and held_out == sorted(held_out, key=int)
    assert split(0) == (train, held_out)
    if 0 < held < n:
        assert {tuple(split(seed)[1]) for seed in range(4)} != {tuple(held_out)}


def test_a_training_row_with_a_held_out_problem_text_is_dropped(tmp_path, caplog):
    # Rows 2k-1 and 2k share a text: whichever is held out, its twin must not be trained on.
    texts = [f"twin {i // 2}" for i in range(12)]
    path = write_jsonl(tmp_path / "p.jsonl", numbered(12, texts))
    with caplog.at_level(logging.WARNING, logger="jaxlab"):
        train, held_out = tasks.load_splits(tasks.TaskConfig(path=str(path), eval_fraction=0.25))
    held_texts = {p.prompt for p in held_out}
    expected = [str(i + 1) for i in range(12)
                if str(i + 1) not in {p.id for p in held_out} and texts[i] not in held_texts]
    assert [p.id for p in train] == expected and len(held_out) == 3
    dropped = 12 - 3 - len(expected)
    assert dropped >= 1
    assert f"{dropped} training problems" in caplog.text


def test_eval_path_holds_out_its_rows_and_removes_their_texts_from_training(tmp_path, caplog):
    path = write_jsonl(tmp_path / "train.jsonl", numbered(6))
    held = [{"problem": "problem 2", "answer": "2"}, {"problem": "new one", "answer": "9"},
            {"problem": "problem 5", "answer": "5"}]
    folder = write_dataset(tmp_path / "eval", held, split="test")
    with caplog.at_level(logging.WARNING, logger="jaxlab"):
        train, held_out = tasks.load_splits(tasks.TaskConfig(path=str(path),
                                                             eval_path=str(folder)))
    assert [p.prompt for p in train] == ["problem 1", "problem 3", "problem 4", "problem 6"]
    assert [p.prompt for p in held_out] == ["problem 2", "new one", "problem 5"]
    assert held_out[1].where == f"{folder} (test) row 2"
    warned = [r.getMessage() for r in caplog.records if r.name == "jaxlab"]
    assert len(warned) == 1 and warned[0].startswith("2 training problems"), warned
    # eval_limit keeps the first held-out problems; the others are still not trained on
    train, held_out = tasks.load_splits(tasks.TaskConfig(path=str(path), eval_path=str(folder),
                                                         eval_limit=2))
    assert [p.prompt for p in held_out] == ["problem 2", "new one"]
    assert [p.prompt for p in train] == ["problem 1", "problem 3", "problem 4", "problem 6"]


def test_eval_limit_cuts_the_drawn_held_out_list(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", numbered(20))
    full = tasks.load_splits(tasks.TaskConfig(path=str(path), eval_fraction=0.3, eval_seed=3))
    cut = tasks.load_splits(tasks.TaskConfig(path=str(path), eval_fraction=0.3, eval_seed=3,
                                             eval_limit=4))
    assert len(full.held_out) == 6 and cut.held_out == full.held_out[:4]
    assert cut.train == full.train


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("fields, words", [
    (dict(kind="code", path="p"), ["task.kind", "['arithmetic', 'math']", "'code'"]),
    (dict(path="p", rewards={"accuracy": 1.0, "length": 1.0}),
     ["['length']", "['accuracy', 'format']"]),
    (dict(path="p", rewards={"accuracy": 1.0, "format": -0.5}), ["'format': -0.5"]),
    (dict(path="p", rewards={"accuracy": math.nan}), ["'accuracy': nan"]),
    (dict(path="p", rewards={"accuracy": math.inf}), ["finite"]),
    (dict(path="p", rewards={"accuracy": 0.0, "format": 0.0}), ["every reward weight 0"]),
    (dict(kind="arithmetic", path="p.jsonl"), ["task.path and task.eval_path must be empty"]),
    (dict(kind="arithmetic", eval_path="e.jsonl"), ["task.eval_path"]),
    (dict(path="p", eval_fraction=0.0), ["task.eval_fraction", "(0, 1]"]),
    (dict(path="p", eval_fraction=1.5), ["task.eval_fraction"]),
    (dict(path="p", eval_fraction=math.nan), ["task.eval_fraction"]),
    (dict(path="p", eval_limit=-1), ["task.eval_limit"]),
    (dict(path="p", long_prompts="truncate"), ["task.long_prompts", "['error', 'drop']"]),
])
def test_a_bad_task_setting_is_named(fields, words):
    with pytest.raises(ValueError) as error:
        tasks.TaskConfig(**fields)
    assert all(w in str(error.value) for w in words), str(error.value)


def test_good_task_settings_pass():
    tasks.TaskConfig(kind="arithmetic")
    no_path = tasks.TaskConfig(kind="math")  # a command line may give the path later
    with pytest.raises(ValueError, match=r"task\.path is empty"):
        tasks.load_splits(no_path)
    tasks.TaskConfig(path="p", eval_fraction=1.0, long_prompts="drop",
                     rewards={"accuracy": 0.0, "format": 1.0})


# ----------------------------------------------------------------------------- prompts


PROBLEMS = [tasks.Problem(i, f"q{i}", "1", f"f.jsonl:{n}") for n, i in enumerate("abcd", 1)]
IDS = [[1] * 3, [1] * 7, [1] * 5, [1] * 9]


def test_long_prompts_error_names_rows_ids_and_lengths():
    with pytest.raises(DataError) as error:
        tasks.fit_prompts(PROBLEMS, IDS, 5)
    message = str(error.value)
    assert "2 of 4 prompts" in message and "max_prompt_tokens=5" in message
    assert "f.jsonl:2 (id b): 7 tokens" in message and "f.jsonl:4 (id d): 9 tokens" in message
    assert "(id c)" not in message  # 5 tokens fit in 5


def test_long_prompts_drop_keeps_the_short_ones_in_order(caplog):
    with caplog.at_level(logging.WARNING, logger="jaxlab"):
        kept, ids = tasks.fit_prompts(PROBLEMS, IDS, 5, "drop")
    assert [p.id for p in kept] == ["a", "c"] and ids == [IDS[0], IDS[2]]
    assert "left out 2 of 4 prompts" in caplog.text and "f.jsonl:2" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="jaxlab"):
        assert tasks.fit_prompts(PROBLEMS, IDS, 9, "drop") == (PROBLEMS, IDS)
    assert not caplog.records
    with pytest.raises(DataError, match="every one of the 4 prompts"):
        tasks.fit_prompts(PROBLEMS, IDS, 2, "drop")


# ----------------------------------------------------------------------------- answers


@pytest.mark.parametrize("text, answer", [
    ("3 apples, then 5 more: \\boxed{8}, or was it 9?", "8"),
    ("\\boxed{1} and finally \\boxed{\\frac{3}{4}}", "\\frac{3}{4}"),
    ("first 3, then 4, so the answer is 72.", "72"),
    ("It costs 1,234 dollars.", "1234"),
    ("It costs 1,234,567", "1234567"),
    ("The temperature is -3.", "-3"),
    ("about 2.75 liters", "2.75"),
    ("a share of 3/4", "3/4"),
    ("no answer here", None),
    ("", None),
    ("\\boxed{} then 7", "7"),  # a blank box is no answer
    ("see pages 5-7", "7"),  # a hyphen between digits is no minus sign
    ("on 2024-11-26", "26"),
    ("the numbers 1,2,3", "3"),  # commas that are not thousands separate numbers
    ("x = \u0663", None),  # only ASCII digits are numbers
])
def test_math_answer(text, answer):
    assert tasks.math_answer(text) == answer


@pytest.mark.parametrize("answer, reference, right", [
    ("0.5", "\\frac{1}{2}", True), ("1/2", "0.5", True), ("3/4", "0.75", True),
    ("72", "72", True), ("1234", "1,234", True), ("-3", "-3", True), ("72", "73", False),
    ("-3", "3", False), (None, "72", False), ("\\frac{", "1", False), (")))", "1", False),
])
def test_math_correct(answer, reference, right):
    assert tasks.math_correct(answer, reference) is right


TEXT = st.lists(st.one_of(st.text(max_size=4), st.sampled_from(
    ["\\boxed{", "\\frac{", "}", "{", "^", "\\", "1,2", "-", "/", "0.5", "7", " ", "$", "\\sqrt"])),
    max_size=8).map("".join)


@settings(max_examples=50, deadline=None)
@given(TEXT, st.sampled_from(["72", "\\frac{1}{2}", "1,234", "x^2"]))
def test_grading_never_raises_on_any_text(text, reference):
    answer = tasks.math_answer(text)
    if "\\boxed" not in text:
        assert (answer is None) == (not any(c in "0123456789" for c in text))
    assert tasks.math_correct(answer, reference) in (True, False)
    assert tasks.math_correct(text, reference) in (True, False)
    assert tasks.accuracy_reward(tasks.GRADERS["math"])(text, reference) in (0.0, 1.0)


def test_same_strings_groups_by_stripped_text_in_order_of_appearance():
    groups = tasks.same_strings([" 3", "12", "3", None, "", "12 ", "1/2", "0.5"])
    assert groups.ids.tolist() == [0, 1, 0, -1, -1, 1, 2, 3]
    assert groups.labels == ("3", "12", "1/2", "0.5")
    assert groups.label(1) == "12" and groups.label(answers.NO_ANSWER) is None
    # the math grader puts 1/2 and 0.5 in one group
    assert tasks.GRADERS["math"].group(["1/2", "0.5"]).ids.tolist() == [0, 0]


def test_the_arithmetic_grader_wants_the_exact_boxed_integer():
    grader = tasks.GRADERS["arithmetic"]
    assert grader.answer("so 5 + 7 = \\boxed{ 12 }") == "12"
    assert grader.answer("so 5 + 7 = 12") is None  # no box, no answer
    assert grader.correct(" 12 ", "12") and not grader.correct("12.0", "12")
    assert not grader.correct("012", "12") and not grader.correct(None, "12")
    right = tasks.accuracy_reward(grader)
    assert right("\\boxed{12}", "12") == 1.0 and right("12", "12") == 0.0


# ----------------------------------------------------------------------------- rewards

WORDS = {1: "\\boxed{4}", 2: "so it is 4", 3: "\\boxed{5}", 4: "no idea", 5: "maybe \\boxed{0.5}"}


def decode_words(ids):
    return " ".join(WORDS[i] for i in ids)


def test_task_rewards_are_the_weighted_sum_and_plug_into_the_loop():
    reward_fn = tasks.task_rewards(tasks.TaskConfig(path="p", rewards={"accuracy": 1.0,
                                                                       "format": 0.25}),
                                   decode_words)
    prompts = [loop.Prompt((7, 8), data="4"), loop.Prompt((9,), data="\\frac{1}{2}")]
    responses = [[[1], [2], [3], [4]], [[5], [2, 1], [4, 5], [3]]]
    truncated = np.array([[False, True, False, False], [False, False, True, True]])
    out = loop.checked_rewards(reward_fn, prompts, responses, truncated, "step 0")
    # by hand: accuracy (last box, else last number, == reference), format (a box)
    accuracy = [[1, 1, 0, 0], [1, 0, 1, 0]]
    box = [[1, 0, 1, 0], [1, 1, 1, 1]]
    assert sorted(out) == ["accuracy", "format", "reward", "truncated"]
    np.testing.assert_array_equal(out["accuracy"], accuracy)
    np.testing.assert_array_equal(out["format"], box)
    np.testing.assert_array_equal(out["truncated"], truncated.astype(float))
    np.testing.assert_allclose(out["reward"], np.add(accuracy, np.multiply(0.25, box)))
    assert out["reward"].dtype == np.float64


def test_accuracy_is_logged_even_when_not_rewarded():
    reward_fn = tasks.task_rewards(tasks.TaskConfig(path="p", rewards={"format": 2.0}),
                                   decode_words)
    out = loop.checked_rewards(reward_fn, [loop.Prompt((1,), data="4")], [[[1], [2], [3]]],
                               np.zeros((1, 3), bool), "step 0")
    np.testing.assert_array_equal(out["accuracy"], [[1, 1, 0]])
    np.testing.assert_array_equal(out["reward"], [[2, 0, 2]])


def test_weighted_reward_of_any_functions():
    functions = {"length": lambda text, ref: len(text), "echo": lambda text, ref: text == ref,
                 "half": lambda text, ref: 0.5}
    reward_fn = tasks.weighted_reward(functions, {"length": 0.5, "half": 4.0},
                                      lambda ids: "x" * len(ids))
    out = loop.checked_rewards(reward_fn, [loop.Prompt((1,), data="xx")], [[[1], [1, 1]]],
                               np.array([[True, False]]), "step 0")
    np.testing.assert_allclose(out["reward"], [[0.5 * 1 + 2, 0.5 * 2 + 2]])
    np.testing.assert_array_equal(out["echo"], [[0, 1]])  # weight 0, still logged
    np.testing.assert_array_equal(out["truncated"], [[1, 0]])
    with pytest.raises(ValueError, match=r"\['speed'\]"):
        tasks.weighted_reward(functions, {"speed": 1.0}, decode_words)


# ----------------------------------------------------------------------------- evaluation


def spaced(ids):
    """A response's text: its token ids, so its answer (the last number) is its last id."""
    return " ".join(map(str, ids))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from jaxlab.models import hf, zoo

    # one layer: a real decoder, compiled in less time than the zoo's two
    return hf.load_pretrained(zoo.create("qwen3", tmp_path_factory.mktemp("q3"),
                                         num_hidden_layers=1))


def test_evaluate_against_our_own_count_from_the_sampler(model):
    from jaxlab.sampling import sampler

    rng = np.random.default_rng(0)
    prompt_ids = [rng.integers(1, 512, n).tolist() for n in (3, 5, 8, 4, 6, 2, 7, 5)]
    stop = tuple(range(1, 512, 8))  # about one token in 8 ends a response: lengths vary
    key, samples, new = jax.random.key(7), 4, 8
    greedy_config = sampler.SamplingConfig(max_new_tokens=new, temperature=0.0, stop_ids=stop,
                                           confidence=False)
    sample_config = dataclasses.replace(greedy_config, temperature=1.0, top_k=3,
                                        group_size=samples)

    def last_ids(out):
        tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
        return [str(tokens[i, n - 1]) for i, n in enumerate(lengths)], lengths

    greedy, greedy_lengths = last_ids(sampler.sample(model, prompt_ids, jax.random.key(1),
                                                     greedy_config))
    drawn, _ = last_ids(sampler.sample(model, prompt_ids, jax.random.fold_in(key, 0),
                                       sample_config))
    drawn = [drawn[i * samples:(i + 1) * samples] for i in range(len(prompt_ids))]
    votes = [collections.Counter(d).most_common(1)[0][0] for d in drawn]  # ties: first seen
    # References right for: a greedy response cut short by a stop token; a majority that is
    # not the first response's answer; else greedy, one draw, or nothing, in turn.
    short = [i for i, n in enumerate(greedy_lengths) if n < new]
    outvoted = [i for i, (v, d) in enumerate(zip(votes, drawn, strict=True)) if v != d[0]]
    assert short and outvoted, (greedy_lengths, drawn)  # the cases this test is about
    references = [greedy[i] if i in short else votes[i] if i in outvoted else
                  (greedy[i], drawn[i][-1], "100000")[i % 3] for i in range(len(prompt_ids))]
    expected_greedy = np.mean([g == r for g, r in zip(greedy, references, strict=True)])
    expected_pass = np.mean([a == r for d, r in zip(drawn, references, strict=True) for a in d])
    expected_majority = np.mean([v == r for v, r in zip(votes, references, strict=True)])
    assert 0 < expected_greedy < 1 and 0 < expected_pass < 1 and 0 < expected_majority < 1

    def run(**settings):
        return tasks.evaluate(model, prompt_ids, references, tasks.GRADERS["math"], spaced,
                              key=key, stop_ids=list(stop), max_new_tokens=new, temperature=1.0,
                              top_k=3, **settings)

    figures = run(samples=samples, batch=64)
    assert figures == pytest.approx({"greedy": expected_greedy, "pass@1": expected_pass,
                                     "majority@4": expected_majority})
    assert run(samples=0, batch=1) == pytest.approx({"greedy": expected_greedy})


# ----------------------------------------------------------------------------- stop ids


@pytest.mark.parametrize("config, eos, expected", [
    ({"eos_token_id": [151645, 151643]}, 151643, (151645, 151643)),
    ({"eos_token_id": 2}, 5, (2, 5)),
    ({"eos_token_id": 2}, 2, (2,)),
    ({"temperature": 0.6}, 7, (7,)),
    (None, 7, (7,)),
])
def test_stop_ids_read_the_generation_config_then_the_tokenizer(tmp_path, config, eos, expected):
    if config is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(config))
    assert tasks.stop_ids(tmp_path, types.SimpleNamespace(eos_token_id=eos)) == expected


def test_stop_ids_without_any_eos_is_an_error(tmp_path):
    no_eos = types.SimpleNamespace(eos_token_id=None)
    with pytest.raises(DataError, match=rf"^{at(tmp_path)}: neither generation_config.json"):
        tasks.stop_ids(tmp_path, no_eos)
    (tmp_path / "generation_config.json").write_text("{}")
    with pytest.raises(DataError, match=r"EOS token to end responses with; give the stop "
                                        r"tokens as loop\.stop_ids$"):
        tasks.stop_ids(tmp_path, no_eos, "loop.stop_ids")
    with pytest.raises(DataError, match=r"add eos_token_id to its generation_config\.json$"):
        tasks.stop_ids(tmp_path, no_eos)
