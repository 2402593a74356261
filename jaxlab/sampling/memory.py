"""How much device memory a `sampler.sample` request needs, answered before anything is
allocated: both of its programs (the prefill and the decode loop) are lowered from abstract
shapes (`jax.ShapeDtypeStruct`s, placed on a mesh's devices as `sample` places them) and
compiled, and XLA's `compiled.memory_analysis()` gives their arguments, outputs, temporaries and
the bytes written in place into donated arguments (`decode_memory`). The devices may be
compile-only devices of another platform, so a TPU or GPU request can be planned on a CPU
(`jaxlab.aot`).

    need = decode_memory(model.config, prompts=4, max_prompt_tokens=512, config=config)
    require_fits(model.config, 4, 512, config, device_bytes=16 * 2**30)  # or what would fit

`kv_cache_bytes` counts the KV alone from shapes (no compile); `require_fits` is the check
every `sample` call makes before it allocates, by `parallel.require_fits`' rule, without
compiling twice: a shape estimate (`estimate_parts`: weights, prompt and generated KV, outputs,
the slots' logits) within `parallel.SCREEN_FRACTION` (half) of the device's memory runs as it
is; one whose weights, KV and outputs alone (held at once for sure) exceed the memory is refused
at once; between the two, the compiled programs decide (remembered per request shape). The
estimate leaves out only XLA's temporaries, which would have to exceed the other half to fail;
the compile it saves is the one the hundreds of small requests of a test suite or a sweep would
otherwise pay twice. A refusal (`parallel.DoesNotFit`) names the smaller requests that fit.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from jaxlab import parallel
from jaxlab.config import require
from jaxlab.models.backend import BackendPolicy
from jaxlab.models.backend import resolve as resolve_policy
from jaxlab.models.decoder import Decoder, DecoderConfig
from jaxlab.sampling import sampler
from jaxlab.sampling.sampler import SamplingConfig, generated_slots, padded_length


def generated_tokens(prompts: int, config: SamplingConfig) -> int:
    """Tokens of generated KV `sample` holds for `prompts` prompts: P G T_gen, or the pool's
    kv_pages x page when paged."""
    if config.kv_pages is not None:
        return config.kv_pages * config.kv_page_slots
    return prompts * config.group_size * generated_slots(config.max_new_tokens)


def kv_token_bytes(c: DecoderConfig, config: SamplingConfig) -> int:
    """Bytes of one token's KV on a model of architecture `c`: keys and values of every layer,
    2 layers K (D x itemsize, or D + 4 for int8 with its scale)."""
    per_head = (c.head_dim + 4 if config.int8_cache
                else c.head_dim * jnp.dtype(c.compute_dtype).itemsize)
    return 2 * c.num_layers * c.num_kv_heads * per_head


def kv_cache_bytes(c: DecoderConfig, prompts: int, max_prompt_tokens: int,
                   config: SamplingConfig) -> int:
    """Bytes of the KV `sample` holds for `prompts` prompts of up to `max_prompt_tokens` tokens on a
    model of architecture `c`, from shapes: each prompt's KV once (L = `padded_length` slots)
    and every slot's generated KV (T_gen = `generated_slots`): `kv_token_bytes` x (P L + P G
    T_gen, or P L + kv_pages x page when paged). Equal to `decode_memory`'s prefix + generated
    (tested), which also gives the compiled programs' peak."""
    tokens = prompts * padded_length(max_prompt_tokens, config) + generated_tokens(prompts, config)
    return kv_token_bytes(c, config) * tokens


