"""The Bradley-Terry scalar reward model of Writing-Zero (section 1 of papers/writing_zero.md) on
a local causal-LM checkpoint, and the paper's pair filter.

    python experiments/train_reward_model.py --config configs/writing_zero/rm_qwen3_gpu.yaml

(in the small world, the `rm` and `rm_teacher` stages of `experiments/writing_zero.py`).

Reads preference pairs (`prompt`, `chosen`, `rejected`: JSON Lines, parquet or a `datasets`
folder; a bad record stops the run naming it before training), puts a linear head on the
backbone's last hidden state (`reward_model.ScalarRewardModel`) and trains
-log sigmoid(r(x, y_chosen) - r(x, y_rejected)). Rows are prompt + response + EOS in the
checkpoint's own tokenizer. Then it measures accuracy on the held-out files, applies the filter
(a chosen reward at or above a quantile and a reward gap >= min_gap) to the training pairs and
writes the kept ones. Writes config.yaml, log.txt, metrics.jsonl, summary.json, kept_pairs.jsonl,
checkpoints/ and rm/ (the backbone as a Hugging Face folder with its tokenizer, the head in
rm/reward_head.safetensors: `reward_model.save`); a rerun resumes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time

import jax
import numpy as np
from flax import nnx

from jaxlab import cli, parallel, results
from jaxlab import config as config_lib
from jaxlab.models import hf
from jaxlab.rl import reward_model, sft

log = logging.getLogger("jaxlab")


@dataclasses.dataclass(frozen=True)
class Config:
    out_dir: str = "results/writing_zero/rm"
    backbone: str = "results/writing_zero/world/writer"  # a local causal-LM folder
    pairs: str = "results/writing_zero/world/preferences.jsonl"
    # held-out pair files to measure accuracy on: name -> path
    eval: dict[str, str] = dataclasses.field(default_factory=lambda: {
        "heldout": "results/writing_zero/world/preferences_heldout.jsonl",
        "true_quality": "results/writing_zero/world/true_pairs.jsonl"})
    compute_dtype: str = "float32"  # activations (master weights are float32)
    length: int = 48                # tokens per row (prompt + response + EOS); longer is an error
    seed: int = 0
    filter: reward_model.PairFilter = dataclasses.field(
        default_factory=reward_model.PairFilter)
    fit: sft.FitConfig = dataclasses.field(default_factory=sft.FitConfig)
    # the devices it trains on: data x fsdp x tensor (with several processes, as many from each);
    # mesh.fsdp=8 splits the parameters and optimizer state (a 4B model, docs/parallel.md)
    mesh: parallel.MeshConfig = dataclasses.field(default_factory=parallel.MeshConfig)

    def __post_init__(self):
        config_lib.require_positive_ints(self, "length")


def pair_data(pairs: list[dict], encoder: sft.TextCodec, length: int) -> dict[str, np.ndarray]:
    return reward_model.pair_batch([encoder.prompt(p["prompt"]) for p in pairs],
                                   [encoder.response(p["chosen"]) for p in pairs],
                                   [encoder.response(p["rejected"]) for p in pairs], length)


def pair_rewards(model, data: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(r_chosen, r_rejected) float32 [N] each."""
    return (reward_model.rewards(model, data["chosen_tokens"], data["chosen_mask"]),
            reward_model.rewards(model, data["rejected_tokens"], data["rejected_mask"]))


def main(argv: list[str] | None = None) -> dict:
    results.join_processes()  # before JAX touches a backend
    cfg = config_lib.from_command_line(Config, argv, __doc__.splitlines()[0])
    mesh = cfg.mesh.build()  # before any work: an error if the devices are not there
    out = results.open_run(cfg.out_dir, cfg)
    results.check_inputs(out, backbone=cfg.backbone, pairs=cfg.pairs,
                         **{f"eval.{name}": path for name, path in cfg.eval.items()})
    encoder = sft.TextCodec(cfg.backbone)
    pairs = reward_model.read_pairs(cfg.pairs)          # every file is checked before training
    held_out = {name: reward_model.read_pairs(path) for name, path in cfg.eval.items()}
    data = pair_data(pairs, encoder, cfg.length)
    backbone = hf.load_pretrained(cfg.backbone, param_dtype="float32",
                                  compute_dtype=cfg.compute_dtype)
    model = reward_model.ScalarRewardModel(backbone, backbone.config.hidden_size,
                                           rngs=nnx.Rngs(cfg.seed))
    start = time.perf_counter()
    model = sft.fit(model, reward_model.pair_loss, data, cfg.fit, out,
                    key=jax.random.key(cfg.seed), mesh=mesh, where="fit.")
    summary = {"pairs": len(pairs), "train_seconds": time.perf_counter() - start}
    for name, rows in held_out.items():
        chosen, rejected = pair_rewards(model, pair_data(rows, encoder, cfg.length))
        summary[f"accuracy_{name}"] = float(reward_model.bt_accuracy(chosen, rejected))
        summary[f"loss_{name}"] = float(reward_model.bt_loss(chosen, rejected))
    chosen, rejected = pair_rewards(model, data)
    keep, counts = reward_model.filter_pairs(chosen, rejected, cfg.filter)
    summary["filter"] = {k: int(v) for k, v in counts._asdict().items()}
    results.write_text(out / "kept_pairs.jsonl", "".join(
        json.dumps(p) + "\n" for p, k in zip(pairs, np.asarray(keep), strict=True) if k))
    reward_model.save(model, out / "rm", eos_token_id=encoder.eos_id,
                      pad_token_id=encoder.tokenizer.pad_token_id)
    hf.save_tokenizer(encoder.tokenizer, out / "rm")
    results.write_json(out / "summary.json", summary)
    log.info("RM accuracy %s; filter kept %d of %d pairs (high chosen %d, large gap %d)",
             {k: round(v, 3) for k, v in summary.items() if k.startswith("accuracy")},
             summary["filter"]["kept"], summary["filter"]["total"],
             summary["filter"]["high_chosen"], summary["filter"]["large_gap"])
    return summary


if __name__ == "__main__":
    cli.run(main)
