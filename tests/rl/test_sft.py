"""Supervised training: the SFT rows and loss against hand-made references, exact resume."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlab.models.decoder import Decoder
from jaxlab.rl import sft, train
from tests.rl.loop_job import CONFIG
from tests.rl.test_train import assert_params_close


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
    config = sft.FitConfig(steps=6, batch_size=4, log_every=1, checkpoint_every=3,
                           optimizer=train.OptimizerConfig(learning_rate=1e-2, warmup_steps=2))

    def params(model):
        return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]

    whole = sft.fit(Decoder(CONFIG, nnx.Rngs(0)), sft.sft_loss, data, config, tmp_path / "a",
                    key=jax.random.key(1))
    sft.fit(Decoder(CONFIG, nnx.Rngs(0)), sft.sft_loss, data,
            dataclasses.replace(config, steps=3), tmp_path / "b", key=jax.random.key(1))
    resumed = sft.fit(Decoder(CONFIG, nnx.Rngs(0)), sft.sft_loss, data, config, tmp_path / "b",
                      key=jax.random.key(1))
    for a, b in zip(params(whole), params(resumed), strict=True):
        np.testing.assert_array_equal(a, b)
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert lines == (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()


def _stream(start, steps=6, rows=4):
    """Step s's batch: rows drawn from a generator seeded by s (so any start reads the same)."""
    for s in range(start, steps):
        rng = np.random.default_rng(s)
        yield sft.sft_batch([rng.integers(3, 16, 3).tolist() for _ in range(rows)],
                            [rng.integers(3, 16, 4).tolist() for _ in range(rows)], length=8)


def test_fit_on_a_stream_resumes_exactly_and_trains_on_each_step_batch(tmp_path):
    """A stream's run cut at step 3 and resumed == the run that never stopped, bit for bit; and
    its first step is one AdamW step on step 0's batch, by hand."""
    config = sft.FitConfig(steps=6, batch_size=4, log_every=1, checkpoint_every=3,
                           optimizer=train.OptimizerConfig(learning_rate=1e-2, warmup_steps=0))

    def params(model):
        return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]

    whole = sft.fit(Decoder(CONFIG, nnx.Rngs(0)), sft.sft_loss, _stream, config,
                    tmp_path / "a", key=jax.random.key(1))
    sft.fit(Decoder(CONFIG, nnx.Rngs(0)), sft.sft_loss, _stream,
            dataclasses.replace(config, steps=3), tmp_path / "b", key=jax.random.key(1))
    resumed = sft.fit(Decoder(CONFIG, nnx.Rngs(0)), sft.sft_loss, _stream, config,
                      tmp_path / "b", key=jax.random.key(1))
    for a, b in zip(params(whole), params(resumed), strict=True):
        np.testing.assert_array_equal(a, b)

    one = sft.fit(Decoder(CONFIG, nnx.Rngs(0)), sft.sft_loss, _stream,
                  dataclasses.replace(config, steps=1), tmp_path / "c", key=jax.random.key(1))
    model = Decoder(CONFIG, nnx.Rngs(0))
    graphdef, state = nnx.split(model, nnx.Param)
    batch = next(_stream(0))
    grads = jax.grad(lambda p: sft.sft_loss(nnx.merge(graphdef, p), batch)[0])(state)
    tx = train.make_optimizer(config.optimizer)
    updates, _ = tx.update(grads, tx.init(state), state)
    want = jax.tree.map(lambda p, u: p + u, state, updates)
    # Adam's first update is about lr * sign(g): entries whose gradient rounds near 0 may differ
    # within 2 lr, all others agree (`assert_params_close`)
    assert_params_close(nnx.state(one, nnx.Param), want, config.optimizer.learning_rate)


def test_a_stream_that_ends_early_or_gives_the_wrong_rows_is_named(tmp_path):
    config = sft.FitConfig(steps=8, batch_size=4, log_every=1, checkpoint_every=8)
    with pytest.raises(ValueError, match=r"step 6: the data stream ended before FitConfig\.steps"):
        sft.fit(Decoder(CONFIG, nnx.Rngs(0)), sft.sft_loss, _stream, config, tmp_path / "a",
                key=jax.random.key(1))
    with pytest.raises(ValueError, match=r"step 0: the data stream's batch has rows .*'tokens': 3"
                                         r".*expected FitConfig.batch_size=4"):
        sft.fit(Decoder(CONFIG, nnx.Rngs(0)), sft.sft_loss, lambda s: _stream(s, rows=3),
                config, tmp_path / "b", key=jax.random.key(1))


