"""The one place where meshes and partition specs are made.

Entry points build a mesh here and pass it explicitly; nothing reads a global mesh.
"""

from __future__ import annotations

import dataclasses
import math
import os
import socket
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

RUNS = "runs"      # axis over which independent runs (seeds, candidate n) are spread
DATA = "data"      # axis over which a training or sampling batch is spread
FSDP = "fsdp"      # axis over which parameters and optimizer state are split (and the batch)
TENSOR = "tensor"  # axis over which attention heads, MLP units and the vocabulary are split


def cpu_cores_as_devices() -> None:
    """On a CPU host, expose one JAX device per core, so that work split over a mesh (runs,
    corpus shards) keeps every core busy. Call before JAX first touches a backend; no-op when the
    flag is already set."""
    flag = "--xla_force_host_platform_device_count"
    if flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}={os.cpu_count()}"


# An explicit multi-process launch: the coordinator's host:port, the process count and this
# process's id (0 .. count - 1), as every process of the run sees them.
PROCESS_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
# Launchers whose environment JAX reads itself (more than one task means a multi-process run).
_LAUNCHERS = {"SLURM_NTASKS": "SLURM", "OMPI_COMM_WORLD_SIZE": "Open MPI"}


def initialize_processes(timeout_s: int = 300) -> int:
    """Joins the multi-process run the environment describes, before JAX touches a backend, and
    returns the process count (1, and nothing done, for a single process).

    - `PROCESS_ENV` all set: `jax.distributed.initialize(address, count, id)` (several hosts of
      any cluster, or several processes on one host);
    - else SLURM or Open MPI with more than one task, or a Cloud TPU pod slice of several hosts
      (TPU_WORKER_HOSTNAMES lists more than one): `jax.distributed.initialize()`, which reads
      those environments itself.
    A partial `PROCESS_ENV` is an error naming what is missing; a coordinator that does not answer
    within `timeout_s`, or a process count other than the one asked, stops with RuntimeError.
    """
    given = {name: os.environ.get(name) for name in PROCESS_ENV}
    missing = [name for name, value in given.items() if not value]
    if len(missing) < len(PROCESS_ENV):
        if missing:
            raise ValueError(f"a multi-process launch needs all of {PROCESS_ENV}; "
                             f"{missing} not set")
        address, count, index = (given[name] for name in PROCESS_ENV)
        try:
            count, index = int(count), int(index)
        except ValueError:
            raise ValueError(f"JAX_NUM_PROCESSES={count!r} and JAX_PROCESS_ID={index!r} must be "
                             f"integers") from None
        if not 0 <= index < count:
            raise ValueError(f"JAX_PROCESS_ID={index} must lie in [0, JAX_NUM_PROCESSES={count})")
        if index > 0:  # process 0 starts the coordinator; the others first wait for it
            _wait_for_coordinator(address, timeout_s)
        args = {"coordinator_address": address, "num_processes": count, "process_id": index}
        where = f"coordinator {address}"
    else:
        launcher = next((name for env, name in _LAUNCHERS.items()
                         if int(os.environ.get(env, "1") or 1) > 1), None)
        if launcher is None and os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:
            launcher = "Cloud TPU"
        if launcher is None:
            return 1
        count, args, where = None, {}, f"the {launcher} environment"
    try:
        jax.distributed.initialize(**args, initialization_timeout=timeout_s)
    except Exception as error:  # JAX raises several kinds; all mean the same to a user
        raise RuntimeError(f"joining a multi-process run through {where} failed within "
                           f"{timeout_s} s: {error}") from error
    if count is not None and jax.process_count() != count:
        raise RuntimeError(f"JAX_NUM_PROCESSES={count} but the run has {jax.process_count()} "
                           f"processes")
    return jax.process_count()


def _wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Returns once something accepts TCP connections at host:port; RuntimeError naming the
    address after `timeout_s` (JAX's own client would abort the process instead)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"JAX_COORDINATOR_ADDRESS={address!r} must be host:port")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=1.0).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the coordinator {address} did not answer within "
                                   f"{timeout_s} s: is process 0 running, and is the address "
                                   f"reachable from this host?") from None
            time.sleep(0.2)


