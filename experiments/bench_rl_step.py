"""RL run speed: a GRPO run (rollouts + updates) of our loop (`jaxlab.rl.loop.run`) against TRL's
`GRPOTrainer` (PyTorch, transformers `generate`, no vLLM) on the same model, prompts, group size,
lengths, loss and optimizer, in one run of this script.

    python experiments/bench_rl_step.py [--size cpu|gpu] [--steps N] [--torch-threads N ..]

cpu: the arithmetic model (`results/arithmetic_model`, a Qwen3-architecture folder with its
tokenizer, from experiments/train_arithmetic.py), float32. gpu: the Qwen3-0.6B shape (random
weights, the arithmetic tokenizer: rewards are mostly 0, which costs the same), float32 master
weights with bfloat16 compute. Both sides: 16 arithmetic problems per step (the same
problems in the same order, `arithmetic.make_problems`), G = 8 samples each at temperature 1
(no top-k/top-p), at most 56 new tokens, stop at EOS; reward 1 for the exact boxed answer
(`arithmetic.grade`); GRPO advantages; one optimizer step over all 16 x 8 completions with the
token-mean PPO-clip loss (epsilon 0.2, no KL: TRL's loss_type="dapo" divides by the active
tokens of the whole generation batch, which with one step per generation is our token_mean),
global-norm clipping at 1, AdamW at a constant learning rate. On a CPU, TRL runs once with one
PyTorch thread per core and once with one thread; the faster is the baseline.

Differences that remain: TRL divides advantages by the sample std + 1e-4, we by the population
std + 1e-6 (a scale of the loss, not of its cost); our rollout pads prompts to 24 tokens and
decodes up to 56 in one compiled loop, and the update takes the batch's prompt and response
widths rounded up to multiples of 16 (`rollout.bucket`: each new pair of widths compiles another
step), where TRL pads to the longest. With the KL weight 0 neither side computes reference
log-probs.

Timed, on both sides (the statistic a user lives first):
- run: the wall time of the whole run of `--steps` steps (default 50), from loading the
  model to the end of the last update, compilation and warm-up included, response lengths as they
  come (ours compiles a new step for each new response width);
- steady state: the median seconds per step over the second half of the run;
- rollout tokens/s: generated tokens over the seconds spent in rollouts, over the whole run.
Each with the rollout / update split (ours: the loop's own rollout_seconds and train_seconds; TRL:
`_generate_and_score_completions` timed inside the step). Ratios are TRL's seconds over ours (> 1:
ours is faster).
"""

from __future__ import annotations

import argparse
import itertools
import os
import pathlib
import tempfile
import time

import jax
import numpy as np

from jaxlab import results
from jaxlab.deepconf import arithmetic
from jaxlab.jsonl import read_records
from jaxlab.models import hf, zoo
from jaxlab.rl import loop, losses, train

SIZES = {
    "cpu": dict(model="results/arithmetic_model", compute="float32"),
    "gpu": dict(model=None, compute="bfloat16"),  # a random Qwen3-0.6B-shaped folder
}
PROMPTS, GROUP, PROMPT_TOKENS, NEW_TOKENS = 16, 8, 24, 56
LEARNING_RATE = 1e-4  # the same on both sides; it does not change the work timed
TERMS, SEED = 4, 1
EOS = arithmetic.VOCAB.index(arithmetic.EOS)


def loop_config(steps: int) -> loop.LoopConfig:
    return loop.LoopConfig(
        steps=steps, prompts=PROMPTS, group_size=GROUP, temperature=1.0,
        max_prompt_tokens=PROMPT_TOKENS, max_new_tokens=NEW_TOKENS, stop_ids=(EOS,),
        advantage="grpo", dynamic_sampling=False, ppo_epochs=1, minibatches=1,
        checkpoint_every=10 ** 6,
        train=train.TrainConfig(
            optimizer=train.OptimizerConfig(learning_rate=LEARNING_RATE, weight_decay=0.0,
                                            max_grad_norm=1.0),
            loss=losses.PolicyLossConfig(clip_low=0.2, clip_high=0.2, kl_coef=0.0)))


def trl_settings(steps: int, out_dir: str, bf16: bool, use_cpu: bool) -> dict:
    """GRPOConfig fields matching `loop_config`: one optimizer step per generation batch of
    PROMPTS x GROUP completions."""
    return dict(
        output_dir=out_dir, max_steps=steps, num_generations=GROUP,
        per_device_train_batch_size=PROMPTS * GROUP, gradient_accumulation_steps=1,
        steps_per_generation=1, num_iterations=1, max_completion_length=NEW_TOKENS,
        temperature=1.0, top_p=1.0, top_k=0, beta=0.0, epsilon=0.2, loss_type="dapo",
        scale_rewards="group", learning_rate=LEARNING_RATE, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, adam_beta1=0.9, adam_beta2=0.999,
        adam_epsilon=1e-8, optim="adamw_torch", shuffle_dataset=False, use_vllm=False,
        use_cpu=use_cpu, bf16=bf16, report_to="none", save_strategy="no", logging_steps=1,
        seed=0, log_completions=False, dataloader_num_workers=0)