def _ragged_data(rows=8):
    """SFT rows whose targets differ in length, so micro-batches hold different token counts."""
    rng = np.random.default_rng(3)
    return sft.sft_batch([rng.integers(3, 16, 2).tolist() for _ in range(rows)],
                         [rng.integers(3, 16, 1 + 5 * (i % 2)).tolist() for i in range(rows)],
                         length=8)


def test_micro_batches_take_the_step_of_the_whole_batch(tmp_path):
    """Accumulating 4 parts of unequal token counts == one step on the batch's token mean."""
    data = _ragged_data()
    config = sft.FitConfig(steps=2, batch_size=8, log_every=1, checkpoint_every=2,
                           optimizer=train.OptimizerConfig(learning_rate=1e-2, warmup_steps=0))

    def params(micro):
        model = sft.fit(Decoder(CONFIG, nnx.Rngs(0)), sft.sft_loss, data,
                        dataclasses.replace(config, microbatches=micro), tmp_path / str(micro),
                        key=jax.random.key(1))
        return jax.tree.leaves(nnx.state(model, nnx.Param))

    for a, b in zip(params(1), params(4), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    losses = [[json.loads(line)["loss"] for line in (tmp_path / m / "metrics.jsonl").open()]
              for m in ("1", "4")]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-6)


def test_a_non_finite_step_stops_the_run_before_it_is_applied(tmp_path):
    """A loss that is NaN on batches holding row 0 stops fit at the first step that draws row
    0, with the step number; the checkpoints before it hold finite parameters."""
    def nan_on_row_0(model, batch):
        loss, metrics = sft.sft_loss(model, batch)
        return loss / jnp.all(batch["tokens"][:, 0] != 2), metrics     # x / False = inf

    data = _ragged_data(16)
    data["tokens"][0, 0] = 2  # no other prompt holds token 2
    key = jax.random.key(1)
    bad = next(s for s in range(2) if 0 in np.asarray(train.batch_indices(key, s, 16, 8)))
    config = sft.FitConfig(steps=4, batch_size=8, log_every=1, checkpoint_every=1,
                           optimizer=train.OptimizerConfig(learning_rate=1e-2, warmup_steps=0))
    with pytest.raises(FloatingPointError, match=f"step {bad}: non-finite loss"):
        sft.fit(Decoder(CONFIG, nnx.Rngs(0)), nan_on_row_0, data, config, tmp_path, key=key)
    saved = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [str(s) for s in range(1, bad + 1)]


def _grads(loss_fn, model, batch, **kwargs):
    graphdef, params = nnx.split(model)
    return jax.jit(jax.grad(lambda p: loss_fn(nnx.merge(graphdef, p), batch, **kwargs)[0]))(
        params)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_gives_the_sft_and_reward_model_gradients_of_no_remat(remat):
    """The gradient under each checkpoint policy equals the plain one (to 1e-6 of its largest
    entry: the recomputed forward rounds differently), for sft_loss and the RM's pair_loss."""
    from jaxlab.rl import reward_model

    rng = np.random.default_rng(0)
    data = sft.sft_batch([rng.integers(3, 16, 3).tolist() for _ in range(4)],
                         [rng.integers(3, 16, 2 + i).tolist() for i in range(4)], length=8)
    model = Decoder(CONFIG, nnx.Rngs(0))
    rm = reward_model.ScalarRewardModel(Decoder(CONFIG, nnx.Rngs(1)), CONFIG.hidden_size,
                                        rngs=nnx.Rngs(2))
    pairs = reward_model.pair_batch([[5, 6]] * 2, [[7, 8, 9], [3]], [[4], [9, 9, 9, 3]], 8)
    for loss_fn, module, batch in ((sft.sft_loss, model, data),
                                   (reward_model.pair_loss, rm, pairs)):
        plain, kept = (jax.tree.leaves(_grads(loss_fn, module, batch, remat=r))
                       for r in ("none", remat))
        scale = max(float(jnp.max(jnp.abs(g))) for g in plain)
        for a, b in zip(plain, kept, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-6 * scale, rtol=0)


def test_fit_passes_its_remat_policy_to_the_loss(tmp_path):
    seen = []

    def loss_fn(model, batch, *, remat="none"):
        seen.append(remat)
        return sft.sft_loss(model, batch, remat=remat)

    config = sft.FitConfig(steps=1, batch_size=4, remat="full",
                           optimizer=train.OptimizerConfig(learning_rate=1e-3))
    sft.fit(Decoder(CONFIG, nnx.Rngs(0)), loss_fn, _ragged_data(), config, tmp_path,
            key=jax.random.key(0))
    assert seen and set(seen) == {"full"}
    with pytest.raises(ValueError, match=r"FitConfig\.remat must be one of"):
        sft.FitConfig(remat="some")
