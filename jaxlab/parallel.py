"""The one place where meshes and partition specs are made.

Entry points build a mesh here and pass it explicitly; nothing reads a global mesh.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

RUNS = "runs"  # axis over which independent runs (seeds, candidate n) are spread
DATA = "data"  # axis over which a training or sampling batch is spread


def cpu_cores_as_devices() -> None:
    """On a CPU host, expose one JAX device per core, so that work split over a mesh (runs,
    corpus shards) keeps every core busy. Call before JAX first touches a backend; no-op when the
    flag is already set."""
    flag = "--xla_force_host_platform_device_count"
    if flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}={os.cpu_count()}"


def make_mesh(axis: str = DATA, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A one-dimensional mesh named `axis` over `devices` (default: every device)."""
    devices = list(jax.devices() if devices is None else devices)
    return Mesh(np.asarray(devices), (axis,))


def single_device_mesh(axis: str = DATA) -> Mesh:
    """A mesh named `axis` over the first device only (an unsharded run of sharded code)."""
    return make_mesh(axis, jax.devices()[:1])


def batch_sharding(mesh: Mesh, axis: str | None = None) -> NamedSharding:
    """Leading dimension split over the mesh's (first) axis, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(axis or mesh.axis_names[0]))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def param_sharding(shape: tuple[int, ...], mesh: Mesh) -> NamedSharding:
    """A matrix is split over the mesh's first axis along its largest dimension that the axis
    size divides; vectors and matrices with no such dimension are replicated."""
    axis = mesh.axis_names[0]
    dims = [int(i) for i in np.argsort(shape)[::-1] if shape[i] % mesh.shape[axis] == 0]
    if len(shape) < 2 or not dims:
        return NamedSharding(mesh, PartitionSpec())
    parts = [None] * len(shape)
    parts[dims[0]] = axis
    return NamedSharding(mesh, PartitionSpec(*parts))


def padded_size(size: int, mesh: Mesh) -> int:
    """The smallest multiple of the mesh's device count that is >= size."""
    return math.ceil(size / mesh.size) * mesh.size


def device_memory_bytes(device: jax.Device) -> int:
    """Memory one device may use: the allocator limit on GPU/TPU; on CPU, the host's available
    memory shared by every CPU device of this process."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return available // max(1, len(jax.local_devices(backend=device.platform)))
