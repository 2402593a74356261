import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxlab import parallel
from jaxlab.models.decoder import Decoder, DecoderConfig
from jaxlab.rl import losses, train

CONFIG = DecoderConfig(family="qwen3", vocab_size=256, hidden_size=64, intermediate_size=128,
                       num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, qk_norm=True)


def _state():
    return train.init_train_state(Decoder(CONFIG, nnx.Rngs(0)), train.OptimizerConfig(),
                                  jax.random.key(0))[1]


def test_fsdp_state_is_born_split_eight_ways():
    # Parameters and Adam moments over fsdp = 8: each device holds an eighth of the bytes, up to
    # the replicated norm scales and scalars (the 5% the issue allows).
    mesh = parallel.make_train_mesh(fsdp=8)
    state = parallel.init_sharded(_state, mesh)
    total = sum(x.nbytes for x in jax.tree.leaves(state))
    held = parallel.bytes_per_device(state)
    assert len(held) == 8
    for nbytes in held.values():
        assert abs(nbytes - total / 8) <= 0.05 * total / 8, (nbytes, total / 8)
    # The same arrays copied to the host are on no device.
    assert parallel.bytes_per_device(jax.tree.map(np.asarray, state.params)) == {}
    q_proj = state.params["layers"][0]["self_attn"]["q_proj"]["kernel"][...]
    assert q_proj.sharding.spec == jax.sharding.PartitionSpec(parallel.FSDP, None)
    assert q_proj.addressable_shards[0].data.shape == (64 // 8, 64)
    # Born sharded, yet the same numbers as the unsharded initialisation (the same random bits;
    # the scaling of the draws may round differently once the program is partitioned).
    for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(_state().params),
                         strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("data,fsdp,tensor", [(1, 8, 1), (1, 4, 2), (2, 2, 2), (1, 1, 8)])
def test_sharded_loss_and_gradient_equal_the_unsharded(data, fsdp, tensor):
    graphdef, params = nnx.split(Decoder(CONFIG, nnx.Rngs(0)), nnx.Param)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (8, 12)), jnp.int32)

    def loss(params, tokens):
        logits = nnx.merge(graphdef, params)(tokens[:, :-1])
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]))

    want_loss, want_grad = jax.jit(jax.value_and_grad(loss))(params, tokens)
    mesh = parallel.make_train_mesh(data, fsdp, tensor)
    shardings = parallel.tree_shardings(params, mesh)
    batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
        (parallel.DATA, parallel.FSDP)))
    step = jax.jit(jax.value_and_grad(loss), in_shardings=(shardings, batch),
                   out_shardings=(None, shardings))
    got_loss, got_grad = step(jax.device_put(params, shardings), jax.device_put(tokens, batch))
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
    for got, want in zip(jax.tree.leaves(got_grad), jax.tree.leaves(want_grad), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-7)


def test_a_dimension_the_mesh_axis_does_not_divide_is_named():
    odd = dataclasses.replace(CONFIG, intermediate_size=100)
    params = nnx.state(Decoder(odd, nnx.Rngs(0)), nnx.Param)
    with pytest.raises(ValueError, match=r"layers/0/mlp/down_proj/kernel of shape \(100, 64\): "
                                         r"its 'mlp' dimension 100 does not divide over mesh axis "
                                         r"'tensor' of size 8"):
        parallel.tree_shardings(params, parallel.make_train_mesh(tensor=8))


def test_mesh_sizes_must_use_every_device():
    with pytest.raises(ValueError, match="needs 4 devices; 8 are present"):
        parallel.make_train_mesh(fsdp=2, tensor=2)
    with pytest.raises(ValueError, match="integers >= 1"):
        parallel.make_train_mesh(fsdp=0)


def test_unnamed_and_scalar_arrays_are_replicated():
    mesh = parallel.make_train_mesh(fsdp=8)
    tree = {"count": jnp.zeros(()), "norm": {"weight": jnp.ones(64)},
            "mystery": {"kernel": jnp.ones((64, 64))}}
    specs = jax.tree.map(lambda s: s.spec, parallel.tree_shardings(tree, mesh))
    P = jax.sharding.PartitionSpec
    assert specs == {"count": P(), "norm": {"weight": P(None)}, "mystery": {"kernel": P(None,
                                                                                       None)}}


