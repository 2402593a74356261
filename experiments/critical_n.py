"""Reproduce LIMIT's critical-n(d) curve with batched free-embedding runs.

    python experiments/critical_n.py --config configs/critical_n/cpu.yaml [key=value ...]
    python experiments/critical_n.py --config configs/critical_n/paper.yaml   # the paper's protocol

Writes to `out_dir`: config.yaml, log.txt, results.json (one record per d, written as each d
finishes; a rerun resumes from it), fit.json (our cubic fit, the paper's, the extrapolation to
d = 512..4096) and curve.png, then prints measured vs published values.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys

import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from tqdm import tqdm

from jaxlab import cli, parallel, results
from jaxlab import config as config_lib
from jaxlab.limit import critical_n
from jaxlab.limit.free_embedding import SolverConfig

log = logging.getLogger("jaxlab")


@dataclasses.dataclass(frozen=True)
class Config:
    out_dir: str = "results/critical_n"
    d_min: int = 4               # first dimension of the sweep
    d_max: int = 16              # last dimension (inclusive)
    start_n: int = 6             # first candidate n at d_min; later d start from earlier answers
    protocol: str = "multi_seed"  # "multi_seed" (windows of candidates, `seeds` each) or
    #                               "paper" (the official gallop / binary search / sweep, 1 seed)
    seeds: int = 4               # restarts per candidate n; solved if any seed solves it
    window: int = 4              # candidate n per batch (multi_seed only)
    segment_steps: int = 500     # steps between looks from the host (stop moot runs, shrink)
    memory_gib: float | None = None  # device memory a call may use (default: what is free)
    solver: SolverConfig = dataclasses.field(default_factory=SolverConfig)

    def __post_init__(self):
        config_lib.require_positive_ints(self, "d_min", "d_max", "start_n", "seeds", "window",
                                         "segment_steps")
        config_lib.require(self.d_min <= self.d_max,
                           f"d_min={self.d_min} must be <= d_max={self.d_max}")
        config_lib.require(self.start_n >= self.solver.k,
                           f"start_n={self.start_n} must be >= solver.k={self.solver.k}")
        config_lib.require(self.protocol in critical_n.PROTOCOLS,
                           f"protocol must be one of {critical_n.PROTOCOLS}, got {self.protocol!r}")
        config_lib.require(self.memory_gib is None or 0 < self.memory_gib < math.inf,
                           f"memory_gib must be a finite number > 0 (or null: what is free), "
                           f"got {self.memory_gib!r}")


def main(argv: list[str] | None = None) -> list[critical_n.CriticalN]:
    parallel.cpu_cores_as_devices()  # before JAX starts its CPU backend
    results.join_processes()  # before JAX touches a backend
    cfg = config_lib.from_command_line(Config, argv, __doc__.splitlines()[0])
    out = results.open_run(cfg.out_dir, cfg, may_change=("d_min", "d_max"))
    path = out / "results.json"
    done = [_from_record(r) for r in results.read_json(path, default=[])]
    mesh = parallel.make_mesh(parallel.RUNS)
    memory = None if cfg.memory_gib is None else int(cfg.memory_gib * 2**30)
    dims = range(cfg.d_min, cfg.d_max + 1)
    log.info("critical-n sweep d=%d..%d, %s protocol, k=%d, %d seeds, window %d, %s loss, "
             "%d %s device(s); writing %s", cfg.d_min, cfg.d_max, cfg.protocol, cfg.solver.k,
             cfg.seeds, cfg.window, cfg.solver.loss, mesh.size, jax.devices()[0].platform, out)
    if cfg.protocol == "paper" and (changed := critical_n.paper_deviations(
            cfg.seeds, critical_n.PAPER_SEED, cfg.solver)):
        log.warning("not the paper's protocol: %s (recorded in results.json)", ", ".join(changed))
    if done:
        log.info("resuming: d=%s already in %s", [r.d for r in done], path)

    bar = tqdm(total=len(dims), initial=sum(r.d in dims for r in done), unit="d",
               dynamic_ncols=True, file=sys.stderr)

    def on_segment(decided: dict[int, bool], steps: int):
        marks = " ".join(f"{n}{'+' if ok else '-'}" for n, ok in sorted(decided.items()))
        bar.set_postfix_str(f"{marks} steps={steps}")

    def on_result(answer: critical_n.CriticalN):
        finished.append(answer)
        results.write_json(path, [r.record() for r in sorted(finished, key=lambda r: r.d)])
        bar.update(1)
        tqdm.write(f"d={answer.d:3d}  critical-n={answer.critical_n:5d}  largest solved="
                   f"{answer.largest_solved_n:5d}  candidates={len(answer.tried):3d}  "
                   f"steps={answer.steps:8d}  {answer.seconds:7.1f}s", file=sys.stderr)
        log.info("d=%d critical_n=%d largest_solved_n=%d tried=%s steps=%d seconds=%.1f "
                 "peak device memory (estimated) %.3f GiB", answer.d, answer.critical_n,
                 answer.largest_solved_n, answer.tried, answer.steps, answer.seconds,
                 answer.peak_bytes / 2**30)

    finished = list(done)
    answers = critical_n.sweep(dims, start=cfg.start_n, seeds=cfg.seeds, window=cfg.window,
                               config=cfg.solver, mesh=mesh, memory_bytes=memory,
                               segment_steps=cfg.segment_steps, done=done, on_result=on_result,
                               on_segment=on_segment, protocol=cfg.protocol)
    bar.close()
    answers = sorted((a for a in answers if a.d in dims), key=lambda a: a.d)
    fit = _write_fit(out, answers)
    _plot(out / "curve.png", answers, fit)
    print(_table(answers, fit))
    log.info("total %.1f s of search; results in %s", sum(a.seconds for a in answers), out)
    return answers


def _from_record(record: dict) -> critical_n.CriticalN:
    tried = {int(n): bool(ok) for n, ok in record.pop("tried", {}).items()}
    peak_bytes = int(record.pop("peak_gib", 0) * 2**30)
    return critical_n.CriticalN(**record, peak_bytes=peak_bytes, tried=tried)


def _write_fit(out, answers) -> dict:
    d = [a.d for a in answers]
    n = [a.critical_n for a in answers]
    fit = {"paper": {"coefficients": list(critical_n.PAPER_FIT), "r2": 0.999, "d_range": [4, 45]}}
    if len(answers) >= 4:
        coefficients, r2 = critical_n.cubic_fit(d, n)
        fit["ours"] = {"coefficients": list(coefficients), "r2": r2, "d_range": [min(d), max(d)]}
    fit["extrapolation"] = [
        {"d": dim, "paper_reported": reported,
         "paper_fit": float(critical_n.cubic(critical_n.PAPER_FIT, dim)),
         "ours": float(critical_n.cubic(fit["ours"]["coefficients"], dim)) if "ours" in fit
         else None}
        for dim, reported in critical_n.PAPER_EXTRAPOLATION.items()]
    results.write_json(out / "fit.json", fit)
    return fit


def _reference(d: int) -> tuple[float, str]:
    """The paper's published value at d where there is one, else its cubic fit."""
    if d in critical_n.PAPER_POINTS:
        return float(critical_n.PAPER_POINTS[d]), "published"
    return float(critical_n.cubic(critical_n.PAPER_FIT, d)), "paper fit"


