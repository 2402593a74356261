"""Supervised training with exact resume: next-token SFT on (prompt, target) pairs (the GenRM's
cold start, section 1 of `papers/writing_zero.md`; a writer's initial policy; the arithmetic
model of `experiments/train_arithmetic.py`) and any loss of a model over a dataset of arrays (the
Bradley-Terry reward model).

    model = sft.fit(model, sft.sft_loss, data, FitConfig(...), out_dir, key=key)

The data are a dataset of arrays with a shared leading axis N, step s training on the examples
`train.batch_indices(key, s, N, batch_size)`, a function of the run's key and s only; or a
stream, `data(start)` yielding the batches of steps start, start + 1, ... (fresh problems every
step, say). The state (parameters, AdamW state, step, key) is checkpointed with Orbax every
`checkpoint_every` steps by the resumable loop of every training job (`jaxlab.rl.scaffold`), so
a rerun of the same out_dir resumes and ends with the parameters of a run that never stopped,
bit for bit.

Before anything is allocated, `fit` checks its step against the device's memory
(`parallel.require_fits`: a shape estimate of the state, gradients and data, and the compiled
step's own figure only when that estimate passes half of the device's memory), refusing a step
too large with `parallel.DoesNotFit`, which names more `microbatches`, `remat="full"` or a
smaller `batch_size` where they fit.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import pathlib
from collections.abc import Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlab import parallel
from jaxlab.config import require, require_positive_ints
from jaxlab.models.decoder import REMAT_POLICIES
from jaxlab.rl import losses, scaffold, train

log = logging.getLogger("jaxlab")

# loss_fn(model, batch, *, remat) -> (scalar loss, {name: scalar} metrics); batch: the data's
# arrays at the step's examples; remat (passed when FitConfig.remat is not "none"): the decoder
# layers' checkpoint policy (`decoder.REMAT_POLICIES`). A loss that is a mean over something
# other than examples (target tokens) reports how many terms it averages as the metric WEIGHT,
# so that micro-batches combine into the whole batch's loss.
WEIGHT = "weight"
LossFn = Callable[[nnx.Module, Mapping[str, jax.Array]], tuple[jax.Array, dict]]
# A stream of batches: stream(start) yields the arrays of steps start, start + 1, ... (each with
# batch_size rows), the same arrays for a step whatever the start (a resumed run reads what the
# run that never stopped read).
Stream = Callable[[int], Iterator[Mapping[str, np.ndarray]]]


@dataclasses.dataclass(frozen=True)
class FitConfig:
    steps: int = 500                # the run's length
    batch_size: int = 64
    optimizer: train.OptimizerConfig = dataclasses.field(
        default_factory=lambda: train.OptimizerConfig(learning_rate=1e-3, warmup_steps=50))
    log_every: int = 25             # steps between metrics.jsonl records
    checkpoint_every: int = 100     # steps between checkpoints (and at the end)
    keep_checkpoints: int = 1
    microbatches: int = 1           # gradient accumulation: each batch in this many parts
    remat: str = "none"             # what the backward pass keeps of each decoder layer
    #                                 (`decoder.REMAT_POLICIES`; memory, not values)

    def __post_init__(self):
        require_positive_ints(self, "steps", "batch_size", "log_every", "checkpoint_every",
                              "keep_checkpoints", "microbatches")
        require(self.remat in REMAT_POLICIES,
                f"FitConfig.remat must be one of {list(REMAT_POLICIES)}, got {self.remat!r}")
        decay = self.optimizer.decay_steps
        require(decay is None or decay <= self.steps,
                f"FitConfig.optimizer.decay_steps={decay} exceeds steps={self.steps} (the "
                f"cosine decay would not reach its end)")
        require(self.batch_size % self.microbatches == 0,
                f"FitConfig.microbatches={self.microbatches} must divide batch_size="
                f"{self.batch_size}")


class TextCodec:
    """Text <-> token ids in a checkpoint folder's own tokenizer (a response ends with EOS)."""

    def __init__(self, folder: str | pathlib.Path):
        from jaxlab.models import hf

        self.tokenizer = hf.load_tokenizer(folder)
        require(self.tokenizer.eos_token_id is not None,
                f"the tokenizer of {folder} has no EOS token")
        self.eos_id = self.tokenizer.eos_token_id

    def prompt(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def response(self, text: str) -> list[int]:
        return [*self.tokenizer.encode(text, add_special_tokens=False), self.eos_id]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ids, without special tokens (padding, EOS)."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


def sft_batch(prompts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], length: int,
              ) -> dict[str, np.ndarray]:
    """Rows `prompt + target`, right-padded to `length`:

      tokens     int32 [N, length]   [p1 p2 p3 t1 t2 t3 0 0]
      mask       int32 [N, length]   [ 1  1  1  1  1  1 0 0]   attention
      loss_mask  float32 [N, length] [ 0  0  0  1  1  1 0 0]   the target's tokens only

    A row longer than `length` is an error naming it.
    """
    require(len(prompts) == len(targets) > 0,
            f"need as many prompts as targets (> 0), got {len(prompts)} and {len(targets)}")
    tokens = np.zeros((len(prompts), length), np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    loss_mask = np.zeros((len(prompts), length), np.float32)
    for row, (prompt, target) in enumerate(zip(prompts, targets, strict=True)):
        p, n = len(prompt), len(prompt) + len(target)
        require(p > 0 and len(target) > 0, f"example {row}: empty prompt or target")
        require(n <= length, f"example {row} has {n} tokens > length {length}")
        tokens[row, :n] = [*prompt, *target]
        mask[row, :n] = 1
        loss_mask[row, p:n] = 1
    return {"tokens": tokens, "mask": mask, "loss_mask": loss_mask}


def sft_loss(model: nnx.Module, batch: Mapping[str, jax.Array], *, remat: str = "none",
             ) -> tuple[jax.Array, dict]:
    """Mean negative log-likelihood of the target tokens:

      L = -sum_{n,t} loss_mask[n,t] log p(tokens[n,t] | tokens[n,<t]) / sum loss_mask
    """
    logp = train.sequence_logprobs(model, batch["tokens"], batch["mask"],
                                   remat=remat)[0]                            # [B, T]
    loss = -losses.token_mean(logp, batch["loss_mask"])
    return loss, {"loss": loss, WEIGHT: jnp.sum(batch["loss_mask"])}


@functools.partial(jax.jit, static_argnames=("graphdef", "loss_fn", "config", "batch_size",
                                             "microbatches", "split", "mesh"), donate_argnums=0)
def _step(state: train.TrainState, data, *, graphdef, loss_fn, config: train.OptimizerConfig,
          batch_size: int | None, microbatches: int, split: NamedSharding | None = None,
          mesh: Mesh | None = None):
    """One AdamW step on the examples of step `state.step` (`batch_size` of the dataset `data`,
    `train.batch_indices`; None: `data` is the step's batch), in `microbatches` parts:

      grad = sum_m w_m grad L_m / sum_m w_m,   w_m = the part's WEIGHT metric (1 if absent)

    which is the gradient of the whole batch's loss (a token mean over all parts' tokens, or a
    mean over examples). A non-finite loss or gradient leaves the state unchanged (metric
    `finite` = 0). `split`: each part's rows spread over the mesh's (data, fsdp) devices
    (XLA sums the gradient over them). `mesh`, given only when it splits the model: the state
    (donated) is returned in its `parallel.tree_shardings`, as it came in."""
    if batch_size is not None:
        size = jax.tree.leaves(data)[0].shape[0]
        rows = train.batch_indices(state.key, state.step, size, batch_size)   # [batch]
        data = jax.tree.map(lambda x: x[rows], data)
    parts = jax.tree.map(lambda x: x.reshape(microbatches, -1, *x.shape[1:]), data)
    if split is not None:                                 # [microbatches, batch / m, ...]
        parts = jax.lax.with_sharding_constraint(parts, split)

    def grads_and_metrics(params, part):
        (_, metrics), grads = jax.value_and_grad(
            lambda p: loss_fn(nnx.merge(graphdef, p), part), has_aux=True)(params)
        return grads, metrics

    def weighted(params, part):
        grads, metrics = grads_and_metrics(params, part)
        weight = jnp.asarray(metrics.pop(WEIGHT, 1.0), jnp.float32)
        return jax.tree.map(lambda x: weight * x, (grads, metrics)), weight

    def accumulate(total, part):
        return jax.tree.map(jnp.add, total, weighted(state.params, part)), None

    first = jax.tree.map(lambda x: x[0], parts)
    if microbatches == 1:  # the batch's own gradient, unscaled
        grads, metrics = grads_and_metrics(state.params, first)
        metrics.pop(WEIGHT, None)
    else:
        ((grads, metrics), weight), _ = jax.lax.scan(
            accumulate, weighted(state.params, first), jax.tree.map(lambda x: x[1:], parts))
        grads, metrics = jax.tree.map(lambda x: x / weight, (grads, metrics))
    finite = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x))
                                  for x in jax.tree.leaves((grads, metrics))]))
    state = train.apply_if_finite(state, grads, config, finite)
    if mesh is not None:  # a mesh that splits the model
        state = jax.lax.with_sharding_constraint(state, parallel.tree_shardings(state, mesh))
    return state, metrics, finite


