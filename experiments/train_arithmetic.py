"""Train a small Qwen3-architecture decoder on the synthetic arithmetic task and save it as a
Hugging Face folder (config.json, model.safetensors, tokenizer), ready for experiments/deepconf.py.

    python experiments/train_arithmetic.py --config configs/deepconf/train_cpu.yaml [key=value ...]

Supervised next-token training on fresh random problems every step (the loss covers the solution
and EOS); progress shows the loss. The train state is checkpointed to `out_dir/checkpoints/` every
`checkpoint_every` steps, and a rerun resumes from the latest complete checkpoint, bit for bit the
run that never stopped (the problems of step s are the s-th batch of one seeded stream). The
stream never draws a held-out problem (`arithmetic.held_out_sets`): at the end the test problems
are written to `out_dir/problems.jsonl` (the input of experiments/deepconf.py), the validation
problems to `out_dir/validation.jsonl`, and the greedy accuracy on each to
`out_dir/train_metrics.json` (`greedy_accuracy` is the test set's).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import sys
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from jaxlab import config as config_lib
from jaxlab import results
from jaxlab.checkpoint import CheckpointConfig, Checkpointer
from jaxlab.deepconf import arithmetic
from jaxlab.deepconf.problems import Problem, save_problems
from jaxlab.models import hf, zoo
from jaxlab.models.decoder import Decoder, DecoderConfig
from jaxlab.rl import losses, train

log = logging.getLogger("jaxlab")


@dataclasses.dataclass(frozen=True)
class Config:
    out_dir: str = "results/arithmetic_model"
    terms: int = 4               # numbers per problem
    steps: int = 1500
    batch: int = 64
    length: int = 80             # tokens per training row
    learning_rate: float = 3e-3
    warmup_steps: int = 100
    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    seed: int = 0
    eval_problems: int = 200
    checkpoint_every: int = 50   # steps between checkpoints (and the loss check)

    def __post_init__(self):
        config_lib.require_positive_ints(self, "terms", "steps", "batch", "length", "hidden_size",
                                         "layers", "heads", "eval_problems", "checkpoint_every")
        config_lib.require(self.learning_rate > 0,
                           f"learning_rate must be > 0, got {self.learning_rate}")
        config_lib.require(0 <= self.warmup_steps < self.steps,
                           f"warmup_steps={self.warmup_steps} must lie in [0, steps={self.steps}) "
                           f"(the cosine decay follows the warmup)")
        config_lib.require(self.hidden_size % self.heads == 0,
                           f"hidden_size={self.hidden_size} must be a multiple of heads")


def model_config(cfg: Config) -> DecoderConfig:
    config = zoo.hf_config("qwen3", vocab_size=len(arithmetic.VOCAB), hidden_size=cfg.hidden_size,
                       intermediate_size=3 * cfg.hidden_size, num_hidden_layers=cfg.layers,
                       num_attention_heads=cfg.heads, num_key_value_heads=max(1, cfg.heads // 2),
                       head_dim=cfg.hidden_size // cfg.heads, max_position_embeddings=512,
                       tie_word_embeddings=True)
    return DecoderConfig.from_hf(config)


@functools.partial(jax.jit, static_argnames=("graphdef", "optimizer"), donate_argnums=(0, 1))
def train_step(params, opt_state, tokens, mask, *, graphdef, optimizer):
    """One Adam step on the mean next-token cross-entropy over the masked (solution) tokens."""

    def loss_fn(params):  # position 0 is a prompt token: masked out
        return -losses.token_mean(train.policy_logprobs(graphdef, params, tokens), mask)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def batches(cfg: Config, start: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(tokens, mask) of steps start, start + 1, ...: batch s is the s-th `cfg.batch` problems
    of one stream seeded by `cfg.seed`, so a resumed run reads the batches it would have read
    (the problems of the steps before `start` are drawn and dropped: a fraction of a second).

    A problem longer than `cfg.length` tokens is replaced by the next one drawn (a warning
    counts them): with 16 terms and length 256, about 2 problems in 100,000 need 255 tokens and
    none of 4 million drawn needed more, but sixteen 99s would need 257, and no stream may stop
    a run. A length that fits fewer than one problem in ten is an error. A held-out problem
    (test or validation) is skipped silently."""
    rng = np.random.default_rng(cfg.seed)
    held_out = arithmetic.held_out_prompts(cfg.eval_problems, cfg.terms, cfg.seed)
    drawn = 0
    for step in range(cfg.steps):
        problems, skipped = [], 0
        while len(problems) < cfg.batch:
            problem = arithmetic.make_problem(rng, cfg.terms, drawn)
            drawn += 1
            if problem.prompt in held_out:
                continue
            if arithmetic.token_count(problem) <= cfg.length:
                problems.append(problem)
                continue
            skipped += 1
            config_lib.require(skipped <= 10 * cfg.batch,
                               f"length={cfg.length} is too short for terms={cfg.terms}: "
                               f"problem {problem.id} needs {arithmetic.token_count(problem)} "
                               f"tokens")
        if step >= start:
            if skipped:
                log.warning("step %d: %d problems longer than length=%d tokens replaced",
                            step, skipped, cfg.length)
            yield arithmetic.training_batch(problems, cfg.length)


