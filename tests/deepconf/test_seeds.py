"""experiments/deepconf_seeds.py: the spread over seeds, and the runs it asks for."""

import functools
import json
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import deepconf  # experiments/deepconf.py  # noqa: E402
import deepconf_seeds as seeds  # noqa: E402
import train_arithmetic  # noqa: E402

from jaxlab.deepconf import prompts  # noqa: E402


def _summary(accuracy: float, saved) -> dict:
    """The shape of experiments/deepconf.py's summary.json, cut down."""
    return {"problems": 4, "offline": {"8": {"pass@1": accuracy, "majority": accuracy + 0.1,
                                             "tokens": 100 * accuracy}},
            "online": {"deepconf-high": {"accuracy": accuracy, "tokens": 50.0, "launched": 8.0,
                                         "stopped": 1.0, "seconds": 0.1, "tokens_saved": saved,
                                         "seconds_saved": 0.2}},
            "offline_seconds": 0.5,
            "auroc": {"tail": {"within_problem": accuracy, "pooled": 0.5}}}


def test_spread_by_hand():
    # 0.25, 0.5, 0.75: mean 0.5; squared deviations 1/16 + 0 + 1/16 over n - 1 = 2 -> std 0.25
    row = seeds.spread([0.25, 0.5, 0.75])
    assert row == {"mean": 0.5, "std": 0.25, "min": 0.25, "max": 0.75,
                   "values": [0.25, 0.5, 0.75]}
    assert seeds.spread([0.9])["std"] == 0.0  # one seed: no spread, not NaN


def test_aggregate_spreads_every_number_and_keeps_none():
    summaries = [_summary(0.2, None), _summary(0.4, None), _summary(0.9, None)]
    out = seeds.aggregate(summaries)
    values = np.array([0.2, 0.4, 0.9])
    assert out["offline"]["8"]["pass@1"]["mean"] == pytest.approx(values.mean())
    assert out["offline"]["8"]["majority"]["std"] == pytest.approx((values + 0.1).std(ddof=1))
    assert out["offline"]["8"]["tokens"]["values"] == pytest.approx(list(100 * values))
    assert out["auroc"]["tail"]["within_problem"]["max"] == 0.9
    assert out["online"]["deepconf-high"]["tokens_saved"] is None
    assert out["problems"]["mean"] == 4
    assert list(out["offline"]["8"]) == ["pass@1", "majority", "tokens"]  # the runs' order
    text = seeds.table({"seeds": [0, 1, 2], "greedy_accuracy": seeds.spread(values), **out})
    assert f"| pass@1 | {100 * values.mean():.1f} ± {100 * values.std(ddof=1):.1f} |" in text
    # accuracy, tokens, launched, stopped, tokens saved (None: "-"), wall time saved
    assert (f"| deepconf-high | 50.0 ± {100 * values.std(ddof=1):.1f} | 50 ± 0 | 8.0 ± 0.0 | "
            f"1.0 ± 0.0 | - | 20.0 ± 0.0 |") in text


def test_config_refuses_one_seed_and_bad_overrides():
    with pytest.raises(ValueError, match="at least 2 distinct seeds"):
        seeds.Config(seeds=(3,))
    with pytest.raises(ValueError, match="at least 2 distinct seeds"):
        seeds.Config(seeds=(1, 1))
    with pytest.raises(ValueError, match=r"key=value, got \['steps'\]"):
        seeds.Config(train=("steps",))
    with pytest.raises(ValueError, match=r"missing\.yaml does not exist"):
        seeds.Config(train_config="missing.yaml")


def test_main_runs_both_experiments_per_seed_and_aggregates(tmp_path, monkeypatch):
    calls = []

    def fake_run(script, config, overrides):  # writes what the real experiment would
        calls.append((script, config, overrides))
        values = dict(o.split("=", 1) for o in overrides)
        out = tmp_path / values["out_dir"]
        out.mkdir(parents=True, exist_ok=True)
        seed = int(values["seed"])
        if script == "train_arithmetic.py":
            (out / "train_metrics.json").write_text(json.dumps({"greedy_accuracy": seed / 10}))
        else:
            (out / "summary.json").write_text(json.dumps(_summary(seed / 4, 0.1 * seed)))

    monkeypatch.setattr(seeds, "run", fake_run)
    monkeypatch.chdir(tmp_path)
    train, deepconf = (os.path.join(ROOT, "configs", "deepconf", name)
                       for name in ("train_cpu.yaml", "cpu.yaml"))
    summary = seeds.main(["seeds=[1,3]", "train=[steps=5]", "deepconf=[task.eval_limit=2]",
                          "out_dir=runs", f"train_config={train}", f"deepconf_config={deepconf}"])
    model = os.path.join("runs", "seed3", "model")
    assert calls[2:] == [
        ("train_arithmetic.py", train,
         ["steps=5", f"out_dir={model}", "seed=3"]),
        ("deepconf.py", deepconf,
         ["task.eval_limit=2", f"out_dir={os.path.join('runs', 'seed3', 'deepconf')}",
          f"model={model}", f"task.path={os.path.join(model, 'problems.jsonl')}", "seed=3"])]
    assert summary["greedy_accuracy"]["values"] == [0.1, 0.3]
    assert summary["offline"]["8"]["pass@1"]["mean"] == pytest.approx(0.5)  # (0.25 + 0.75) / 2
    assert summary["online"]["deepconf-high"]["tokens_saved"]["max"] == pytest.approx(0.3)
    assert json.loads((tmp_path / "runs" / "summary.json").read_text()) == summary
    assert (tmp_path / "runs" / "accuracy_vs_tokens.png").stat().st_size > 0