def host_array(x: jax.Array) -> np.ndarray:
    """The whole of a (possibly multi-process) array as a NumPy array on every process: its
    shards gathered from the other processes when this one does not hold them all."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def put(tree, sharding):
    """`jax.device_put(tree, sharding)` that also works when the sharding spans the devices of
    several processes: each process then builds its own shards of each (global) array from its
    copy of the whole value, which every process must hold alike (same seed, same data).
    `sharding`: one `jax.sharding.Sharding` for every array, or a tree of them like `tree`
    (e.g. `tree_shardings(tree, mesh)`)."""
    if isinstance(sharding, jax.sharding.Sharding):
        if sharding.is_fully_addressable:
            return jax.device_put(tree, sharding)
        return jax.tree.map(lambda leaf: _place(leaf, sharding), tree)
    if all(s.is_fully_addressable for s in jax.tree.leaves(sharding)):
        return jax.device_put(tree, sharding)
    return jax.tree.map(_place, tree, sharding)


def _place(leaf, sharding: jax.sharding.Sharding) -> jax.Array:
    """`leaf` (held whole by this process) as a global array of `sharding`."""
    if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        data = _place(jax.random.key_data(leaf), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(leaf))
    value = np.asarray(leaf)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def make_mesh(axis: str = DATA, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A one-dimensional mesh named `axis` over `devices` (default: every device)."""
    devices = list(jax.devices() if devices is None else devices)
    return Mesh(np.asarray(devices), (axis,))