def _table(answers, fit) -> str:
    lines = [f"{'d':>4} {'critical-n':>10} {'largest solved':>14} {'paper':>8} {'source':>10} "
             f"{'diff':>7} {'seconds':>8}"]
    for a in answers:
        ref, source = _reference(a.d)
        lines.append(f"{a.d:4d} {a.critical_n:10d} {a.largest_solved_n:14d} {ref:8.1f} "
                     f"{source:>10} {100 * (a.critical_n - ref) / ref:+6.1f}% {a.seconds:8.1f}")
    if "ours" in fit:
        c, r2 = fit["ours"]["coefficients"], fit["ours"]["r2"]
        lines.append(f"our fit: n(d) = {c[0]:.4f} + {c[1]:.4f} d + {c[2]:.4f} d^2 + {c[3]:.5f} d^3"
                     f"  (r^2 = {r2:.4f}, d = {fit['ours']['d_range'][0]}.."
                     f"{fit['ours']['d_range'][1]})")
    lines.append(f"{'d':>6} {'paper':>12} {'paper fit':>12} {'our fit':>12}")
    for row in fit["extrapolation"]:
        ours = f"{row['ours']:12.4g}" if row["ours"] is not None else f"{'-':>12}"
        lines.append(f"{row['d']:6d} {row['paper_reported']:12.4g} {row['paper_fit']:12.4g} {ours}")
    return "\n".join(lines)


def _plot(path, answers, fit) -> None:
    d = np.array([a.d for a in answers])
    grid = np.linspace(min(d.min(), 4), max(d.max(), 4) + 1, 200)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot(d, [a.critical_n for a in answers], "o", label="measured critical-n")
    if "ours" in fit:
        ax.plot(grid, critical_n.cubic(fit["ours"]["coefficients"], grid), "-",
                label="our cubic fit")
    ax.plot(grid, critical_n.cubic(critical_n.PAPER_FIT, grid), "--", label="paper's cubic fit")
    published = [(dim, n) for dim, n in critical_n.PAPER_POINTS.items() if dim <= grid.max()]
    if published:
        ax.plot(*zip(*published, strict=True), "k^", label="paper's published values")
    ax.set_xlabel("embedding dimension d")
    ax.set_ylabel("critical n (top-2)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    results.save_figure(fig, path)
    plt.close(fig)


if __name__ == "__main__":
    cli.run(main)
