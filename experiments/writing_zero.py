"""Writing-Zero's two claims in the small writing world: every stage for every seed, one summary.

    python experiments/writing_zero.py --config configs/writing_zero/small.yaml \
        [out_dir=DIR] [seeds=N]

Claim 1: a pairwise GenRM judges better than a scalar reward model. Claim 2: BRPO against that
GenRM trains a better writer than ScalarRM-GRPO, without its reward hacking. Per seed s (folder
out_dir/seed_<s>), each stage is its script run as a process of its own, with its section of
this config, seed s and the folders of the stages before it; a rerun resumes every stage:

  world       experiments/writing_world.py        rater pairs, true-quality pairs, the initial
                                                  writer, the teacher's traces of fresh pairs
  rm          experiments/train_reward_model.py   the scalar RM on the rater's labels
  rm_teacher  experiments/train_reward_model.py   the same on the teacher's labels of the
                                                  GenRM's pairs (section `rm`)
  genrm       experiments/train_genrm.py          cold start on the teacher's traces, GRPO with
                                                  the consistency reward on unseen pairs
  writer      experiments/train_writer.py         five writers from the initial one: BRPO with
                                                  the GenRM and with the teacher, GRPO on the
                                                  scalar RM, the ideal rater-RM and the true
                                                  quality

Every stage config is checked (`--check`) before anything runs. Writes config.yaml, log.txt,
summary.json, tables.md (`tables`: the headline figures as mean +- std over seeds) and
curves.png:

  seeds
  baselines   {random, always_longer, always_shorter, teacher, teacher_without_position_bias}:
              both-orders accuracy on each seed's true-quality pairs (`judging.baselines`);
              ideal_rater_rm: single-comparison accuracy
  genrm       {both_orders_accuracy, per_order_accuracy ([first, second] per seed),
              soft_accuracy, first_position, criteria_accuracy (mean over criteria and
              positions)} after GRPO, and `cold_start`, the same before it
  scalar_rm   {true_pair_accuracy, rater_accuracy} (held-out rater labels); teacher_rm the same
  bayes_rater_accuracy   the ideal rater-RM's accuracy on the held-out rater labels: the best
              any reward model of those labels can reach (`judging.ideal_rater_accuracy`)
  writers     {start, brpo_genrm, brpo_teacher, grpo_scalar_rm, grpo_ideal_rm, grpo_true}:
              {quality, words, redundant_words, distinct_bigrams, kl} on the evaluation prompts
              at the end of training
  matched_kl  each writer's rollout quality where its training KL (the loop's per-token k3)
              first reaches the smallest final KL of the five (`quality_at_kl`)
  spread      every list above as `results.spread` (mean, sample std, min, max)

Lists hold one value per seed. curves.png: per method, the mean over seeds and the min-max band
of each logged measure over steps.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import subprocess
import sys
import time
from typing import Any

import numpy as np
import yaml

from jaxlab import cli, jsonl, results
from jaxlab import config as config_lib
from jaxlab.rl import reward_model
from jaxlab.writing import judging, teacher, world

log = logging.getLogger("jaxlab")

HERE = pathlib.Path(__file__).resolve().parent
STAGES = ("world", "rm", "rm_teacher", "genrm", "writer")
SCRIPTS = {"world": "writing_world.py", "rm": "train_reward_model.py",
           "rm_teacher": "train_reward_model.py", "genrm": "train_genrm.py",
           "writer": "train_writer.py"}
WRITERS = ("brpo_genrm", "brpo_teacher", "grpo_scalar_rm", "grpo_ideal_rm", "grpo_true")
WRITER_MEASURES = ("quality", "words", "redundant_words", "distinct_bigrams", "kl")


@dataclasses.dataclass(frozen=True)
class Config:
    out_dir: str = "results/writing_zero/small"
    seeds: int = 3                  # seeds 0 .. seeds - 1; more seeds extend a finished run
    # each stage's settings (its script's config, less out_dir, seed and the upstream paths)
    world: dict[str, Any] = dataclasses.field(default_factory=dict)
    rm: dict[str, Any] = dataclasses.field(default_factory=dict)
    genrm: dict[str, Any] = dataclasses.field(default_factory=dict)
    writer: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        config_lib.require_positive_ints(self, "seeds")


def stage_config(cfg: Config, stage: str, seed: int, folder: pathlib.Path) -> dict:
    """The stage's config for `seed`: its section, the seed, its folder and its inputs (the
    GenRM's teacher and the writer's task are the world's)."""
    world_dir = folder / "world"
    section = dict(cfg.rm if stage == "rm_teacher" else getattr(cfg, stage))
    paths = {
        "world": {},
        "rm": {"backbone": world_dir / "writer", "pairs": world_dir / "preferences.jsonl"},
        "rm_teacher": {"backbone": world_dir / "writer",
                       "pairs": world_dir / "teacher_labels.jsonl"},
        "genrm": {"model": world_dir / "genrm_init", "traces": world_dir / "judge_traces.jsonl",
                  "rl_pairs": world_dir / "rl_pairs.jsonl",
                  "eval_pairs": world_dir / "true_pairs.jsonl",
                  "teacher": cfg.world.get("teacher", {})},
        "writer": {"writer": world_dir / "writer", "genrm": folder / "genrm" / "genrm",
                   "rm": folder / "rm" / "rm", "methods": list(WRITERS),
                   "task": cfg.world.get("task", {})},
    }[stage]
    if stage.startswith("rm"):
        paths["eval"] = {"heldout": world_dir / "preferences_heldout.jsonl",
                         "true_quality": world_dir / "true_pairs.jsonl"}
    section.update({k: v if isinstance(v, list | dict) else str(v) for k, v in paths.items()},
                   out_dir=str(folder / stage), seed=seed)
    return json.loads(json.dumps(section, default=str))   # paths as text


