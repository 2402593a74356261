"""A small RL run for the kill-and-resume test: `python -m tests.rl.loop_job OUT ITERATIONS`."""

import logging
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import numpy as np
from flax import nnx

from jaxlab.models.decoder import Decoder, DecoderConfig
from jaxlab.rl import loop, train

CONFIG = DecoderConfig(family="qwen3", vocab_size=16, hidden_size=16, intermediate_size=32,
                       num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, qk_norm=True)


def prompt_fn(key, count):
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)))
    return [loop.Prompt(tuple(rng.integers(3, 16, rng.integers(1, 4)).tolist()))
            for _ in range(count)]


def reward_fn(prompts, responses, truncated):
    """Rewards responses made of even tokens."""
    return np.asarray([[np.mean([t % 2 == 0 for t in r]) if r else 0.0 for r in group]
                       for group in responses])


def config(steps: int) -> loop.LoopConfig:
    return loop.LoopConfig(steps=steps, prompts=4, group_size=4, max_prompt_tokens=4,
                           max_new_tokens=6, stop_ids=(2,), minibatches=2, checkpoint_every=1,
                           temperature=0.9, train=train.TrainConfig(
                               optimizer=train.OptimizerConfig(learning_rate=1e-2)))


def main(out: str, steps: int) -> None:
    logger = logging.getLogger("jaxlab")
    logger.addHandler(logging.StreamHandler())
    logger.setLevel(logging.INFO)
    _, state = loop.run(Decoder(CONFIG, nnx.Rngs(0)), prompt_fn, reward_fn,
                        config(steps), out, key=jax.random.key(0))
    leaves = [np.asarray(x) for x in jax.tree.leaves(state.params)]
    np.savez(os.path.join(out, "final.npz"), *leaves)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
