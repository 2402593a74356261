"""A small Qwen3-architecture decoder trained on the arithmetic task (`arithmetic`), saved as a
Hugging Face folder for DeepConf and the RL loop (`experiments/train_arithmetic.py` runs it).

    metrics = arithmetic_model.train(Config(...), out_dir)

Supervised next-token training (`sft.fit`, the resumable loop of every training job) on fresh
random problems every step: the loss covers the solution and EOS. Batch s is the s-th
`fit.batch_size` problems of one stream seeded by `seed` (`batches`), so a resumed run reads
the batches it would have read. The stream never draws a held-out problem
(`arithmetic.held_out_sets`): at the end the test problems are written to `problems.jsonl`, the
validation problems to `validation.jsonl`, and the greedy accuracy on each to
`train_metrics.json` (`greedy_accuracy` is the test set's).

The run's folder is the model's Hugging Face folder (config.json, model.safetensors, the
tokenizer), written once training has finished, so that a folder with a config.json holds a
trained model (`experiments/train_grpo.py` trains one where there is none). While it trains,
`policy/` holds the model of the latest checkpoint (`scaffold.export_policy`, with
generation_config.json), rewritten at each one; at the end it is the finished model too.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
from collections.abc import Iterator
from typing import ClassVar

import jax
import numpy as np
from flax import nnx

from jaxlab import jsonl, results
from jaxlab.config import require, require_positive_ints
from jaxlab.deepconf import arithmetic
from jaxlab.deepconf.problems import Problem, save_problems
from jaxlab.models import hf, zoo
from jaxlab.models.decoder import Decoder, DecoderConfig
from jaxlab.rl import scaffold, sft
from jaxlab.rl.train import OptimizerConfig

log = logging.getLogger("jaxlab")

POLICY = "policy"  # the model of the latest checkpoint, written while it trains


def _fit() -> sft.FitConfig:
    return sft.FitConfig(
        steps=1500, batch_size=64, log_every=50, checkpoint_every=50, keep_checkpoints=2,
        optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=100, decay_steps=1500,
                                  weight_decay=0.01, max_grad_norm=0.0))


@dataclasses.dataclass(frozen=True)
class Config:
    out_dir: str = "results/arithmetic_model"
    terms: int = 4               # numbers per problem
    length: int = 80             # tokens per training row
    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    seed: int = 0
    eval_problems: int = 200
    fit: sft.FitConfig = dataclasses.field(default_factory=_fit)  # steps, batch size, AdamW
    #                              (cosine decay over the run), checkpoints

    # The keys of earlier versions of this config, refused with their new names.
    RENAMED: ClassVar[dict[str, str]] = {
        "steps": "fit.steps", "batch": "fit.batch_size", "checkpoint_every": "fit.checkpoint_every",
        "learning_rate": "fit.optimizer.learning_rate",
        "warmup_steps": "fit.optimizer.warmup_steps"}

    def __post_init__(self):
        require_positive_ints(self, "terms", "length", "hidden_size", "layers", "heads",
                              "eval_problems")
        require(self.hidden_size % self.heads == 0,
                f"hidden_size={self.hidden_size} must be a multiple of heads")


def decoder_config(cfg: Config) -> DecoderConfig:
    """The model: a Qwen3 architecture over the task's character vocabulary."""
    config = zoo.hf_config("qwen3", vocab_size=len(arithmetic.VOCAB), hidden_size=cfg.hidden_size,
                           intermediate_size=3 * cfg.hidden_size, num_hidden_layers=cfg.layers,
                           num_attention_heads=cfg.heads,
                           num_key_value_heads=max(1, cfg.heads // 2),
                           head_dim=cfg.hidden_size // cfg.heads, max_position_embeddings=512,
                           tie_word_embeddings=True)
    return DecoderConfig.from_hf(config)


def example(problem: arithmetic.Problem) -> tuple[list[int], list[int]]:
    """(prompt, target) token ids of a problem: the target is its solution and EOS."""
    return (arithmetic.encode(problem.prompt),
            [*arithmetic.encode(problem.solution), arithmetic.VOCAB.index(arithmetic.EOS)])


def batches(cfg: Config, start: int) -> Iterator[dict[str, np.ndarray]]:
    """The `sft.sft_batch` rows of steps start, start + 1, ...: batch s is the s-th
    `fit.batch_size` problems of one stream seeded by `cfg.seed` (an `sft.Stream`; the problems
    of the steps before `start` are drawn and dropped: a fraction of a second).

    A problem longer than `cfg.length` tokens is replaced by the next one drawn (a warning
    counts them): with 16 terms and length 256, about 2 problems in 100,000 need 255 tokens and
    none of 4 million drawn needed more, but sixteen 99s would need 257, and no stream may stop
    a run. A length that fits fewer than one problem in ten is an error. A held-out problem
    (test or validation) is skipped silently."""
    rng = np.random.default_rng(cfg.seed)
    held_out = arithmetic.held_out_prompts(cfg.eval_problems, cfg.terms, cfg.seed)
    size, drawn = cfg.fit.batch_size, 0
    for step in range(cfg.fit.steps):
        problems, skipped = [], 0
        while len(problems) < size:
            problem = arithmetic.make_problem(rng, cfg.terms, drawn)
            drawn += 1
            if problem.prompt in held_out:
                continue
            if arithmetic.token_count(problem) <= cfg.length:
                problems.append(problem)
                continue
            skipped += 1
            require(skipped <= 10 * size,
                    f"length={cfg.length} is too short for terms={cfg.terms}: problem "
                    f"{problem.id} needs {arithmetic.token_count(problem)} tokens")
        if step >= start:
            if skipped:
                log.warning("step %d: %d problems longer than length=%d tokens replaced",
                            step, skipped, cfg.length)
            yield sft.sft_batch(*zip(*map(example, problems), strict=True), cfg.length)


def train(cfg: Config, out: str | pathlib.Path) -> dict:
    """Trains the model into `out` (a folder opened with `results.open_run`; a rerun resumes),
    saves it with its tokenizer and held-out problems, and returns (and writes) the metrics."""
    out = pathlib.Path(out)
    ids = {"eos_token_id": arithmetic.VOCAB.index(arithmetic.EOS),
           "pad_token_id": arithmetic.VOCAB.index(arithmetic.PAD)}
    model = Decoder(decoder_config(cfg), nnx.Rngs(cfg.seed))
    model = sft.fit(model, sft.sft_loss, lambda start: batches(cfg, start), cfg.fit, out,
                    key=jax.random.key(cfg.seed), where="fit.",
                    on_save=scaffold.export_policy(model, out / POLICY,
                                                   arithmetic.char_tokenizer(), **ids))
    # The finished model: `out` itself (a config.json there means a trained model)
    hf.save_pretrained(model, out, **ids)
    arithmetic.save_tokenizer(out)
    held_out = arithmetic.held_out_sets(cfg.eval_problems, cfg.terms, cfg.seed)
    for split, name in arithmetic.HELD_OUT_FILES.items():
        save_problems([Problem(p.id, p.prompt, p.answer) for p in held_out[split]], out / name)
    metrics = {"final_loss": jsonl.resume_records(out / scaffold.METRICS)[-1]["loss"],
               "greedy_accuracy": arithmetic.greedy_accuracy(model, held_out["test"], cfg.length),
               "validation_greedy_accuracy": arithmetic.greedy_accuracy(
                   model, held_out["validation"], cfg.length)}
    results.write_json(out / "train_metrics.json", metrics)
    log.info("saved %s: loss %.4f, greedy accuracy %.3f (test), %.3f (validation) on %d "
             "problems each", out, metrics["final_loss"], metrics["greedy_accuracy"],
             metrics["validation_greedy_accuracy"], cfg.eval_problems)
    return metrics
