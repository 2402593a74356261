"""experiments/train_grpo.py on your own checkpoint and data, end to end at a tiny size: a zoo
Qwen3 with a chat-template tokenizer, a ten-row JSON Lines file of GSM8K-style problems,
configs/rl/math_cpu.yaml. Two steps, a checkpoint after each; a run stopped after the first
resumes and ends where an uninterrupted run ends; the policy folder loads in transformers."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxlab import tasks
from jaxlab.models import hf, zoo

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
import train_grpo

ROOT = Path(__file__).resolve().parents[2]


def _problems(path: Path) -> Path:
    rows = [{"question": f"What is {a} + {b}?", "answer": f"{a} plus {b} is {a + b}.\n#### {a + b}"}
            for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (9, 1), (2, 2), (4, 5), (6, 1), (8, 3),
                         (2, 7)]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("math")
    model = zoo.create("qwen3", root / "model", tokenizer=True, max_position_embeddings=512)
    return root, model, _problems(root / "problems.jsonl")


def _args(root: Path, out: str, model: Path, data: Path, *overrides: str) -> list[str]:
    return ["--config", str(ROOT / "configs/rl/math_cpu.yaml"), f"out_dir={root / out}",
            f"model={model}", f"task.path={data}", "task.problem_field=question",
            "task.eval_fraction=0.2", "eval_samples=2", "loop.steps=2", "loop.prompts=2",
            "loop.group_size=2", "loop.minibatches=1", "loop.max_prompt_tokens=128",
            "loop.max_new_tokens=6", "loop.checkpoint_every=1", "loop.dynamic_sampling=false",
            "loop.train.optimizer.learning_rate=1e-3", *overrides]


def test_math_task_end_to_end_resume_and_a_policy_transformers_loads(world, monkeypatch):
    root, model, data = world
    pool = []  # the problems the run draws its training prompts from
    real = train_grpo.file_prompts

    def recording(problems, ids):
        pool.extend(p.prompt for p in problems)
        return real(problems, ids)

    monkeypatch.setattr(train_grpo, "file_prompts", recording)
    summary = train_grpo.main(_args(root, "whole", model, data))
    monkeypatch.setattr(train_grpo, "file_prompts", real)
    run = root / "whole"
    for name in ("config.yaml", "log.txt", "metrics.jsonl", "summary.json", "curves.png",
                 "inputs.json", "policy/config.json", "policy/model.safetensors",
                 "policy/tokenizer.json"):
        assert (run / name).exists(), name
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1]
    for record in records:  # each reward function logged apart, the reward their weighted sum
        assert {"accuracy", "format", "truncated"} <= record.keys()
        assert record["reward_mean"] == pytest.approx(record["accuracy"] + 0.1 * record["format"])
    # 10 rows, 2 held out (eval_fraction 0.2), the 8 others trained on: the training pool and
    # the held-out problems split the file's questions, none in both
    splits = tasks.load_splits(tasks.TaskConfig(path=str(data), problem_field="question",
                                                eval_fraction=0.2))
    questions = [json.loads(line)["question"] for line in data.read_text().splitlines()]
    held = [p.prompt for p in splits.held_out]
    assert summary["held_out"] == {"held_out": 2} and len(held) == 2 and len(pool) == 8
    assert not set(pool) & set(held) and sorted(pool + held) == sorted(questions)
    for when in ("before", "after"):
        assert set(summary[when]["held_out"]) == {"greedy", "pass@1", "majority@2"}

    # Stopped after its first step (the second step's prompts never come), then rerun: it
    # resumes from the step-1 checkpoint and ends with the uninterrupted run's policy.
    real = train_grpo.file_prompts
    calls = []

    def stopping(problems, ids):
        draw = real(problems, ids)

        def once(key, count):
            calls.append(count)
            if len(calls) > 1:
                raise KeyboardInterrupt
            return draw(key, count)
        return once

    monkeypatch.setattr(train_grpo, "file_prompts", stopping)
    with pytest.raises(KeyboardInterrupt):
        train_grpo.main(_args(root, "stopped", model, data))
    monkeypatch.setattr(train_grpo, "file_prompts", real)
    stopped = root / "stopped"
    assert [json.loads(x)["step"] for x in (stopped / "metrics.jsonl").read_text().splitlines()
            ] == [0]
    # the policy of the step-1 checkpoint is already a whole folder, with its generation config
    generation = json.loads((stopped / "policy/generation_config.json").read_text())
    assert generation["eos_token_id"] == 2 and generation["temperature"] == 1.0
    assert (stopped / "policy/tokenizer.json").exists()
    resumed = train_grpo.main(_args(root, "stopped", model, data))
    assert "resuming from step 1" in (stopped / "log.txt").read_text()
    assert resumed["before"] == summary["before"] and resumed["after"] == summary["after"]
    ours = hf.read_tensors(run / "policy")
    again = hf.read_tensors(stopped / "policy")
    for name, tensor in ours.items():
        np.testing.assert_array_equal(again[name], tensor, err_msg=name)

    # The policy is a Hugging Face folder: transformers loads it with its tokenizer and gives
    # jaxlab's logits; generation stops at the chat model's end of turn.
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(run / "policy")
    ids = tasks.encode_prompts(tasks.TaskConfig(path=str(data)), tokenizer, splits.held_out)[0]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(run / "policy").eval()
    with torch.no_grad():
        want = theirs(torch.tensor([ids])).logits.numpy()
    policy = hf.load_pretrained(run / "policy")
    got = np.asarray(policy(np.asarray([ids]), np.ones((1, len(ids)), np.int32)))
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)
    assert json.loads((run / "policy/config.json").read_text())["eos_token_id"] == \
        tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_long_prompts_are_refused_naming_the_row_or_dropped_with_a_count(world, caplog):
    root, model, data = world
    lines = data.read_text().splitlines()
    long = root / "long.jsonl"
    long.write_text("\n".join([*lines[:4], json.dumps({"question": "x" * 300, "answer": "1"}),
                               *lines[4:]]) + "\n")
    with pytest.raises(tasks.DataError, match=rf"{long}:5 \(id 5\): \d+ tokens"):
        train_grpo.main(_args(root, "long", model, long))
    assert not (root / "long").exists()  # refused before the folder: the fixed command runs
    with pytest.raises(ValueError, match=r"loop\.prompts=9 is more than the 8 training problems"):
        train_grpo.main(_args(root, "long", model, data, "loop.prompts=9"))
    assert not (root / "long").exists()
    with caplog.at_level("WARNING", logger="jaxlab"):
        summary = train_grpo.main(_args(root, "dropped", model, long, "task.long_prompts=drop",
                                        "loop.steps=1"))
    assert "left out 1 of" in caplog.text
    assert summary["optimizer_steps"] == 1
    with pytest.raises(ValueError, match="no training problems are left once 10 are held out"):
        train_grpo.main(_args(root, "all_held_out", model, data, "task.eval_fraction=1.0"))


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_any_supported_family_trains_on_a_file(tmp_path, family):
    """model=DIR: a Qwen2 or Llama folder with its chat tokenizer runs the same path."""
    model = zoo.create(family, tmp_path / family, tokenizer=True, max_position_embeddings=512)
    data = _problems(tmp_path / "problems.jsonl")
    summary = train_grpo.main(_args(tmp_path, "run", model, data, "loop.steps=1",
                                    "eval_samples=0"))
    assert summary["optimizer_steps"] == 1 and set(summary["after"]["held_out"]) == {"greedy"}
    assert json.loads((tmp_path / "run/policy/config.json").read_text())["model_type"] == family
