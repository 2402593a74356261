import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxlab import parallel
from jaxlab.checkpoint import CheckpointConfig, Checkpointer
from jaxlab.models.decoder import Decoder, DecoderConfig
from jaxlab.rl import loop, losses, scaffold, train

B, T, VOCAB, WIDTH = 16, 8, 32, 16
TINY = DecoderConfig(family="qwen3", vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=32,
                     num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, qk_norm=True)


def tiny(seed=0, **overrides):
    return Decoder(dataclasses.replace(TINY, **overrides), nnx.Rngs(seed))


def make_batch(graphdef, params, num=B, seed=0):
    """Rows of left padding, prompt, response and right padding, with uneven loss masks (one
    empty, one covering every real token after the first) so devices hold unequal counts."""
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(0, VOCAB, (num, T)), jnp.int32)
    first = rng.integers(0, 3, num)                       # left padding
    last = np.maximum(first + 2, T - rng.integers(0, 3, num))  # right padding after `last`
    starts = np.minimum(first + 1 + rng.integers(0, 3, num), last - 1)
    first[:2], last[:2], starts[:2] = 0, T, (T, 1)
    positions = np.arange(T)
    mask = jnp.asarray((positions >= first[:, None]) & (positions < last[:, None]), jnp.int32)
    loss_mask = jnp.asarray((positions >= starts[:, None]) & (positions < last[:, None]),
                            jnp.float32)
    logp = train.policy_logprobs(graphdef, params, tokens, mask)
    noise = jnp.asarray(rng.normal(0, 0.2, (2, num, T)), jnp.float32)
    return train.PolicyBatch(tokens=tokens, mask=mask, loss_mask=loss_mask,
                             old_logp=logp + noise[0], ref_logp=logp + noise[1],
                             advantages=jnp.asarray(rng.choice([-1.0, 0.0, 1.0], num),
                                                    jnp.float32))


def fresh(config, seed=0):
    return train.init_train_state(tiny(seed), config.optimizer, jax.random.key(seed))


def on(mesh, state, batch):
    return (jax.device_put(state, parallel.replicated(mesh)),
            jax.device_put(batch, parallel.batch_sharding(mesh)))