def estimate_parts(c: DecoderConfig, prompts: int, max_prompt_tokens: int,
                   config: SamplingConfig, weights: int = 0,
                   slot_shards: int = 1) -> dict[str, int]:
    """What `sample`'s decode loop holds at once per device, from shapes (no compile), by part:

      weights + K P L (prompt KV) + K T_gen_tokens / s (generated KV) + outputs
        + 4 V (P + P G / s) (the prompts' and the slots' float32 logits)

    K = `kv_token_bytes`, T_gen_tokens = `generated_tokens`, outputs the `Samples` buffers
    (replicated, as is the prompts' KV), s the devices the slots are split over, `weights` the
    parameters' bytes on one device. XLA's temporaries are left out."""
    capacity = sampler.DecodeShape.of(config).capacity
    k = kv_token_bytes(c, config)
    return {
        "weights": weights,
        "prompt KV": k * prompts * padded_length(max_prompt_tokens, config),
        "generated KV": k * generated_tokens(prompts, config) // slot_shards,
        "outputs": nbytes(jax.eval_shape(lambda: sampler.Samples.empty(
            prompts, capacity, config.max_new_tokens))),
        "logits": 4 * c.vocab_size * (prompts + prompts * config.group_size // slot_shards)}


@dataclasses.dataclass(frozen=True)
class DecodeMemory:
    """Device bytes of one `sample` request, from XLA's analysis of the compiled prefill and
    decode loop (`compiled.memory_analysis()`; per device when the slots are sharded)."""

    weights: int       # the model's parameters
    prefix: int        # the prompts' KV, once per prompt (an argument of the loop)
    generated: int     # every slot's generated KV (T_gen slots each, or the pool of pages), a
    #                    donated argument of the loop
    samples: int       # the `Samples` buffers (at the output capacity)
    outputs: int       # the loop's outputs (the samples and the generated KV)
    temporaries: int   # XLA's temporaries of the loop
    arguments: int     # the loop's arguments (weights, prefix, generated KV, outputs, ...)
    aliased: int       # outputs written into donated arguments (generated KV, outputs)
    prefill: int       # peak of the prefill program (arguments + outputs + temporaries)

    @property
    def loop(self) -> int:
        """Peak of the decode loop: arguments + outputs + temporaries - aliased."""
        return self.arguments + self.outputs + self.temporaries - self.aliased

    @property
    def peak(self) -> int:
        """What the request needs at once: the larger of the two programs' peaks."""
        return max(self.loop, self.prefill)


def decode_memory(c: DecoderConfig, prompts: int, max_prompt_tokens: int, config: SamplingConfig,
                  mesh: Mesh | None = None,
                  backend: BackendPolicy | str | None = None) -> DecodeMemory:
    """The memory `sample` needs for `prompts` prompts of up to `max_prompt_tokens` tokens on a
    model of architecture `c`: both programs lowered from abstract shapes and compiled (nothing is
    allocated; the compile takes seconds for a full-size model, so answers are remembered).
    Compiled for the devices of `mesh` (the slots split over it as `sample` splits them;
    compile-only devices of a TPU or GPU target work too) or the default device, under
    `backend` (default: those devices' policy, `backend_policy`)."""
    devices = None if mesh is None else list(mesh.devices.flat)
    return _decode_memory(c, prompts, max_prompt_tokens, config, mesh,
                          resolve_policy(backend, devices))


@functools.lru_cache(maxsize=64)
def _decode_memory(c: DecoderConfig, prompts: int, max_prompt_tokens: int, config: SamplingConfig,
                   mesh: Mesh | None, policy: BackendPolicy) -> DecodeMemory:
    programs = lower_decode(c, prompts, max_prompt_tokens, config, mesh, policy)
    a = programs.loop.compile().memory_analysis()
    b = programs.prefill.compile().memory_analysis()
    return DecodeMemory(
        weights=programs.weights, prefix=programs.prefix, generated=programs.generated,
        samples=programs.samples, outputs=a.output_size_in_bytes,
        temporaries=a.temp_size_in_bytes, arguments=a.argument_size_in_bytes,
        aliased=a.alias_size_in_bytes,
        prefill=(b.argument_size_in_bytes + b.output_size_in_bytes + b.temp_size_in_bytes))


@dataclasses.dataclass(frozen=True)
class DecodePrograms:
    """The prefill and the decode loop of one `sample` request, lowered from abstract inputs
    (nothing allocated) for a mesh's devices; `.compile()` each. Bytes are of whole arrays
    (all devices together)."""

    prefill: jax.stages.Lowered  # `sampler.prefill` of P prompts of L tokens
    loop: jax.stages.Lowered     # `sampler.decode_loop`, the while loop over every slot
    decode_kernel: str           # the loop's DecodeShape.decode_kernel (`mesh_decode_kernel`)
    weights: int                 # the model's parameters
    prefix: int                  # the prompts' KV, once per prompt
    generated: int               # every slot's generated KV (or the pool of pages)
    samples: int                 # the `Samples` buffers (at the output capacity)


def lower_decode(c: DecoderConfig, prompts: int, max_prompt_tokens: int, config: SamplingConfig,
                 mesh: Mesh | None, policy: BackendPolicy) -> DecodePrograms:
    """`sample`'s two programs for `prompts` prompts of up to `max_prompt_tokens` tokens on a model
    of architecture `c` under `policy`, lowered on abstract inputs placed as `sample` places
    them on `mesh` (slots split over its batch axes, weights in their `parallel.tree_shardings`;
    compile-only devices of a TPU or GPU target work too), or for the default device."""
    require(prompts > 0 and max_prompt_tokens > 0,
            f"prompts={prompts} and max_prompt_tokens={max_prompt_tokens} must be positive")
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Decoder(c, nnx.Rngs(0), policy)))
    length = padded_length(max_prompt_tokens, config)
    ids = jax.ShapeDtypeStruct((prompts, length), jnp.int32)
    settings = dict(int8_cache=config.int8_cache, scan_layers=config.scan_layers)
    prefix, logits = jax.eval_shape(functools.partial(sampler.prefill, **settings), graphdef,
                                    state, ids, ids)
    shape = sampler.DecodeShape.of(config)
    generated = jax.eval_shape(lambda: sampler.init_generated(nnx.merge(graphdef, state),
                                                              prompts, config))
    out = jax.eval_shape(lambda: sampler.Samples.empty(prompts, shape.capacity,
                                                       config.max_new_tokens))
    per_prompt = functools.partial(jax.ShapeDtypeStruct, (prompts,))
    key = jax.eval_shape(jax.random.key, 0)
    # traced values: abstract
    strategy = jax.eval_shape(lambda: sampler.sampling_strategy(config))
    scalars = (per_prompt(jnp.float32), per_prompt(jnp.int32))
    sizes = dict(weights=nbytes(state), prefix=nbytes(prefix.fields),
                 generated=nbytes(generated.fields), samples=nbytes(out))
    if mesh is not None:  # placed as `sample` places them
        sampler.check_mesh(prompts, config, mesh)
        shape = sampler.mesh_decode_kernel(shape, policy, mesh)
        state = abstract_on(state, parallel.tree_shardings(state, mesh))
        generated = abstract_on(generated, sampler.cache_sharding(generated, mesh))
        ids, prefix, logits, out, key, strategy, scalars = abstract_on(
            (ids, prefix, logits, out, key, strategy, scalars), parallel.replicated(mesh))
    with jax.default_device(policy_device(mesh)):
        prefill = sampler.prefill.lower(graphdef, state, ids, ids, **settings)
        loop = sampler.decode_loop.lower(graphdef, state, prefix, logits, generated, out, key,
                                         strategy, *scalars, shape=shape)
    return DecodePrograms(prefill=prefill, loop=loop, decode_kernel=shape.decode_kernel,
                          **sizes)


