import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxlab.limit import critical_n as cn
from jaxlab.limit import free_embedding as fe

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
FAST = fe.SolverConfig(check_every=10, patience=200, steps=2000)


def test_cubic_fit_recovers_known_coefficients():
    d = np.arange(4, 20)
    coefficients, r2 = cn.cubic_fit(d, cn.cubic(cn.PAPER_FIT, d))
    np.testing.assert_allclose(coefficients, cn.PAPER_FIT, rtol=1e-6, atol=1e-8)
    assert r2 == pytest.approx(1.0)
    noisy = cn.cubic(cn.PAPER_FIT, d) + np.random.default_rng(0).normal(0, 5, d.shape)
    _, r2 = cn.cubic_fit(d, noisy)
    assert 0.9 < r2 < 1.0


def test_paper_fit_reproduces_its_extrapolation():
    # The digest's fit gives ~500k at d = 512 ... ~250M at d = 4096 (within rounding).
    for d, reported in cn.PAPER_EXTRAPOLATION.items():
        assert cn.cubic(cn.PAPER_FIT, d) == pytest.approx(reported, rel=0.05)


def test_cubic_fit_needs_four_points():
    with pytest.raises(ValueError, match="at least 4"):
        cn.cubic_fit([1, 2, 3], [1, 2, 3])


@pytest.mark.parametrize("tried,expected", [
    ({}, [10, 11, 12]),                                  # start
    ({10: True, 11: True, 12: True}, [13, 14, 15]),      # all solved: go up
    ({10: True, 11: False, 12: False}, None),            # 11 unsolved after a solved 10
    ({10: False, 11: False, 12: True}, [7, 8, 9]),       # nothing solved below 10 known: go down
    ({3: False}, None),                                  # k + 1 = 3 is the smallest n
    ({7: True, 8: True, 9: True, 10: False}, None),
])
def test_next_window(tried, expected):
    assert cn._next_window(tried, start=10, window=3, k=2) == expected


def test_search_agrees_with_plain_solve():
    answer = cn.search(2, start=3, seeds=2, window=3, config=FAST, segment_steps=50)
    c = answer.critical_n
    # Rerun the decisive candidates with the plain solver: no seed solves c, one solves c - 1.
    check = fe.solve([0, 1], [c, c], 2, FAST)
    assert not check.solved.any()
    if c - 1 > FAST.k:
        assert fe.solve([0, 1], [c - 1, c - 1], 2, FAST).solved.any()
    assert answer.tried[c] is False and all(answer.tried[n] for n in answer.tried if n < c)
    assert answer.largest_solved_n == max(n for n, ok in answer.tried.items() if ok)
    assert answer.steps > 0 and answer.seeds == 2 and answer.k == 2


def test_evaluate_stops_moot_runs_yet_decides_the_same(mesh8):
    # Candidates above the first candidate no seed solves are moot and left undecided.
    decided, steps = cn.evaluate([4, 5, 6, 7], 2, 2, FAST, mesh=mesh8, segment_steps=20)
    plain = fe.solve([0, 1] * 4, [4, 4, 5, 5, 6, 6, 7, 7], 2, FAST)
    solved = dict(zip([4, 5, 6, 7], plain.solved.reshape(4, 2).any(axis=1), strict=True))
    ceiling = min((n for n, ok in solved.items() if not ok), default=8)
    assert decided == {n: bool(ok) for n, ok in solved.items() if n <= ceiling}
    assert 0 < steps <= int(plain.steps.sum())


def test_predict_start_extrapolates_recent_growth():
    done = [cn.CriticalN(d, 2, n, n - 1, 2, 0, 0.0) for d, n in [(4, 10), (5, 14), (6, 18)]]
    assert cn.predict_start(done, 7, window=4) == 22 - 2
    assert cn.predict_start([], 7, window=4) is None


def _cli(tmp_path, *overrides):
    env = dict(os.environ, PYTHONPATH=os.path.abspath(ROOT))
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "experiments", "critical_n.py"), "--config",
         os.path.join(ROOT, "configs", "critical_n", "cpu.yaml"), f"out_dir={tmp_path}",
         "d_min=2", "d_max=5", "start_n=3", "seeds=2", "solver.check_every=10",
         "solver.patience=200", "solver.steps=2000", "segment_steps=100", *overrides],
        capture_output=True, text=True, env=env, timeout=600)


def test_cli_writes_results_and_resumes(tmp_path):
    first = _cli(tmp_path)
    assert first.returncode == 0, first.stderr
    records = json.loads((tmp_path / "results.json").read_text())
    assert [r["d"] for r in records] == [2, 3, 4, 5]
    for r in records:
        assert {"d", "k", "critical_n", "largest_solved_n", "seeds", "steps", "seconds"} <= set(r)
        assert r["k"] == 2 and r["seeds"] == 2 and r["critical_n"] > 2
    assert records[-1]["critical_n"] >= records[0]["critical_n"]
    fit = json.loads((tmp_path / "fit.json").read_text())
    assert len(fit["ours"]["coefficients"]) == 4 and len(fit["extrapolation"]) == 5
    assert (tmp_path / "curve.png").stat().st_size > 0
    assert (tmp_path / "config.yaml").exists() and (tmp_path / "log.txt").exists()
    assert "our fit" in first.stdout

    # A lost d is recomputed on rerun; finished ones are kept as they were.
    (tmp_path / "results.json").write_text(json.dumps(records[:2]))
    second = _cli(tmp_path)
    assert second.returncode == 0, second.stderr
    assert "resuming: d=[2, 3]" in second.stderr
    again = json.loads((tmp_path / "results.json").read_text())
    assert again[:2] == records[:2] and [r["d"] for r in again] == [2, 3, 4, 5]


