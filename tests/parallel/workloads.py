"""The workloads a multi-process run and a single-process run of as many devices must agree on
(tests/parallel/test_multiprocess.py)."""

import jax
import numpy as np
from flax import nnx

from jaxlab import parallel
from jaxlab.limit import free_embedding as fe
from jaxlab.models.decoder import Decoder, DecoderConfig
from jaxlab.rl import train

SOLVER = fe.SolverConfig(check_every=10, patience=200, max_steps=500)
TINY = DecoderConfig(family="qwen3", vocab_size=32, hidden_size=16, intermediate_size=32,
                     num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, qk_norm=True)


def free_embedding_batch() -> dict[str, np.ndarray]:
    """8 runs (seeds x n) split over a RUNS mesh of every device."""
    runs = fe.solve([0, 1, 2, 3] * 2, [5, 5, 6, 6, 7, 7, 8, 8], 3, SOLVER,
                    mesh=parallel.make_mesh(parallel.RUNS))
    return {"solved": runs.solved, "steps": runs.steps, "loss": runs.loss}


def policy_step() -> dict[str, np.ndarray]:
    """One data-parallel policy step of a tiny decoder on 16 rows over a DATA mesh."""
    mesh = parallel.make_mesh(parallel.DATA)
    config = train.TrainConfig(learning_rate=1e-2)
    graphdef, state = train.init_train_state(Decoder(TINY, nnx.Rngs(0)), config,
                                             jax.random.key(0))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, TINY.vocab_size, (16, 8)).astype(np.int32)
    mask = np.ones((16, 8), np.int32)
    logp = np.asarray(train.policy_logprobs(graphdef, state.params, tokens, mask))
    batch = train.PolicyBatch(
        tokens=tokens, mask=mask, loss_mask=np.ones((16, 8), np.float32),
        old_logp=logp + rng.normal(0, 0.1, logp.shape).astype(np.float32), ref_logp=logp,
        advantages=rng.choice([-1.0, 1.0], 16).astype(np.float32))
    state = parallel.put(state, parallel.replicated(mesh))
    batch = parallel.put(batch, parallel.batch_sharding(mesh))
    state, metrics = train.train_step(state, batch, graphdef=graphdef, config=config, mesh=mesh)
    params = {"/".join(map(str, path)): parallel.host_array(leaf)
              for path, leaf in jax.tree_util.tree_leaves_with_path(
                  nnx.to_pure_dict(state.params))}
    return {**{f"param:{k}": v for k, v in params.items()},
            **{f"metric:{k}": parallel.host_array(v) for k, v in metrics.items()}}


def run_all() -> dict[str, np.ndarray]:
    return {**{f"runs:{k}": v for k, v in free_embedding_batch().items()}, **policy_step()}
