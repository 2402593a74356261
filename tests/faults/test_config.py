"""Validate, then write: a bad setting stops an experiment with a message naming the key, before
its results folder is created or touched, and the corrected rerun proceeds."""

import critical_n
import deepconf
import limit_eval
import pytest
import train_arithmetic

from jaxlab.config import ConfigError, load_config
from jaxlab.results import open_run

from .conftest import TINY_TRAINING, refused, snapshot


@pytest.mark.parametrize("bad,names", [
    ("fit.steps=1", ["decay_steps=6", "steps=1"]),        # case 1: steps below the schedule
    ("fit.optimizer.warmup_steps=-5", ["warmup_steps", "-5"]),  # case 6: a negative warmup
    ("fit.batch_size=x", ["fit.batch_size='x'"]),         # a wrong-typed override
    ("batch=4", ["'batch' was renamed 'fit.batch_size'"]),  # a key of an earlier version
])
def test_train_arithmetic_refuses_before_writing(capsys, trained, bad, names):
    argv, out = trained
    metrics = (out / "train_metrics.json").read_text()
    with refused(capsys, out, *names):                    # the finished run is left whole
        train_arithmetic.main([*argv, bad])
    assert train_arithmetic.main(argv)["greedy_accuracy"] == 0.25  # the same config reruns
    # (`trained` itself began with a refused steps=1 in a fresh folder, then the corrected run)
    assert (out / "train_metrics.json").read_text() == metrics


@pytest.mark.parametrize("bad,names", [
    ("temperature=-1", ["temperature", "-1"]),            # case 2
    ("top_p=0", ["top_p", "0"]),                          # case 3
    ("top_k=-3", ["top_k", "-3"]),                        # case 4
    ("window=x", ["window='x'"]),                         # case 7: the key, not just the value
    ("ks=[a]", ["ks=['a']"]),                             # inside a list, too
    ("consensus=2", ["consensus", "2"]),                  # the online rule's own check
])
def test_deepconf_refuses_before_writing(capsys, tmp_path, bad, names):
    out = tmp_path / "run"
    with refused(capsys, out, *names):
        deepconf.main([f"out_dir={out}", bad])


@pytest.mark.parametrize("bad", ["memory_gib=inf", "memory_gib=nan"])
def test_critical_n_refuses_infinite_memory(capsys, tmp_path, bad):   # case 5
    out = tmp_path / "run"
    with refused(capsys, out, "memory_gib"):
        critical_n.main([f"out_dir={out}", bad])
    assert load_config(critical_n.Config, None, ["memory_gib=0.5"]).memory_gib == 0.5


def test_limit_eval_refuses_ks_no_corpus_fills(capsys, tmp_path):     # case 14
    out = tmp_path / "run"
    dataset = "datasets=[{name: tiny, generate: {num_docs: 46, num_queries: 30}}]"
    with refused(capsys, out, "ks=[100]", "'tiny'", "46 documents"):
        limit_eval.main([f"out_dir={out}", dataset, "ks=[100]", "minilm=false", "free_dims=[]"])
    # a k that fits: accepted by the same check
    limit_eval._check_ks(load_config(limit_eval.Config, None, [dataset, "ks=[2,100]"]))


def test_limit_eval_refuses_no_retriever(capsys, tmp_path):           # case 15
    out = tmp_path / "run"
    with refused(capsys, out, "no retriever", "free_dims"):
        limit_eval.main([f"out_dir={out}", "bm25=false", "minilm=false", "free_dims=[]"])


def test_damaged_saved_config_names_file_and_line(tmp_path):         # case 11
    out = tmp_path / "run"
    config = load_config(critical_n.Config, None, [f"out_dir={out}"])
    open_run(out, config)
    saved = out / "config.yaml"
    saved.write_text(saved.read_text().replace("d_min: 4", "d_min: [4"))
    before = snapshot(out)
    with pytest.raises(ConfigError, match=rf"{saved}:\d+: not valid YAML"):
        open_run(out, config)
    assert snapshot(out) == before


def test_config_file_errors_name_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("d_min: 4\nd_max: [5\n")
    with pytest.raises(ConfigError, match=rf"{path}:\d+: not valid YAML"):
        load_config(critical_n.Config, path)
    path.write_text("d_min: x\n")
    with pytest.raises(ConfigError, match=rf"{path}: d_min='x'"):
        load_config(critical_n.Config, path)


def test_a_folder_of_an_earlier_version_is_refused_naming_the_renamed_keys(capsys, tmp_path):
    """A results folder written when the arithmetic model's run length and batch were top-level
    keys: refused (nothing touched), the message naming each key's new name."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("out_dir: x\nterms: 2\nsteps: 6\nbatch: 4\nlength: 40\n")
    with refused(capsys, out, "steps is now fit.steps", "batch is now fit.batch_size"):
        train_arithmetic.main([f"out_dir={out}", *TINY_TRAINING])


@pytest.mark.parametrize("key,new", [
    ("loop.iterations", "loop.steps"),
    ("loop.train.learning_rate", "loop.train.optimizer.learning_rate"),
    ("loop.train.temperature", "loop.temperature"),
    ("fit.warmup_steps", "fit.optimizer.warmup_steps"),
    ("solver.max_steps", "solver.steps"),
])
def test_renamed_keys_are_refused_with_their_new_names(key, new):
    """Each old key names its new one (`config.RENAMED`), in any nesting; a key that exists
    under its old name is left alone (the solver's learning_rate is its own)."""
    import train_grpo
    import train_reward_model

    schema = {"loop": train_grpo.Config, "fit": train_reward_model.Config,
              "solver": critical_n.Config}[key.split(".")[0]]
    with pytest.raises(ConfigError, match=rf"'{key}' was renamed '{new}'"):
        load_config(schema, None, [f"{key}=1"])
    assert load_config(critical_n.Config, None, ["solver.learning_rate=0.5"]
                       ).solver.learning_rate == 0.5


def test_keys_of_free_form_sections_are_never_taken_for_renamed_ones(capsys):
    """writing_zero.py's stage sections are free mappings: a current key there is left alone
    even when another key of the same override fails (only that one is named)."""
    import writing_zero

    with pytest.raises(ConfigError) as error:
        load_config(writing_zero.Config, None,
                    ["writer.loop.train.optimizer.learning_rate=1e-5", "seeds=x"])
    assert "seeds='x'" in str(error.value) and "renamed" not in str(error.value)
