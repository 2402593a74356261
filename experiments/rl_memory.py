"""Device memory of a GRPO run (experiments/train_grpo.py) from its config, before any device
is rented: the programs the run compiles, compiled for the target, nothing allocated.

    python experiments/rl_memory.py --config configs/rl/math_qwen3_0.6b_gpu.yaml \
        [--shape 0.6B] [--target auto|h100|h200|cpu] [--out FILE] [key=value ...]

The config is read with train_grpo's schema (`key=value` overrides as there; a math task's file
is not read: `task.path` may be empty). The architecture is that of `model`'s config.json
when that folder exists, else the released Qwen3 of `--shape` (`zoo.qwen3`), float32 master
weights and `compute_dtype` activations. Reported per device, in bytes (the table: GiB), from
each program lowered on `jax.ShapeDtypeStruct`s and compiled (`memory_analysis()`; peak =
arguments + new outputs + temporaries):

  step     the policy step (`train.train_step`) at the widest batch `loop.run` builds: prompts x
           group_size / minibatches rows of max_prompt_tokens + max_new_tokens tokens, with
           loop.train's microbatches, remat and logprob_chunk, each group's prompt run once
           (`train.SharedPrompts`) where `loop.shared_prompts` says so; what `loop.run` checks
           (`train.require_policy_step_fits`)
  sampler  the rollouts' `sampler.sample` of prompts x group_size slots, max_prompt_tokens +
           max_new_tokens, weights in the compute dtype (`sampling.memory.decode_memory`: the
           prefill's and the decode loop's compiled figures)
  eval     the held-out evaluation's sampling (`tasks.evaluate`: its batch of prompts x
           eval_samples slots at max_prompt_tokens, float32 weights)
  state    the float32 parameters and AdamW moments as the step holds them on the mesh
and what a device holds at once in each phase of the run (sums of the above and of what the run
keeps beside each program: the reference policy in the compute dtype, the float32 policy as
loaded, which train_grpo keeps until training ends, the whole step's batch while it is trained
on; not the CUDA context, the libraries' workspaces or the allocator's fragmentation).

Targets: `h100` / `h200`, one GPU (or `mesh`'s devices) of `jaxlab.targets`, compiled by XLA's
GPU compiler on this machine (the `gpu-compile` extra; no autotuning, as no GPU is there), each
phase also set against the 75% of the memory JAX's allocator takes by default; `cpu`, this
machine's CPU devices and XLA's CPU compiler (other temporaries than a GPU's); `auto` (default),
the H100 target when its compiler is installed, else the CPU (the table and the JSON say which
compiler gave the figures). The GPU compiler sorts some top-k shapes with CUB, whose scratch
size it asks a GPU for: a decode loop of such a shape (128 slots, for one) does not compile
here, and its peak is estimated from shapes (`memory.estimate_parts`: weights, KV, outputs and
logits, no temporaries; the table says so). Writes JSON (default
results/rl_memory/<config>-<model>-<target>.json).
"""

from __future__ import annotations

import os

# Before JAX starts: the CPU is the only backend started here (a GPU target's compiler is
# reached through jax.experimental.topologies).
os.environ["JAX_PLATFORMS"] = "cpu"

import argparse
import dataclasses
import pathlib
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import train_grpo

from jaxlab import aot, cli, parallel, results, targets
from jaxlab import config as config_lib
from jaxlab.config import require
from jaxlab.models import backend, hf, zoo
from jaxlab.models.decoder import Decoder, DecoderConfig
from jaxlab.rl import loop as loop_lib
from jaxlab.rl import train
from jaxlab.sampling import memory, sampler

GPU_TARGETS = {"h100": "h100-8", "h200": "h200-1"}  # a jaxlab.targets GPU of that kind
# The share of a GPU's memory JAX's allocator takes by default (XLA_PYTHON_CLIENT_MEM_FRACTION).
JAX_GPU_FRACTION = 0.75
TARGET_CHOICES = ("auto", *GPU_TARGETS, "cpu")


@dataclasses.dataclass(frozen=True)
class Devices:
    """What the programs are compiled for."""

    devices: tuple[jax.Device, ...]
    device_bytes: int   # memory of one device
    compiler: str       # which compiler gave the figures, in words
    jax_bytes: int | None = None  # GPU: what JAX's allocator takes of it by default


def load_config(path: str | None, overrides: Sequence[str]) -> train_grpo.Config:
    """train_grpo's Config from `path` and `overrides` (a math task's file is not read)."""
    return config_lib.load_config(train_grpo.Config, path, overrides)


