"""GRPO on the arithmetic model: the RL loop (`jaxlab.rl.loop`) on a task with an exact reward.

    python experiments/train_grpo.py --config configs/rl/arithmetic_cpu.yaml [key=value ...]

Starts from the model of experiments/train_arithmetic.py (trained first, with
configs/deepconf/train_cpu.yaml, when `model` does not exist), samples G solutions of fresh
4-term sums per prompt (or of a fixed pool of `problem_pool` problems), rewards an exact boxed
answer with 1 (+ `format_reward` for any boxed answer), and trains with GRPO. Greedy accuracy on
the model's 200 held-out problems is measured before and after, in the same run. Writes
config.yaml, log.txt, metrics.jsonl (one line per iteration), summary.json, curves.png and
checkpoints/; a rerun resumes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import sys
import time

import jax
import numpy as np
from flax import nnx

from jaxlab import config as config_lib
from jaxlab import parallel, results
from jaxlab.deepconf import arithmetic
from jaxlab.deepconf.problems import load_problems
from jaxlab.models import hf
from jaxlab.rl import loop

log = logging.getLogger("jaxlab")


@dataclasses.dataclass(frozen=True)
class Config:
    out_dir: str = "results/grpo_arithmetic"
    model: str = "results/arithmetic_model"  # a train_arithmetic.py folder (trained if absent)
    model_config: str = "configs/deepconf/train_cpu.yaml"  # how to train it when absent
    compute_dtype: str = "float32"  # activations (master weights are float32)
    terms: int = 4
    format_reward: float = 0.1      # added for any boxed answer, right or wrong
    problem_pool: int = 0           # draw prompts from a fixed set of this many (0: fresh ones)
    seed: int = 0
    # devices (CPU: one per core), with several processes as many from each: mesh.data=8 for
    # data parallelism; mesh.fsdp=8 splits the parameters and optimizer state (large models)
    mesh: parallel.MeshConfig = dataclasses.field(default_factory=parallel.MeshConfig)
    loop: loop.LoopConfig = dataclasses.field(default_factory=loop.LoopConfig)

    def __post_init__(self):
        config_lib.require_positive_ints(self, "terms")
        config_lib.require(self.problem_pool >= 0,
                           f"problem_pool must be >= 0, got {self.problem_pool}")
        config_lib.require(self.format_reward >= 0,
                           f"format_reward must be >= 0, got {self.format_reward}")


def prompt_fn(terms: int, pool: int = 0, seed: int = 0):
    """Problems drawn from the key, a function of (run key, iteration, round) only: fresh ones,
    or `count` of a fixed pool of `pool` problems (without replacement)."""
    problems = arithmetic.make_problems(pool, terms, seed=20_000 + seed) if pool else None

    def draw(key: jax.Array, count: int) -> list[loop.Prompt]:
        rng = np.random.default_rng(np.asarray(jax.random.key_data(key)))
        if problems is None:
            chosen = [arithmetic.make_problem(rng, terms, i) for i in range(count)]
        else:
            config_lib.require(count <= pool, f"problem_pool={pool} is smaller than "
                                              f"loop.prompts={count}")
            chosen = [problems[i] for i in rng.permutation(pool)[:count]]
        return [loop.Prompt(tuple(arithmetic.encode(p.prompt)), p.answer) for p in chosen]
    return draw


def reward_fn(format_reward: float) -> loop.RewardFn:
    """1 for the exact answer, + format_reward for a boxed answer; accuracy logged apart."""
    def score(prompt: loop.Prompt, response: list[int], truncated: bool) -> dict[str, float]:
        correct, formatted = arithmetic.grade(arithmetic.decode(response), prompt.data)
        return {"reward": correct + format_reward * formatted, "accuracy": float(correct),
                "truncated": float(truncated)}
    return loop.per_response(score)


def plot(records: list[dict], path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    x = [r["iteration"] for r in records]
    for ax, name in zip(axes, ("reward_mean", "accuracy", "response_length"), strict=True):
        ax.plot(x, [r[name] for r in records])
        ax.set_xlabel("iteration")
        ax.set_title(name)
    fig.tight_layout()
    results.save_figure(fig, path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parallel.cpu_cores_as_devices()  # on a CPU host, the mesh's devices are cores
    results.join_processes()  # before JAX touches a backend
    cfg = config_lib.from_command_line(Config, argv, __doc__.splitlines()[0])
    mesh = cfg.mesh.build()  # before any work: an error if the devices are not there
    eos = arithmetic.VOCAB.index(arithmetic.EOS)
    config_lib.require(cfg.loop.stop_ids == (eos,), f"loop.stop_ids must be [{eos}] (EOS)")
    out = results.open_run(cfg.out_dir, cfg)
    model_dir = pathlib.Path(cfg.model)
    if not (model_dir / "config.json").exists():
        log.info("no model at %s: training it with %s", model_dir, cfg.model_config)
        sys.path.insert(0, str(pathlib.Path(__file__).parent))
        import train_arithmetic
        train_arithmetic.main(["--config", cfg.model_config, f"out_dir={model_dir}"])
        results.open_run(cfg.out_dir, cfg)  # log to this run's folder again
    policy = hf.load_pretrained(model_dir, dtype="float32", activation_dtype=cfg.compute_dtype)
    held_out = load_problems(model_dir / "problems.jsonl")
    budget = cfg.loop.max_new_tokens
    summary = results.read_json(out / "summary.json", {})
    if "accuracy_before" not in summary:
        summary = {"accuracy_before": arithmetic.greedy_accuracy(policy, held_out, budget),
                   "held_out": len(held_out)}
        results.write_json(out / "summary.json", summary)
    log.info("greedy accuracy before: %.3f on %d held-out problems", summary["accuracy_before"],
             len(held_out))
    start = time.perf_counter()
    graphdef, state = loop.run(policy, prompt_fn(cfg.terms, cfg.problem_pool, cfg.seed),
                               reward_fn(cfg.format_reward),
                               cfg.loop, out, key=jax.random.key(cfg.seed), mesh=mesh)
    seconds = time.perf_counter() - start
    trained = nnx.merge(graphdef, jax.tree.map(parallel.host_array, state.params))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary.update({
        "accuracy_after": arithmetic.greedy_accuracy(trained, held_out, budget),
        "iterations": cfg.loop.iterations, "optimizer_steps": int(state.step),
        "seconds_this_run": seconds,
        "rollout_seconds": sum(r["rollout_seconds"] for r in records),
        "train_seconds": sum(r["train_seconds"] for r in records),
    })
    summary["error_reduction"] = 1 - (1 - summary["accuracy_after"]) / max(
        1e-9, 1 - summary["accuracy_before"])
    results.write_json(out / "summary.json", summary)
    plot(records, out / "curves.png")
    log.info("greedy accuracy %.3f -> %.3f (error reduced by %.0f%%) after %d iterations; rollout "
             "%.0f s, train %.0f s", summary["accuracy_before"], summary["accuracy_after"],
             100 * summary["error_reduction"], cfg.loop.iterations, summary["rollout_seconds"],
             summary["train_seconds"])
    return summary


if __name__ == "__main__":
    main()