def single_device_mesh(axis: str = DATA,
                       devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh named `axis` over the first of `devices` only (default: of every device; an
    unsharded run of sharded code, or a program compiled for one device of a target)."""
    return make_mesh(axis, list(jax.devices() if devices is None else devices)[:1])


def batch_sharding(mesh: Mesh, axis: str | None = None) -> NamedSharding:
    """Leading dimension split over `axis` (default: the mesh's first axis; on a
    `make_train_mesh` mesh, DATA and FSDP together), the rest replicated."""
    if axis is None and FSDP in mesh.axis_names:
        return NamedSharding(mesh, PartitionSpec((DATA, FSDP)))
    return NamedSharding(mesh, PartitionSpec(axis or mesh.axis_names[0]))


def is_split_model(mesh: Mesh) -> bool:
    """Whether the mesh splits parameters (an FSDP or TENSOR axis of more than one device)."""
    return any(mesh.shape.get(axis, 1) > 1 for axis in (FSDP, TENSOR))


def batch_devices(mesh: Mesh) -> int:
    """The number of slices a batch is split into on `mesh` (`batch_sharding`)."""
    return mesh.shape.get(DATA, 1) * mesh.shape.get(FSDP, 1)


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
    """Memory one device may use: the allocator limit less the bytes in use on GPU/TPU (for the
    devices of a mesh, with several processes: `free_bytes`); on a compile-only device of a
    target (`jaxlab.targets`, which has no allocator), its HBM from the targets table; on CPU,
    the host's available memory shared by every CPU device of this process. ValueError for
    another device with neither."""
    try:
        stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    except jax.errors.JaxRuntimeError:  # a compile-only device: "only for addressable devices"
        stats = None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    if device.platform != "cpu":
        from jaxlab import targets

        known = targets.of_device(device)
        if known is None:
            raise ValueError(f"device {device} ({device.device_kind!r}) reports no memory "
                             f"limit and is of no kind in jaxlab.targets.TARGETS")
        return known.hbm_bytes
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return available // max(1, len(jax.local_devices(backend=device.platform)))


def free_bytes(mesh: Mesh | None = None, held=None) -> int:
    """Bytes one device of `mesh` (default: this process's first device) may use for a program:
    `device_memory_bytes` of this process's first device of the mesh, plus what `held` (a tree
    of arrays the program replaces or reuses, e.g. the weights or a train state already placed)
    holds on that device; with several processes, the least of every process's answer in whole
    KiB (`multihost_utils.process_allgather`, of int32 as JAX holds integers without x64), so
    that every process decides alike (each must call it: a collective)."""
    device = (jax.local_devices() if mesh is None else mesh.local_devices)[0]
    free = device_memory_bytes(device) + (0 if held is None
                                          else bytes_per_device(held).get(device, 0))
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        kib = np.int32(min(free // 1024, np.iinfo(np.int32).max))
        free = 1024 * int(np.min(multihost_utils.process_allgather(kib)))
    return free


# A shape estimate within this fraction of a device's memory runs without compiling anything to
# check it: what the estimate leaves out (XLA's temporaries) has the rest of the device. Above
# it, the compiled program's own figure (XLA's `memory_analysis`) decides (`require_fits`).
SCREEN_FRACTION = 0.5


class DoesNotFit(ValueError):
    """A program needs more device memory than its device has: raised before anything is
    allocated, with what it needs (GiB, broken down) and which smaller settings fit."""


def compiled_parts(compiled: jax.stages.Compiled) -> dict[str, int]:
    """Device bytes of a compiled program at its peak, per device, by part (XLA's
    `memory_analysis`); their sum is arguments + outputs + temporaries - outputs written into
    donated arguments."""
    m = compiled.memory_analysis()
    return {"arguments": m.argument_size_in_bytes,
            "new outputs": m.output_size_in_bytes - m.alias_size_in_bytes,
            "temporaries": m.temp_size_in_bytes}


Parts = dict[str, int]  # bytes by what holds them


def require_fits(subject: str, device_bytes: int, estimate: Callable[[dict], Parts],
                 compiled: Callable[[dict], Parts], knobs: Sequence[Sequence[dict]],
                 certain: Sequence[str], name: Callable[[dict], str] | None = None,
                 ) -> int | None:
    """The memory check of a program before anything is allocated. `estimate(change)` gives
    the per-device bytes by part of the program with the settings `change` ({}: as asked) from
    shapes; the parts named in `certain` (e.g. parameters, optimizer state, gradients, the
    batch) are held at once for sure, so their sum C is a lower bound, while the others are
    approximate. With E the sum of every part and M = `device_bytes`:

      C >  M       `DoesNotFit` at once, nothing compiled ("needs at least C"), naming for
                   each knob its first setting with C <= M and E <= M / 2
      E <= M / 2   None: it runs, nothing compiled (`SCREEN_FRACTION`)
      otherwise    the compiled program's peak P = sum(compiled({})): returned when P <= M,
                   else `DoesNotFit` ("needs P") naming for each knob its first setting that
                   passes this same check (compiled only past M / 2)

    A knob is a sequence of changes, smaller and smaller ({"microbatches": 2},
    {"microbatches": 4}, ...; `first_fitting`); `name(change)` writes one as the user sets it
    (default 'key=value, ...'). `subject` names the program and its settings."""
    def sums(change: dict) -> tuple[Parts, int, int]:
        parts = estimate(change)
        return parts, sum(parts[k] for k in certain), sum(parts.values())

    def passes(change: dict, compile: bool) -> bool:
        _, low, total = sums(change)
        return low <= device_bytes and (total <= SCREEN_FRACTION * device_bytes or (
            compile and sum(compiled(change).values()) <= device_bytes))

    parts, low, total = sums({})
    if low > device_bytes:
        rest = {k: n for k, n in parts.items() if k not in certain}
        need = (f"at least {gib(low)} per device ("
                + ", ".join(f"{k} {gib(parts[k])}" for k in certain)
                + (f"; and about {gib(sum(rest.values()))} more: " + ", ".join(
                    f"{k} {gib(n)}" for k, n in rest.items()) if rest else "") + ")")
        compile = False
    elif total <= SCREEN_FRACTION * device_bytes:
        return None
    else:
        parts = compiled({})
        peak = sum(parts.values())
        if peak <= device_bytes:
            return peak
        need = (f"{gib(peak)} per device as compiled ("
                + ", ".join(f"{k} {gib(n)}" for k, n in parts.items()) + ")")
        compile = True
    name = name or (lambda change: ", ".join(f"{k}={v!r}" for k, v in change.items()))
    options = [first_fitting(knob, lambda change: passes(change, compile)) for knob in knobs]
    options = [name(change) for change in options if change]
    raise DoesNotFit(f"{subject} needs {need} but {gib(device_bytes)} are available; "
                     + ("would fit: " + ", or ".join(options) if options
                        else "no smaller setting fits" + ("" if compile else " by its estimate")))


def halvings(n: int) -> list[int]:
    """n // 2, n // 4, ..., 1: a knob's smaller and smaller settings."""
    return [n >> i for i in range(1, n.bit_length())]


def first_fitting(knob: Sequence[dict], fits: Callable[[dict], bool]) -> dict | None:
    """The first change of `knob` that `fits`, by bisection (a knob's changes are smaller and
    smaller, so once one fits the later ones do): about log2(len(knob)) + 1 checks."""
    if not knob or not fits(knob[-1]):
        return None
    low, high = 0, len(knob) - 1
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if fits(knob[middle]) else (middle + 1, high)
    return knob[low]


def shard_bytes(tree, shardings) -> int:
    """Bytes one device holds of `tree`'s arrays (or ShapeDtypeStructs) placed by `shardings`
    (one sharding, or a tree of them): the sum of each array's shard."""
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, tree)
    return sum(math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
               for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True))