@pytest.mark.parametrize("data,fsdp,tensor,remat", [(1, 8, 1, "none"), (2, 2, 2, "full")])
def test_split_model_step_equals_the_single_device_step(data, fsdp, tensor, remat):
    # The policy step on a mesh that splits the model (left to XLA's partitioner), with gradient
    # clipping, KL and entropy terms, 2 micro-batches and (on one mesh) every decoder layer
    # rematerialized, against the one-device step without remat: same
    # loss, same Adam moments, parameters within the sign flips of near-zero gradients; the
    # state stays split as it was born. (Moments agree to float32 summation order: 1e-8 of
    # moments ~1e-3.)
    from tests.rl.test_train import assert_params_close, make_batch

    config = train.TrainConfig(
        optimizer=train.OptimizerConfig(learning_rate=1e-2), microbatches=2,
        loss=losses.PolicyLossConfig(kl_coef=0.1, entropy_coef=0.01))
    graphdef, _ = nnx.split(Decoder(CONFIG, nnx.Rngs(0)))
    state = train.init_train_state(Decoder(CONFIG, nnx.Rngs(0)), config.optimizer,
                                   jax.random.key(0))[1]
    batch = make_batch(graphdef, state.params, num=16)
    single = parallel.single_device_mesh()
    want, want_metrics = train.train_step(jax.device_put(state, parallel.replicated(single)),
                                          batch, graphdef=graphdef, config=config, mesh=single,
                                          temperature=1.0)
    config = dataclasses.replace(config, remat=remat)
    mesh = parallel.make_train_mesh(data, fsdp, tensor)
    split = parallel.init_sharded(
        lambda: train.init_train_state(Decoder(CONFIG, nnx.Rngs(0)), config.optimizer,
                                       jax.random.key(0))[1], mesh)
    got, metrics = train.train_step(split, jax.device_put(batch, parallel.batch_sharding(mesh)),
                                    graphdef=graphdef, config=config, mesh=mesh, temperature=1.0)
    for name in ("loss", "grad_norm", "kl", "entropy"):
        np.testing.assert_allclose(metrics[name], want_metrics[name], rtol=1e-5, err_msg=name)
    mu = [x for path, x in jax.tree_util.tree_leaves_with_path(got.opt_state)
          if ".mu" in jax.tree_util.keystr(path)]
    want_mu = [x for path, x in jax.tree_util.tree_leaves_with_path(want.opt_state)
               if ".mu" in jax.tree_util.keystr(path)]
    for x, y in zip(mu, want_mu, strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-8)
    assert_params_close(got.params, want.params, config.optimizer.learning_rate)
    for got_leaf, born in zip(jax.tree.leaves(got), jax.tree.leaves(split), strict=False):
        assert got_leaf.sharding.is_equivalent_to(born.sharding, got_leaf.ndim)


@pytest.mark.parametrize("data,fsdp,tensor,scan_layers", [(1, 1, 8, False), (2, 2, 2, False),
                                                          (2, 2, 2, True)])
def test_sampling_with_split_parameters_equals_replicated(data, fsdp, tensor, scan_layers,
                                                          monkeypatch):
    # The sampler on a mesh that splits the weights over tensor (and fsdp) devices, as the
    # train step holds them: the same tokens as on one device (layers unrolled), the weights
    # never replicated; also with the layers scanned over their stacked weights.
    from jaxlab.sampling import sampler

    model = Decoder(CONFIG, nnx.Rngs(0))
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13]]
    config = sampler.SamplingConfig(max_new_tokens=8, group_size=4, temperature=1.0,
                                    confidence=True)
    one = jax.device_get(sampler.sample(model, prompts, jax.random.key(3), config))
    seen = {}
    decode = sampler.decode_loop

    def spy(graphdef, state, *args, **kwargs):
        seen["q_proj"] = state["layers"][0]["self_attn"]["q_proj"]["kernel"][...].sharding
        return decode(graphdef, state, *args, **kwargs)

    monkeypatch.setattr(sampler, "decode_loop", spy)
    mesh = parallel.make_train_mesh(data, fsdp, tensor)
    many = jax.device_get(sampler.sample(
        model, prompts, jax.random.key(3),
        dataclasses.replace(config, scan_layers=scan_layers), mesh=mesh))
    np.testing.assert_array_equal(one.tokens, many.tokens)
    np.testing.assert_array_equal(one.lengths, many.lengths)
    np.testing.assert_allclose(one.confidence, many.confidence, rtol=1e-5)
    split = jax.sharding.PartitionSpec(parallel.FSDP if fsdp > 1 else None, parallel.TENSOR)
    assert seen["q_proj"].spec == split  # [E, H D]: embed over fsdp, heads over tensor
