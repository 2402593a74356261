"""Ahead-of-time compilation of jaxlab's jobs for a TPU or GPU target, on any machine: what a
program needs per device, whether it fits the chip's HBM and which Pallas kernel it runs,
before a device is rented (`experiments/compile_for.py`; the targets: `jaxlab.targets`).

    result = compile_for("tpu-v5e-8", ("decode", "train"), JobSizes(model="qwen3-0.6b"))

Jobs (each compiled on its own; one failing is recorded, not raised):
  decode   the sampler's decode loop (`sampler.decode_loop`): P prompts x G slots, each prompt's KV
           once, T new tokens; slots split over every device of the target (weights
           replicated, or with `decode_split="fsdp"` split over the devices too)
  prefill  the sampler's prefill (`sampler.prefill`) of the same P prompts, placed alike
  train    the policy-gradient step (`train.train_step`): rows x width tokens, float32 master
           weights + AdamW, bfloat16 compute, parameters and Adam moments split over fsdp x
           tensor = every device, layers rematerialized
  pallas   the policy's Pallas decode-attention kernel alone on one device, as
           `attention.decode_attention(..., decode_kernel="pallas")` calls it
           (`attention.pallas_gpu_attention`, Triton; `attention.pallas_tpu_attention`, Mosaic)
           for one layer of the decode loop's slots
  pallas_paged  the same for a paged cache: one layer of a pool of pages (every slot's
           pages), read through a page table (`attention.pallas_gpu_paged_attention`, Triton;
           `attention.pallas_tpu_attention` with `pages`, Mosaic)

Each program is built under the target's backend policy (`backend_policy(devices)`: the
program a run on the target compiles, not the CPU variant) and lowered on abstract inputs
(`jax.ShapeDtypeStruct`s carrying NamedShardings over a mesh of the target's compile-only
devices). Reported per device, from `compiled.memory_analysis()`: argument, output, alias
(outputs written into donated arguments), temporary and generated-code bytes, and
peak = arguments + outputs + temporaries - aliased, against the target's HBM. The TPU compiler
refuses a program over HBM (compiled=False, fits=False, its error); the GPU compiler does not
(fits compares). On TPU, `compiled.cost_analysis()` gives flops and bytes accessed, and
roofline_seconds = max(flops / peak_flops, bytes / hbm_bandwidth) of the compiler's static
counts for one run of the program, where a loop's body (the decode loop's step, a scanned
layer) counts once: a compiler's estimate, not a measured time.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from jaxlab import parallel, targets
from jaxlab.config import require
from jaxlab.models import attention, zoo
from jaxlab.models.backend import BackendPolicy, backend_policy
from jaxlab.models.decoder import REMAT_POLICIES, Decoder, DecoderConfig
from jaxlab.models.kv_cache import DECODE_BLOCK
from jaxlab.rl import train
from jaxlab.sampling import sampler
from jaxlab.sampling.memory import abstract_on, lower_decode

JOBS = ("decode", "prefill", "train", "pallas", "pallas_paged")
# A Pallas kernel's custom call in compiled HLO -> the kernel's compiler.
KERNELS = {"tpu_custom_call": "mosaic", "__gpu$xla.gpu.triton": "triton"}


@dataclasses.dataclass(frozen=True)
class JobSizes:
    """The model and the sizes of each job (hashable)."""

    model: str = "qwen3-0.6b"       # a released Qwen3 (`zoo.QWEN3_SIZES`)
    layers: int | None = None       # that many layers instead of the model's (smaller compiles)
    # decode, prefill, pallas: bfloat16 weights and compute
    prompts: int = 32               # P
    group_size: int = 8             # G, slots per prompt (P x G slots decoded at once)
    budget: int | None = None       # traces per prompt (> group_size refills slots)
    max_prompt_tokens: int = 1024   # L, tokens per prompt
    max_new_tokens: int = 1024      # T
    int8_cache: bool = False        # keys and values in int8 with per-token scales
    kv_pages: int | None = None     # the generated KV in a pool of pages (one device only)
    scan_layers: bool = False       # the decode loop's layers in one scan
    decode_split: str = "data"      # "data": weights replicated; "fsdp": weights split too
    decode_devices: int | None = None  # decode over the target's first devices only
    # train: float32 master weights, bfloat16 compute
    rows: int = 8                   # B, sequences per step
    width: int = 2048               # tokens per sequence
    tensor: int = 1                 # devices of the tensor axis (the rest: fsdp)
    remat: str = "full"             # what the backward pass keeps of a layer (REMAT_POLICIES)
    microbatches: int = 1           # gradient accumulation
    logprob_chunk: int = 512        # positions per chunk of the output head

    def __post_init__(self):
        require(self.decode_split in ("data", "fsdp"),
                f"JobSizes.decode_split {self.decode_split!r} is not 'data' or 'fsdp'")
        require(self.remat in REMAT_POLICIES,
                f"JobSizes.remat {self.remat!r} is not one of {list(REMAT_POLICIES)}")
        for name in ("prompts", "group_size", "max_prompt_tokens", "max_new_tokens", "rows",
                     "width",
                     "tensor", "microbatches", "logprob_chunk"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 1,
                    f"JobSizes.{name} must be an integer >= 1, got {value!r}")


def decoder_config(sizes: JobSizes, training: bool) -> DecoderConfig:
    """The model's architecture: float32 master weights for training, bfloat16 weights to
    sample; bfloat16 compute."""
    layers = {} if sizes.layers is None else dict(num_hidden_layers=sizes.layers)
    return zoo.qwen3(sizes.model, param_dtype="float32" if training else "bfloat16",
                     compute_dtype="bfloat16", **layers)


def sampling_config(sizes: JobSizes) -> sampler.SamplingConfig:
    return sampler.SamplingConfig(max_new_tokens=sizes.max_new_tokens, group_size=sizes.group_size,
                                  budget=sizes.budget, int8_cache=sizes.int8_cache,
                                  kv_pages=sizes.kv_pages, scan_layers=sizes.scan_layers)


def decode_mesh(devices: Sequence[jax.Device], sizes: JobSizes) -> Mesh:
    """The sampler's mesh over `devices` (the first `decode_devices` of them): slots split over
    data x fsdp, weights split over fsdp x tensor (`sample` with a `make_train_mesh` mesh)."""
    devices = list(devices)[:sizes.decode_devices]
    rest = len(devices) // sizes.tensor
    axes = dict(fsdp=rest) if sizes.decode_split == "fsdp" else dict(data=rest)
    return parallel.make_train_mesh(**axes, tensor=sizes.tensor, devices=devices)


def train_mesh(devices: Sequence[jax.Device], sizes: JobSizes) -> Mesh:
    """fsdp x tensor over every device of the target."""
    return parallel.make_train_mesh(fsdp=len(devices) // sizes.tensor, tensor=sizes.tensor,
                                    devices=list(devices))


def abstract_train_inputs(config: DecoderConfig, train_config: train.TrainConfig, batch: int,
                          seq: int, mesh: Mesh | None = None,
                          backend: BackendPolicy | str | None = None):
    """(graphdef, TrainState and PolicyBatch of jax.ShapeDtypeStructs) of `train_step` for a
    model of architecture `config` under `backend` (default: the policy of `mesh`'s devices);
    on `mesh`, carrying the shardings the step runs with (the state's
    `parallel.tree_shardings`, the batch's `parallel.batch_sharding`). Nothing is allocated."""
    devices = None if mesh is None else list(mesh.devices.flat)
    graphdef, state = train.abstract_train_state(
        lambda: Decoder(config, nnx.Rngs(0), backend, devices), train_config.optimizer)
    sds = jax.ShapeDtypeStruct
    rows = (batch, seq)
    policy_batch = train.PolicyBatch(
        tokens=sds(rows, jnp.int32), mask=sds(rows, jnp.int32), loss_mask=sds(rows, jnp.float32),
        old_logp=sds(rows, jnp.float32), ref_logp=sds(rows, jnp.float32),
        advantages=sds((batch,), jnp.float32))
    if mesh is not None:
        state = abstract_on(state, parallel.tree_shardings(state, mesh))
        policy_batch = abstract_on(policy_batch, parallel.batch_sharding(mesh))
    return graphdef, state, policy_batch


# --------------------------------------------------------------------------------------------
# The jobs, lowered: (lowered program, mesh axis sizes)


def lower_decode_job(job: str, devices: Sequence[jax.Device], sizes: JobSizes):
    """The decode loop ("decode") or the prefill ("prefill") on the sampler's mesh."""
    mesh = decode_mesh(devices, sizes)
    programs = lower_decode(decoder_config(sizes, training=False), sizes.prompts,
                            sizes.max_prompt_tokens, sampling_config(sizes), mesh,
                            backend_policy(list(mesh.devices.flat)))
    lowered = programs.loop if job == "decode" else programs.prefill
    return lowered, dict(mesh.shape), dict(decode_kernel=programs.decode_kernel)


def lower_train_job(devices: Sequence[jax.Device], sizes: JobSizes):
    """`train.train_step` over fsdp x tensor = every device."""
    mesh = train_mesh(devices, sizes)
    train_config = train.TrainConfig(remat=sizes.remat, microbatches=sizes.microbatches,
                                     logprob_chunk=sizes.logprob_chunk)
    graphdef, state, batch = abstract_train_inputs(decoder_config(sizes, training=True),
                                                   train_config, sizes.rows, sizes.width, mesh)
    with jax.default_device(mesh.devices.flat[0]):
        lowered = train.train_step.lower(state, batch, graphdef=graphdef, config=train_config,
                                         mesh=mesh, temperature=1.0)
    params = sum(x.size for x in jax.tree.leaves(state.params))
    return lowered, dict(mesh.shape), dict(params=params)


def lower_pallas_job(devices: Sequence[jax.Device], sizes: JobSizes, paged: bool = False):
    """The policy's Pallas decode kernel on the first device, for one layer of the decode
    loop: q [B, K, G, D] of the P x G slots, a bfloat16 cache [B, K, T_gen, D]; `paged`: a pool
    [B T_gen / P, K, P, D] of pages of P = block slots and a page table [B, T_gen / P]."""
    device = devices[0]
    policy = backend_policy([device])
    require(policy.pallas is not None, f"the {policy.name} policy has no Pallas kernel")
    c = decoder_config(sizes, training=False)
    b, k, d = sizes.prompts * sizes.group_size, c.num_kv_heads, c.head_dim
    size = sampler.generated_slots(sizes.max_new_tokens)
    block = min(DECODE_BLOCK, size)
    placed = SingleDeviceSharding(device)

    def sds(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=placed)

    q = sds((b, k, c.num_heads // k, d), jnp.bfloat16)
    span = sds((b,), jnp.int32)
    pages = size // block
    cache = sds((b * pages, k, block, d) if paged else (b, k, size, d), jnp.bfloat16)
    table = (sds((b, pages), jnp.int32),) if paged else ()

    def attend(q, keys, values, start, end, *table):  # the decode loop's routing, forced
        return attention.decode_attention(q, keys, values, None, None, start, end, block=block,
                                          key_layout="slots", policy=policy,
                                          decode_kernel="pallas",
                                          pages=table[0] if table else None)

    with jax.default_device(device):
        lowered = jax.jit(attend).lower(q, cache, cache, span, span, *table)
    name = policy.pallas + ("_paged" if paged and policy.pallas == "pallas_gpu" else "")
    return lowered, {}, dict(decode_kernel=name)


def lower_job(job: str, devices: Sequence[jax.Device], sizes: JobSizes):
    """(lowered program, mesh axis sizes, facts about it) of `job` (one of `JOBS`)."""
    require(job in JOBS, f"unknown job {job!r}; jobs: {JOBS}")
    if job in ("decode", "prefill"):
        return lower_decode_job(job, devices, sizes)
    if job == "train":
        return lower_train_job(devices, sizes)
    return lower_pallas_job(devices, sizes, paged=job == "pallas_paged")


# --------------------------------------------------------------------------------------------
# Compiling and reading the compiled program


def kernel_calls(hlo: str) -> dict[str, int]:
    """Pallas kernels in compiled HLO text: {"mosaic" or "triton": custom calls}."""
    found: dict[str, int] = {}
    for target in re.findall(r'custom_call_target="([^"]+)"', hlo):
        if target in KERNELS:
            found[KERNELS[target]] = found.get(KERNELS[target], 0) + 1
    return found


def collectives(hlo: str) -> dict[str, int]:
    """Collective operations in compiled HLO text (synchronous or started asynchronously):
    {"all-gather": count, ...}, those present only."""
    found: dict[str, int] = {}
    for op in re.findall(r"\b(all-gather|all-reduce|reduce-scatter|all-to-all|"
                         r"collective-permute)(?:-start)?\(", hlo):
        found[op] = found.get(op, 0) + 1
    return found


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def compile_job(job: str, target: str | targets.Target, sizes: JobSizes,
                keep: dict | None = None) -> dict:
    """Compiles `job` for `target` and reads the program: a dict of the fields listed in the
    module docstring, and the Pallas kernels' and collectives' counts. A failure (of building,
    lowering or compiling) is recorded in "error" (its first line); a TPU program refused for
    its size has fits=False. `keep`, if given, receives the compiled program under `job`."""
    t = targets.target(target)
    devices = targets.devices(t)
    record = dict(compiled=False, policy=backend_policy(devices[:1]).name, mesh=None,
                  kernel=None, kernel_calls=0, collectives=None, hbm_bytes=t.hbm_bytes,
                  fits=None, error=None)
    for field in ("argument", "output", "alias", "temp", "generated_code", "peak"):
        record[f"{field}_bytes"] = None
    record.update(flops=None, bytes_accessed=None, roofline_seconds=None,
                  lower_seconds=None, compile_seconds=None)
    start = time.perf_counter()
    try:
        lowered, mesh, facts = lower_job(job, devices, sizes)
    except Exception as error:  # recorded: the other jobs go on
        record.update(error=first_line(error), lower_seconds=time.perf_counter() - start)
        return record
    record.update(mesh=mesh, **facts, lower_seconds=time.perf_counter() - start)
    start = time.perf_counter()
    try:
        compiled = lowered.compile()
    except Exception as error:
        record.update(error=first_line(error), compile_seconds=time.perf_counter() - start)
        if "RESOURCE_EXHAUSTED" in str(error):
            record["fits"] = False
        return record
    record.update(compiled=True, compile_seconds=time.perf_counter() - start)
    if keep is not None:
        keep[job] = compiled
    record.update(memory(compiled))
    record["fits"] = record["peak_bytes"] <= t.hbm_bytes
    hlo = compiled.as_text()
    record["collectives"] = collectives(hlo)
    calls = kernel_calls(hlo)
    if calls:
        record.update(kernel=", ".join(sorted(calls)), kernel_calls=sum(calls.values()))
    if t.platform == "tpu":
        record.update(roofline(compiled, t))
    return record


def memory(compiled: jax.stages.Compiled) -> dict[str, int]:
    """Bytes per device of a compiled program, and its peak (arguments + outputs + temporaries
    - aliased)."""
    m = compiled.memory_analysis()
    out = {f"{field}_bytes": int(getattr(m, f"{field}_size_in_bytes"))
           for field in ("argument", "output", "alias", "temp", "generated_code")}
    out["peak_bytes"] = (out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"]
                         - out["alias_bytes"])
    return out


def roofline(compiled: jax.stages.Compiled, t: targets.Target) -> dict[str, float | None]:
    """flops, bytes accessed and max(flops / peak, bytes / bandwidth) of one device's program
    (`cost_analysis`, where the backend gives one)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):  # one dict per program in some JAX versions
        cost = cost[0] if cost else None
    if not cost:
        return {}
    flops, accessed = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
    return dict(flops=flops, bytes_accessed=accessed,
                roofline_seconds=max(flops / t.peak_flops, accessed / t.hbm_bandwidth))


def compile_for(target: str | targets.Target, jobs: Sequence[str] = JOBS,
                sizes: JobSizes = JobSizes(), progress=None) -> dict:
    """{"target", "devices", "device_kind", "sizes", "jobs": {job: `compile_job`}}; `progress`,
    if given, is called with (job, record) after each job."""
    t = targets.target(target)
    bad = [job for job in jobs if job not in JOBS]
    require(not bad, f"unknown jobs {bad}; jobs: {JOBS}")
    result = dict(target=t.name, devices=len(targets.devices(t)), device_kind=t.device_kind,
                  sizes=dataclasses.asdict(sizes), jobs={})
    for job in jobs:
        result["jobs"][job] = compile_job(job, t, sizes)
        if progress is not None:
            progress(job, result["jobs"][job])
    return result


def table(result: dict) -> str:
    """A readable table of `compile_for`'s result (GiB per device)."""
    def size(value):
        return "-" if value is None else f"{value / parallel.GIB:.2f}"

    lines = [f"{result['target']}: {result['devices']} x {result['device_kind']}, "
             f"{result['sizes']['model']} (GiB per device)",
             f"{'job':12s} {'policy':6s} {'mesh':22s} {'kernel':7s} {'args':>7s} {'out':>7s} "
             f"{'alias':>7s} {'temp':>7s} {'peak':>7s} {'HBM':>7s} {'fits':>5s} "
             f"{'compile s':>9s} {'roofline ms':>11s}"]
    for job, r in result["jobs"].items():
        mesh = "x".join(f"{k}{v}" for k, v in (r["mesh"] or {}).items() if v > 1) or "1"
        fits = "-" if r["fits"] is None else ("yes" if r["fits"] else "NO")
        seconds = "-" if r["compile_seconds"] is None else f"{r['compile_seconds']:.1f}"
        roof = "-" if r["roofline_seconds"] is None else f"{1000 * r['roofline_seconds']:.2f}"
        lines.append(f"{job:12s} {r['policy']:6s} {mesh:22s} {r['kernel'] or '-':7s} "
                     f"{size(r['argument_bytes']):>7s} {size(r['output_bytes']):>7s} "
                     f"{size(r['alias_bytes']):>7s} {size(r['temp_bytes']):>7s} "
                     f"{size(r['peak_bytes']):>7s} {size(r['hbm_bytes']):>7s} {fits:>5s} "
                     f"{seconds:>9s} {roof:>11s}")
        if r["error"]:
            lines.append(f"             {r['error'][:200]}")
    return "\n".join(lines)