GIB = 2**30


def gib(count: int) -> str:
    """Bytes as GiB to three significant digits: '1.5 GiB', '0.00214 GiB'."""
    return f"{count / GIB:.3g} GiB"


# --------------------------------------------------------------------------------------------
# Sharding rules: logical axis names of every parameter, mapped to mesh axes by one table


# A parameter's logical axes, by the last two names of its path (module, array): the decoder
# (Qwen3 / Qwen2 / Llama), the BERT encoder and the reward model's head. A path no rule names is
# replicated (norm scales, biases of the embedding width).
LOGICAL_AXES: dict[tuple[str, str], tuple[str | None, ...]] = {
    ("embed_tokens", "embedding"): ("vocab", "embed"),
    ("lm_head", "kernel"): ("embed", "vocab"),
    ("q_proj", "kernel"): ("embed", "heads"), ("q_proj", "bias"): ("heads",),
    ("k_proj", "kernel"): ("embed", "kv_heads"), ("k_proj", "bias"): ("kv_heads",),
    ("v_proj", "kernel"): ("embed", "kv_heads"), ("v_proj", "bias"): ("kv_heads",),
    ("o_proj", "kernel"): ("heads", "embed"),
    ("gate_proj", "kernel"): ("embed", "mlp"), ("up_proj", "kernel"): ("embed", "mlp"),
    ("down_proj", "kernel"): ("mlp", "embed"),
    ("word", "embedding"): ("vocab", "embed"),
    ("query", "kernel"): ("embed", "heads"), ("query", "bias"): ("heads",),
    ("key", "kernel"): ("embed", "heads"), ("key", "bias"): ("heads",),
    ("value", "kernel"): ("embed", "heads"), ("value", "bias"): ("heads",),
    ("out", "kernel"): ("heads", "embed"),
    ("intermediate", "kernel"): ("embed", "mlp"), ("intermediate", "bias"): ("mlp",),
    ("output", "kernel"): ("mlp", "embed"),
    ("head", "kernel"): ("embed", None),
}

# Logical axis -> mesh axis (FSDP splits the embedding width of every matrix, so parameters and
# their Adam moments are split over FSDP x TENSOR devices; TENSOR splits heads, MLP units and the
# vocabulary, Megatron-style).
RULES: dict[str, str] = {"embed": FSDP, "heads": TENSOR, "kv_heads": TENSOR, "mlp": TENSOR,
                         "vocab": TENSOR}


def make_train_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1,
                    devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (DATA, FSDP, TENSOR) mesh of data x fsdp x tensor devices (1 allowed for any axis);
    ValueError when that is not the number of devices."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = {DATA: data, FSDP: fsdp, TENSOR: tensor}
    bad = {name: size for name, size in sizes.items() if not (isinstance(size, int) and size >= 1)}
    if bad:
        raise ValueError(f"mesh axis sizes must be integers >= 1, got {bad}")
    if data * fsdp * tensor != len(devices):
        raise ValueError(f"mesh {sizes} needs {data * fsdp * tensor} devices; "
                         f"{len(devices)} are present")
    return Mesh(np.asarray(devices).reshape(data, fsdp, tensor), (DATA, FSDP, TENSOR))


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """The devices a training experiment runs on: a `make_train_mesh` of data x fsdp x tensor
    devices (with several processes, as many from each). The default, one device, is each
    process's first device. A Qwen3-4B train step needs `fsdp=8` (docs/parallel.md)."""

    data: int = 1    # batch rows split over this many devices (data parallelism)
    fsdp: int = 1    # parameters, optimizer state and batch rows split over this many
    tensor: int = 1  # attention heads, MLP units and the vocabulary split over this many

    def __post_init__(self):
        for name in ("data", "fsdp", "tensor"):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise ValueError(f"MeshConfig.{name} must be an integer >= 1, got {value!r}")

    @property
    def size(self) -> int:
        return self.data * self.fsdp * self.tensor

    def build(self, devices: Sequence[jax.Device] | None = None) -> Mesh | None:
        """The train mesh over the first size / P of `devices` (default: every device of the
        run) of each of their P processes, process by process; None for one device of the
        default (the entry points' default mesh). ValueError when they are not there."""
        if self.size == 1 and devices is None:
            return None
        by_process: dict[int, list[jax.Device]] = {}
        for d in jax.devices() if devices is None else devices:
            by_process.setdefault(d.process_index, []).append(d)
        processes = len(by_process)
        local = min(len(found) for found in by_process.values())
        if self.size % processes or self.size // processes > local:
            raise ValueError(f"mesh data x fsdp x tensor = {self.size} devices must split "
                             f"evenly over the {processes} processes, at most {local} each")
        each = self.size // processes
        chosen = [d for p in sorted(by_process) for d in by_process[p][:each]]
        return make_train_mesh(self.data, self.fsdp, self.tensor, chosen)


