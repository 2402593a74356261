"""The Writing-Zero scripts' data checks: bad judge traces named by file:line, the both-order
consistency filter keeping exactly the pairs its rule names, bad writer settings refused."""

import dataclasses
import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

from jaxlab import config as config_lib
from jaxlab.rl import sft
from jaxlab.writing import teacher, world

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
import train_genrm
import train_reward_model
import train_writer
import writing_world
import writing_zero

ROOT = Path(__file__).resolve().parents[2]
SMALL = ROOT / "configs/writing_zero/small.yaml"
STAGE_CONFIGS = {"world": writing_world.Config, "rm": train_reward_model.Config,
                 "rm_teacher": train_reward_model.Config, "genrm": train_genrm.Config,
                 "writer": train_writer.Config}


def stage_config(tmp_path, stage, overrides=(), seed=0):
    """The stage's config as writing_zero.py writes it for `seed`, loaded by its script."""
    cfg = config_lib.load_config(writing_zero.Config, SMALL)
    path = tmp_path / f"{stage}.yaml"
    path.write_text(yaml.safe_dump(writing_zero.stage_config(cfg, stage, seed, tmp_path)))
    return config_lib.load_config(STAGE_CONFIGS[stage], path, overrides)


def test_every_stage_of_the_small_run_gets_a_valid_config_joined_to_the_stages_before(tmp_path):
    configs = {stage: stage_config(tmp_path, stage, seed=2) for stage in STAGE_CONFIGS}
    assert all(c.seed == 2 and c.out_dir == str(tmp_path / stage)
               for stage, c in configs.items())
    world_dir = tmp_path / "world"
    assert configs["rm"].pairs == str(world_dir / "preferences.jsonl")
    assert configs["rm_teacher"].pairs == str(world_dir / "teacher_labels.jsonl")
    assert configs["rm_teacher"].fit == configs["rm"].fit
    assert configs["genrm"].traces == str(world_dir / "judge_traces.jsonl")
    assert configs["genrm"].teacher == configs["world"].teacher
    assert configs["writer"].genrm == str(tmp_path / "genrm" / "genrm")
    assert configs["writer"].methods == writing_zero.WRITERS
    assert configs["writer"].task == configs["world"].task


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
    ("methods=[brpo_genrm,ppo]", "methods must be a non-empty list"),
    ("methods=[brpo,scalar_grpo]", r"\['brpo', 'scalar_grpo'\] are now called "
                                   r"\['brpo_genrm', 'grpo_scalar_rm'\]"),
    ("votes=3", "votes=3 needs judge_temperature > 0"),
    ("prompts=p.jsonl", r"methods \['brpo_teacher', 'grpo_ideal_rm', 'grpo_true'\] need the "
                        r"small world's rubric"),
    ("judge_max_prompt_tokens=40", "need judge_max_prompt_tokens >= 72"),
])
def test_bad_writer_settings_are_refused_before_training(tmp_path, override, match):
    with pytest.raises(config_lib.ConfigError, match=match):
        stage_config(tmp_path, "writer", [override])


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
    cfg = stage_config(tmp_path, "writer", [
        f"prompts={_prompt_file(tmp_path, texts)}", "methods=[brpo_genrm,grpo_scalar_rm]",
        "template='Q {prompt} A {response_1} B {response_2}'"])
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
    cfg = stage_config(tmp_path, "writer", [f"prompts={path}", "methods=[brpo_genrm]"])
    with pytest.raises(ValueError, match=r"prompts.jsonl:2: field 'prompt' is missing"):
        train_writer.prompt_fn(cfg, None)


def test_the_gpu_writer_config_is_valid():
    cfg = config_lib.load_config(train_writer.Config,
                                 ROOT / "configs/writing_zero/writer_qwen3_gpu.yaml")
    assert cfg.prompts and cfg.loop.group_size == 16 and cfg.measures[0] == "words"