@pytest.mark.parametrize(("experiment", "config"), [
    ("deepconf", "cpu"), ("deepconf", "long_cpu"), ("deepconf", "paper_gpu"),
    ("train_arithmetic", "train_cpu"), ("train_arithmetic", "train_long_cpu"),
    ("deepconf_seeds", "seeds_cpu"), ("deepconf_seeds", "seeds_long_cpu")])
def test_every_deepconf_config_loads(experiment, config, monkeypatch):
    from jaxlab import config as config_lib

    monkeypatch.chdir(ROOT)  # the seeds configs name the others relative to the repository
    module = {"deepconf": deepconf, "train_arithmetic": train_arithmetic,
              "deepconf_seeds": seeds}[experiment]
    cfg = config_lib.load_config(module.Config, f"configs/deepconf/{config}.yaml")
    if config == "paper_gpu":  # the paper's settings (papers/deepconf.md)
        assert (cfg.window, cfg.tail, cfg.confidence_k, cfg.temperature, cfg.top_p, cfg.top_k,
                cfg.warmup, cfg.offline_traces, cfg.consensus, cfg.task.chat_template,
                cfg.task.instruction) == (
                    2048, 2048, 20, 0.6, 0.95, 20, 16, 512, 0.95, True, prompts.INSTRUCTION)
        assert cfg.sampling(stop_ids=(0, 2)).stop_ids == (0, 2)
        assert cfg.online("deepconf-low").budget == 512


def test_problems_longer_than_the_training_length_are_replaced(caplog):
    from jaxlab.deepconf import arithmetic, arithmetic_model
    from jaxlab.rl import sft

    class Nines:  # every number 99: the longest sums, so the longest solution
        def integers(self, low, high, size):
            return np.full(size, high - 1)

    # 53 prompt + 203 solution + EOS: the longest 16-term problem does not fit length 256
    longest = arithmetic.make_problem(Nines(), 16, 0)
    assert longest.answer == "1584" and arithmetic.token_count(longest) == 257
    with pytest.raises(ValueError, match="has 257 tokens > length 256"):
        sft.sft_batch(*([part] for part in arithmetic_model.example(longest)), 256)
    # 4-term problems need 59 to 65 tokens: at length 64 the longer ones are replaced by the
    # next problems of the stream, which are the same as at a length that fits them all
    config = functools.partial(arithmetic_model.Config, terms=4, seed=5,
                               fit=sft.FitConfig(steps=3, batch_size=8))
    stream = np.random.default_rng(5)
    every = [arithmetic.make_problem(stream, 4, i) for i in range(200)]
    fitting = [p for p in every if arithmetic.token_count(p) <= 64]
    assert len(fitting) >= 24 and fitting[:24] != every[:24]  # some of the first are too long
    with caplog.at_level("WARNING", logger="jaxlab"):
        rows = [b["tokens"] for b in arithmetic_model.batches(config(length=64), start=0)]
    expected = sft.sft_batch(*zip(*map(arithmetic_model.example, fitting[:24]), strict=True),
                             64)["tokens"]
    np.testing.assert_array_equal(np.concatenate(rows), expected)
    # a resumed stream reads the batches of the steps it resumes at
    resumed = [b["tokens"] for b in arithmetic_model.batches(config(length=64), start=1)]
    np.testing.assert_array_equal(np.concatenate(resumed), expected[8:])
    assert "longer than length=64 tokens replaced" in caplog.text
    with pytest.raises(ValueError, match="length=30 is too short for terms=4"):
        next(arithmetic_model.batches(config(length=30), start=0))