def lower_step(graphdef: nnx.GraphDef, state: train.TrainState, batch: Mapping[str, jax.Array],
               loss_fn: LossFn, config: FitConfig) -> jax.stages.Lowered:
    """`fit`'s step on one batch (arrays or `jax.ShapeDtypeStruct`s of batch_size rows), lowered
    for the default device (`.compile().memory_analysis()`: what a step needs, nothing
    allocated)."""
    if config.remat != "none":
        loss_fn = functools.partial(loss_fn, remat=config.remat)
    return _step.lower(state, batch, graphdef=graphdef, loss_fn=loss_fn,
                       config=config.optimizer, batch_size=None,
                       microbatches=config.microbatches)


def _require_step_fits(model: nnx.Module, loss_fn: LossFn, data: Mapping[str, np.ndarray],
                       config: FitConfig, mesh: Mesh, stream: bool, device_bytes: int | None,
                       where: str, held=None) -> int | None:
    """Refuses, before anything is allocated, `fit`'s step of `model` on `data` (the dataset,
    batch_size rows drawn per step; or for a `stream`, its first batch) on `mesh` that would not
    fit in `device_bytes` per device (default: `parallel.free_bytes(mesh, held)`, `held` the
    train state already placed): `parallel.require_fits` with the per-device estimate

      S + G + D

    (S the parameters and AdamW moments and G the gradients as placed on `mesh`, D the data,
    replicated: the dataset, or a stream's batch of batch_size rows; all certain, the loss's
    activations left out), and the compiled step's peak only when that estimate passes half of
    the memory. The settings it suggests, each named `where` + its FitConfig field: more
    `microbatches`, `remat="full"`, a smaller `batch_size` (for a stream, whose batches must
    then have that many rows). Returns the compiled peak when it was compiled, else None."""
    graphdef, state, parts = train.placed_state(model, config.optimizer, mesh)
    data = {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype,
                                    sharding=parallel.replicated(mesh)) for k, v in data.items()}
    shards = parallel.batch_devices(mesh) if parallel.DATA in mesh.axis_names else 1
    rows = config.batch_size
    row_bytes = sum(x.size * x.dtype.itemsize for x in data.values()) // (rows if stream else 1)

    def settings(change: dict) -> FitConfig:
        return dataclasses.replace(config, **change)

    def estimate(change: dict) -> parallel.Parts:
        return {**parts, "data": row_bytes * (settings(change).batch_size if stream else 1)}

    def compiled(change: dict) -> parallel.Parts:
        cfg = settings(change)
        split = NamedSharding(mesh, PartitionSpec(None, *parallel.batch_sharding(mesh).spec)
                              ) if shards > 1 else None
        step_data = data if not stream else jax.tree.map(
            lambda x: jax.ShapeDtypeStruct((cfg.batch_size, *x.shape[1:]), x.dtype,
                                           sharding=x.sharding), data)
        loss = loss_fn if cfg.remat == "none" else functools.partial(loss_fn, remat=cfg.remat)
        return parallel.compiled_parts(_step.lower(
            state, step_data, graphdef=graphdef, loss_fn=loss, config=cfg.optimizer,
            batch_size=None if stream else cfg.batch_size, microbatches=cfg.microbatches,
            split=split, mesh=mesh if parallel.is_split_model(mesh) else None).compile())

    def divides(size: int, parts: int) -> bool:  # `size` rows in `parts` over the shards
        return size % parts == 0 and (size // parts) % shards == 0

    knobs = [[{"microbatches": m} for m in (2 ** i for i in range(1, rows.bit_length()))
              if m > config.microbatches and divides(rows, m)],
             [{"remat": "full"}] if config.remat != "full" else [],
             [{"batch_size": b} for b in parallel.halvings(rows)
              if divides(b, config.microbatches)]]
    return parallel.require_fits(
        f"the training step with {where}batch_size={rows}, {where}microbatches="
        f"{config.microbatches}, {where}remat={config.remat!r}",
        parallel.free_bytes(mesh, held) if device_bytes is None else device_bytes, estimate,
        compiled, [k for k in knobs if k], certain=(*parts, "data"),
        name=lambda change: ", ".join(f"{where}{k}={v!r}" for k, v in change.items()))


def fit(model: nnx.Module, loss_fn: LossFn, data: Mapping[str, np.ndarray] | Stream,
        config: FitConfig, out_dir: str | pathlib.Path, *, key: jax.Array,
        mesh: Mesh | None = None, device_bytes: int | None = None,
        where: str = "FitConfig.", on_save: scaffold.OnSave | None = None) -> nnx.Module:
    """Trains `model` (float32 parameters) on `loss_fn` over `data` (arrays with a shared
    leading axis N, or a `Stream` of batches); returns the trained model. `out_dir` receives
    metrics.jsonl (step, loss and loss_fn's metrics every `log_every` steps) and checkpoints/;
    a rerun resumes (`scaffold.run`). `on_save(state)` is called after each checkpoint with the
    state saved, and first, in a resumed run, with the restored one (`scaffold.export_policy`
    writes the model as a Hugging Face folder).

    `mesh` (default: this process's first device): the data are replicated on it and each
    batch's rows split over its (data, fsdp) devices (`parallel.batch_sharding`; batch_size /
    microbatches must divide over them). The state is replicated, or, on a mesh that splits the
    model (fsdp or tensor > 1), held in its `parallel.tree_shardings` (restored so from a
    checkpoint); the returned model's parameters are then split too. It may span the devices
    of several processes (`results.join_processes`): every
    process then calls `fit` alike, with the same model and data; process 0 alone writes the
    metrics, every process its shards of the checkpoints (Orbax).

    Before anything is allocated (for a stream: before its first batch is trained on, the
    state already placed counted as free) the step is checked against `device_bytes` per device
    (default: the free memory of a device of the mesh, the least over processes,
    `parallel.free_bytes`); a step too large is refused with `parallel.DoesNotFit`. Errors name
    `config`'s fields after `where` (e.g. "fit." for the `fit` key of an experiment's
    config)."""
    stream = callable(data)
    if not stream:
        size = {k: np.shape(v)[0] for k, v in data.items()}
        require(len(set(size.values())) == 1, f"data arrays have different lengths: {size}")
        require(config.batch_size <= min(size.values()),
                f"{where}batch_size={config.batch_size} exceeds the {min(size.values())} "
                f"examples")
    mesh = mesh or parallel.make_mesh(parallel.DATA, jax.local_devices()[:1])
    shards = parallel.batch_devices(mesh) if parallel.DATA in mesh.axis_names else 1
    require((config.batch_size // config.microbatches) % shards == 0,
            f"{where}batch_size={config.batch_size} / microbatches={config.microbatches} "
            f"must split evenly over the mesh's {shards} data devices (data x fsdp)")
    split = NamedSharding(mesh, PartitionSpec(None, *parallel.batch_sharding(mesh).spec)
                          ) if shards > 1 else None                # [microbatches, rows, ...]
    check = functools.partial(_require_step_fits, model, loss_fn, config=config, mesh=mesh,
                              stream=stream, device_bytes=device_bytes, where=where)
    if not stream:
        check(data)
    if config.remat != "none":
        loss_fn = functools.partial(loss_fn, remat=config.remat)
    graphdef, state = scaffold.init_state(model, config.optimizer, key, mesh)
    on_mesh = functools.partial(parallel.put, sharding=parallel.replicated(mesh))
    dataset = None if stream else on_mesh({k: np.asarray(v) for k, v in data.items()})
    batches: list[Iterator] = []  # the stream, opened at the first step run

    def step(state: train.TrainState, s: int):
        if stream:
            first = not batches
            if first:
                batches.append(iter(data(s)))
            batch = _stream_batch(next(batches[0], None), s, config.batch_size)
            if first:  # the stream's shapes are known from its first batch
                check(batch, held=state)
        state, metrics, finite = _step(
            state, on_mesh(batch) if stream else dataset, graphdef=graphdef, loss_fn=loss_fn,
            config=config.optimizer, batch_size=None if stream else config.batch_size,
            microbatches=config.microbatches, split=split,
            mesh=mesh if parallel.is_split_model(mesh) else None)
        if not bool(finite):  # the step left the state unchanged
            metrics = {k: float(parallel.host_array(v)) for k, v in metrics.items()}
            raise scaffold.NonFinite(f"non-finite loss or gradient (metrics {metrics})")
        if s % config.log_every == 0 or s + 1 == config.steps:
            return state, {k: float(parallel.host_array(v)) for k, v in metrics.items()}
        return state, None

    state = scaffold.run(state, step, scaffold.Schedule(
        config.steps, config.checkpoint_every, config.keep_checkpoints), out_dir,
        on_save=on_save)
    return nnx.merge(graphdef, state.params)


def _stream_batch(batch: Mapping[str, np.ndarray] | None, step: int, batch_size: int,
                  ) -> dict[str, np.ndarray]:
    """A stream's batch of step `step` as arrays; ValueError naming the step when the stream
    ended early or the batch has the wrong number of rows."""
    require(batch is not None, f"step {step}: the data stream ended before FitConfig.steps")
    batch = {k: np.asarray(v) for k, v in batch.items()}
    rows = {k: v.shape[0] if v.ndim else None for k, v in batch.items()}
    require(set(rows.values()) == {batch_size}, f"step {step}: the data stream's batch has "
            f"rows {rows}, expected FitConfig.batch_size={batch_size} for every array")
    return batch
