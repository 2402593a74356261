"""GRPO on a task with a checked answer: the RL loop (`jaxlab.rl.loop`) on your checkpoint and
your problems, or on the built-in arithmetic task.

    python experiments/train_grpo.py --config configs/rl/math_cpu.yaml model=DIR task.path=FILE
    python experiments/train_grpo.py --config configs/rl/arithmetic_cpu.yaml [key=value ...]

`task` (`jaxlab.tasks.TaskConfig`) says what is trained on. kind=math: the problems of a JSON
Lines, parquet or `datasets` file, through the chat template of `model`'s tokenizer (any Qwen3,
Qwen2 or Llama folder that `hf.load_pretrained` reads), rewarded by math-verify's verdict on the
response's answer plus any other weighted reward (`task.rewards`); a share of the file (or a
second file) is held out. kind=arithmetic: fresh 4-term sums for the model of
experiments/train_arithmetic.py (trained first, with `model_config`, when `model` does not
exist), held out: the model's validation and test sets.

Before and after training the held-out problems are evaluated in the same run (`tasks.evaluate`:
greedy accuracy, and pass@1 and majority@k of `eval_samples` responses at the rollout
temperature). Writes config.yaml, log.txt, metrics.jsonl (one line per step), summary.json
({"before": {split: figures}, "after": ...}), curves.png, checkpoints/ and policy/ (the policy
as a Hugging Face folder with its tokenizer and generation_config.json, written at each
checkpoint and at the end); a rerun resumes.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import time
from typing import ClassVar

import jax
import numpy as np
from flax import nnx

from jaxlab import cli, jsonl, parallel, results, tasks
from jaxlab import config as config_lib
from jaxlab.deepconf import arithmetic, arithmetic_model
from jaxlab.deepconf.problems import load_problems
from jaxlab.models import hf
from jaxlab.rl import loop, scaffold

log = logging.getLogger("jaxlab")

ARITHMETIC = tasks.TaskConfig(kind="arithmetic", rewards={"accuracy": 1.0, "format": 0.1})


@dataclasses.dataclass(frozen=True)
class Config:
    out_dir: str = "results/grpo_arithmetic"
    model: str = "results/arithmetic_model"  # a Hugging Face folder with its tokenizer (the
    #                                          arithmetic task: a train_arithmetic.py folder,
    #                                          trained when absent)
    model_config: str = "configs/deepconf/train_cpu.yaml"  # arithmetic: how to train it
    compute_dtype: str = "float32"  # activations (master weights are float32)
    seed: int = 0
    eval_samples: int = 8           # responses per held-out problem for pass@1 and
    #                                 majority@k at the rollout temperature (0: greedy only)
    eval_batch: int = 64            # held-out problems sampled at once (x eval_samples slots)
    task: tasks.TaskConfig = dataclasses.field(default_factory=lambda: ARITHMETIC)
    # devices (CPU: one per core), with several processes as many from each: mesh.data=8 for
    # data parallelism; mesh.fsdp=8 splits the parameters and optimizer state (large models)
    mesh: parallel.MeshConfig = dataclasses.field(default_factory=parallel.MeshConfig)
    loop: loop.LoopConfig = dataclasses.field(default_factory=loop.LoopConfig)

    RENAMED: ClassVar[dict[str, str]] = {"terms": "task.terms", "problem_pool":
                                         "task.problem_pool",
                                         "format_reward": "task.rewards.format"}

    def __post_init__(self):
        config_lib.dtype_name(self.compute_dtype, "compute_dtype")
        config_lib.require(self.eval_samples >= 0,
                           f"eval_samples must be >= 0, got {self.eval_samples}")
        config_lib.require_positive_ints(self, "eval_batch")
        if self.task.kind == "arithmetic":
            eos = arithmetic.VOCAB.index(arithmetic.EOS)
            config_lib.require(self.loop.stop_ids in ((), (eos,)),
                               f"loop.stop_ids must be [{eos}] (EOS) for the arithmetic task")


def arithmetic_prompts(terms: int, pool: int = 0, seed: int = 0,
                       held_out: frozenset[str] = frozenset()) -> loop.PromptFn:
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
            config_lib.require(count <= pool, f"task.problem_pool={pool} is smaller than "
                                              f"loop.prompts={count}")
            chosen = [problems[i] for i in rng.permutation(pool)[:count]]
        return [loop.Prompt(tuple(arithmetic.encode(p.prompt)), p.answer) for p in chosen]
    return draw


def file_prompts(problems: list[tasks.Problem], ids: list[list[int]]) -> loop.PromptFn:
    """`count` of the training problems, drawn without replacement from the key (a function of
    run key, step and round only), each with its reference answer as the reward's data."""
    def draw(key: jax.Array, count: int) -> list[loop.Prompt]:
        config_lib.require(count <= len(problems), f"loop.prompts={count} is more than the "
                                                   f"{len(problems)} training problems")
        rng = np.random.default_rng(np.asarray(jax.random.key_data(key)))
        return [loop.Prompt(tuple(ids[i]), problems[i].answer)
                for i in rng.permutation(len(problems))[:count]]
    return draw


