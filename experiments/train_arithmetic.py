"""Train a small Qwen3-architecture decoder on the synthetic arithmetic task and save it as a
Hugging Face folder (config.json, model.safetensors, tokenizer), ready for experiments/deepconf.py.

    python experiments/train_arithmetic.py --config configs/deepconf/train_cpu.yaml [key=value ...]

Supervised next-token training on fresh random problems every step (the loss covers the solution
and EOS); progress shows the loss. At the end the held-out problems are written to
`out_dir/problems.jsonl` (the input of experiments/deepconf.py) and the greedy accuracy on them to
`out_dir/train_metrics.json`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import sys

import jax
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from jaxlab import config as config_lib
from jaxlab import results
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

    def __post_init__(self):
        config_lib.require_positive_ints(self, "terms", "steps", "batch", "length", "hidden_size",
                                         "layers", "heads", "eval_problems")
        config_lib.require(self.learning_rate > 0, "learning_rate must be > 0")
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


def main(argv: list[str] | None = None) -> dict:
    cfg = config_lib.from_command_line(Config, argv, __doc__.splitlines()[0])
    out = results.open_run(cfg.out_dir, cfg)
    model = Decoder(model_config(cfg), nnx.Rngs(cfg.seed))
    graphdef, params = nnx.split(model)
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, cfg.warmup_steps,
                                                  cfg.steps)
    optimizer = optax.adamw(schedule, weight_decay=0.01)
    opt_state = optimizer.init(params)
    rng = np.random.default_rng(cfg.seed)
    bar = tqdm(range(cfg.steps), unit="step", file=sys.stderr, dynamic_ncols=True)
    for step in bar:
        batch = [arithmetic.make_problem(rng, cfg.terms, step * cfg.batch + i)
                 for i in range(cfg.batch)]
        tokens, mask = arithmetic.training_batch(batch, cfg.length)
        params, opt_state, loss = train_step(params, opt_state, tokens, mask,
                                             graphdef=graphdef, optimizer=optimizer)
        if step % 50 == 0 or step == cfg.steps - 1:
            loss = float(loss)
            if not np.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at step {step}; stopping")
            bar.set_postfix(loss=f"{loss:.4f}")
    model = nnx.merge(graphdef, params)
    hf.save_pretrained(model, out, eos_token_id=arithmetic.VOCAB.index(arithmetic.EOS),
                               pad_token_id=arithmetic.VOCAB.index(arithmetic.PAD))
    arithmetic.save_tokenizer(out)
    held_out = arithmetic.make_problems(cfg.eval_problems, cfg.terms, seed=10_000 + cfg.seed)
    save_problems([Problem(p.id, p.prompt, p.answer) for p in held_out], out / "problems.jsonl")
    metrics = {"final_loss": float(loss), "greedy_accuracy": arithmetic.greedy_accuracy(
        model, held_out, cfg.length)}
    results.write_json(out / "train_metrics.json", metrics)
    log.info("saved %s: loss %.4f, greedy accuracy %.3f on %d held-out problems", out,
             metrics["final_loss"], metrics["greedy_accuracy"], cfg.eval_problems)
    return metrics


if __name__ == "__main__":
    main()
