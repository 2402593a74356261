"""GRPO on the arithmetic model over seeds, with its settings chosen on validation: one command
from a clean checkout to the reported test figure.

    python experiments/grpo_seeds.py --config configs/rl/arithmetic_cpu.yaml \
        --sweep loop.train.optimizer.learning_rate=1e-5,3e-5,1e-4 --seeds 0 1 2 \
        [--parallel 2] [key=value ...]

1. Sweep: `experiments/train_grpo.py` with the first seed for each value of the swept setting
   (the arithmetic model is trained first when absent); the value with the best greedy accuracy
   on the model's validation set is chosen (ties: the first listed).
2. Seeds: the chosen value with every other seed.
3. Report: test accuracy before and after over the seeds (mean, sample std, min, max), which no
   choice ever looked at, beside the sweep's validation figures.

Every run is a train_grpo.py folder, `out/<key>=<value>/seed<s>` (or `out/seed<s>` without a
sweep); a rerun reuses finished runs. Writes `out/summary.json` and prints the tables.
"""

from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from jaxlab import cli, results
from jaxlab.jsonl import read_json
from jaxlab.results import spread

SCRIPT = pathlib.Path(__file__).with_name("train_grpo.py")


def choose(validation: dict[str, float]) -> str:
    """The setting with the highest validation accuracy; ties go to the first listed."""
    return max(validation, key=lambda value: (validation[value], -list(validation).index(value)))


def greedy(run: dict, when: str, split: str) -> float:
    """A run's greedy accuracy on a held-out split, "before" or "after" training."""
    return run[when][split]["greedy"]


def _run(config: str, folder: pathlib.Path, seed: int, overrides: list[str]) -> dict:
    summary = folder / "summary.json"
    if summary.exists() and "after" in (done := read_json(summary)):
        if not all(isinstance(figures, dict) for figures in done["after"].values()):
            raise ValueError(f"{summary} was written by an earlier train_grpo.py (one accuracy "
                             f"per split, not greedy, pass@1 and majority@k): remove {folder} "
                             f"to run it again, or choose another --out")
        return done
    command = [sys.executable, str(SCRIPT), "--config", config, f"out_dir={folder}",
               f"seed={seed}", *overrides]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True)
    return read_json(summary)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", default="results/grpo_seeds")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sweep", help="key=v1,v2,...: values of one setting, chosen on "
                                        "validation with the first seed")
    parser.add_argument("--parallel", type=int, default=1, help="runs at once (after the first)")
    args, overrides = parser.parse_known_args(argv)
    out = pathlib.Path(args.out)
    if args.sweep:
        key, _, values = args.sweep.partition("=")
        if not key or not values:
            parser.error(f"--sweep must be key=v1,v2,..., got {args.sweep!r}")
        settings = {f"{key}={v}": [*overrides, f"{key}={v}"] for v in values.split(",")}
    else:
        settings = {"": overrides}

    def run(setting: str, seed: int) -> dict:
        return _run(args.config, out / setting / f"seed{seed}", seed, settings[setting])

    def run_all(jobs: list[tuple[str, int]]) -> list[dict]:
        if not jobs:
            return []
        first = [run(*jobs[0])]  # alone: it trains the arithmetic model when absent
        with ThreadPoolExecutor(max(1, args.parallel)) as pool:
            return first + list(pool.map(lambda job: run(*job), jobs[1:]))

    first_seed, other_seeds = args.seeds[0], args.seeds[1:]
    sweep = dict(zip(settings, run_all([(s, first_seed) for s in settings]), strict=True))
    validation = {s: greedy(r, "after", "validation") for s, r in sweep.items()}
    chosen = choose(validation)
    runs = [sweep[chosen], *run_all([(chosen, seed) for seed in other_seeds])]
    summary = {
        "config": args.config, "overrides": overrides, "chosen": chosen or None,
        "sweep": {s: {"validation_before": greedy(r, "before", "validation"),
                      "validation_after": greedy(r, "after", "validation")}
                  for s, r in sweep.items()},
        "seeds": args.seeds,
        "test_before": spread([greedy(r, "before", "test") for r in runs]),
        "test_after": spread([greedy(r, "after", "test") for r in runs]),
        "validation_after": spread([greedy(r, "after", "validation") for r in runs]),
        "test_error_reduction": spread([r["greedy_error_reduction"]["test"] for r in runs]),
        "seconds_per_run": spread([r["seconds_this_run"] for r in runs]),
    }
    results.write_json(out / "summary.json", summary)
    print(table(summary))
    return summary


def table(summary: dict) -> str:
    lines = [f"setting chosen on validation (seed {summary['seeds'][0]}): "
             f"{summary['chosen'] or 'the config as given'}"]
    for setting, row in summary["sweep"].items():
        lines.append(f"  {setting or 'config':40s} validation {100 * row['validation_before']:.1f}%"
                     f" -> {100 * row['validation_after']:.1f}%")
    for name in ("test_before", "test_after", "test_error_reduction"):
        s = summary[name]
        lines.append(f"{name:22s} mean {100 * s['mean']:6.1f}%  std {100 * s['std']:4.1f}  "
                     f"min {100 * s['min']:6.1f}%  max {100 * s['max']:6.1f}%  "
                     f"(seeds {summary['seeds']})")
    return "\n".join(lines)


if __name__ == "__main__":
    cli.run(main)
