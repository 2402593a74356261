"""Compile targets: TPU slices and GPU hosts that jaxlab's programs can be compiled for on any
machine, with no accelerator present (`jaxlab.aot`, `experiments/compile_for.py`).

A target's devices are compile-only devices from `jax.experimental.topologies`: the real TPU
compiler (libtpu, the `tpu` extra) or the real GPU compiler (the `gpu-compile` extra: XLA's CUDA
plugin and ptxas) compiles for them, nothing runs on them. A TPU slice is named by its topology;
a GPU by an XLA `GpuTargetConfigProto` (the text files in `jaxlab/gpu_targets`).

    name         devices  device kind             HBM per device     peak bf16   HBM bandwidth
    tpu-v5e-8    8        TPU v5 lite (v5e)       15.75 GiB          197 TF/s    0.82 TB/s
    tpu-v6e-8    8        TPU v6 lite (v6e)       31.25 GiB          918 TF/s    1.64 TB/s
    tpu-v5p-8    4        TPU v5 (v5p megacore)   95.74 GiB          459 TF/s    2.77 TB/s
    tpu-v5p-64   32       TPU v5 (v5p megacore)   95.74 GiB          459 TF/s    2.77 TB/s
    h100-8       8        NVIDIA H100 80GB HBM3   79.11 GiB          989 TF/s    3.35 TB/s
    h200-1       1        NVIDIA H200             139.87 GiB         989 TF/s    4.80 TB/s

TPU HBM is what the TPU compiler accepts (measured: the largest donated buffer a v5e, v6e or
v5p device compiles, to 1 KiB; a larger program is refused with RESOURCE_EXHAUSTED); a v5p
slice is named by its TensorCores (v5p-8: 4 chips, each one megacore device). GPU HBM is the
spec's `device_memory_size` (the GPU compiler does not refuse a larger program: compare).
Peaks are the vendors' dense bfloat16 figures (Cloud TPU system architecture pages; NVIDIA's
H100 / H200 SXM data sheets).

Set `JAX_PLATFORMS=cpu` before JAX is imported (a machine without the accelerator otherwise
tries to start it); `devices` sets `TPU_SKIP_MDS_QUERY=1` (libtpu does not look for a cloud
metadata server).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import os

import jax

from jaxlab.config import require

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Target:
    """A slice of accelerators to compile for (hashable)."""

    name: str
    platform: str                 # "tpu" or "gpu"
    topology: str                 # TPU: the topology name ("v5e:2x4"); GPU: "1x1x<devices>"
    device_kind: str              # what the compile-only devices report as `device_kind`
    hbm_bytes: int                # memory one device may use
    peak_flops: float             # dense bfloat16 FLOP/s of one device
    hbm_bandwidth: float          # bytes/s of one device's HBM
    chip_config: str = "default"  # TPU: "default", or "megacore" (v4, v5p: one device a chip)
    host_bounds: tuple[int, int, int] = (2, 2, 1)  # TPU: chips per host (x, y, z)
    gpu_spec: str | None = None   # GPU: the GpuTargetConfigProto file in jaxlab/gpu_targets

    def __post_init__(self):
        require(self.platform in ("tpu", "gpu"),
                f"Target.platform {self.platform!r} is not 'tpu' or 'gpu'")
        require(self.platform == "tpu" or self.gpu_spec is not None,
                f"GPU target {self.name!r} needs a gpu_spec file")


_V5E = dict(platform="tpu", device_kind="TPU v5 lite", hbm_bytes=16_909_197_312,
            peak_flops=197e12, hbm_bandwidth=819e9, host_bounds=(2, 4, 1))
_V6E = dict(platform="tpu", device_kind="TPU v6 lite", hbm_bytes=33_550_106_624,
            peak_flops=918e12, hbm_bandwidth=1640e9, host_bounds=(2, 4, 1))
_V5P = dict(platform="tpu", device_kind="TPU v5", hbm_bytes=102_803_283_968,
            peak_flops=459e12, hbm_bandwidth=2765e9, chip_config="megacore")
_H100 = dict(platform="gpu", device_kind="NVIDIA H100 80GB HBM3", hbm_bytes=84_942_979_072,
             peak_flops=989e12, hbm_bandwidth=3.35e12, gpu_spec="h100_sxm.txtpb")
_H200 = dict(platform="gpu", device_kind="NVIDIA H200", hbm_bytes=150_177_054_720,
             peak_flops=989e12, hbm_bandwidth=4.8e12, gpu_spec="h200_sxm.txtpb")

TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("tpu-v5e-8", topology="v5e:2x4", **_V5E),
    Target("tpu-v6e-8", topology="v6e:2x4", **_V6E),
    Target("tpu-v5p-8", topology="v5:2x2x1", **_V5P),
    Target("tpu-v5p-64", topology="v5:2x4x4", **_V5P),
    Target("h100-8", topology="1x1x8", **_H100),
    Target("h200-1", topology="1x1x1", **_H200),
)}


def target(name: str | Target) -> Target:
    """The target named `name` (a `Target` is returned as is); ValueError listing the names."""
    if isinstance(name, Target):
        return name
    require(name in TARGETS, f"unknown compile target {name!r}; targets: {sorted(TARGETS)}")
    return TARGETS[name]


def gpu_target_config(spec: str) -> str:
    """The text of the GpuTargetConfigProto file `spec` shipped in `jaxlab/gpu_targets`."""
    return importlib.resources.files("jaxlab").joinpath("gpu_targets", spec).read_text()


@functools.cache
def devices(name: str | Target) -> tuple[jax.Device, ...]:
    """The compile-only devices of target `name`, in the topology's order (made once per
    process). Needs libtpu (TPU targets) or the CUDA plugin (GPU targets); an ImportError or
    RuntimeError naming the extra that brings it otherwise."""
    t = target(name)
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    from jax.experimental.topologies import get_topology_desc

    extra = "tpu" if t.platform == "tpu" else "gpu-compile"
    try:
        if t.platform == "tpu":
            topology = get_topology_desc(platform="tpu", topology_name=t.topology,
                                         chip_config_name=t.chip_config,
                                         chips_per_host_bounds=t.host_bounds, num_slices=1)
        else:
            topology = get_topology_desc(topology_name="", platform="cuda",
                                         target_config=gpu_target_config(t.gpu_spec),
                                         topology=t.topology)
    except Exception as error:
        raise RuntimeError(f"cannot make the compile-only devices of target {t.name!r} "
                           f"({t.platform} {t.topology}): {str(error).splitlines()[0]}; "
                           f"install the compiler with `pip install -e \".[{extra}]\"`"
                           ) from error
    found = tuple(topology.devices)
    require(found and all(d.device_kind == t.device_kind for d in found),
            f"target {t.name!r}: the compiler made devices of kinds "
            f"{sorted({d.device_kind for d in found})}, want {t.device_kind!r}")
    return found


def hbm_bytes(name: str | Target) -> int:
    """Memory one device of target `name` may use, in bytes."""
    return target(name).hbm_bytes


def of_device(device: jax.Device) -> Target | None:
    """The first target whose devices are of `device`'s kind, None for another kind."""
    kind = getattr(device, "device_kind", None)
    return next((t for t in TARGETS.values() if t.device_kind == kind), None)
