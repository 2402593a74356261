"""Every test sees 8 simulated CPU devices, so sharded code runs sharded everywhere."""

import os
import tempfile

# The tests compile many small programs and run each briefly: XLA's CPU backend compiles them
# at LLVM's lowest optimization level (the suite runs about a quarter faster; benchmarks and
# experiments keep the default). Processes the tests start inherit these flags.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8"
                           + " --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache per test run, shared by the pytest-xdist workers (same run
# id) and the processes the tests start (they inherit the environment): the same programs are
# compiled again after each module clears the in-memory caches, by both processes of a
# multi-process test and by an experiment run twice to test its resume.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), "jaxlab-tests-xla-cache",
    os.environ.get("PYTEST_XDIST_TESTRUNUID", f"process-{os.getpid()}")))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")

import gc

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


@pytest.fixture(autouse=True, scope="module")
def _compiled_programs_freed_after_each_module(request):
    """Each test module leaves no compiled programs behind: XLA's CPU backend maps a few memory
    regions per compiled program, and the whole suite in one process would otherwise reach the
    kernel's limit on a process's mappings (vm.max_map_count, 65,530 by default), where the
    compiler crashes with a segmentation fault."""
    yield
    jax.clear_caches()
    gc.collect()