def run_stage(stage: str, config_path: pathlib.Path, check: bool = False) -> None:
    """The stage's script on `config_path` in a process of its own; an error names the stage."""
    command = [sys.executable, str(HERE / SCRIPTS[stage]), "--config", str(config_path)]
    done = subprocess.run(command + (["--check"] if check else []),
                          capture_output=check, text=True)
    if done.returncode:
        detail = (done.stderr or "").strip().splitlines()[-1:] if check else []
        raise RuntimeError(f"stage {stage} ({' '.join(command)}) failed with exit status "
                           f"{done.returncode}{': ' + detail[0] if detail else ''}")


def write_stage_configs(cfg: Config, seed: int, folder: pathlib.Path) -> dict[str, pathlib.Path]:
    paths = {}
    for stage in STAGES:
        paths[stage] = folder / f"{stage}.yaml"
        results.write_text(paths[stage], yaml.safe_dump(stage_config(cfg, stage, seed, folder),
                                                        sort_keys=False))
    return paths


def metrics(path: pathlib.Path) -> list[dict]:
    """A stage's metrics.jsonl records (a bad line is an error naming file:line)."""
    return jsonl.resume_records(path)


def smooth(values: np.ndarray, width: int = 5) -> np.ndarray:
    """Trailing mean over `width` steps (fewer at the start)."""
    cumulative = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    low = np.maximum(idx - width, 0)
    return (cumulative[idx] - cumulative[low]) / (idx - low)


def quality_at_kl(records: dict[str, list[dict]], width: int = 5) -> dict[str, dict]:
    """Per method, the rollout quality (trailing mean over `width` steps) at the first
    step where its trailing-mean training KL reaches the smallest final one among the
    methods: the methods compared at the same distance from the initial writer."""
    kl = {m: smooth(np.asarray([r["kl"] for r in rows]), width) for m, rows in records.items()}
    level = min(float(k[-1]) for k in kl.values())
    out = {}
    for method, rows in records.items():
        at = int(np.argmax(kl[method] >= level))
        quality = smooth(np.asarray([r["quality"] for r in rows]), width)
        out[method] = {"kl": level, "step": rows[at]["step"],
                       "quality": float(quality[at])}
    return out


def seed_summary(cfg: Config, folder: pathlib.Path, seed: int) -> dict:
    """One seed's figures from its stages' summaries."""
    world_config = config_lib.from_mapping(world.WorldConfig, cfg.world.get("task", {}),
                                           "world.task")
    teacher_config = config_lib.from_mapping(teacher.Teacher, cfg.world.get("teacher", {}),
                                             "world.teacher")
    true_pairs = reward_model.read_pairs(folder / "world" / "true_pairs.jsonl")
    genrm = results.read_json(folder / "genrm" / "summary.json")
    rms = {name: results.read_json(folder / name / "summary.json")
           for name in ("rm", "rm_teacher")}
    writer = results.read_json(folder / "writer" / "summary.json")

    def judge(report: dict) -> dict:
        return {"both_orders_accuracy": report["accuracy_both"],
                "per_order_accuracy": [report["accuracy_first"], report["accuracy_second"]],
                "soft_accuracy": report["accuracy_soft"],
                "first_position": report["first_position"],
                "criteria_accuracy": float(np.mean([c["mean"] for c in
                                                    report["criteria"].values()]))}

    return {
        "baselines": judging.baselines(true_pairs, world_config, teacher_config, seed),
        "genrm": judge(genrm["after_grpo"]), "genrm_cold_start": judge(genrm["cold_start"]),
        **{name: {"true_pair_accuracy": s["accuracy_true_quality"],
                  "rater_accuracy": s["accuracy_heldout"]}
           for name, s in (("scalar_rm", rms["rm"]), ("teacher_rm", rms["rm_teacher"]))},
        "bayes_rater_accuracy": judging.ideal_rater_accuracy(
            reward_model.read_pairs(folder / "world" / "preferences_heldout.jsonl"),
            world_config),
        "writers": {m: {k: writer[m]["end"][k] if m != "start" else writer["start"][k]
                        for k in WRITER_MEASURES} for m in ("start", *WRITERS)},
        "matched_kl": quality_at_kl({m: metrics(folder / "writer" / m / "metrics.jsonl")
                                     for m in WRITERS}),
    }