def architecture(cfg: train_grpo.Config, shape: str | None) -> tuple[DecoderConfig, str]:
    """(the policy's architecture with float32 master weights and cfg's compute dtype, where
    it comes from): `cfg.model`'s config.json when that folder has one, else Qwen3 `shape`."""
    folder = pathlib.Path(cfg.model) if cfg.model else None
    if folder is not None and (folder / "config.json").is_file():
        return (hf.load_decoder_config(folder, param_dtype="float32",
                                       compute_dtype=cfg.compute_dtype), str(folder))
    require(shape is not None, f"no config.json in model={cfg.model!r}: give the model's "
                               f"folder (model=DIR) or a Qwen3 size (--shape 0.6B)")
    return (zoo.qwen3(shape, param_dtype="float32", compute_dtype=cfg.compute_dtype),
            f"Qwen3-{shape.removeprefix('qwen3-').removeprefix('Qwen3-')} (--shape)")


def compile_devices(target: str, count: int) -> Devices:
    """`count` devices of `target` (one of TARGET_CHOICES; "auto": h100 where its compiler is
    installed, else cpu)."""
    require(target in TARGET_CHOICES, f"--target must be one of {TARGET_CHOICES}, got {target!r}")
    if target == "auto":
        try:
            return compile_devices("h100", count)
        except (RuntimeError, ImportError) as error:
            found = compile_devices("cpu", count)
            return dataclasses.replace(found, compiler=f"{found.compiler}; the H100 target is "
                                                       f"not available here ({error})")
    if target == "cpu":
        devices = tuple(jax.devices("cpu")[:count])
        require(len(devices) == count, f"the mesh needs {count} devices; this machine has "
                                       f"{len(jax.devices('cpu'))} CPU devices")
        return Devices(devices, parallel.device_memory_bytes(devices[0]),
                       f"XLA's CPU compiler ({devices[0].device_kind}), not a GPU's: the "
                       f"temporaries differ from a GPU program's")
    base = targets.target(GPU_TARGETS[target])
    gpu = dataclasses.replace(base, name=f"{target}-{count}", topology=f"1x1x{count}")
    devices = targets.devices(gpu)
    return Devices(devices, gpu.hbm_bytes,
                   f"XLA's GPU compiler for {count} x {gpu.device_kind} (compile-only devices)",
                   int(JAX_GPU_FRACTION * gpu.hbm_bytes))


def loop_mesh(cfg: train_grpo.Config, devices: Sequence[jax.Device]) -> jax.sharding.Mesh:
    """The mesh `loop.run` runs on: one device's DATA mesh (its default), else `cfg.mesh`."""
    if cfg.mesh.size == 1:
        return parallel.make_mesh(parallel.DATA, list(devices)[:1])
    return cfg.mesh.build(devices)


def policy_step(arch: DecoderConfig, rows: int, width: int, config: train.TrainConfig,
                mesh: jax.sharding.Mesh, temperature: float,
                shared: train.SharedPrompts | None) -> dict[str, int]:
    """The compiled `train_step` of `rows` x `width` tokens on `mesh`, per device:
    {"arguments", "new outputs", "temporaries", "peak", "state", "gradients", "parameters",
    "batch" (the step's PolicyBatch, whole)}."""
    graphdef, state, batch = aot.abstract_train_inputs(arch, config, rows, width, mesh)
    with jax.default_device(mesh.devices.flat[0]):
        compiled = train.train_step.lower(state, batch, graphdef=graphdef, config=config,
                                          mesh=mesh, temperature=temperature,
                                          shared=shared).compile()
    parts = parallel.compiled_parts(compiled)
    shardings = jax.tree.map(lambda x: x.sharding, state)
    return {**parts, "peak": sum(parts.values()),
            "state": parallel.shard_bytes(state, shardings),
            "gradients": parallel.shard_bytes(state.params, shardings.params),
            "parameters": sum(x.size for x in jax.tree.leaves(state.params)),
            "batch": memory.nbytes(batch)}


