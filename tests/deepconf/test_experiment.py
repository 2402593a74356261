"""experiments/deepconf.py end to end on a tiny random model (few answers: it must not crash)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxlab import arrays
from jaxlab.deepconf import answers, arithmetic, voting
from jaxlab.deepconf.problems import Problem, load_problems, save_problems
from jaxlab.jsonl import DataError
from jaxlab.models import hf, zoo

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = zoo.create("qwen3", tmp_path_factory.mktemp("model"),
                      vocab_size=len(arithmetic.VOCAB))
    arithmetic.save_tokenizer(path)
    save_problems([Problem(p.id, p.prompt, p.answer)
                   for p in arithmetic.make_problems(3, 2, seed=0)], path / "problems.jsonl")
    return path


def _run(folder, out, *overrides):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "experiments", "deepconf.py"), f"model={folder}",
         f"problems={folder / 'problems.jsonl'}", f"out_dir={out}", "max_new_tokens=8",
         "group_size=4", "offline_traces=8", "ks=[4,8]", "warmup=4", "batch=4", "window=3",
         "tail=5", *overrides], capture_output=True, text=True, timeout=600,
        env=dict(os.environ, PYTHONPATH=os.path.abspath(ROOT)))


def test_run_writes_records_summary_and_plot_then_resumes(folder, tmp_path):
    first = _run(folder, tmp_path, "limit=2", "online_at_once=true")  # both problems at once
    assert first.returncode == 0, first.stderr
    records = [json.loads(line) for line in (tmp_path / "problems.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ["sum2-0", "sum2-1"]
    for r in records:
        assert set(r["offline"]) == {"4", "8", "traces"}
        assert len(r["offline"]["traces"]["correct"]) == 8
        assert set(r["online"]) == {"deepconf-low", "deepconf-high"}
        assert r["offline"]["8"]["tokens"] <= 8 * 8
        for rule in r["online"].values():
            assert 4 <= rule["launched"] <= 8 and rule["tokens"] <= 8 * 8
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["problems"] == 2 and (tmp_path / "accuracy_vs_tokens.png").stat().st_size
    assert set(summary["auroc"]) == {"mean", "lowest_group", "bottom_group", "tail"}
    assert "deepconf-low" in first.stdout
    # the character tokenizer has no chat template: plain prompts, and the log says so
    assert "no chat template" in (tmp_path / "log.txt").read_text()
    traces = _traces(tmp_path)
    assert arrays.missing_chunks(traces) == [2]  # rows for all 3 problems; 2 run so far
    first_rows = {name: arrays.read(traces, name) for name in traces.arrays}
    _check_traces(folder, traces, records, rows=[0, 1])
    second = _run(folder, tmp_path, "limit=3")  # resumes: only the third problem is new
    # (online one problem at a time: the flag may change on a resume, the results do not)
    assert second.returncode == 0, second.stderr
    again = [json.loads(line) for line in (tmp_path / "problems.jsonl").read_text().splitlines()]
    assert again[:2] == records and len(again) == 3
    assert arrays.missing_chunks(_traces(tmp_path)) == []
    for name, values in first_rows.items():  # the first two problems' traces are kept
        np.testing.assert_array_equal(arrays.read(traces, name, 0, 2), values[:2])
    _check_traces(folder, traces, again, rows=[2])


def _traces(out):
    """The trace arrays of a run of `_run` (3 problems, 8 traces, 8 new tokens)."""
    p, n, t = 3, 8, 8
    return arrays.open_store(out / "traces", {
        "tokens": ((p, n, t), "int32"), "confidence": ((p, n, t), "float32"),
        "lengths": ((p, n), "int32"), "lowest_group": ((p, n), "float32"),
        "tail": ((p, n), "float32"), "finish_reason": ((p, n), "int32")}, 1)


def _check_traces(folder, traces, records, rows):
    """The stored traces are the ones the records were computed from: same token counts, same
    confidence metrics, and decoded they give the answers judged in the record."""
    tokenizer = hf.load_tokenizer(folder)
    for row in rows:
        record = records[row]["offline"]
        lengths = arrays.read(traces, "lengths", row, row + 1)[0]                  # [N]
        tokens = arrays.read(traces, "tokens", row, row + 1)[0]                    # [N, T]
        confidence = arrays.read(traces, "confidence", row, row + 1)[0]            # [N, T]
        assert 1 <= lengths.min() and lengths.max() <= 8
        for k in (4, 8):
            assert lengths[:k].sum() == record[str(k)]["tokens"]
        past = np.arange(8)[None, :] >= lengths[:, None]                            # [N, T]
        assert not tokens[past].any() and not confidence[past].any()
        for name in ("mean", "tail"):
            np.testing.assert_allclose(
                np.asarray(voting.trace_metric(name, confidence, lengths, 3, 5)),
                record["traces"][name], atol=1e-4)
        np.testing.assert_allclose(arrays.read(traces, "tail", row, row + 1)[0],
                                   record["traces"]["tail"], atol=1e-4)
        texts = [tokenizer.decode(t[:n], skip_special_tokens=True)
                 for t, n in zip(tokens, lengths, strict=True)]
        correct = [answers.is_correct(answers.boxed_answer(t), records[row]["answer"])
                   for t in texts]
        assert correct == record["traces"]["correct"]


def test_bad_settings_stop_before_work(folder, tmp_path):
    run = _run(folder, tmp_path, "warmup=16")
    assert run.returncode != 0 and "warmup=16" in run.stderr
    assert not (tmp_path / "problems.jsonl").exists()


def test_problem_file_errors_name_the_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "a", "prompt": "x", "answer": "1"}\n{"id": "b", "prompt": 3}\n')
    with pytest.raises(DataError, match=r"p.jsonl:2: missing key 'answer'|p.jsonl:2: 'prompt'"):
        load_problems(path)
    path.write_text('{"id": "a", "prompt": "x", "answer": "1"}\n{"id": "a", "prompt": "y", '
                    '"answer": 2}\n')
    with pytest.raises(DataError, match=r"p\.jsonl:2: duplicate id 'a'"):
        load_problems(path)
    path.write_text("not json\n")
    with pytest.raises(DataError, match=r"p\.jsonl:1: not valid JSON"):
        load_problems(path)


def _experiment_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "deepconf_experiment", os.path.join(ROOT, "experiments", "deepconf.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["tail", "window"])
def test_a_tail_or_window_below_one_is_an_error_naming_it(name):
    module = _experiment_module()
    with pytest.raises(ValueError, match=f"Config.{name} must be an integer >= 1"):
        module.Config(**{name: 0})
    # longer than max_new_tokens is allowed (the whole trace)
    assert module.Config(**{name: 4096}).sampling(eos=0).max_new_tokens == 64


def test_auroc_counts_pairs_ordered_right_and_halves_ties():
    module = _experiment_module()
    scores = np.array([0.9, 0.5, 0.5, 0.1])
    right = np.array([True, True, False, False])
    # positive-negative pairs: (0.9, 0.5) 1, (0.9, 0.1) 1, (0.5, 0.5) 1/2, (0.5, 0.1) 1 -> 3.5 / 4
    assert module.auroc(scores, right) == 0.875
    assert np.isnan(module.auroc(scores, np.ones(4, bool)))
