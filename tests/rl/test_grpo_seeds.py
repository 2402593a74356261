"""experiments/grpo_seeds.py: the value chosen on validation, the other seeds run with it, and the
test figure over seeds, from finished run folders (no training: `_run` reuses a folder whose
summary.json holds "after")."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
import grpo_seeds


def _finished(folder: Path, validation: float, test: float) -> None:
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({
        "before": {"validation": {"greedy": 0.8}, "test": {"greedy": 0.75}},
        "after": {"validation": {"greedy": validation}, "test": {"greedy": test}},
        "greedy_error_reduction": {"validation": 1 - (1 - validation) / 0.2,
                                   "test": 1 - (1 - test) / 0.25},
        "seconds_this_run": 10.0}))


def test_choose_takes_the_best_validation_and_the_first_of_a_tie():
    assert grpo_seeds.choose({"a": 0.5, "b": 0.7, "c": 0.6}) == "b"
    assert grpo_seeds.choose({"a": 0.7, "b": 0.6, "c": 0.7}) == "a"


def test_the_report_uses_the_chosen_value_over_seeds_and_never_its_test_figure(tmp_path):
    key = "loop.train.learning_rate"
    # seed 0: lr 1e-4 wins on validation although 1e-5 has the better test accuracy
    _finished(tmp_path / f"{key}=1e-5" / "seed0", validation=0.80, test=0.95)
    _finished(tmp_path / f"{key}=1e-4" / "seed0", validation=0.85, test=0.80)
    _finished(tmp_path / f"{key}=1e-4" / "seed1", validation=0.84, test=0.90)
    _finished(tmp_path / f"{key}=1e-5" / "seed1", validation=0.99, test=0.99)  # never read
    summary = grpo_seeds.main(["--config", "unused.yaml", "--out", str(tmp_path),
                               "--sweep", f"{key}=1e-5,1e-4", "--seeds", "0", "1"])
    assert summary["chosen"] == f"{key}=1e-4"
    assert summary["test_after"]["values"] == [0.80, 0.90]
    assert summary["test_after"]["mean"] == pytest.approx(0.85)
    assert summary["test_after"]["std"] == pytest.approx(0.0707107, rel=1e-5)  # sqrt(0.005)
    assert summary["test_error_reduction"]["values"] == pytest.approx([0.2, 0.6])
    assert json.loads((tmp_path / "summary.json").read_text()) == summary


def test_a_run_folder_of_an_earlier_format_is_refused_naming_it(tmp_path):
    folder = tmp_path / "seed0"
    folder.mkdir()
    (folder / "summary.json").write_text(json.dumps({
        "before": {"validation": 0.8, "test": 0.75}, "after": {"validation": 0.9, "test": 0.8}}))
    with pytest.raises(ValueError, match=r"seed0/summary\.json was written by an earlier"):
        grpo_seeds.main(["--config", "unused.yaml", "--out", str(tmp_path), "--seeds", "0"])