@pytest.mark.parametrize("override,message", [
    ("solvr.k=2", "solvr"), ("seeds=two", "two"), ("seeds=-1", "seeds"),
    ("solver.k=0", "k must be"), ("d_min=9", "d_min=9")])
def test_cli_rejects_bad_settings_before_work(tmp_path, override, message):
    run = _cli(tmp_path, override)
    assert run.returncode != 0 and message in run.stderr
    assert not (tmp_path / "results.json").exists()


def test_cli_refuses_to_mix_configs(tmp_path):
    assert _cli(tmp_path, "d_max=4").returncode == 0
    run = _cli(tmp_path, "d_max=4", "seeds=3")
    assert run.returncode != 0 and "different config" in run.stderr


def test_search_narrows_the_window_to_fit_memory():
    # Room for two runs per call: one candidate (two seeds) at a time, same answer.
    n_max = 12
    room = 2 * fe.run_bytes(n_max, 2, 2)
    narrow = cn.search(2, start=3, seeds=2, window=4, config=FAST, memory_bytes=room,
                       segment_steps=50)
    wide = cn.search(2, start=3, seeds=2, window=4, config=FAST, segment_steps=50)
    assert narrow.critical_n == wide.critical_n < n_max
    with pytest.raises(ValueError, match="GiB are available"):
        cn.search(2, start=3, seeds=2, window=4, config=FAST, memory_bytes=fe.run_bytes(3, 2, 2))


# --------------------------------------------------------------------------------------------
# The paper's protocol


def _oracle(solvable):
    """A fake solver deciding n by the rule `solvable`, recording what each call asked."""
    calls = []

    def solved(ns):
        calls.append(list(ns))
        return {n: solvable(n) for n in ns}

    return solved, calls


@pytest.mark.parametrize("start,calls", [
    # Gallop up 8 -> 9 -> 11 (fails), bisect 10 (fails), 9 already known; sweep 5..14.
    (8, [[8], [9], [11], [10], [5, 6, 7, 12, 13, 14]]),
    # Gallop down 16 -> 15 -> 13 -> 9 (solved), bisect 11, 9 (known), 10; sweep 5..14.
    (16, [[16], [15], [13], [9], [11], [10], [5, 6, 7, 8, 12, 14]]),
])
def test_official_search_monotone_by_hand(start, calls):
    solved, asked = _oracle(lambda n: n < 10)
    assert cn.official_search(solved, start, lowest=2) == 9
    assert asked == calls


def test_official_search_non_monotone_by_hand():
    # 8 fails between solved 7 and solved 9, 10: the gallop down from 8 stops at 7, the binary
    # search keeps 7, and the sweep 3..12 brings 9 and 10 into the record.
    solved, asked = _oracle(lambda n: n <= 7 or n in (9, 10))
    assert cn.official_search(solved, 8, lowest=2) == 7
    assert asked == [[8], [7], [3, 4, 5, 6, 9, 10, 11, 12]]


def test_official_search_stops_at_the_lowest_n():
    solved, asked = _oracle(lambda n: n <= 2)
    assert cn.official_search(solved, 4, lowest=2) == 2
    assert asked[:3] == [[4], [3], [2]]


def test_paper_search_reads_critical_n_from_the_whole_record(monkeypatch):
    pattern = {n: n <= 7 or n in (9, 10) for n in range(3, 20)}

    def fake_evaluate(candidates, seeds, d, config, **kwargs):
        assert seeds == 1 and kwargs["every_candidate"] and kwargs["first_seed"] == 42
        return {n: pattern[n] for n in candidates}, 50 * len(candidates)

    monkeypatch.setattr(cn, "evaluate", fake_evaluate)
    answer = cn.paper_search(4, start=8, config=cn.PAPER_SOLVER)
    assert answer.critical_n == 8 and answer.largest_solved_n == 10
    assert answer.tried == {n: pattern[n] for n in range(3, 13)}
    assert answer.protocol == "paper" and answer.steps == 50 * 10
    modified = cn.paper_search(4, start=8, config=FAST)
    assert modified.protocol.startswith("paper (modified: ")
    assert "check_every=10 (paper: 50)" in modified.protocol
    assert "seeds" not in modified.protocol


def test_paper_search_agrees_with_plain_solve():
    # Every n of the record, rerun alone with the plain solver and the same seed, decides alike.
    answer = cn.paper_search(2, start=4, config=FAST, segment_steps=50)
    ns = sorted(answer.tried)
    plain = fe.solve([cn.PAPER_SEED] * len(ns), ns, 2, FAST)
    assert answer.tried == dict(zip(ns, plain.solved.tolist(), strict=True))
    assert answer.critical_n == min(n for n in ns if not answer.tried[n])


def test_paper_protocol_matches_the_official_defaults():
    # The official script's DEFAULT_EXPERIMENT_PARAMS: lr 0.01, 100,000 iterations, temperature
    # 0.1, seed 42, a check every 50, patience 1000 with min delta 1e-5.
    s = cn.PAPER_SOLVER
    assert (s.learning_rate, s.steps, s.temperature, s.check_every, s.patience,
            s.min_improvement, s.loss, cn.PAPER_SEED) == (
        0.01, 100_000, 0.1, 50, 1000, 1e-5, "per_positive", 42)
    assert cn.paper_deviations(1, 42, s) == []
    assert cn.paper_deviations(4, 42, s) == ["seeds=4 (paper: 1)"]