def test_kl_from_the_start_sums_log_ratios_over_response_tokens():
    """KL(pi || pi_0) on given responses: 0 against itself; against another model the sum over
    each response's tokens of log pi - log pi_0 from full softmaxes, averaged over responses."""
    from flax import nnx

    from jaxlab.models.decoder import Decoder
    from jaxlab.rl import loop

    config = world.ModelSize(16, 1, 2).decoder_config()
    a, b = Decoder(config, nnx.Rngs(0)), Decoder(config, nnx.Rngs(1))
    prompts = [loop.Prompt(tuple(world.encode("write sun river night :"))),
               loop.Prompt(tuple(world.encode("write sea :")))]
    responses = [world.encode("the sun ."), world.encode("a"), world.encode("sea sea ."),
                 world.encode("the old sea")]
    assert train_writer.kl_from(a, a, prompts, responses, 2) == pytest.approx(0.0, abs=1e-6)

    def logp(model, row, start):
        tokens = jax.numpy.asarray([row])
        logits = model(tokens, jax.numpy.ones_like(tokens))[0]
        full = jax.nn.log_softmax(logits.astype("float32"), -1)
        return sum(float(full[t - 1, row[t]]) for t in range(start, len(row)))

    want = []
    for i, r in enumerate(responses):
        row = [*prompts[i // 2].tokens, *r]
        start = len(prompts[i // 2].tokens)
        want.append(logp(a, row, start) - logp(b, row, start))
    assert train_writer.kl_from(a, b, prompts, responses, 2) == pytest.approx(np.mean(want),
                                                                             abs=1e-4)


def test_quality_at_matched_kl_by_hand():
    """KL levels (trailing mean over 1): the smallest final KL is 0.2 (method b); a reaches it
    at step 1, b at step 2."""
    def rows(kl, quality):
        return [{"step": i, "kl": k, "quality": q}
                for i, (k, q) in enumerate(zip(kl, quality, strict=True))]

    records = {"a": rows([0.0, 0.3, 0.5], [5.0, 6.0, 7.0]),
               "b": rows([0.0, 0.1, 0.2], [5.0, 5.5, 4.0])}
    got = writing_zero.quality_at_kl(records, width=1)
    assert [got[m]["step"] for m in "ab"] == [1, 2]
    assert [got[m]["quality"] for m in "ab"] == [6.0, 4.0]
    assert [got[m]["kl"] for m in "ab"] == pytest.approx([0.2, 0.2])
    np.testing.assert_allclose(writing_zero.smooth(np.asarray([1.0, 3.0, 5.0, 7.0]), 2),
                               [1.0, 2.0, 4.0, 6.0])


def test_per_seed_figures_gather_into_lists_and_spreads():
    per_seed = [{"a": {"x": 1.0, "pair": [0.5, 0.7]}}, {"a": {"x": 3.0, "pair": [0.7, 0.9]}}]
    gathered = writing_zero.gather(per_seed)
    assert gathered == {"a": {"x": [1.0, 3.0], "pair": [[0.5, 0.7], [0.7, 0.9]]}}
    spread = writing_zero.spreads(gathered)
    assert spread["a"]["x"]["mean"] == 2.0 and spread["a"]["x"]["std"] == pytest.approx(2 ** 0.5)
    assert [s["mean"] for s in spread["a"]["pair"]] == pytest.approx([0.6, 0.8])


def test_a_bad_stage_section_is_named_before_any_work(tmp_path):
    """writing_zero.py checks every stage's config (`--check`) before running any; the error
    names the stage and the key."""
    bad = tmp_path / "bad.yaml"
    cfg = yaml.safe_load(SMALL.read_text())
    cfg["genrm"]["sft"]["stepz"] = 3
    cfg["out_dir"] = str(tmp_path / "run")
    bad.write_text(yaml.safe_dump(cfg))
    with pytest.raises(RuntimeError, match=r"stage genrm .* failed with exit status 2: .*stepz"):
        writing_zero.main(["--config", str(bad)])
    assert not (tmp_path / "run" / "seed_0" / "world").exists()


def test_finished_stages_are_not_run_again_and_a_changed_one_is(tmp_path, monkeypatch):
    """main runs each stage once per seed; a rerun skips the stages that finished with the same
    config (`<stage>.done`), reruns a stage whose config changed, and runs a new seed's all."""
    calls = []
    monkeypatch.setattr(writing_zero, "run_stage", lambda stage, path, check=False:
                        None if check else calls.append((path.parent.name, stage)))
    monkeypatch.setattr(writing_zero, "seed_summary", lambda cfg, folder, seed: {"x": seed})
    monkeypatch.setattr(writing_zero, "plot", lambda cfg, out, seeds: None)
    monkeypatch.setattr(writing_zero, "tables", lambda spread: "")
    args = ["--config", str(SMALL), f"out_dir={tmp_path}", "seeds=1"]
    writing_zero.main(args)
    assert calls == [("seed_0", s) for s in writing_zero.STAGES]
    calls.clear()
    writing_zero.main(args)
    assert calls == []
    done = tmp_path / "seed_0" / "genrm.done"
    done.write_text(done.read_text().replace("seed: 0", "seed: 9"))   # finished another way
    writing_zero.main([*args[:-1], "seeds=2"])
    assert calls == [("seed_0", "genrm")] + [("seed_1", s) for s in writing_zero.STAGES]
    assert json.loads((tmp_path / "summary.json").read_text())["x"] == [0, 1]


def test_the_tables_show_mean_and_std_over_seeds():
    seed = {"baselines": {"random": 0.25}, "scalar_rm": {"true_pair_accuracy": 0.5},
            "teacher_rm": {"true_pair_accuracy": 0.7},
            "genrm_cold_start": {"both_orders_accuracy": 0.6},
            "genrm": {"both_orders_accuracy": 0.7},
            "writers": {"start": dict.fromkeys(writing_zero.WRITER_MEASURES, 1.0)},
            "matched_kl": {}}
    other = json.loads(json.dumps(seed))
    other["genrm"]["both_orders_accuracy"] = 0.8
    text = writing_zero.tables(writing_zero.spreads(writing_zero.gather([seed, other])))
    assert "| GenRM after GRPO, both orders | 75.0 ± 7.1 |" in text       # sqrt(0.005) = 7.1%
    assert ("| start | 1.00 ± 0.00 | 1.00 ± 0.00 | 1.00 ± 0.00 | 1.000 ± 0.000 | 1.000 ± 0.000 "
            "|  |") in text
