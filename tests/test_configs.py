"""Every YAML file under configs/ loads and validates into the Config of the experiment that reads
it, without running anything: the schema's defaults, the file and the schema's `__post_init__`
checks, through `jaxlab.config.load_config` (what each script's `main` calls through
`from_command_line(Config, ["--config", FILE, ...])` before any work).

A new config file is covered as soon as it exists: `SCRIPTS` maps it to its script by folder and
name pattern, and a file it cannot map (or maps twice) fails with a message naming the file.
"""

from __future__ import annotations

import fnmatch
import importlib
import os
import pathlib
import sys

import pytest

from jaxlab import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

CONFIG_FILES = sorted((ROOT / "configs").rglob("*.yaml"))

# (folder under configs/, file-name pattern) -> the experiment script (module in experiments/)
# that reads the files, as each script's docstring says. A file must match exactly one pattern.
SCRIPTS = {
    ("critical_n", "*.yaml"): "critical_n",
    ("deepconf", "cpu.yaml"): "deepconf",
    ("deepconf", "long_cpu.yaml"): "deepconf",
    ("deepconf", "paper_gpu.yaml"): "deepconf",
    ("deepconf", "seeds_*.yaml"): "deepconf_seeds",
    ("deepconf", "train_*.yaml"): "train_arithmetic",
    ("limit_eval", "*.yaml"): "limit_eval",
    ("rl", "*.yaml"): "train_grpo",
    ("writing_zero", "genrm_*.yaml"): "train_genrm",
    ("writing_zero", "rm_*.yaml"): "train_reward_model",
    ("writing_zero", "writer_*.yaml"): "train_writer",
    ("writing_zero", "small.yaml"): "writing_zero",
}
IDS = [str(path.relative_to(ROOT)) for path in CONFIG_FILES]


def script_of(path: pathlib.Path) -> str | None:
    """The experiment module that reads the config file `path`; None unless exactly one entry
    of `SCRIPTS` matches it."""
    folder = path.parent.relative_to(ROOT / "configs").as_posix()
    matches = {script for (f, pattern), script in SCRIPTS.items()
               if f == folder and fnmatch.fnmatchcase(path.name, pattern)}
    return matches.pop() if len(matches) == 1 else None


def load(path: pathlib.Path):
    script = script_of(path)
    assert script is not None, (
        f"{path.relative_to(ROOT)} is not mapped to an experiment script: add its folder and "
        f"name to SCRIPTS in {pathlib.Path(__file__).name}")
    module = importlib.import_module(script)
    return module, config_lib.load_config(module.Config, path)


def test_every_config_file_is_covered():
    """The parametrized cases are every YAML file under configs/ (counted here independently,
    .yml included), and each maps to one script."""
    found = [os.path.join(folder, name) for folder, _, names in os.walk(ROOT / "configs")
             for name in names if name.endswith((".yaml", ".yml"))]
    assert len(found) >= 20, f"expected the configs/ folder's files, found {found}"
    assert len(IDS) == len(set(IDS)) == len(found), sorted(set(found) - set(map(str, CONFIG_FILES)))
    unmapped = [name for name, path in zip(IDS, CONFIG_FILES, strict=True)
                if script_of(path) is None]
    assert not unmapped, f"config files no entry of SCRIPTS maps to one script: {unmapped}"


@pytest.mark.parametrize("path", CONFIG_FILES, ids=IDS)
def test_config_file_loads_into_its_experiment(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # configs name other configs relative to the checkout
    module, cfg = load(path)
    assert type(cfg) is module.Config


def test_the_script_docstrings_agree_with_the_mapping():
    """Each script's docstring shows a config file of its own; that file maps back to it."""
    for script in sorted(set(SCRIPTS.values())):
        doc = importlib.import_module(script).__doc__
        shown = [word for word in doc.split() if word.startswith("configs/")
                 and word.endswith(".yaml") and f"experiments/{script}.py --config {word}" in doc]
        assert shown, f"experiments/{script}.py's docstring shows no --config configs/...yaml"
        for word in shown:
            assert script_of(ROOT / word) == script, (word, script)


def test_configs_that_other_configs_run_load_with_the_overrides_they_get(monkeypatch):
    """deepconf_seeds.py runs train_arithmetic.py and deepconf.py with the files its config
    names and key=value overrides of its own; train_grpo.py trains a missing model with
    `model_config`. Those files load into the right schemas with those overrides."""
    import deepconf

    from jaxlab.deepconf import arithmetic_model

    monkeypatch.chdir(ROOT)
    for path in CONFIG_FILES:
        module, cfg = load(path)
        if module.__name__ == "deepconf_seeds":
            for seed in cfg.seeds:
                config_lib.load_config(arithmetic_model.Config, cfg.train_config,
                                       [*cfg.train, "out_dir=x/model", f"seed={seed}"])
                config_lib.load_config(deepconf.Config, cfg.deepconf_config,
                                       [*cfg.deepconf, "out_dir=x/dc", "model=x/model",
                                        "task.path=x/model/problems.jsonl", f"seed={seed}"])
        elif module.__name__ == "train_grpo":
            config_lib.load_config(arithmetic_model.Config, cfg.model_config, ["out_dir=x"])


def test_check_validates_and_exits_without_running(capsys):
    """`--check` parses the config as a run would, then exits 0; a bad key still exits 2 with
    the key named."""
    import writing_zero
    path = ROOT / "configs/writing_zero/small.yaml"
    with pytest.raises(SystemExit) as stop:
        config_lib.from_command_line(writing_zero.Config, ["--config", str(path), "--check"])
    assert stop.value.code == 0 and "a valid config" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        config_lib.from_command_line(writing_zero.Config,
                                     ["--config", str(path), "--check", "seedz=2"])
    assert stop.value.code == 2 and "seedz" in capsys.readouterr().err


def test_from_mapping_fills_a_schema_and_names_where_a_key_does_not_fit():
    from jaxlab.writing import world
    got = config_lib.from_mapping(world.WorldConfig, {"label_noise": 0.2,
                                                      "rubric": {"slack": 2}}, "world.task")
    assert got.label_noise == 0.2 and got.rubric == world.Rubric(slack=2)
    with pytest.raises(config_lib.ConfigError, match=r"world.task: .*noise"):
        config_lib.from_mapping(world.WorldConfig, {"noise": 0.2}, "world.task")
    with pytest.raises(config_lib.ConfigError, match=r"world.task: WorldConfig.label_noise"):
        config_lib.from_mapping(world.WorldConfig, {"label_noise": 2.0}, "world.task")
