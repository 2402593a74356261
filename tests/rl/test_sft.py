"""Supervised training: the SFT rows and loss against hand-made references, exact resume."""

import jax
import numpy as np
import pytest
from flax import nnx

from jaxlab.models.decoder import Decoder
from jaxlab.rl import sft
from tests.rl.loop_job import CONFIG


def test_sft_rows_mask_everything_but_the_target():
    batch = sft.sft_batch([[5, 6], [7]], [[8, 9, 1], [3, 1]], length=6)
    np.testing.assert_array_equal(batch["tokens"], [[5, 6, 8, 9, 1, 0], [7, 3, 1, 0, 0, 0]])
    np.testing.assert_array_equal(batch["mask"], [[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(batch["loss_mask"], [[0, 0, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0]])
    with pytest.raises(ValueError, match="example 1 has 7 tokens > length 6"):
        sft.sft_batch([[5], [7, 7, 7]], [[8], [3, 3, 3, 1]], length=6)


def test_sft_loss_is_the_nll_of_the_target_tokens_only():
    """Against log_softmax of the model's full logits, gathered at the target positions."""
    model = Decoder(CONFIG, nnx.Rngs(0))
    batch = sft.sft_batch([[5, 6], [7]], [[8, 9, 1], [3, 1]], length=6)
    graphdef, state = nnx.split(model)
    loss = jax.jit(lambda s, b: sft.sft_loss(nnx.merge(graphdef, s), b)[0])(state, batch)
    logits = jax.jit(lambda s, t, m: nnx.merge(graphdef, s)(t, m))(state, batch["tokens"],
                                                                  batch["mask"])
    logp = jax.nn.log_softmax(logits)
    picked = [float(logp[row, t - 1, batch["tokens"][row, t]])
              for row in range(2) for t in range(6) if batch["loss_mask"][row, t]]
    assert float(loss) == pytest.approx(-np.mean(picked), rel=1e-5)


def test_fit_resumes_exactly(tmp_path):
    """3 steps, then a rerun to 6 in the same folder == 6 steps at once, bit for bit."""
    rng = np.random.default_rng(0)
    data = sft.sft_batch([rng.integers(3, 16, 3).tolist() for _ in range(16)],
                         [rng.integers(3, 16, 4).tolist() for _ in range(16)], length=8)
    config = sft.FitConfig(steps=6, batch_size=4, learning_rate=1e-2, warmup_steps=2,
                           log_every=1, checkpoint_every=3)

    def params(model):
        return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]

    whole = sft.fit(Decoder(CONFIG, nnx.Rngs(0)), sft.sft_loss, data, config, tmp_path / "a",
                    key=jax.random.key(1))
    import dataclasses
    sft.fit(Decoder(CONFIG, nnx.Rngs(0)), sft.sft_loss, data,
            dataclasses.replace(config, steps=3), tmp_path / "b", key=jax.random.key(1))
    resumed = sft.fit(Decoder(CONFIG, nnx.Rngs(0)), sft.sft_loss, data, config, tmp_path / "b",
                      key=jax.random.key(1))
    for a, b in zip(params(whole), params(resumed), strict=True):
        np.testing.assert_array_equal(a, b)
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert lines == (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
