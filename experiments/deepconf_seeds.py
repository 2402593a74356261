"""DeepConf over several training seeds: train the task model once per seed, run DeepConf offline
and online on each, and report every figure as a mean and spread over the seeds.

    python experiments/deepconf_seeds.py --config configs/deepconf/seeds_cpu.yaml [key=value ...]

A model trained on a synthetic task moves by many points with its seed (and with float rounding
in the code under it), so one run's table says little. Per seed s this runs, as child processes,
`experiments/train_arithmetic.py --config <train_config> out_dir=<out_dir>/seed<s>/model seed=s`
and `experiments/deepconf.py --config <deepconf_config> out_dir=<out_dir>/seed<s>/deepconf
model=... task.path=... seed=s` (each seed has its own held-out problems and sampling key), with
the `train` and `deepconf` overrides appended. Both resume, so a rerun finishes what a killed run
left. The driver is one process; each child joins whatever multi-process run its environment
describes, as every experiment does. Writes `summary.json` (every number of deepconf's summary
as mean, std, min, max and the per-seed values, plus the models' greedy accuracy),
`accuracy_vs_tokens.png` (mean with one std as error bars) and prints the table.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import subprocess
import sys

from jaxlab import cli, results
from jaxlab import config as config_lib
from jaxlab.deepconf import plots
from jaxlab.results import spread

log = logging.getLogger("jaxlab")

EXPERIMENTS = pathlib.Path(__file__).resolve().parent


@dataclasses.dataclass(frozen=True)
class Config:
    out_dir: str = "results/deepconf_seeds"
    train_config: str = "configs/deepconf/train_cpu.yaml"    # experiments/train_arithmetic.py
    deepconf_config: str = "configs/deepconf/cpu.yaml"       # experiments/deepconf.py
    seeds: tuple[int, ...] = (0, 1, 2)
    train: tuple[str, ...] = ()       # key=value overrides for every training run
    deepconf: tuple[str, ...] = ()    # key=value overrides for every DeepConf run

    def __post_init__(self):
        config_lib.require(len(self.seeds) >= 2 and len(set(self.seeds)) == len(self.seeds),
                           f"seeds must hold at least 2 distinct seeds (a spread needs two), "
                           f"got {list(self.seeds)}")
        for path in (self.train_config, self.deepconf_config):
            config_lib.read_yaml(path)  # a missing or broken file is an error before any run
        for overrides in (self.train, self.deepconf):
            config_lib.check_overrides(overrides)


def aggregate(summaries: list):
    """The per-seed summaries (same structure: one config) with each number replaced by its
    `spread` over seeds, keys in the first summary's order; a None (a figure a run could not
    define) stays None."""
    first = summaries[0]
    if isinstance(first, dict):
        return {key: aggregate([s[key] for s in summaries]) for key in first}
    return None if first is None else spread(summaries)


def run(script: str, config: str, overrides: list[str]) -> None:
    command = [sys.executable, str(EXPERIMENTS / script), "--config", config, *overrides]
    log.info("running %s", " ".join(command))
    done = subprocess.run(command, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{script} exited with status {done.returncode}: {' '.join(command)}")


def main(argv: list[str] | None = None) -> dict:
    cfg = config_lib.from_command_line(Config, argv, __doc__.splitlines()[0])
    out = results.open_run(cfg.out_dir, cfg)
    summaries, greedy = [], []
    for seed in cfg.seeds:
        model, dc = out / f"seed{seed}" / "model", out / f"seed{seed}" / "deepconf"
        run("train_arithmetic.py", cfg.train_config,
            [*cfg.train, f"out_dir={model}", f"seed={seed}"])
        run("deepconf.py", cfg.deepconf_config,
            [*cfg.deepconf, f"out_dir={dc}", f"model={model}",
             f"task.path={model / 'problems.jsonl'}", f"seed={seed}"])
        greedy.append(results.read_json(model / "train_metrics.json")["greedy_accuracy"])
        summaries.append(results.read_json(dc / "summary.json"))
    summary = {"seeds": list(cfg.seeds), "greedy_accuracy": spread(greedy),
               **aggregate(summaries)}
    results.write_json(out / "summary.json", summary)
    plots.accuracy_vs_tokens(summary, out / "accuracy_vs_tokens.png",
                  ylabel=f"accuracy (%), mean ± std over {len(cfg.seeds)} seeds")
    print(table(summary))
    return summary


def _cell(row: dict, scale: float = 100.0, digits: int = 1) -> str:
    return f"{scale * row['mean']:.{digits}f} ± {scale * row['std']:.{digits}f}"


def table(summary: dict) -> str:
    """Markdown tables: offline accuracy by method and K, online, AUROC (mean ± std over seeds)."""
    offline = summary["offline"]
    ks = list(offline)
    names = [name for name in offline[ks[0]] if name != "tokens"]
    greedy = summary["greedy_accuracy"]
    lines = [f"{len(summary['seeds'])} training seeds {summary['seeds']}; greedy accuracy "
             f"{_cell(greedy)}% (min {100 * greedy['min']:.1f}, max {100 * greedy['max']:.1f});"
             f" mean ± std over seeds", "",
             "| method | " + " | ".join(f"K = {k}" for k in ks) + " |",
             "|---" * (len(ks) + 1) + "|"]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(_cell(offline[k][name]) for k in ks) + " |")
    lines.append("| mean tokens per problem | " + " | ".join(
        _cell(offline[k]["tokens"], 1.0, 0) for k in ks) + " |")
    lines += ["", "| online | accuracy | tokens | traces launched | stopped | tokens saved "
              "| wall time saved |", "|---|---|---|---|---|---|---|"]
    for rule, row in summary["online"].items():
        saved = _cell(row["tokens_saved"]) if row["tokens_saved"] is not None else "-"
        lines.append(f"| {rule} | {_cell(row['accuracy'])} | {_cell(row['tokens'], 1.0, 0)} | "
                     f"{_cell(row['launched'], 1.0)} | {_cell(row['stopped'], 1.0)} | "
                     f"{saved} | {_cell(row['seconds_saved'])} |")
    lines += ["", "| AUROC (correct vs wrong traces) | within problems | pooled |",
              "|---|---|---|"]
    for name, row in sorted(summary["auroc"].items()):
        lines.append(f"| {name} | {_cell(row['within_problem'], 1.0, 2)} | "
                     f"{_cell(row['pooled'], 1.0, 2)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    cli.run(main)
