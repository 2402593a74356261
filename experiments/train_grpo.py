"""GRPO on the arithmetic model: the RL loop (`jaxlab.rl.loop`) on a task with an exact reward.

    python experiments/train_grpo.py --config configs/rl/arithmetic_cpu.yaml [key=value ...]

Starts from the model of experiments/train_arithmetic.py (trained first, with
configs/deepconf/train_cpu.yaml, when `model` does not exist), samples G solutions of fresh
4-term sums per prompt (or of a fixed pool of `problem_pool` problems), rewards an exact boxed
answer with 1 (+ `format_reward` for any boxed answer), and trains with GRPO. No prompt is ever
one of the model's held-out problems. Greedy accuracy is measured before and after, in the same
run, on the model's validation set (`validation.jsonl`: what settings are chosen on) and its test
set (`problems.jsonl`: what is reported). Writes config.yaml, log.txt, metrics.jsonl (one line
per step), summary.json, curves.png, checkpoints/ and policy/ (the trained policy as a
Hugging Face folder with its tokenizer); a rerun resumes.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import time

import jax
import numpy as np
from flax import nnx

from jaxlab import cli, jsonl, parallel, results
from jaxlab import config as config_lib
from jaxlab.deepconf import arithmetic, arithmetic_model
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


def prompt_fn(terms: int, pool: int = 0, seed: int = 0, held_out: frozenset[str] = frozenset()):
    """Problems drawn from the key, a function of (run key, step, round) only: fresh ones,
    or `count` of a fixed pool of `pool` problems (without replacement). A problem whose prompt
    is in `held_out` is never drawn (nor put in the pool)."""
    problems = None
    if pool:
        problems = [p for p in arithmetic.make_problems(pool + len(held_out), terms,
                                                        seed=20_000 + seed)
                    if p.prompt not in held_out][:pool]

    def draw(key: jax.Array, count: int) -> list[loop.Prompt]:
        rng = np.random.default_rng(np.asarray(jax.random.key_data(key)))
        if problems is None:
            chosen = arithmetic.draw_problems(rng, terms, count, exclude=held_out)
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
    x = [r["step"] for r in records]
    for ax, name in zip(axes, ("reward_mean", "accuracy", "response_length"), strict=True):
        ax.plot(x, [r[name] for r in records])
        ax.set_xlabel("step")
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
        model_cfg = config_lib.load_config(arithmetic_model.Config, cfg.model_config,
                                           [f"out_dir={model_dir}"])
        arithmetic_model.train(model_cfg, results.open_run(model_dir, model_cfg))
        results.open_run(cfg.out_dir, cfg)  # log to this run's folder again
    policy = hf.load_pretrained(model_dir, param_dtype="float32", compute_dtype=cfg.compute_dtype)
    missing = [name for name in arithmetic.HELD_OUT_FILES.values()
               if not (model_dir / name).exists()]
    config_lib.require(not missing, f"{model_dir} has no {' or '.join(missing)}: the held-out "
                                    f"sets that experiments/train_arithmetic.py writes (a model "
                                    f"trained before they were split into validation and test "
                                    f"must be trained again)")
    results.check_inputs(out, model=model_dir, **{split: model_dir / name for split, name
                                                  in arithmetic.HELD_OUT_FILES.items()})
    held_out = {split: load_problems(model_dir / name)
                for split, name in arithmetic.HELD_OUT_FILES.items()}
    summary = results.read_json(out / "summary.json", {})
    if "before" not in summary:
        summary = {"held_out": {split: len(p) for split, p in held_out.items()},
                   "before": accuracies(policy, held_out, cfg.loop.max_new_tokens)}
        results.write_json(out / "summary.json", summary)
    log.info("greedy accuracy before: %s", summary["before"])
    start = time.perf_counter()
    excluded = frozenset(p.prompt for split in held_out.values() for p in split)
    graphdef, state = loop.run(policy, prompt_fn(cfg.terms, cfg.problem_pool, cfg.seed, excluded),
                               reward_fn(cfg.format_reward),
                               cfg.loop, out, key=jax.random.key(cfg.seed), mesh=mesh)
    seconds = time.perf_counter() - start
    trained = nnx.merge(graphdef, jax.tree.map(parallel.host_array, state.params))
    hf.save_pretrained(trained, out / "policy", eos_token_id=eos,
                       pad_token_id=arithmetic.VOCAB.index(arithmetic.PAD))
    arithmetic.save_tokenizer(out / "policy")
    records = jsonl.resume_records(out / "metrics.jsonl")
    summary.update({
        "after": accuracies(trained, held_out, cfg.loop.max_new_tokens),
        "steps": cfg.loop.steps, "optimizer_steps": int(state.step),
        "seconds_this_run": seconds,
        "rollout_seconds": sum(r["rollout_seconds"] for r in records),
        "train_seconds": sum(r["train_seconds"] for r in records),
    })
    summary["test_error_reduction"] = error_reduction(summary["before"]["test"],
                                                      summary["after"]["test"])
    results.write_json(out / "summary.json", summary)
    plot(records, out / "curves.png")
    log.info("greedy accuracy on test %.3f -> %.3f (error reduced by %.0f%%), on validation "
             "%.3f -> %.3f, after %d steps; rollout %.0f s, train %.0f s",
             summary["before"]["test"], summary["after"]["test"],
             100 * summary["test_error_reduction"], summary["before"]["validation"],
             summary["after"]["validation"], cfg.loop.steps, summary["rollout_seconds"],
             summary["train_seconds"])
    return summary


def accuracies(model, held_out: dict[str, list], max_new_tokens: int) -> dict[str, float]:
    """Greedy accuracy of `model` on each held-out split."""
    return {split: arithmetic.greedy_accuracy(model, problems, max_new_tokens)
            for split, problems in held_out.items()}


def error_reduction(before: float, after: float) -> float:
    """1 - (1 - after) / (1 - before): the fraction of errors removed (negative: added)."""
    return 1 - (1 - after) / max(1e-9, 1 - before)


if __name__ == "__main__":
    cli.run(main)
