"""The backend policy: every choice that depends on the platform a program is compiled for, in
one small frozen dataclass, made by one function from the devices the program runs on.

A model holds its policy (`Decoder.backend`, a static field of its graph): whatever compiles
the model's prefill, decode loop or train step compiles that policy's code. Nothing below it
reads `jax.default_backend()`; a program compiled on this machine for a TPU or GPU target
(`experiments/compile_for.py`) is the target's program.

    field          "gpu" / "tpu" (the plain code)                "cpu" (its workarounds)
    attention      `jax.nn.dot_product_attention` (XLA's         `attention.grouped_attention`:
                   implementation, JAX's default)                two batched products per kv
                                                                 head, ~3x faster there
    decode_kernel  the platform's Pallas kernel where it         the portable flash-decoding
                   applies, else the portable one (logged)       (`attention.block_attention`)
    key_layout     "slots" [B, K, S, D], the kernels' layout     "dims" [B, K, D, S]: q @ k as a
                                                                 plain product, no repacking
    half_as_bits   False: 16-bit caches hold 16-bit floats      True: held as uint16 bits; the
                                                                 CPU converts 16-bit floats to
                                                                 float32 around every move
    row_products   False: `lax.dot_general` as written          True: x [..., E] multiplied as
                                                                 rows [N, E], 16-bit products
                                                                 asked for in float32

`backend_policy(devices, name)` picks it: `name` (or the environment's `JAXLAB_POLICY`,
default "auto") names one of `POLICIES`, or "auto" takes the devices' platform. A GPU or TPU
policy on devices of another platform (the CPU tests, a comparison) runs its Pallas kernels in
interpret mode (`interpret`), so every policy's program runs anywhere.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Sequence

import jax

from jaxlab.config import require

log = logging.getLogger("jaxlab")

ENV = "JAXLAB_POLICY"
NAMES = ("auto", "cpu", "gpu", "tpu")
# A device's platform -> the policy "auto" gives it (others: the portable "cpu" policy).
PLATFORMS = {"cpu": "cpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu", "tpu": "tpu"}


@dataclasses.dataclass(frozen=True)
class BackendPolicy:
    """Every platform-dependent choice of the models (hashable: a static field)."""

    name: str               # "cpu", "gpu" or "tpu"
    attention: str          # full-sequence attention: "dot_product" or "grouped"
    decode_kernel: str      # what decode_kernel="auto" runs where it applies: "pallas_gpu",
    #                         "pallas_tpu" or "portable"
    key_layout: str         # a new cache's key layout: "slots" or "dims"
    half_as_bits: bool      # a 16-bit float cache is held as uint16 bits
    row_products: bool      # linear layers multiply rows [N, E]; 16-bit products in float32
    interpret: bool = False  # Pallas kernels in interpret mode (the policy of another platform)

    def __post_init__(self):
        require(self.name in NAMES[1:], f"policy name {self.name!r} is not one of {NAMES[1:]}")
        require(self.attention in ("dot_product", "grouped"),
                f"BackendPolicy.attention {self.attention!r} is not 'dot_product' or 'grouped'")
        require(self.decode_kernel in ("pallas_gpu", "pallas_tpu", "portable"),
                f"BackendPolicy.decode_kernel {self.decode_kernel!r} is not 'pallas_gpu', "
                "'pallas_tpu' or 'portable'")
        require(self.key_layout in ("slots", "dims"),
                f"BackendPolicy.key_layout {self.key_layout!r} is not 'slots' or 'dims'")

    @property
    def pallas(self) -> str | None:
        """The platform's Pallas decode kernel ("pallas_gpu", "pallas_tpu"), None on the CPU."""
        return {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}.get(self.name)


_ACCELERATOR = dict(attention="dot_product", key_layout="slots", half_as_bits=False,
                    row_products=False)
POLICIES = {
    "gpu": BackendPolicy("gpu", decode_kernel="pallas_gpu", **_ACCELERATOR),
    "tpu": BackendPolicy("tpu", decode_kernel="pallas_tpu", **_ACCELERATOR),
    "cpu": BackendPolicy("cpu", attention="grouped", decode_kernel="portable", key_layout="dims",
                         half_as_bits=True, row_products=True),
}


def platform_of(devices: Sequence[jax.Device] | None = None) -> str:
    """The policy name of the devices' platform ("cpu", "gpu", "tpu"); default: every device
    (`jax.devices()`). Devices of several platforms are an error."""
    devices = list(jax.devices() if devices is None else devices)
    require(devices, "no devices to choose a backend policy for")
    found = {PLATFORMS.get(d.platform.lower(), "cpu") for d in devices}
    require(len(found) == 1, f"devices of several platforms {sorted(found)}: compile for one")
    return found.pop()


def backend_policy(devices: Sequence[jax.Device] | None = None,
                   name: str | None = None) -> BackendPolicy:
    """The policy of a program run on `devices` (default `jax.devices()`; pass a mesh's
    `mesh.devices.flat`, or a compile-only target's devices): `name` (default: the environment's
    `JAXLAB_POLICY`, else "auto") is one of `NAMES`; "auto" takes the devices' platform. A GPU or
    TPU policy on another platform runs its Pallas kernels in interpret mode."""
    name = name or os.environ.get(ENV) or "auto"
    require(name in NAMES, f"backend policy {name!r} (argument or ${ENV}) is not one of {NAMES}")
    platform = platform_of(devices)
    name = platform if name == "auto" else name
    policy = POLICIES[name]
    if name != "cpu" and name != platform:
        policy = dataclasses.replace(policy, interpret=True)
    return policy


def resolve(policy: BackendPolicy | str | None,
            devices: Sequence[jax.Device] | None = None) -> BackendPolicy:
    """A policy as given, or `backend_policy(devices, name)` of a name (None: the default)."""
    if isinstance(policy, BackendPolicy):
        return policy
    return backend_policy(devices, policy)


@functools.cache
def explain(policy: BackendPolicy, what: str, choice: str, reason: str = "") -> None:
    """Logs, once per process for each distinct message, what `policy` chose for `what` and
    why (called while a program is traced: once per compiled program, not per step)."""
    log.info("backend policy %s%s: %s -> %s%s", policy.name,
             " (interpret)" if policy.interpret else "", what, choice,
             f" ({reason})" if reason else "")
