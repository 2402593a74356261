"""The small writing world's data and initial models (`jaxlab.writing`): the start of the
Writing-Zero reproduction on 2 CPU cores.

    python experiments/writing_world.py --config configs/writing_zero/world_cpu.yaml [key=value ...]

Writes to out_dir:
  preferences.jsonl          rater-labelled pairs (label noise, length confound): the RM's data
  preferences_heldout.jsonl  more of the same, held out
  true_pairs.jsonl           held-out pairs labelled by the hidden quality (chosen is better)
  writer/                    the initial writer: supervised on the response generator's mixed-
                             quality texts (a Hugging Face folder with the world's tokenizer)
  genrm_init/                a random-init decoder of the GenRM's size, same tokenizer
A rerun resumes the writer's training and rewrites the data identically.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import jax
from flax import nnx

from jaxlab import config as config_lib
from jaxlab import results
from jaxlab.models.decoder import Decoder
from jaxlab.rl import sft
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
    length: int = 48               # tokens per supervised row (prompt + response + EOS)
    task: world.WorldConfig = dataclasses.field(default_factory=world.WorldConfig)
    writer: world.ModelSize = dataclasses.field(default_factory=world.ModelSize)
    genrm: world.ModelSize = dataclasses.field(default_factory=lambda: world.ModelSize(128, 3))
    fit: sft.FitConfig = dataclasses.field(default_factory=sft.FitConfig)

    def __post_init__(self):
        config_lib.require_positive_ints(self, "pairs", "heldout_pairs", "true_pairs",
                                         "writer_examples", "length")


def write_jsonl(path, records: list[dict]) -> None:
    results.write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def main(argv: list[str] | None = None) -> dict:
    cfg = config_lib.from_command_line(Config, argv, __doc__.splitlines()[0])
    out = results.open_run(cfg.out_dir, cfg)
    write_jsonl(out / "preferences.jsonl", world.preference_pairs(cfg.pairs, cfg.seed, cfg.task))
    write_jsonl(out / "preferences_heldout.jsonl",
                world.preference_pairs(cfg.heldout_pairs, cfg.seed + 1, cfg.task))
    write_jsonl(out / "true_pairs.jsonl",
                world.preference_pairs(cfg.true_pairs, cfg.seed + 2, cfg.task, rater=False))
    examples = world.writer_examples(cfg.writer_examples, cfg.seed + 3, cfg.task)
    data = sft.sft_batch([world.encode(e["prompt"]) for e in examples],
                         [[*world.encode(e["response"]), world.EOS_ID] for e in examples],
                         cfg.length)
    writer = Decoder(cfg.writer.decoder_config(), nnx.Rngs(cfg.seed))
    writer = sft.fit(writer, sft.sft_loss, data, cfg.fit, out / "writer_sft",
                     key=jax.random.key(cfg.seed))
    world.save_model(writer, out / "writer")
    world.save_model(Decoder(cfg.genrm.decoder_config(), nnx.Rngs(cfg.seed + 1)),
                     out / "genrm_init")
    last = json.loads((out / "writer_sft" / "metrics.jsonl").read_text().splitlines()[-1])
    log.info("wrote %s; the writer's final supervised loss %.4f", out, last["loss"])
    return last


if __name__ == "__main__":
    main()
