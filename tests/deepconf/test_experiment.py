"""experiments/deepconf.py end to end on a tiny random model (few answers: it must not crash)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxlab import arrays, tasks
from jaxlab.config import ConfigError, load_config
from jaxlab.deepconf import answers, arithmetic, prompts, voting
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
         f"task.path={folder / 'problems.jsonl'}", f"out_dir={out}", "max_new_tokens=8",
         "group_size=4", "offline_traces=8", "ks=[4,8]", "warmup=4", "batch=4", "window=3",
         "tail=5", *overrides], capture_output=True, text=True, timeout=600,
        env=dict(os.environ, PYTHONPATH=os.path.abspath(ROOT)))


def test_run_writes_records_summary_and_plot_then_resumes(folder, tmp_path):
    first = _run(folder, tmp_path, "task.eval_limit=2",
                 "online_at_once=true")  # both problems at once
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
    # plain prompts on purpose (the default task's chat_template=false): no warning
    assert "no chat template" not in (tmp_path / "log.txt").read_text()
    traces = _traces(tmp_path)
    assert arrays.missing_chunks(traces) == [2]  # rows for all 3 problems; 2 run so far
    first_rows = {name: arrays.read(traces, name) for name in traces.arrays}
    _check_traces(folder, traces, records, rows=[0, 1])
    second = _run(folder, tmp_path, "task.eval_limit=3")  # resumes: only the third is new
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
    assert module.Config(**{name: 4096}).sampling(stop_ids=(0,)).max_new_tokens == 64


def test_auroc_counts_pairs_ordered_right_and_halves_ties():
    module = _experiment_module()
    scores = np.array([0.9, 0.5, 0.5, 0.1])
    right = np.array([True, True, False, False])
    # positive-negative pairs: (0.9, 0.5) 1, (0.9, 0.1) 1, (0.5, 0.5) 1/2, (0.5, 0.1) 1 -> 3.5 / 4
    assert module.auroc(scores, right) == 0.875
    assert np.isnan(module.auroc(scores, np.ones(4, bool)))



GSM8K_LIKE = [  # GSM8K's fields: the reference is the text after "####"
    {"question": f"Tom has {a} apples and buys {b} more. How many now?",
     "answer": f"He has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"}
    for a, b in [(3, 9), (7, 5), (10, 2), (4, 4), (6, 1), (8, 3)]]

TINY_RUN = ["max_new_tokens=4", "group_size=2", "offline_traces=2", "ks=[2]", "warmup=2",
            "batch=2", "window=2", "tail=2", "rules=[deepconf-low]"]


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory):
    """A tiny random Qwen3 with a character tokenizer that has a ChatML chat template (EOS
    <|im_end|>), and a GSM8K-like file of six problems."""
    folder = zoo.create("qwen3", tmp_path_factory.mktemp("chat"), tokenizer=True)
    (folder / "gsm.jsonl").write_text("".join(json.dumps(row) + "\n" for row in GSM8K_LIKE))
    return folder


def _gsm_task(folder, **fields) -> dict:
    """The task section a GSM8K-like file shares with the RL configs: half of it held out."""
    return {"kind": "math", "path": str(folder / "gsm.jsonl"), "problem_field": "question",
            "answer_field": "answer", "id_field": "", "eval_fraction": 0.5, "eval_seed": 3,
            "system_prompt": "Be brief.", "chat_template": True, **fields}


def _config(path, folder, **fields):
    """A config file holding `_gsm_task` (JSON is YAML)."""
    path.write_text(json.dumps({"task": _gsm_task(folder, **fields)}))
    return path


@pytest.mark.filterwarnings("ignore:Mean of empty slice")  # no right trace
def test_a_task_file_with_other_fields_through_the_chat_template(chat_folder, tmp_path,
                                                                 monkeypatch):
    module = _experiment_module()
    config = _config(tmp_path / "gsm.yaml", chat_folder)
    calls = []  # (prompts, sampling config) of each sampler call, offline and online
    sample = module.sampler.sample

    def recording(model, prompt_ids, key, sampling, *args, **kwargs):
        calls.append(([list(ids) for ids in prompt_ids], sampling))
        return sample(model, prompt_ids, key, sampling, *args, **kwargs)

    monkeypatch.setattr(module.sampler, "sample", recording)
    out = tmp_path / "run"
    argv = ["--config", str(config), f"model={chat_folder}", f"out_dir={out}", *TINY_RUN]
    summary = module.main(argv)
    held_out = tasks.load_splits(tasks.TaskConfig(**_gsm_task(chat_folder))).held_out
    assert len(held_out) == 3 and summary["problems"] == 3
    records = [json.loads(line) for line in (out / "problems.jsonl").read_text().splitlines()]
    # the held-out rows (ids: row numbers), in file order, with the answers after "####"
    assert [r["id"] for r in records] == [p.id for p in held_out]
    rows = [GSM8K_LIKE[int(r["id"]) - 1] for r in records]
    assert [r["answer"] for r in records] == [row["answer"].split("#### ")[1] for row in rows]
    # prompts: the system turn, the question and the paper's instruction, the turn opened
    tokenizer = hf.load_tokenizer(chat_folder)
    want = [f"<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n{row['question']}\n"
            f"{prompts.INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n" for row in rows]
    got = dict.fromkeys(tokenizer.decode(ids) for call, _ in calls for ids in call)
    assert list(got) == want
    # traces end at the chat model's EOS
    assert {sampling.stop_ids for _, sampling in calls} == {
        (tokenizer.convert_tokens_to_ids("<|im_end|>"),)}
    assert json.loads((out / "inputs.json").read_text())["task"]["path"] == str(
        chat_folder / "gsm.jsonl")
    cfg = load_config(module.Config, config, argv[2:])
    traces = arrays.open_store(out / "traces", module.trace_specs(3, cfg), 1)
    assert arrays.missing_chunks(traces) == []


@pytest.mark.filterwarnings("ignore:Mean of empty slice")  # no right trace
def test_a_long_prompt_is_refused_naming_its_row_or_left_out(chat_folder, tmp_path):
    module = _experiment_module()
    config = _config(tmp_path / "all.yaml", chat_folder, eval_fraction=1.0)
    argv = ["--config", str(config), f"model={chat_folder}", *TINY_RUN]
    with pytest.raises(DataError, match=r"6 of 6 prompts are longer than max_prompt_tokens=60: "
                                        r".*gsm\.jsonl:1 \(id 1\): \d+ tokens"):
        module.main([*argv, f"out_dir={tmp_path / 'a'}", "max_prompt_tokens=60"])
    assert not (tmp_path / "a").exists()                     # refused before the run's folder
    task = tasks.TaskConfig(**_gsm_task(chat_folder, eval_fraction=1.0))
    lengths = sorted(len(ids) for ids in tasks.encode_prompts(
        task, hf.load_tokenizer(chat_folder), tasks.load_splits(task).held_out))
    assert lengths[0] > 60 and lengths[-2] < lengths[-1]     # one question is longer ("10")
    summary = module.main([*argv, f"out_dir={tmp_path / 'b'}",
                           f"max_prompt_tokens={lengths[-1] - 1}", "task.long_prompts=drop"])
    assert summary["problems"] == 5


@pytest.mark.parametrize(("old", "new"), [("problems", "task.path"),
                                          ("limit", "task.eval_limit"),
                                          ("chat_template", "task.chat_template")])
def test_the_keys_of_the_problems_file_are_refused_with_their_task_names(old, new, tmp_path):
    module = _experiment_module()
    value = {"problems": "x.jsonl", "limit": "2", "chat_template": "false"}[old]
    with pytest.raises(ConfigError, match=f"{old!r} was renamed {new!r}"):
        load_config(module.Config, None, [f"{old}={value}"])
    config = tmp_path / "old.yaml"
    config.write_text(f"{old}: {value}\n")
    with pytest.raises(ConfigError, match=rf"old\.yaml: {old!r} was renamed {new!r}"):
        load_config(module.Config, config)


def test_the_arithmetic_kind_is_refused():
    module = _experiment_module()
    with pytest.raises(ValueError, match=r"task\.kind=arithmetic generates its problems for "
                                         r"training; DeepConf evaluates the held-out problems"):
        module.Config(task=tasks.TaskConfig(kind="arithmetic"))
