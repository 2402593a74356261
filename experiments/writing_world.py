"""The small writing world's data and initial models (`jaxlab.writing`): the start of the
Writing-Zero reproduction on 2 CPU cores.

    python experiments/writing_world.py --config results/writing_zero/small/seed_0/world.yaml

(the stage config `experiments/writing_zero.py` writes for each seed; any key=value after it
overrides).

Writes to out_dir:
  preferences.jsonl          rater-labelled pairs (label noise, length confound): the RM's data
  preferences_heldout.jsonl  more of the same, held out
  true_pairs.jsonl           held-out pairs labelled by the hidden quality (chosen is better)
  judge_traces.jsonl         the rubric teacher's judge traces of `judge_pairs` fresh pairs
                             labelled by the hidden quality, balanced against the length
                             confound (`world.judge_pairs`), each in both orders: the GenRM's
                             cold start
  teacher_labels.jsonl       the same traces as the preferences their verdicts state (two per
                             pair, `teacher.verdict_label`): a scalar RM on the teacher's
                             judgements sees what the GenRM sees
  rl_pairs.jsonl             `rl_pairs` more such pairs, none seen above, weighted to small
                             quality gaps: the GenRM's GRPO
  writer/                    the initial writer: supervised on the response generator's mixed-
                             quality texts (a Hugging Face folder with the world's tokenizer)
  writer_sft/                its training: metrics.jsonl, checkpoints/, and policy/ (the
                             writer as a Hugging Face folder at each checkpoint and the end)
  genrm_init/                a random-init decoder of the GenRM's size, same tokenizer
A rerun resumes the writer's training and rewrites the data identically.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import jax
from flax import nnx

from jaxlab import cli, results
from jaxlab import config as config_lib
from jaxlab.jsonl import read_records
from jaxlab.models.decoder import Decoder
from jaxlab.rl import scaffold, sft
from jaxlab.writing import teacher as teacher_lib
from jaxlab.writing import world

log = logging.getLogger("jaxlab")


@dataclasses.dataclass(frozen=True)
class Config:
    out_dir: str = "results/writing_zero/world"
    seed: int = 0
    pairs: int = 20_000            # rater-labelled training pairs
    heldout_pairs: int = 1_000     # rater-labelled held-out pairs
    true_pairs: int = 500          # held-out pairs labelled by the true quality
    writer_examples: int = 20_000
    judge_pairs: int = 50_000      # pairs the teacher judges in both orders (cold-start traces)
    rl_pairs: int = 5_000          # pairs for the GenRM's GRPO
    length: int = 48               # tokens per supervised row (prompt + response + EOS)
    task: world.WorldConfig = dataclasses.field(default_factory=world.WorldConfig)
    writer: world.ModelSize = dataclasses.field(default_factory=world.ModelSize)
    genrm: world.ModelSize = dataclasses.field(default_factory=lambda: world.ModelSize(128, 3))
    teacher: teacher_lib.Teacher = dataclasses.field(default_factory=teacher_lib.Teacher)
    fit: sft.FitConfig = dataclasses.field(default_factory=sft.FitConfig)

    def __post_init__(self):
        config_lib.require_positive_ints(self, "pairs", "heldout_pairs", "true_pairs",
                                         "writer_examples", "length", "judge_pairs", "rl_pairs")


def write_jsonl(path, records: list[dict]) -> None:
    results.write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def main(argv: list[str] | None = None) -> dict:
    cfg = config_lib.from_command_line(Config, argv, __doc__.splitlines()[0])
    out = results.open_run(cfg.out_dir, cfg)
    write_jsonl(out / "preferences.jsonl", world.preference_pairs(cfg.pairs, cfg.seed, cfg.task))
    write_jsonl(out / "preferences_heldout.jsonl",
                world.preference_pairs(cfg.heldout_pairs, cfg.seed + 1, cfg.task))
    true_pairs = world.preference_pairs(cfg.true_pairs, cfg.seed + 2, cfg.task, rater=False)
    write_jsonl(out / "true_pairs.jsonl", true_pairs)
    judge_pairs = world.judge_pairs(cfg.judge_pairs, cfg.seed + 4, cfg.task, exclude=true_pairs)
    traces = teacher_lib.judge_records(judge_pairs, cfg.seed + 5, cfg.teacher)
    write_jsonl(out / "judge_traces.jsonl", traces)
    write_jsonl(out / "teacher_labels.jsonl",
                [label for t in traces if (label := teacher_lib.verdict_label(t))])
    write_jsonl(out / "rl_pairs.jsonl",
                world.judge_pairs(cfg.rl_pairs, cfg.seed + 6, cfg.task, small_gaps=True,
                                  exclude=true_pairs + judge_pairs))
    examples = world.writer_examples(cfg.writer_examples, cfg.seed + 3, cfg.task)
    data = sft.sft_batch([world.encode(e["prompt"]) for e in examples],
                         [[*world.encode(e["response"]), world.EOS_ID] for e in examples],
                         cfg.length)
    writer = Decoder(cfg.writer.decoder_config(), nnx.Rngs(cfg.seed))
    writer = sft.fit(writer, sft.sft_loss, data, cfg.fit, out / "writer_sft",
                     key=jax.random.key(cfg.seed), where="fit.",
                     on_save=scaffold.export_policy(writer, out / "writer_sft" / "policy",
                                                    world.tokenizer(), eos_token_id=world.EOS_ID,
                                                    pad_token_id=world.PAD_ID))
    world.save_model(writer, out / "writer")
    world.save_model(Decoder(cfg.genrm.decoder_config(), nnx.Rngs(cfg.seed + 1)),
                     out / "genrm_init")
    last = read_records(out / "writer_sft" / "metrics.jsonl")[-1]
    log.info("wrote %s; the writer's final supervised loss %.4f", out, last["loss"])
    return last


if __name__ == "__main__":
    cli.run(main)