def nbytes(tree) -> int:
    """Bytes of a tree of arrays or ShapeDtypeStructs (whole arrays)."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


# The parts of `estimate_parts` a request holds at once for sure (the logits are approximate).
CERTAIN = ("weights", "prompt KV", "generated KV", "outputs")


def require_fits(c: DecoderConfig, prompts: int, max_prompt_tokens: int, config: SamplingConfig,
                 device_bytes: int, mesh: Mesh | None = None,
                 backend: BackendPolicy | str | None = None,
                 weights: int | None = None) -> DecodeMemory | None:
    """Refuses, before anything is allocated, a `sample` request that would not fit in
    `device_bytes` per device: `parallel.require_fits` with the estimate `estimate_parts`
    (`weights` bytes of parameters per device, default those of a `Decoder(c)` as `sample`
    places them on `mesh`; weights, KV and outputs certain) and `decode_memory`'s compiled
    peak (for `mesh`'s devices under `backend`). Returns that `DecodeMemory` when the request
    was compiled to decide, None when its estimate is within half of the memory. A refusal,
    `parallel.DoesNotFit` (a ValueError), says how much it needs and which smaller requests
    fit: an int8 cache, fewer slots (group_size halved), a shorter `max_new_tokens` (halved), a
    paged cache of fewer pages (halved)."""
    slots = prompts * config.group_size
    shards = 1 if mesh is None else slots // parallel.batch_sharding(mesh).shard_shape((slots,))[0]
    if weights is None:
        weights = placed_bytes(nnx.state(nnx.eval_shape(lambda: Decoder(c, nnx.Rngs(0)))), mesh)

    def estimate(change: dict) -> parallel.Parts:
        return estimate_parts(c, prompts, max_prompt_tokens,
                              dataclasses.replace(config, **change), weights, shards)

    measured: dict[str, DecodeMemory] = {}   # the request's own figures, once compiled

    def compiled(change: dict) -> parallel.Parts:
        need = decode_memory(c, prompts, max_prompt_tokens, dataclasses.replace(config, **change),
                             mesh, backend)
        if not change:
            measured["request"] = need
        if need.prefill > need.loop:
            return {"prefill": need.prefill}
        return {"loop arguments (weights, KV, outputs)": need.arguments,
                "loop's new outputs": need.outputs - need.aliased,
                "loop temporaries": need.temporaries}

    def name(change: dict) -> str:
        return ", ".join(f"{k}={v}" + (f" (pages of {config.kv_page_slots} tokens)"
                                       if k == "kv_pages" else "") for k, v in change.items())

    halved = parallel.halvings
    pages = generated_tokens(prompts, config) // config.kv_page_slots - (
        config.kv_pages is not None)  # one fewer than the pages held now
    knobs = [[{"int8_cache": True}] if not config.int8_cache else [],
             [{"group_size": g} for g in halved(config.group_size)],
             [{"max_new_tokens": t} for t in halved(config.max_new_tokens)],
             [{"kv_pages": p} for p in (pages, *halved(pages)) if p > config.pages_per_trace]]
    peak = parallel.require_fits(
        f"sampling {prompts} prompt(s) of {max_prompt_tokens} tokens with group_size="
        f"{config.group_size}, max_new_tokens={config.max_new_tokens}, int8_cache="
        f"{config.int8_cache}, kv_pages={config.kv_pages}", device_bytes, estimate, compiled,
        knobs, CERTAIN, name)
    return None if peak is None else measured["request"]


def placed_bytes(state, mesh: Mesh | None) -> int:
    """Bytes one device holds of the parameters `state` (arrays or ShapeDtypeStructs) as
    `sample` places them: whole without a mesh, else in their `parallel.tree_shardings`."""
    return (nbytes(state) if mesh is None
            else parallel.shard_bytes(state, parallel.tree_shardings(state, mesh)))


def abstract_on(tree, shardings):
    """Abstract arrays (ShapeDtypeStructs) of `tree`'s arrays placed by `shardings` (one
    sharding for every leaf, or a tree of them): what `jit(...).lower` compiles for the
    shardings' devices, which may be compile-only devices of another platform."""
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def policy_device(mesh: Mesh | None) -> jax.Device:
    """The device to lower under (`jax.default_device`): the mesh's first, else the default."""
    return jax.devices()[0] if mesh is None else mesh.devices.flat[0]
