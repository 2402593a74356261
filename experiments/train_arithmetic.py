"""Train a small Qwen3-architecture decoder on the synthetic arithmetic task and save it as a
Hugging Face folder (config.json, model.safetensors, tokenizer), ready for experiments/deepconf.py.

    python experiments/train_arithmetic.py --config configs/deepconf/train_cpu.yaml [key=value ...]

Supervised next-token training on fresh random problems every step (`jaxlab.deepconf.
arithmetic_model`, over `sft.fit`); progress shows the loss. The train state is checkpointed to
`out_dir/checkpoints/` every `fit.checkpoint_every` steps, and a rerun resumes from the latest
complete checkpoint, bit for bit the run that never stopped. At the end the test problems are
written to `out_dir/problems.jsonl` (the input of experiments/deepconf.py), the validation
problems to `out_dir/validation.jsonl`, and the greedy accuracy on each to
`out_dir/train_metrics.json` (`greedy_accuracy` is the test set's).
"""

from __future__ import annotations

import logging

from jaxlab import cli, results
from jaxlab import config as config_lib
from jaxlab.deepconf import arithmetic_model
from jaxlab.deepconf.arithmetic_model import Config

log = logging.getLogger("jaxlab")


def main(argv: list[str] | None = None) -> dict:
    results.join_processes()  # before JAX touches a backend
    cfg = config_lib.from_command_line(Config, argv, __doc__.splitlines()[0])
    out = results.open_run(cfg.out_dir, cfg)
    finished = results.read_json(out / "train_metrics.json")  # written last
    if finished is not None:
        log.info("%s holds a finished run (train_metrics.json); nothing to do", out)
        return finished
    return arithmetic_model.train(cfg, out)


if __name__ == "__main__":
    cli.run(main)