def decode(ids) -> str:
    """Text of token ids; ids outside the task's vocabulary (a random large model) are dropped."""
    return arithmetic.decode([i for i in ids if i < len(arithmetic.VOCAB)])


def exact_reward(prompts, responses, truncated):
    """Ours: 1 for the exact boxed answer ([groups, G])."""
    return np.asarray([[float(arithmetic.grade(decode(r), p.data)[0]) for r in group]
                       for p, group in zip(prompts, responses, strict=True)])


def run_ours(path: pathlib.Path, problems, steps: int, compute: str,
             out_dir: pathlib.Path) -> tuple[list[dict], float]:
    """(metrics.jsonl records of `steps` steps of loop.run, the run's wall seconds
    from loading the model)."""
    start = time.perf_counter()
    policy = hf.load_pretrained(path, param_dtype="float32", compute_dtype=compute)
    calls = itertools.count()

    def prompt_fn(key, count):  # the next `count` problems (no refills: one call a step)
        i = next(calls)
        return [loop.Prompt(tuple(arithmetic.encode(p.prompt)), p.answer)
                for p in problems[i * count:(i + 1) * count]]

    loop.run(policy, prompt_fn, exact_reward, loop_config(steps), out_dir,
             key=jax.random.key(0))
    seconds = time.perf_counter() - start
    return read_records(out_dir / "metrics.jsonl"), seconds