def gather(per_seed: list[dict]) -> dict:
    """Per-seed dicts -> one dict of the same shape with a list (one value per seed) at each
    leaf."""
    first = per_seed[0]
    if isinstance(first, dict):
        return {k: gather([s[k] for s in per_seed]) for k in first}
    return list(per_seed)


def spreads(tree: Any) -> Any:
    """`results.spread` of every list of numbers in `tree`."""
    if isinstance(tree, dict):
        return {k: spreads(v) for k, v in tree.items()}
    if tree and isinstance(tree[0], list):   # [first, second] per seed
        return [results.spread([x[i] for x in tree]) for i in range(len(tree[0]))]
    return results.spread(tree)


def tables(spread: dict) -> str:
    """The headline figures as two Markdown tables, mean +- sample std over seeds: the judges'
    accuracy on the true-quality pairs, and the writers at the end of training."""
    def cell(s: dict, scale: float = 1.0, digits: int = 1) -> str:
        return f"{scale * s['mean']:.{digits}f} ± {scale * s['std']:.{digits}f}"

    judges = [(f"baseline: {name}", spread["baselines"][name]) for name in spread["baselines"]]
    judges += [("scalar RM (rater labels), one comparison", spread["scalar_rm"]
                ["true_pair_accuracy"]),
               ("scalar RM (teacher labels), one comparison", spread["teacher_rm"]
                ["true_pair_accuracy"]),
               ("GenRM cold start, both orders", spread["genrm_cold_start"]
                ["both_orders_accuracy"]),
               ("GenRM after GRPO, both orders", spread["genrm"]["both_orders_accuracy"])]
    lines = ["| judge | accuracy on the true-quality pairs (%) |", "|---|---|"]
    lines += [f"| {name} | {cell(s, 100)} |" for name, s in judges]
    lines += ["", "| writer | " + " | ".join(WRITER_MEASURES) + " | quality at matched KL |",
              "|---|" + "---|" * (len(WRITER_MEASURES) + 1)]
    for method, figures in spread["writers"].items():
        matched = spread["matched_kl"].get(method, {}).get("quality")
        lines.append(f"| {method} | " + " | ".join(cell(figures[k], digits=3 if k in (
            "distinct_bigrams", "kl") else 2) for k in WRITER_MEASURES)
            + f" | {cell(matched, digits=2) if matched else ''} |")
    return "\n".join(lines) + "\n"


def plot(cfg: Config, out: pathlib.Path, seeds: list[int]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(WRITER_MEASURES), figsize=(4 * len(WRITER_MEASURES), 3.5))
    for method in WRITERS:
        runs = [metrics(out / f"seed_{s}" / "writer" / method / "metrics.jsonl") for s in seeds]
        length = min(len(r) for r in runs)
        for ax, name in zip(axes, WRITER_MEASURES, strict=True):
            values = np.asarray([[row[name] for row in r[:length]] for r in runs])
            x = np.arange(length)
            line, = ax.plot(x, values.mean(0), label=method)
            ax.fill_between(x, values.min(0), values.max(0), color=line.get_color(), alpha=0.2)
            ax.set_title(name)
            ax.set_xlabel("step")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"writers over {len(seeds)} seeds: mean and min-max")
    fig.tight_layout()
    results.save_figure(fig, out / "curves.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    cfg = config_lib.from_command_line(Config, argv, __doc__.splitlines()[0])
    out = results.open_run(cfg.out_dir, cfg, may_change=("seeds",))
    seeds = list(range(cfg.seeds))
    for stage, path in write_stage_configs(cfg, 0, out / "seed_0").items():
        run_stage(stage, path, check=True)          # every section checked before any work
    for seed in seeds:
        folder = out / f"seed_{seed}"
        for stage, path in write_stage_configs(cfg, seed, folder).items():
            done = path.with_suffix(".done")         # the config the stage finished with
            if done.exists() and done.read_text() == path.read_text():
                continue
            start = time.perf_counter()
            log.info("seed %d: stage %s", seed, stage)
            run_stage(stage, path)
            seconds = time.perf_counter() - start
            results.write_text(done, path.read_text())
            log.info("seed %d: stage %s took %.0f s", seed, stage, seconds)
    per_seed = [seed_summary(cfg, out / f"seed_{s}", s) for s in seeds]
    summary = {"seeds": seeds, **gather(per_seed)}
    summary["spread"] = spreads({k: v for k, v in summary.items() if k != "seeds"})
    results.write_json(out / "summary.json", summary)
    results.write_text(out / "tables.md", tables(summary["spread"]))
    log.info("over seeds %s:\n%s", seeds, tables(summary["spread"]))
    plot(cfg, out, seeds)
    log.info("wrote %s", out / "summary.json")
    return summary


if __name__ == "__main__":
    cli.run(main)