def _names(path) -> list[str]:
    """The names along a pytree path (dict keys, attribute names, indices, as strings), without
    the `.value` of an nnx Variable at its end."""
    names = []
    for entry in path:
        for field in ("key", "name", "idx"):
            if hasattr(entry, field):
                names.append(str(getattr(entry, field)))
                break
    while names and names[-1] in ("value", "raw_value"):
        names.pop()
    return names


def logical_axes(path, ndim: int) -> tuple[str | None, ...]:
    """The logical axes of the array at `path` (a pytree key path, e.g. of the params or of an
    optimizer state holding a copy of their tree): `LOGICAL_AXES` by its last two names, all
    None (replicated) for a path no rule names or an array of another rank."""
    names = _names(path)
    axes = LOGICAL_AXES.get(tuple(names[-2:]), ())
    return axes if len(axes) == ndim else (None,) * ndim


def partition_spec(path, shape: tuple[int, ...], mesh: Mesh,
                   rules: dict[str, str] = RULES) -> PartitionSpec:
    """The PartitionSpec of the array at `path` under `rules` on `mesh`; mesh axes the mesh lacks
    or of size 1 are left out. ValueError naming the parameter, its dimension and the mesh axis
    when the axis size does not divide that dimension."""
    parts = []
    for dim, axis in zip(shape, logical_axes(path, len(shape)), strict=True):
        mesh_axis = rules.get(axis) if axis is not None else None
        if mesh_axis is None or mesh.shape.get(mesh_axis, 1) == 1:
            parts.append(None)
            continue
        if dim % mesh.shape[mesh_axis]:
            raise ValueError(f"parameter {'/'.join(_names(path))} of shape {tuple(shape)}: its "
                             f"{axis!r} dimension {dim} does not divide over mesh axis "
                             f"{mesh_axis!r} of size {mesh.shape[mesh_axis]}")
        parts.append(mesh_axis)
    return PartitionSpec(*parts)


def tree_shardings(tree, mesh: Mesh, rules: dict[str, str] = RULES):
    """A NamedSharding for every array of `tree` (arrays or `jax.ShapeDtypeStruct`s, e.g. from
    `jax.eval_shape`) by its path: parameters by `rules`, optimizer moments like their parameters,
    scalars and unnamed arrays replicated."""
    def sharding(path, leaf):
        return NamedSharding(mesh, partition_spec(path, tuple(leaf.shape), mesh, rules))

    return jax.tree_util.tree_map_with_path(sharding, tree)


def init_sharded(init, mesh: Mesh, rules: dict[str, str] = RULES):
    """`init()` (a function of no arguments returning a pytree of arrays) run so that every array
    is born with its `tree_shardings` sharding: its shapes from `jax.eval_shape`, then one jitted
    call with those out_shardings, so no device ever holds the whole tree."""
    shardings = tree_shardings(jax.eval_shape(init), mesh, rules)
    return jax.jit(init, out_shardings=shardings)()


def bytes_per_device(tree) -> dict[jax.Device, int]:
    """Bytes of `tree`'s arrays that each device holds (its shards); host (NumPy) arrays are
    on no device."""
    held: dict[jax.Device, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in getattr(leaf, "addressable_shards", ()):
            held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
    return held
