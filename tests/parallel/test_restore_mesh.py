"""A checkpoint saved under one mesh restores under another (or on one device), values equal."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from jaxlab import parallel
from jaxlab.checkpoint import CheckpointConfig, Checkpointer
from tests.parallel import workloads


def _host(tree) -> list[np.ndarray]:
    """Every array of `tree` as NumPy (PRNG keys as their key data)."""
    return [np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype,
                                                                        jax.dtypes.prng_key)
                       else x) for x in jax.tree.leaves(tree)]


def _specs(tree) -> set[PartitionSpec]:
    return {x.sharding.spec for x in jax.tree.leaves(tree)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A train state born split over an fsdp=8 mesh, saved at step 7."""
    directory = tmp_path_factory.mktemp("checkpoints")
    state = parallel.init_sharded(workloads.distinct_state,
                                  parallel.make_train_mesh(fsdp=8))
    assert PartitionSpec(None, parallel.FSDP) in _specs(state)  # really split
    with Checkpointer(directory, CheckpointConfig(best_metric=None, async_save=False)) as ckpt:
        assert ckpt.save(7, state)
    return directory


@pytest.mark.parametrize("mesh", ["fsdp2_tensor4", "one_device"])
def test_a_state_saved_under_one_mesh_restores_under_another(saved, mesh):
    abstract = jax.eval_shape(workloads.distinct_state)
    if mesh == "one_device":
        shardings = jax.tree.map(lambda _: parallel.replicated(parallel.single_device_mesh()),
                                 abstract)
    else:
        shardings = parallel.tree_shardings(abstract, parallel.make_train_mesh(fsdp=2, tensor=4))
    with Checkpointer(saved, CheckpointConfig(best_metric=None)) as ckpt:
        restored = ckpt.restore(abstract, shardings=shardings)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings), strict=True):
        assert got.sharding == want
    if mesh != "one_device":  # split as the new mesh says, over both of its axes
        assert {PartitionSpec(parallel.FSDP, parallel.TENSOR),
                PartitionSpec(parallel.TENSOR, parallel.FSDP)} <= _specs(restored)
    # The reference: the same state computed unsplit, on the default device.
    for got, want in zip(_host(restored), _host(jax.jit(workloads.distinct_state)()),
                         strict=True):
        np.testing.assert_array_equal(got, want)


def test_shardings_that_do_not_fit_the_target_are_an_error(saved):
    abstract = jax.eval_shape(workloads.distinct_state)
    with Checkpointer(saved, CheckpointConfig(best_metric=None)) as ckpt, \
            pytest.raises(ValueError):
        ckpt.restore(abstract, shardings=[parallel.replicated(parallel.single_device_mesh())])