@dataclasses.dataclass
class Task:
    """What a run trains and evaluates on, read once: the checkpoint, how its text is decoded,
    the training prompts, and the held-out splits (each [(prompt ids, reference)])."""

    model: pathlib.Path
    prompt_fn: loop.PromptFn
    decode: object
    stop_ids: tuple[int, ...]
    held_out: dict[str, tuple[list[list[int]], list[str]]]
    inputs: dict[str, pathlib.Path]
    tokenizer: object


def arithmetic_task(cfg: Config) -> Task:
    model_dir = pathlib.Path(cfg.model)
    if not (model_dir / "config.json").exists():
        log.info("no model at %s: training it with %s", model_dir, cfg.model_config)
        model_cfg = config_lib.load_config(arithmetic_model.Config, cfg.model_config,
                                           [f"out_dir={model_dir}"])
        arithmetic_model.train(model_cfg, results.open_run(model_dir, model_cfg))
        results.open_run(cfg.out_dir, cfg)  # log to this run's folder again
    missing = [name for name in arithmetic.HELD_OUT_FILES.values()
               if not (model_dir / name).exists()]
    config_lib.require(not missing, f"{model_dir} has no {' or '.join(missing)}: the held-out "
                                    f"sets that experiments/train_arithmetic.py writes (a model "
                                    f"trained before they were split into validation and test "
                                    f"must be trained again)")
    held_out = {split: load_problems(model_dir / name)
                for split, name in arithmetic.HELD_OUT_FILES.items()}
    excluded = frozenset(p.prompt for split in held_out.values() for p in split)
    return Task(
        model=model_dir,
        prompt_fn=arithmetic_prompts(cfg.task.terms, cfg.task.problem_pool, cfg.seed, excluded),
        decode=arithmetic.decode, stop_ids=(arithmetic.VOCAB.index(arithmetic.EOS),),
        held_out={split: ([arithmetic.encode(p.prompt) for p in problems],
                          [p.answer for p in problems]) for split, problems in held_out.items()},
        inputs={"model": model_dir, **{split: model_dir / name for split, name
                                       in arithmetic.HELD_OUT_FILES.items()}},
        tokenizer=arithmetic.char_tokenizer())


def math_task(cfg: Config) -> Task:
    """The checkpoint's tokenizer and the task's problems, read and checked before the run's
    folder is opened: a bad file or setting leaves no folder behind to refuse the corrected
    command."""
    task = cfg.task
    config_lib.require(bool(cfg.model), "model is empty: give model=DIR, a Hugging Face folder "
                                        "with its tokenizer")
    tokenizer = hf.load_tokenizer(cfg.model)
    splits = tasks.load_splits(task)
    config_lib.require(bool(splits.train), f"{task.path}: no training problems are left once "
                                           f"{len(splits.held_out)} are held out (lower "
                                           f"task.eval_fraction, or give task.eval_path)")
    width = cfg.loop.max_prompt_tokens
    train, train_ids = tasks.fit_prompts(splits.train, tasks.encode_prompts(task, tokenizer,
                                                                            splits.train),
                                         width, task.long_prompts)
    held, held_ids = tasks.fit_prompts(splits.held_out, tasks.encode_prompts(
        task, tokenizer, splits.held_out), width, task.long_prompts)
    config_lib.require(cfg.loop.prompts <= len(train),
                       f"loop.prompts={cfg.loop.prompts} is more than the {len(train)} training "
                       f"problems of {task.path}")
    log.info("%d training problems from %s, %d held out (%s)", len(train), task.path, len(held),
             task.eval_path or f"{task.eval_fraction:.0%} of it")

    def decode(ids) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    return Task(
        model=pathlib.Path(cfg.model),
        prompt_fn=file_prompts(train, train_ids), decode=decode,
        stop_ids=cfg.loop.stop_ids or tasks.stop_ids(cfg.model, tokenizer, "loop.stop_ids"),
        held_out={"held_out": (held_ids, [p.answer for p in held])},
        inputs={"model": pathlib.Path(cfg.model), "task": pathlib.Path(task.path),
                **({"eval": pathlib.Path(task.eval_path)} if task.eval_path else {})},
        tokenizer=tokenizer)


