import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxlab.limit import critical_n as cn
from jaxlab.limit import free_embedding as fe

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
FAST = fe.SolverConfig(check_every=10, patience=200, max_steps=2000)


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
         "solver.patience=200", "solver.max_steps=2000", "segment_steps=100", *overrides],
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
    with pytest.raises(ValueError, match="GiB is available"):
        cn.search(2, start=3, seeds=2, window=4, config=FAST, memory_bytes=fe.run_bytes(3, 2, 2))