def main(argv: list[str] | None = None) -> dict:
    results.join_processes()  # before JAX touches a backend
    cfg = config_lib.from_command_line(Config, argv, __doc__.splitlines()[0])
    out = results.open_run(cfg.out_dir, cfg)
    finished = results.read_json(out / "train_metrics.json")  # written last
    if finished is not None:
        log.info("%s holds a finished run (train_metrics.json); nothing to do", out)
        return finished
    graphdef, params = nnx.split(Decoder(model_config(cfg), nnx.Rngs(cfg.seed)))
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, cfg.warmup_steps,
                                                  cfg.steps)
    optimizer = optax.adamw(schedule, weight_decay=0.01)
    state = {"params": params, "opt_state": optimizer.init(params),
             "step": jnp.zeros((), jnp.int32), "loss": jnp.zeros((), jnp.float32)}
    with Checkpointer(out / "checkpoints", CheckpointConfig(keep_last=2, best_metric=None)
                      ) as checkpointer:
        if checkpointer.latest_step() is not None:
            state = checkpointer.restore(state)
            log.info("resuming from step %d (%s)", int(state["step"]), checkpointer.directory)
        start = int(state["step"])
        bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, unit="step",
                   file=sys.stderr, dynamic_ncols=True)
        for step, (tokens, mask) in zip(bar, batches(cfg, start), strict=True):
            params, opt_state, loss = train_step(state["params"], state["opt_state"], tokens,
                                                 mask, graphdef=graphdef, optimizer=optimizer)
            state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1,
                     "loss": loss}
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
                loss = float(loss)
                if not np.isfinite(loss):
                    raise FloatingPointError(
                        f"loss is {loss} at step {step}; stopping (last checkpoint: step "
                        f"{checkpointer.latest_step()} in {checkpointer.directory})")
                bar.set_postfix(loss=f"{loss:.4f}")
                checkpointer.save(step + 1, state)
        bar.close()
    model = nnx.merge(graphdef, state["params"])
    hf.save_pretrained(model, out, eos_token_id=arithmetic.VOCAB.index(arithmetic.EOS),
                               pad_token_id=arithmetic.VOCAB.index(arithmetic.PAD))
    arithmetic.save_tokenizer(out)
    held_out = arithmetic.held_out_sets(cfg.eval_problems, cfg.terms, cfg.seed)
    for split, name in arithmetic.HELD_OUT_FILES.items():
        save_problems([Problem(p.id, p.prompt, p.answer) for p in held_out[split]], out / name)
    metrics = {"final_loss": float(state["loss"]),
               "greedy_accuracy": arithmetic.greedy_accuracy(model, held_out["test"], cfg.length),
               "validation_greedy_accuracy": arithmetic.greedy_accuracy(
                   model, held_out["validation"], cfg.length)}
    results.write_json(out / "train_metrics.json", metrics)
    log.info("saved %s: loss %.4f, greedy accuracy %.3f (test), %.3f (validation) on %d "
             "problems each", out, metrics["final_loss"], metrics["greedy_accuracy"],
             metrics["validation_greedy_accuracy"], cfg.eval_problems)
    return metrics


if __name__ == "__main__":
    main()