def assert_trees_close(a, b, atol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


def assert_params_close(a, b, learning_rate):
    """After one Adam step (about lr * sign(g)), every entry within the 2 lr that a sign flip of
    a near-zero gradient allows, and all but a few within 1e-6."""
    diffs = np.concatenate([np.abs(np.asarray(x) - np.asarray(y)).ravel() for x, y in zip(
        jax.tree.leaves(a), jax.tree.leaves(b), strict=True)])
    assert diffs.max() <= 2 * learning_rate and np.mean(diffs <= 1e-6) > 0.995


def assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


TEMPERATURE = 0.7
PLAIN = train.TrainConfig(optimizer=train.OptimizerConfig(learning_rate=1e-2, max_grad_norm=0.0),
                          logprob_chunk=3,
                          loss=losses.PolicyLossConfig(kl_coef=0.1, entropy_coef=0.01))


def test_step_is_the_gradient_of_the_whole_batch_loss():
    graphdef, state = fresh(PLAIN)
    batch = make_batch(graphdef, state.params)

    def reference_loss(params):  # the whole batch at once: full logits, no chunks, no shard_map
        logits = nnx.merge(graphdef, params)(batch.tokens[:, :-1], batch.mask[:, :-1])
        logits = logits / TEMPERATURE
        per_token, _ = losses.policy_loss_per_token(
            losses.token_logprobs(logits, batch.tokens[:, 1:]), losses.entropy(logits),
            batch.old_logp[:, 1:], batch.advantages, batch.ref_logp[:, 1:], PLAIN.loss)
        return losses.token_mean(per_token, batch.loss_mask[:, 1:])

    loss, grads = jax.value_and_grad(reference_loss)(state.params)
    tx = optax.adamw(PLAIN.optimizer.learning_rate, weight_decay=PLAIN.optimizer.weight_decay)
    updates, want_opt = tx.update(grads, tx.init(state.params), state.params)
    want_params = optax.apply_updates(state.params, updates)

    mesh = parallel.single_device_mesh()
    new, metrics = train.train_step(*on(mesh, state, batch), graphdef=graphdef, config=PLAIN,
                                    temperature=TEMPERATURE, mesh=mesh)
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm"], optax.tree.norm(grads), rtol=1e-5)
    assert metrics["count"] == jnp.sum(batch.loss_mask[:, 1:])
    # Adam's moments are (1 - b1) g and (1 - b2) g^2: the chunked, masked step's gradient is the
    # full-logits gradient. Its first update is about lr * sign(g), so entries with g ~ 0 may
    # flip within 2 lr; all others agree.
    for got, want in zip(jax.tree.leaves(new.opt_state), jax.tree.leaves(want_opt), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-9)
    assert_params_close(new.params, want_params, PLAIN.optimizer.learning_rate)
    assert new.step == 1
    # A second step with the same shapes reuses the compiled step.
    compiled = train.train_step._cache_size()
    train.train_step(new, jax.device_put(batch, parallel.batch_sharding(mesh)),
                     graphdef=graphdef, config=PLAIN, temperature=TEMPERATURE, mesh=mesh)
    assert train.train_step._cache_size() == compiled


def test_a_step_with_an_empty_loss_mask_moves_nothing():
    # After a real step AdamW holds momentum: a plain zero-gradient update would still move
    # every weight by about lr. With no token in the loss (every group dropped) nothing moves;
    # the step is counted, as the iteration took place.
    graphdef, state = fresh(PLAIN)
    mesh = parallel.single_device_mesh()
    batch = make_batch(graphdef, state.params)
    state, _ = train.train_step(*on(mesh, state, batch), graphdef=graphdef, config=PLAIN,
                                temperature=TEMPERATURE, mesh=mesh)
    before = jax.tree.map(np.asarray, (state.params, state.opt_state))
    empty = batch._replace(loss_mask=jnp.zeros_like(batch.loss_mask))
    after, metrics = train.train_step(*on(mesh, state, empty), graphdef=graphdef, config=PLAIN,
                                      temperature=TEMPERATURE, mesh=mesh)
    assert_trees_equal((after.params, after.opt_state), before)
    assert after.step == 2 and metrics["loss"] == 0 and metrics["finite"] == 1
    # the same zero gradient through the optimizer alone does move the weights
    zero = jax.tree.map(jnp.zeros_like, state.params)
    updates, _ = train.make_optimizer(PLAIN.optimizer).update(zero, state.opt_state, state.params)
    assert max(float(jnp.max(jnp.abs(u))) for u in jax.tree.leaves(updates)) > 1e-4


@pytest.mark.parametrize(("advantage", "kl_coef", "entropy_coef", "want"), [
    # groups of G = 3; group 1 dropped, group 2 a spare; BRPO references have advantage 0
    ("brpo", 0.0, 0.0, [1, 0, 1, 0, 0, 0, 0, 0, 0]),
    ("brpo", 0.1, 0.0, [1, 1, 1, 0, 0, 0, 1, 1, 1]),   # the KL term trains every kept row
    ("brpo", 0.0, 0.01, [1, 1, 1, 0, 0, 0, 0, 0, 0]),  # the entropy term trains the reference
    ("grpo", 0.0, 0.0, [1, 1, 1, 0, 0, 0, 0, 0, 0]),   # a zero GRPO advantage is no reference
])
def test_trained_rows_leave_out_what_only_dilutes_the_token_mean(advantage, kl_coef,
                                                                 entropy_coef, want):
    config = loop.LoopConfig(group_size=3, advantage=advantage, train=train.TrainConfig(
        loss=losses.PolicyLossConfig(kl_coef=kl_coef, entropy_coef=entropy_coef)))
    advantages = jnp.asarray([[1.0, 0.0, -1.0], [0.0, 1.0, 1.0], [-1.0, -1.0, 0.0]])
    keep, spare = jnp.asarray([True, False, True]), jnp.asarray([False, False, True])
    rows = loop.trained_rows(advantages, keep, spare, config)
    np.testing.assert_array_equal(rows, np.asarray(want, bool))


def test_sharded_accumulated_step_equals_single_device_step(data_mesh8):
    loss = losses.PolicyLossConfig(kl_coef=0.1, entropy_coef=0.01, dual_clip=3.0,
                                   aggregation="sequence_mean")
    optimizer = train.OptimizerConfig(learning_rate=1e-2)
    single = train.TrainConfig(optimizer=optimizer, loss=loss)
    sharded = train.TrainConfig(optimizer=optimizer, loss=loss, microbatches=2)
    graphdef, state = fresh(single)
    batch = make_batch(graphdef, state.params, num=32)
    results = []
    for config, mesh in ((single, parallel.single_device_mesh()), (sharded, data_mesh8)):
        s, b = on(mesh, fresh(config)[1], batch)
        history = []
        for _ in range(3):
            s, metrics = train.train_step(s, b, graphdef=graphdef, config=config, mesh=mesh,
                                          temperature=1.0)
            history.append(metrics)
        results.append((s, history))
    (s1, h1), (s8, h8) = results
    # After three Adam steps at lr 1e-2: within 1e-5 (1e-3 of a step). The fused attention's
    # float32 reductions round differently for 2 rows per device than for 16, and Adam's update
    # g / sqrt(v) magnifies that rounding in entries whose gradient is near zero.
    assert_trees_close(s8.params, s1.params, atol=1e-5)
    assert_trees_close(s8.opt_state, s1.opt_state, atol=1e-5)
    for m1, m8 in zip(h1, h8, strict=True):
        assert set(m1) == set(m8) == {"loss", "policy", "kl", "entropy", "clipped", "grad_norm",
                                      "count", "finite"}
        for name in m1:
            np.testing.assert_allclose(m8[name], m1[name], rtol=1e-5, atol=1e-6, err_msg=name)
    assert h1[-1]["loss"] < h1[0]["loss"]  # it trains


def grouped_batch(graphdef, params, prompts=8, group=4, width=5, steps=6, seed=0):
    """`prompts` groups of `group` rows: one left-padded prompt of 1..width tokens per group,
    each row its own right-padded response of 0..steps tokens (the loss on those)."""
    rng = np.random.default_rng(seed)
    num, cols = prompts * group, np.arange(width + steps)
    prompt = np.repeat(rng.integers(0, VOCAB, (prompts, width)), group, axis=0)
    first = np.repeat(width - rng.integers(1, width + 1, prompts), group)
    lengths = rng.integers(0, steps + 1, num)
    lengths[0] = 0                                         # an empty response
    tokens = np.concatenate([prompt, rng.integers(0, VOCAB, (num, steps))], axis=1)
    mask = (cols >= first[:, None]) & (cols < width + lengths[:, None])
    loss_mask = (cols >= width) & mask
    tokens, mask = jnp.asarray(tokens * mask, jnp.int32), jnp.asarray(mask, jnp.int32)
    logp = train.policy_logprobs(graphdef, params, tokens, mask)
    noise = jnp.asarray(rng.normal(0, 0.2, (2, num, width + steps)), jnp.float32)
    return train.PolicyBatch(tokens=tokens, mask=mask, loss_mask=jnp.asarray(loss_mask,
                                                                               jnp.float32),
                             old_logp=logp + noise[0], ref_logp=logp + noise[1],
                             advantages=jnp.asarray(rng.normal(size=num), jnp.float32))


SHARED = train.SharedPrompts(group_size=4, prompt_width=5)


def grouped_state():
    return train.init_train_state(tiny(num_layers=2, num_heads=4, num_kv_heads=2), PLAIN.optimizer,
                                  jax.random.key(0))


@pytest.mark.parametrize("remat", ["none", "full"])
def test_shared_prompts_give_the_row_by_row_logprobs_and_gradients(remat):
    """Each group's prompt run once (`SharedPrompts`; 2 layers, 4 heads on 2 kv heads; layers
    unrolled, or scanned under remat) gives the rows' log-probs and entropies on every response
    token, 0 on the prompt columns, and the same gradient."""
    graphdef, state = grouped_state()
    batch = grouped_batch(graphdef, state.params)
    on_response = np.asarray(batch.loss_mask) > 0

    def weighted(params, shared):
        logp, ent = train.sequence_logprobs(
            nnx.merge(graphdef, params), batch.tokens, batch.mask, temperature=TEMPERATURE, chunk=3,
            entropy_grad=True, remat=remat, shared=shared)
        return jnp.sum(batch.loss_mask * (logp + 0.3 * ent)), (logp, ent)

    value_and_grad = jax.jit(jax.value_and_grad(weighted, has_aux=True), static_argnums=1)
    (row_total, row), row_grads = value_and_grad(state.params, None)
    (total, got), grads = value_and_grad(state.params, SHARED)
    for x, y in zip(got, row, strict=True):
        np.testing.assert_allclose(np.asarray(x)[on_response], np.asarray(y)[on_response],
                                   rtol=1e-5, atol=1e-5)
        assert not np.asarray(x)[:, :5].any()
    np.testing.assert_allclose(total, row_total, rtol=1e-5)
    assert_trees_close(grads, row_grads, atol=1e-5)


def test_a_shared_prompts_step_equals_the_row_by_row_step_on_every_mesh(data_mesh8):
    """The step with `SharedPrompts` equals the row by row step (metrics to 1e-5, parameters
    after one Adam step): on one device, in 2 micro-batches, on 8 data devices (one group each)
    and on a (data 2, fsdp 2, tensor 2) mesh that splits the model; micro-batches that would
    split a group are refused."""
    graphdef, state = grouped_state()
    batch = grouped_batch(graphdef, state.params)
    one = parallel.single_device_mesh()
    want, want_metrics = train.train_step(*on(one, fresh_like(state), batch), graphdef=graphdef,
                                          config=PLAIN, temperature=TEMPERATURE, mesh=one)
    cases = [(one, PLAIN), (one, dataclasses.replace(PLAIN, microbatches=2)),
             (data_mesh8, PLAIN), (parallel.make_train_mesh(2, 2, 2), PLAIN)]
    for mesh, config in cases:
        _, placed = scaffold.init_state(nnx.merge(graphdef, state.params), config.optimizer,
                                    jax.random.key(0), mesh)
        new, metrics = train.train_step(
            placed, jax.device_put(batch, parallel.batch_sharding(mesh)), graphdef=graphdef,
            config=config, temperature=TEMPERATURE, mesh=mesh, shared=SHARED)
        for name in ("loss", "policy", "kl", "entropy", "clipped", "grad_norm", "count"):
            np.testing.assert_allclose(metrics[name], want_metrics[name], rtol=1e-5,
                                       atol=1e-7, err_msg=f"{name} on {mesh.shape}")
        assert_params_close(new.params, want.params, PLAIN.optimizer.learning_rate)
    with pytest.raises(ValueError, match="whole groups of 4 rows"):
        train.train_step(*on(data_mesh8, fresh_like(state), jax.tree.map(lambda x: x[:16],
                                                                         batch)),
                         graphdef=graphdef, config=PLAIN,
                         temperature=TEMPERATURE, mesh=data_mesh8, shared=SHARED)
    with pytest.raises(ValueError, match="group_size"):
        train.SharedPrompts(group_size=0, prompt_width=5)


def fresh_like(state):
    """A copy of `state` (the step donates its input)."""
    return jax.tree.map(jnp.copy, state)


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    graphdef, state = fresh(PLAIN, seed=3)
    data = make_batch(graphdef, state.params, num=40, seed=3)  # 40 examples, batches of 16
    mesh = parallel.single_device_mesh()

    def run(state, steps, checkpointer=None):
        seen = []
        for _ in range(steps):
            index = train.batch_indices(state.key, state.step, 40, B)
            seen.append(np.asarray(index))
            state, b = on(mesh, state, jax.tree.map(lambda x, i=index: x[i], data))
            state, metrics = train.train_step(state, b, graphdef=graphdef, config=PLAIN,
                                              temperature=TEMPERATURE, mesh=mesh)
            if checkpointer is not None:
                checkpointer.save(int(state.step), state, metrics)
        return state, seen

    whole, whole_batches = run(fresh(PLAIN, seed=3)[1], 7)

    with Checkpointer(tmp_path, CheckpointConfig(keep_checkpoints=2)) as checkpointer:
        _, first_batches = run(fresh(PLAIN, seed=3)[1], 4, checkpointer)
    # A new process: a fresh state of the same shapes, then the latest checkpoint.
    with Checkpointer(tmp_path, CheckpointConfig(keep_checkpoints=2)) as checkpointer:
        assert checkpointer.latest_step() == 4
        restored = checkpointer.restore(fresh(PLAIN, seed=99)[1])
    assert restored.step == 4
    resumed, later_batches = run(restored, 3)

    np.testing.assert_array_equal(np.stack(first_batches + later_batches), np.stack(whole_batches))
    assert_trees_equal(resumed, whole)


def test_batch_indices_cover_each_epoch_once():
    key = jax.random.key(0)
    epoch = np.concatenate([train.batch_indices(key, s, 10, 3) for s in range(3)])
    assert len(set(epoch.tolist())) == 9  # 3 batches of 3 from 10: one example left out
    again = np.concatenate([train.batch_indices(key, s, 10, 3) for s in range(3, 6)])
    assert len(set(again.tolist())) == 9 and not np.array_equal(epoch, again)


def test_bad_batches_are_named():
    graphdef, state = fresh(PLAIN)
    batch = make_batch(graphdef, state.params)
    mesh = parallel.single_device_mesh()
    bad = [
        (batch._replace(advantages=batch.advantages[:3]), "advantages"),
        (batch._replace(old_logp=batch.old_logp[:, :3]), "old_logp"),
        (batch._replace(tokens=batch.tokens.astype(jnp.float32)), "integers"),
        (jax.tree.map(lambda x: x[:15], batch), "multiple"),
    ]
    for wrong, match in bad:
        with pytest.raises(ValueError, match=match):
            train.train_step(state, wrong, graphdef=graphdef,
                             config=train.TrainConfig(microbatches=2), mesh=mesh,
                             temperature=1.0)
    with pytest.raises(ValueError, match="'data' axis"):
        train.train_step(state, batch, graphdef=graphdef, config=PLAIN, temperature=TEMPERATURE,
                         mesh=parallel.make_mesh(parallel.RUNS, jax.devices()[:1]))
    with pytest.raises(ValueError, match="microbatches"):
        train.TrainConfig(microbatches=0)


def test_models_with_non_parameter_state_are_refused():
    model = tiny()
    model.calls = nnx.BatchStat(jnp.zeros(()))
    with pytest.raises(ValueError, match=r"non-parameter state.*calls"):
        train.init_train_state(model, PLAIN.optimizer, jax.random.key(0))


def test_the_causal_lm_trains_sharded_as_on_one_device(tmp_path, data_mesh8):
    from jaxlab.models import hf, zoo

    path = zoo.create("qwen3", tmp_path, vocab_size=VOCAB)
    graphdef, state = train.init_train_state(hf.load_pretrained(path), PLAIN.optimizer,
                                             jax.random.key(0))
    batch = make_batch(graphdef, state.params)
    one, metrics_one = train.train_step(*on(parallel.single_device_mesh(), state, batch),
                                        graphdef=graphdef, config=PLAIN, temperature=TEMPERATURE,
                                        mesh=parallel.single_device_mesh())
    _, state = train.init_train_state(hf.load_pretrained(path), PLAIN.optimizer, jax.random.key(0))
    many, metrics_many = train.train_step(*on(data_mesh8, state, batch), graphdef=graphdef,
                                          config=PLAIN, temperature=TEMPERATURE, mesh=data_mesh8)
    assert np.isfinite(float(metrics_one["loss"])) and float(metrics_one["grad_norm"]) > 0
    np.testing.assert_allclose(metrics_one["loss"], metrics_many["loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics_one["grad_norm"], metrics_many["grad_norm"], rtol=1e-5)
    # Adam's moments are linear in g and g^2: the sharded gradients equal the single-device ones.
    assert_trees_close(many.opt_state, one.opt_state, atol=1e-6)
    # Its first step is lr * g / (|g| + eps), about lr * sign(g): where a gradient entry is ~0,
    # the float32 reduction order over 8 shards can flip it. Every entry stays within the 2 lr
    # such a flip allows, and all but a few agree to 1e-6.
    assert_params_close(many.params, one.params, PLAIN.optimizer.learning_rate)


@pytest.mark.parametrize("config,reference", [
    (train.OptimizerConfig(learning_rate=0.1, warmup_steps=2, decay_steps=6, weight_decay=0.01,
                           max_grad_norm=0.0),
     lambda: optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 0.1, 2, 6),
                         weight_decay=0.01)),
    (train.OptimizerConfig(learning_rate=0.1, warmup_steps=3, max_grad_norm=0.5),
     lambda: optax.chain(optax.clip_by_global_norm(0.5),
                         optax.adamw(optax.linear_schedule(0.0, 0.1, 3), weight_decay=0.0))),
])
def test_the_optimizer_is_the_schedule_and_clipping_it_names(config, reference):
    """make_optimizer(OptimizerConfig) against optax composed by hand: the same updates over
    eight steps (warmup, cosine decay to 0 and past its end, or constant after the warmup)."""
    params = {"w": jnp.ones(3)}
    grads = [{"w": jnp.asarray(np.random.default_rng(s).normal(size=3), jnp.float32)}
             for s in range(8)]
    ours, theirs = train.make_optimizer(config), reference()
    a, b = ours.init(params), theirs.init(params)
    for g in grads:
        (u, a), (v, b) = ours.update(g, a, params), theirs.update(g, b, params)
        np.testing.assert_array_equal(u["w"], v["w"])
    with pytest.raises(ValueError, match="decay_steps must be None or an integer > warmup_steps"):
        train.OptimizerConfig(warmup_steps=5, decay_steps=5)