def sampling(arch: DecoderConfig, prompts: int, max_prompt_tokens: int,
             config: sampler.SamplingConfig, mesh: jax.sharding.Mesh) -> dict:
    """`sampler.sample`'s figures per device for `prompts` prompts on `mesh`, as
    `sampling.memory.decode_memory` compiles them: weights, KV (the prompts' and the generated),
    the decode loop's temporaries, the prefill's and the loop's peaks and the request's peak.
    A loop the compiler cannot compile here (XLA's GPU compiler sorts some top-k shapes with
    CUB, whose scratch size it asks a GPU for) is estimated from shapes instead
    (`memory.estimate_parts`: no temporaries), and "loop" says why."""
    devices = list(mesh.devices.flat)
    programs = memory.lower_decode(arch, prompts, max_prompt_tokens, config, mesh,
                                   backend.resolve(None, devices))
    prefill = sum(parallel.compiled_parts(programs.prefill.compile()).values())
    slots = prompts * config.group_size
    shards = slots // parallel.batch_sharding(mesh).shard_shape((slots,))[0]  # the slots'
    weights = memory.placed_bytes(nnx.state(nnx.eval_shape(
        lambda: Decoder(arch, nnx.Rngs(0), None, devices))), mesh)
    figures = {"weights": weights, "prompt KV": programs.prefix,
               "generated KV": programs.generated // shards, "outputs": programs.samples,
               "prefill peak": prefill, "prompts": prompts, "slots": slots}
    try:
        m = programs.loop.compile().memory_analysis()
    except jax.errors.JaxRuntimeError as error:
        parts = memory.estimate_parts(arch, prompts, max_prompt_tokens, config, weights,
                                      shards)
        figures.update({"loop temporaries": None, "loop peak": sum(parts.values()),
                        "loop": f"estimated from shapes (weights, KV, outputs, logits; no "
                                f"temporaries): the compiler here refused it "
                                f"({aot.first_line(error)[:100]})"})
    else:
        figures.update({"loop temporaries": m.temp_size_in_bytes,
                        "loop peak": (m.argument_size_in_bytes + m.output_size_in_bytes
                                      + m.temp_size_in_bytes - m.alias_size_in_bytes),
                        "loop": "compiled"})
    figures["peak"] = max(figures["loop peak"], prefill)
    return figures


