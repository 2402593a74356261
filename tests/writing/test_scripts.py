"""The Writing-Zero scripts' data checks: bad judge traces named by file:line, the both-order
consistency filter keeping exactly the pairs its rule names, bad writer settings refused."""

import dataclasses
import json
import sys
from pathlib import Path

import jax
import pytest

from jaxlab import config as config_lib
from jaxlab.rl import sft
from jaxlab.writing import teacher, world

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
import train_genrm
import train_writer

ROOT = Path(__file__).resolve().parents[2]


def trace(r1, r2, preferred, box, prompt="write sun river night :"):
    return {"prompt": prompt, "response_1": r1, "response_2": r2, "preferred": preferred,
            "judge": f"total ; \\boxed{{ {box[0]} , {box[1]} }}"}


def test_the_consistency_filter_keeps_pairs_right_in_both_orders(tmp_path):
    traces = [
        trace("a", "b", 1, (7, 3)), trace("b", "a", 2, (2, 8)),   # right in both: kept
        trace("c", "d", 1, (7, 3)), trace("d", "c", 2, (8, 2)),   # first-position bias: out
        trace("e", "f", 1, (5, 5)), trace("f", "e", 2, (2, 8)),   # a tie: out
        trace("g", "h", 1, (9, 1)),                               # one order only: out
        trace("j", "i", 2, (1, 9)), trace("i", "j", 1, (9, 1)),   # right in both, other order
        {**trace("k", "l", 1, (9, 1)), "judge": "no box"}, trace("l", "k", 2, (1, 9)),
    ]
    path = tmp_path / "traces.jsonl"
    path.write_text("".join(json.dumps(t) + "\n" for t in traces))
    kept, counts = train_genrm.consistent_traces(train_genrm.read_traces(path))
    assert counts == {"traces": 11, "pairs_in_both_orders": 5, "pairs_kept": 2}
    assert {(t["response_1"], t["response_2"]) for t in kept} == {
        ("a", "b"), ("b", "a"), ("i", "j"), ("j", "i")}


@pytest.mark.parametrize("change,match", [
    ({"preferred": 3}, "traces.jsonl:2: preferred must be 1 or 2"),
    ({"response_2": ""}, "traces.jsonl:2: 'response_2' is empty"),
    ({"judge": None}, "traces.jsonl:2: 'judge' must be str"),
])
def test_bad_traces_are_named_by_file_and_line(tmp_path, change, match):
    path = tmp_path / "traces.jsonl"
    good = trace("a", "b", 1, (7, 3))
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, **change}) + "\n")
    with pytest.raises(ValueError, match=match):
        train_genrm.read_traces(path)


@pytest.mark.parametrize("override,match", [
    ("loop.group_size=1", "group_size must be an integer >= 2"),
    ("methods=[brpo,ppo]", "methods must be a non-empty list"),
    ("votes=3", "votes=3 needs judge_temperature > 0"),
    ("judge_max_prompt_tokens=40", "need judge_max_prompt_tokens >= 72"),
])
def test_bad_writer_settings_are_refused_before_training(override, match):
    with pytest.raises(config_lib.ConfigError, match=match):
        config_lib.load_config(train_writer.Config, ROOT / "configs/writing_zero/writer_cpu.yaml",
                               [override])


def _prompt_file(tmp_path, texts):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": t, "id": i}) + "\n"
                            for i, t in enumerate(texts)))
    return path


def test_a_prompt_file_gives_the_writer_its_prompts_judge_template_and_measures(tmp_path):
    """Prompts drawn from the file (a function of the key, without replacement), judged
    through the configured template, measured without the world's hidden rubric."""
    texts = [world.prompt_text(req) for req in (("sun", "river"), ("night", "sun"),
                                                ("river", "night"))]
    world.save_tokenizer(tmp_path / "tok")
    codec = sft.TextCodec(tmp_path / "tok")
    cfg = config_lib.load_config(
        train_writer.Config, ROOT / "configs/writing_zero/writer_cpu.yaml",
        [f"prompts={_prompt_file(tmp_path, texts)}", "template='Q {prompt} A {response_1} "
         "B {response_2}'"])
    draw = train_writer.prompt_fn(cfg, codec)
    drawn = draw(jax.random.key(0), 3)
    assert sorted(p.data for p in drawn) == sorted(texts)
    assert [p.data for p in draw(jax.random.key(0), 3)] == [p.data for p in drawn]
    assert all(list(p.tokens) == codec.prompt(p.data) for p in drawn)
    assert train_writer.judge_text(cfg, "sun", "a b", "c") == "Q sun A a b B c"
    world_cfg = dataclasses.replace(cfg, prompts="")
    assert train_writer.judge_text(world_cfg, texts[0], "a", "b") == teacher.judge_prompt(
        texts[0], "a", "b")
    assert cfg.measures == ("words", "distinct_bigrams", "scalar_rm")
    assert set(train_writer.measures(texts[0], "sun sun river .", False)) == {
        "words", "distinct_bigrams"}
    assert train_writer.measures(texts[0], "sun sun river .", True)["quality"] == \
        world.quality(world.required_words(texts[0]), "sun sun river .")


def test_a_bad_prompt_file_is_named_by_file_and_line(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "sun"}\n{"text": "river"}\n')
    cfg = config_lib.load_config(train_writer.Config,
                                 ROOT / "configs/writing_zero/writer_cpu.yaml", [f"prompts={path}"])
    with pytest.raises(ValueError, match=r"prompts.jsonl:2: field 'prompt' is missing"):
        train_writer.prompt_fn(cfg, None)


def test_the_gpu_writer_config_is_valid():
    cfg = config_lib.load_config(train_writer.Config,
                                 ROOT / "configs/writing_zero/writer_qwen3_gpu.yaml")
    assert cfg.prompts and cfg.loop.group_size == 16 and cfg.measures[0] == "words"