def run_trl(path: pathlib.Path, problems, steps: int, compute: str, out_dir: pathlib.Path,
            threads: int) -> tuple[list[dict], float]:
    """(per optimizer step: seconds, rollout seconds and TRL's logged metrics; the run's wall
    seconds from loading the model)."""
    import datasets
    import torch
    import transformers
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(threads)
    start = time.perf_counter()
    cuda = torch.cuda.is_available()
    args = GRPOConfig(**trl_settings(steps, str(out_dir), bf16=compute == "bfloat16",
                                     use_cpu=not cuda))
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, padding_side="left")
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    dataset = datasets.Dataset.from_list([{"prompt": p.prompt, "answer": p.answer}
                                          for p in problems])

    def exact_answer(prompts, completions, answer, **kwargs):
        return [float(arithmetic.grade(c, a)[0]) for c, a in zip(completions, answer,
                                                                  strict=True)]

    timed: list[dict] = []

    class Timed(GRPOTrainer):
        def _generate_and_score_completions(self, *a, **k):
            start = time.perf_counter()
            out = super()._generate_and_score_completions(*a, **k)
            timed[-1]["rollout_seconds"] = time.perf_counter() - start
            return out

    class StepTimes(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            timed.append({"start": time.perf_counter()})

        def on_step_end(self, args, state, control, **kwargs):
            timed[-1]["seconds"] = time.perf_counter() - timed[-1].pop("start")

        def on_log(self, args, state, control, logs=None, **kwargs):
            if timed and logs and "loss" in logs:  # not the summary at the end
                timed[-1]["logs"] = dict(logs)

    trainer = Timed(model=model, reward_funcs=exact_answer, args=args, train_dataset=dataset,
                    processing_class=tokenizer, callbacks=[StepTimes()])
    trainer.train()
    seconds = time.perf_counter() - start
    for s in timed:
        s["train_seconds"] = s["seconds"] - s["rollout_seconds"]
        s["response_length"] = s.get("logs", {}).get("completions/mean_length", np.nan)
    return timed, seconds


def summary(records: list[dict], run_s: float, total: str | None) -> dict:
    """The run's wall seconds; the median seconds per step over its second half (steady
    state) with the rollout / update medians; the first step; rollout tokens/s over the
    run (PROMPTS x GROUP x mean response length, over the rollout seconds)."""
    seconds = [r[total] if total else r["rollout_seconds"] + r["train_seconds"] for r in records]
    steady = records[len(records) // 2:]
    tokens = sum(PROMPTS * GROUP * r["response_length"] for r in records)
    return {"steps": len(records), "run_s": run_s, "first_s": seconds[0],
            "steady_median_s": float(np.median(seconds[len(records) // 2:])),
            "steady_rollout_median_s": float(np.median([r["rollout_seconds"] for r in steady])),
            "steady_update_median_s": float(np.median([r["train_seconds"] for r in steady])),
            "rollout_s": float(sum(r["rollout_seconds"] for r in records)),
            "rollout_tokens_per_s": float(tokens / sum(r["rollout_seconds"] for r in records))}


def wait_for_model(path: pathlib.Path, seconds: float = 600) -> None:
    """The arithmetic model may be being written by another run: wait for its config.json."""
    deadline = time.time() + seconds
    while not (path / "config.json").exists() or not (path / "model.safetensors").exists():
        if time.time() > deadline:
            raise FileNotFoundError(
                f"no model at {path}; train it with python experiments/train_arithmetic.py "
                f"--config configs/deepconf/train_cpu.yaml")
        time.sleep(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default=None,
                        help="model size (default: gpu on a GPU, else cpu)")
    parser.add_argument("--steps", type=int, default=50, help="steps per side")
    parser.add_argument("--out", default=None,
                        help="JSON file (default: results/bench_rl_step/<size>.json)")
    parser.add_argument("--torch-threads", type=int, nargs="+", default=None,
                        help="PyTorch CPU thread counts to run TRL with (default: one per core, "
                             "and 1); the fastest is the baseline")
    args = parser.parse_args()
    name = args.size or ("gpu" if jax.default_backend() == "gpu" else "cpu")
    size = SIZES[name]
    out = pathlib.Path(args.out or f"results/bench_rl_step/{name}.json")
    config = loop_config(args.steps)
    settings = trl_settings(args.steps, "unused", bf16=size["compute"] == "bfloat16",
                            use_cpu=name == "cpu")
    if name == "gpu" and jax.default_backend() != "gpu":
        print(f"--size gpu needs a GPU (JAX backend: {jax.default_backend()}); built the loop "
              f"config ({config.prompts} x {config.group_size}, {config.max_new_tokens} new "
              f"tokens) and {len(settings)} GRPOConfig fields; skipped")
        return
    problems = arithmetic.make_problems(PROMPTS * args.steps, TERMS, SEED)
    # On a busy CPU one thread can beat one per core (spinning OpenMP workers); on a GPU the
    # thread count hardly matters: one run.
    threads = sorted(set(args.torch_threads or [len(os.sched_getaffinity(0)), 1]),
                     reverse=True)[:1 if name == "gpu" else None]
    with tempfile.TemporaryDirectory() as work:
        work = pathlib.Path(work)
        if size["model"] is None:
            path = zoo.create("qwen3", work / "model", size="released", param_dtype="float32")
            arithmetic.save_tokenizer(path)
        else:
            path = pathlib.Path(size["model"])
            wait_for_model(path)
        ours, ours_s = run_ours(path, problems, args.steps, size["compute"], work / "ours")
        theirs = {n: run_trl(path, problems, args.steps, size["compute"],
                             work / f"trl{n}", n) for n in threads}
    mine = summary(ours, ours_s, None)
    trl = {n: summary(steps, run_s, "seconds") for n, (steps, run_s) in theirs.items()}
    best = min(trl, key=lambda n: trl[n]["run_s"])
    base = trl[best]
    device = jax.devices()[0].device_kind
    rewards = (float(np.mean([r["reward_mean"] for r in ours])),
               float(np.mean([s.get("logs", {}).get("reward", np.nan)
                              for s in theirs[best][0]])))
    print(f"GRPO run of {args.steps} steps, {path} ({size['compute']} compute), "
          f"{PROMPTS} prompts x G={GROUP}, <= {NEW_TOKENS} new tokens, temperature 1, one "
          f"optimizer step per RL step, on {device}")
    print(f"mean reward: ours {rewards[0]:.3f}, TRL {rewards[1]:.3f}")
    print(f"{'':28s} {'run s':>8s} {'ratio':>6s} {'1st it s':>8s} {'steady s/it':>11s} "
          f"{'ratio':>6s} {'rollout':>8s} {'update':>7s} {'rollout tok/s':>13s}")
    rows = [("jaxlab loop.run", mine)] + [(f"TRL GRPOTrainer, {n} thread(s)", r)
                                          for n, r in trl.items()]
    for label, r in rows:
        print(f"{label:28s} {r['run_s']:8.1f} {base['run_s'] / r['run_s']:5.2f}x "
              f"{r['first_s']:8.2f} {r['steady_median_s']:11.2f} "
              f"{base['steady_median_s'] / r['steady_median_s']:5.2f}x "
              f"{r['steady_rollout_median_s']:8.2f} {r['steady_update_median_s']:7.2f} "
              f"{r['rollout_tokens_per_s']:13.0f}")
    print("(run: wall seconds of the whole run, compiles included; steady: median over the "
          "second half; ratio: the fastest TRL run's seconds over this row's, > 1 is faster than "
          "TRL; rollout tok/s over the whole run)")
    results.write_json(out, {
        "size": name, "device": device, "model": str(path), "compute_dtype": size["compute"],
        "prompts": PROMPTS, "group_size": GROUP, "max_new_tokens": NEW_TOKENS,
        "steps": args.steps, "loop_config": repr(config), "trl_config": settings,
        "ours": mine, "trl_by_threads": trl, "trl_threads": best,
        "run_ratio": base["run_s"] / mine["run_s"],
        "steady_ratio": base["steady_median_s"] / mine["steady_median_s"],
        "ours_steps": ours, "trl_steps_by_threads": {n: s for n, (s, _) in theirs.items()}})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