def measure(cfg: train_grpo.Config, arch: DecoderConfig, devices: Sequence[jax.Device],
            ) -> dict:
    """The run's memory per device on `devices` (bytes; see the module docstring):
    {"step", "sampler", "eval", "state", "phases": {phase: {part: bytes, "total": bytes}},
    "settings"}."""
    loop = cfg.loop
    mesh = loop_mesh(cfg, devices)
    shards = parallel.batch_devices(mesh)
    total_rows = loop.prompts * loop.group_size
    rows, width = total_rows // loop.minibatches, loop.max_prompt_tokens + loop.max_new_tokens
    require(rows % (shards * loop.train.microbatches) == 0,
            f"prompts x group_size / minibatches = {rows} rows must split evenly over the "
            f"mesh's {shards} data devices x train.microbatches={loop.train.microbatches}")
    shared = loop_lib.shared_prompts(loop, loop.max_prompt_tokens, shards)
    step = policy_step(arch, rows, width, loop.train, mesh, loop.temperature, shared)
    compute = arch.compute_dtype
    rollouts = sampling(dataclasses.replace(arch, param_dtype=compute), loop.prompts,
                        loop.max_prompt_tokens, loop.sampling, mesh)
    held_out = None
    eval_prompts = min(cfg.eval_batch, cfg.task.eval_limit or cfg.eval_batch)  # at most
    if cfg.eval_samples:  # greedy alone (one slot a prompt) needs less than the sampled ones
        held_out = sampling(arch, eval_prompts, loop.max_prompt_tokens, dataclasses.replace(
            loop.sampling, group_size=cfg.eval_samples), parallel.make_mesh(
            parallel.DATA, list(devices)[:1]))
    n = step["parameters"]
    # the reference policy: the parameters in the compute dtype, placed as the state's
    reference = step["gradients"] * jnp.dtype(compute).itemsize // 4
    loaded = 4 * n  # train_grpo's policy as loaded: float32, on the first device
    batch = step["batch"] * (total_rows // rows)  # the whole step's batch, on the first device
    phases = {
        "rollouts": {"parameters and AdamW state": step["state"], "reference policy": reference,
                     "policy as loaded": loaded, "sampler peak": rollouts["peak"]},
        "policy step": {"step peak": step["peak"], "reference policy": reference,
                        "policy as loaded": loaded, "the step's whole batch": batch},
    }
    if held_out is not None:
        # the optimizer state and the policy as loaded are freed by then; the trained
        # parameters are the sampler's weights (in its peak)
        phases["evaluation after training"] = {"sampler peak": held_out["peak"]}
    for parts in phases.values():
        parts["total"] = sum(parts.values())
    return {"step": step, "sampler": rollouts, "eval": held_out, "state": step["state"],
            "phases": phases,
            "settings": {"mesh": dict(mesh.shape), "rows": rows, "width": width,
                         "shared_prompts": shared is not None,
                         "microbatches": loop.train.microbatches, "remat": loop.train.remat,
                         "logprob_chunk": loop.train.logprob_chunk,
                         "rollout_slots": total_rows, "eval_prompts": eval_prompts,
                         "eval_samples": cfg.eval_samples, "compute_dtype": compute}}


def gib(count: int | None) -> str:
    return "-" if count is None else f"{count / parallel.GIB:.2f}"


def table(result: dict) -> str:
    """The figures as text, GiB per device."""
    figures, s = result["figures"], result["figures"]["settings"]
    step, rollouts, held_out = figures["step"], figures["sampler"], figures["eval"]
    lines = [f"{result['config']}: {result['model']}, {step['parameters'] / 1e6:.4g}M "
             f"parameters, compute {s['compute_dtype']}, mesh "
             + "x".join(f"{k}{v}" for k, v in s["mesh"].items()),
             f"compiled by {result['compiler']}; {gib(result['device_bytes'])} GiB per device"
             + ("" if result["jax_bytes"] is None else
                f", {gib(result['jax_bytes'])} of which JAX's allocator takes by default "
                f"({JAX_GPU_FRACTION:.0%}, XLA_PYTHON_CLIENT_MEM_FRACTION)"),
             "",
             f"policy step: {s['rows']} rows x {s['width']} tokens, microbatches "
             f"{s['microbatches']}, remat {s['remat']}, logprob_chunk {s['logprob_chunk']}, "
             f"shared prompts {'yes' if s['shared_prompts'] else 'no'}",
             f"  arguments {gib(step['arguments'])}  new outputs {gib(step['new outputs'])}  "
             f"temporaries {gib(step['temporaries'])}  peak {gib(step['peak'])}",
             f"parameters + AdamW state (float32): {gib(step['state'])}; gradients "
             f"{gib(step['gradients'])}"]
    for name, need in (("rollouts' sampler", rollouts), ("held-out eval sampler", held_out)):
        if need is None:
            continue
        lines += [f"{name}: {need['prompts']} prompts, {need['slots']} slots",
                  "  " + "  ".join(f"{k} {gib(need[k])}" for k in (
                      "weights", "prompt KV", "generated KV", "loop temporaries",
                      "loop peak", "prefill peak", "peak"))]
        if need["loop"] != "compiled":
            lines.append(f"  the decode loop: {need['loop']}")
    lines += ["", "at once per device, by phase (GiB):"]
    for phase, parts in figures["phases"].items():
        fits = "fits" if parts["total"] <= result["device_bytes"] else "DOES NOT FIT"
        if result["jax_bytes"] is not None and fits == "fits":
            fits += (f" in {JAX_GPU_FRACTION:.0%}" if parts["total"] <= result["jax_bytes"]
                     else f" only over {JAX_GPU_FRACTION:.0%}")
        lines.append(f"  {phase:27s} {gib(parts['total']):>6s}  ({fits}; "
                     + ", ".join(f"{k} {gib(v)}" for k, v in parts.items() if k != "total")
                     + ")")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="an RL config (configs/rl/*.yaml)")
    parser.add_argument("--shape", default=None, choices=list(zoo.QWEN3_SIZES),
                        help="a released Qwen3's architecture, when model has no config.json")
    parser.add_argument("--target", default="auto", choices=TARGET_CHOICES)
    parser.add_argument("--out", default=None, help="JSON file")
    parser.add_argument("overrides", nargs="*", help="key=value, as for train_grpo.py")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except config_lib.ConfigError as e:
        parser.error(str(e))
    arch, model = architecture(cfg, args.shape)
    found = compile_devices(args.target, cfg.mesh.size)
    result = {"config": args.config or "the defaults", "overrides": list(args.overrides),
              "model": model, "target": args.target, "compiler": found.compiler,
              "device_kind": found.devices[0].device_kind, "device_bytes": found.device_bytes,
              "jax_bytes": found.jax_bytes,
              "figures": measure(cfg, arch, found.devices)}
    print(table(result))
    name = (pathlib.Path(args.config).stem if args.config else "defaults")
    out = pathlib.Path(args.out or f"results/rl_memory/{name}-"
                       f"{pathlib.Path(model.split()[0]).name}-{args.target}.json")
    results.write_json(out, result)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    cli.run(main)
