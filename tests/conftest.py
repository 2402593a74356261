"""Every test sees 8 simulated CPU devices, so sharded code runs sharded everywhere."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import pytest

from jaxlab import parallel


@pytest.fixture(scope="session")
def mesh8():
    assert jax.device_count() == 8, "conftest must set the device count before JAX starts"
    return parallel.make_mesh(parallel.RUNS)


@pytest.fixture(scope="session")
def data_mesh8():
    assert jax.device_count() == 8, "conftest must set the device count before JAX starts"
    return parallel.make_mesh(parallel.DATA)