def plot(records: list[dict], summary: dict, path: pathlib.Path) -> None:
    """The training curves (reward, each reward function, response length per step) and the
    held-out figures before and after, one bar pair per split and figure."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in ("reward_mean", "accuracy", "format", "response_length")
             if n in records[0]]
    fig, axes = plt.subplots(1, len(names) + 1, figsize=(4.3 * (len(names) + 1), 3.5))
    x = [r["step"] for r in records]
    for ax, name in zip(axes[:-1], names, strict=True):
        ax.plot(x, [r[name] for r in records])
        ax.set_xlabel("step")
        ax.set_title(name)
    bars = [(f"{split}\n{name}", summary["before"][split][name], figures[name])
            for split, figures in summary["after"].items() for name in figures]
    ax, at = axes[-1], np.arange(len(bars))
    ax.bar(at - 0.2, [b for _, b, _ in bars], 0.4, label="before")
    ax.bar(at + 0.2, [a for _, _, a in bars], 0.4, label="after")
    ax.set_xticks(at, [label for label, _, _ in bars], fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_title("held out")
    ax.legend(fontsize=7)
    fig.tight_layout()
    results.save_figure(fig, path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parallel.cpu_cores_as_devices()  # on a CPU host, the mesh's devices are cores
    results.join_processes()  # before JAX touches a backend
    cfg = config_lib.from_command_line(Config, argv, __doc__.splitlines()[0])
    mesh = cfg.mesh.build()  # before any work: an error if the devices are not there
    if cfg.task.kind == "arithmetic":  # (it may train the model, logging to the run's folder)
        out = results.open_run(cfg.out_dir, cfg)
        task = arithmetic_task(cfg)
    else:
        task = math_task(cfg)
        out = results.open_run(cfg.out_dir, cfg)
    results.check_inputs(out, **task.inputs)
    summary = results.read_json(out / "summary.json", {})
    if "after" in summary:
        log.info("%s holds a finished run: held out, before %s, after %s", out,
                 summary["before"], summary["after"])
        return summary
    policy = hf.load_pretrained(task.model, param_dtype="float32",
                                compute_dtype=cfg.compute_dtype)
    loop_config = dataclasses.replace(cfg.loop, stop_ids=task.stop_ids)
    grader = tasks.GRADERS[cfg.task.kind]
    key = jax.random.key(cfg.seed)

    def evaluate(model) -> dict[str, dict[str, float]]:
        return {split: tasks.evaluate(
            model, ids, references, grader, task.decode, key=jax.random.fold_in(key, 1),
            stop_ids=task.stop_ids, max_new_tokens=cfg.loop.max_new_tokens,
            temperature=cfg.loop.temperature, samples=cfg.eval_samples, top_p=cfg.loop.top_p,
            top_k=cfg.loop.top_k, batch=cfg.eval_batch)
            for split, (ids, references) in task.held_out.items()}

    if "before" not in summary:
        summary = {"held_out": {split: len(ids) for split, (ids, _) in task.held_out.items()},
                   "before": evaluate(policy)}
        results.write_json(out / "summary.json", summary)
    log.info("held out, before: %s", summary["before"])
    start = time.perf_counter()
    eos = task.stop_ids[0] if len(task.stop_ids) == 1 else list(task.stop_ids)
    export = scaffold.export_policy(
        policy, out / "policy", task.tokenizer, eos_token_id=eos,
        pad_token_id=task.tokenizer.pad_token_id,
        **hf.generation_fields(cfg.loop.temperature, cfg.loop.top_k, cfg.loop.top_p))
    graphdef, state = loop.run(policy, task.prompt_fn,
                               tasks.task_rewards(cfg.task, task.decode), loop_config, out,
                               key=key, mesh=mesh, on_save=export)
    seconds = time.perf_counter() - start
    del policy  # its memory is free for the evaluation (the export keeps only its graph)
    params, optimizer_steps = jax.tree.map(parallel.host_array, state.params), int(state.step)
    del state  # the optimizer state's memory is free for the evaluation, on this process's
    #            first device (the parameters may have spanned several processes' devices)
    trained = nnx.merge(graphdef, jax.device_put(params, jax.local_devices()[0]))
    records = jsonl.resume_records(out / "metrics.jsonl")
    summary.update({
        "after": evaluate(trained),
        "steps": cfg.loop.steps, "optimizer_steps": optimizer_steps,
        "seconds_this_run": seconds,
        "rollout_seconds": sum(r["rollout_seconds"] for r in records),
        "train_seconds": sum(r["train_seconds"] for r in records),
    })
    summary["greedy_error_reduction"] = {
        split: error_reduction(summary["before"][split]["greedy"],
                               summary["after"][split]["greedy"]) for split in task.held_out}
    results.write_json(out / "summary.json", summary)
    plot(records, summary, out / "curves.png")
    for split in task.held_out:
        log.info("%s: %s -> %s (greedy error reduced by %.0f%%)", split,
                 summary["before"][split], summary["after"][split],
                 100 * summary["greedy_error_reduction"][split])
    log.info("%d steps; rollout %.0f s, train %.0f s", cfg.loop.steps,
             summary["rollout_seconds"], summary["train_seconds"])
    return summary


def error_reduction(before: float, after: float) -> float:
    """1 - (1 - after) / (1 - before): the fraction of errors removed (negative: added)."""
    return 1 - (1 - after) / max(1e-9, 1 - before)


if __name__ == "__main__":
    cli.run(main)
