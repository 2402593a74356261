"""A jitted, data-parallel policy-gradient step for jaxlab's causal LMs (section 2, step 5 of
`papers/writing_zero.md`), and the train state it updates.

The policy is a `jaxlab.models.Decoder` (any Flax NNX module with its `hidden(ids, mask)` and
`unembedding()`). It enters compiled code as its `nnx.split` graph definition (static) and
parameters (a pytree in the state). Master parameters and the optimizer state are float32;
compute runs in the model's compute dtype (load with `param_dtype="float32",
compute_dtype="bfloat16"` for bf16 compute: each matmul casts the float32 weights, and the
gradients and updates stay float32, so updates of 1e-6 are not rounded away).

On a mesh with only a `parallel.DATA` axis the step runs under `jax.shard_map`: every device
takes its slice of the batch, optionally in micro-batches (gradient accumulation), and gradients
are averaged with `jax.lax.pmean` (the pmap semantics). Each device's loss is scaled so that the
average equals the gradient of the loss over the whole batch: the sharded step computes the
single-device step. On a `parallel.make_train_mesh` mesh with `fsdp` or `tensor` axes larger than
1 the same step is left to XLA's partitioner: the state stays in its `parallel.tree_shardings`
(parameters and Adam moments split over fsdp x tensor, born so with `parallel.init_sharded`),
the batch is split over (data, fsdp), and XLA gathers weights and reduce-scatters gradients.
A step whose loss or gradient is not finite leaves the state unchanged and says so in its
metrics (`finite`).

Memory: `require_policy_step_fits` checks a step's size against the device's memory before
anything is allocated (the RL loop calls it at its start): a shape estimate (parameters, AdamW
moments, gradients and the batch, held at once for sure; each layer's kept activations and the
output head's chunk, approximate), and, when that estimate passes half of the device's memory,
the compiled step's own figure (XLA's `memory_analysis`; `parallel.require_fits`). A step too
large is refused with `parallel.DoesNotFit`, naming the settings that fit: more
`train.microbatches`, a smaller `train.logprob_chunk`, `train.remat="full"`, fewer rows. Small
steps, the many of a test suite, are never compiled twice.

Exact resume: the state holds the step and the run's root key; whatever a run draws from
`(key, step)` (`batch_indices`, the reference choice of BRPO) is the same after a restart.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh, PartitionSpec

from jaxlab import parallel
from jaxlab.config import is_int, require
from jaxlab.models.decoder import REMAT_POLICIES, positions_of
from jaxlab.rl import losses


@struct.dataclass
class TrainState:
    params: nnx.State          # the model's nnx.Param variables
    opt_state: optax.OptState
    step: jax.Array            # [] int32, optimizer steps taken
    key: jax.Array             # the run's root PRNG key; step s draws from (key, s)


class PolicyBatch(NamedTuple):
    """Sampled sequences and what the loss needs about them. Position t of the [B, T] fields is
    about token t given tokens < t; position 0 is never trained. A row is a left-padded prompt
    followed by its response and right padding (`jaxlab.rl.rollout.policy_batch` builds one)."""

    tokens: jax.Array      # int32 [B, T], prompt + response (+ padding)
    mask: jax.Array        # [B, T], 1 on real tokens (the attention mask; 0 on padding)
    loss_mask: jax.Array   # [B, T], 1 on the response tokens to train on
    old_logp: jax.Array    # float32 [B, T], log-probs under the sampling policy
    ref_logp: jax.Array    # float32 [B, T], log-probs under the reference policy (read only
    #                        when the loss has a KL term)
    advantages: jax.Array  # float32 [B], one per sequence (GRPO, BRPO, ...)

    @property
    def positions(self) -> jax.Array:
        """int32 [B, T]: each token's RoPE position, as the model computes it from the mask."""
        return positions_of(self.mask)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with global-norm clipping and a learning-rate schedule (`make_optimizer`):

      rate(s) = learning_rate * s / warmup_steps                            s < warmup_steps
              = learning_rate                                               decay_steps None
              = learning_rate * (1 + cos(pi (s - w) / (decay_steps - w))) / 2  (cosine, to 0)
    """

    learning_rate: float = 1e-6  # the peak rate (the papers give no value for the RL step)
    warmup_steps: int = 0        # linear warmup from 0 to learning_rate over these steps
    decay_steps: int | None = None  # cosine decay to 0 at this step, warmup included
    #                              (None: constant after the warmup)
    adam_eps: float = 1e-8       # AdamW's epsilon: updates of entries whose gradient is far
    #                              below it shrink with the gradient instead of being scaled up
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0   # clip the global gradient norm to this (0: no clipping)

    def __post_init__(self):
        require(self.learning_rate > 0,
                f"OptimizerConfig.learning_rate must be > 0, got {self.learning_rate}")
        require(is_int(self.warmup_steps) and self.warmup_steps >= 0,
                f"OptimizerConfig.warmup_steps must be an integer >= 0, got "
                f"{self.warmup_steps!r}")
        require(self.decay_steps is None or (is_int(self.decay_steps)
                                             and self.decay_steps > self.warmup_steps),
                f"OptimizerConfig.decay_steps must be None or an integer > warmup_steps="
                f"{self.warmup_steps} (the cosine decay follows the warmup), got "
                f"{self.decay_steps!r}")
        require(self.adam_eps > 0, f"OptimizerConfig.adam_eps must be > 0, got {self.adam_eps}")
        require(self.weight_decay >= 0,
                f"OptimizerConfig.weight_decay must be >= 0, got {self.weight_decay}")
        require(self.max_grad_norm >= 0,
                f"OptimizerConfig.max_grad_norm must be >= 0, got {self.max_grad_norm}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Settings of the policy-gradient step (hashable: a static argument of the compiled step):
    its loss, its optimizer, and how it spends memory. The policy's temperature is the
    rollout's, an argument of `train_step` (`jaxlab.rl.loop.LoopConfig.temperature`)."""

    loss: losses.PolicyLossConfig = dataclasses.field(default_factory=losses.PolicyLossConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    microbatches: int = 1        # gradient accumulation: each device's slice in this many parts
    logprob_chunk: int = 512     # positions per chunk of the output head (memory: [B, chunk, V])
    remat: str = "none"          # what the backward pass keeps of each decoder layer
    #                              (`decoder.REMAT_POLICIES`): "none" every activation, "full"
    #                              its input only, "dots" also its projections' outputs

    def __post_init__(self):
        require(isinstance(self.microbatches, int) and self.microbatches >= 1,
                f"TrainConfig.microbatches must be an integer >= 1, got {self.microbatches!r}")
        require(isinstance(self.logprob_chunk, int) and self.logprob_chunk >= 1,
                f"TrainConfig.logprob_chunk must be an integer >= 1, got {self.logprob_chunk!r}")
        require(self.remat in REMAT_POLICIES,
                f"TrainConfig.remat must be one of {list(REMAT_POLICIES)}, got {self.remat!r}")


def require_temperature(temperature: float) -> None:
    """The policy pi_T = softmax(logits / T) needs T > 0 (greedy rollouts have no ratio)."""
    require(temperature > 0, f"the policy's temperature must be > 0 (the rollouts' sampling "
                             f"temperature; greedy rollouts have no policy ratio), got "
                             f"{temperature}")


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
    """AdamW at `config`'s schedule (`OptimizerConfig`), after global-norm clipping."""
    rate = config.learning_rate
    if config.decay_steps is not None:
        rate = optax.warmup_cosine_decay_schedule(0.0, rate, config.warmup_steps,
                                                  config.decay_steps)
    elif config.warmup_steps:
        rate = optax.linear_schedule(0.0, rate, config.warmup_steps)
    adamw = optax.adamw(rate, eps=config.adam_eps, weight_decay=config.weight_decay)
    if config.max_grad_norm == 0:
        return adamw
    return optax.chain(optax.clip_by_global_norm(config.max_grad_norm), adamw)


def init_train_state(model: nnx.Module, config: OptimizerConfig, key: jax.Array,
                     ) -> tuple[nnx.GraphDef, TrainState]:
    """Splits `model` into its graph definition and a train state at step 0.

    The state holds copies of the parameters and of `key`, so the step (which donates the state)
    leaves `model` and `key` usable. Parameters must be float32 (master weights) and the model's
    state must be parameters only (the step recreates the model from graph and parameters).
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    other = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(rest)]
    require(not other, f"the model holds non-parameter state {other[:5]}; the policy step "
                       f"trains models whose state is nnx.Param only")
    low = [f"{jax.tree_util.keystr(path)} ({x.dtype})"
           for path, x in jax.tree_util.tree_leaves_with_path(params) if x.dtype != jnp.float32]
    require(not low, f"master parameters must be float32, got {low[:3]}: AdamW updates of "
                     f"1e-6 vanish in bfloat16 weights. For bfloat16 compute load the model with "
                     f"param_dtype='float32', compute_dtype='bfloat16'")
    params, key = jax.tree.map(jnp.copy, (params, key))
    state = TrainState(params=params, opt_state=make_optimizer(config).init(params),
                       step=jnp.zeros((), jnp.int32), key=key)
    return graphdef, state


def abstract_train_state(model_fn, config: OptimizerConfig,
                         ) -> tuple[nnx.GraphDef, TrainState]:
    """(graph, the train state as `jax.ShapeDtypeStruct`s) of the model `model_fn()` builds,
    nothing allocated: what a step is lowered on to read its compiled memory."""
    graphdef = nnx.graphdef(nnx.eval_shape(model_fn))
    state = jax.eval_shape(lambda: init_train_state(model_fn(), config, jax.random.key(0))[1])
    return graphdef, state


@dataclasses.dataclass(frozen=True)
class SharedPrompts:
    """Rows come in groups of `group_size` consecutive rows whose first `prompt_width` columns
    (the left-padded prompt) are the same: each group's prompt runs through the model once
    (`Decoder.grouped_hidden`), and only the response columns get log-probs (the prompt's are
    0). The values are those of the rows run one by one (up to float rounding); the linear
    layers' work per group falls from G (L + T) to L + G T tokens."""

    group_size: int
    prompt_width: int

    def __post_init__(self):
        for name in ("group_size", "prompt_width"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 1,
                    f"SharedPrompts.{name} must be an integer >= 1, got {value!r}")


def sequence_logprobs(model: nnx.Module, tokens: jax.Array, mask: jax.Array, *,
                      temperature: float = 1.0, chunk: int = 512, entropy_grad: bool = False,
                      remat: str = "none", sharding: jax.sharding.Sharding | None = None,
                      shared: SharedPrompts | None = None) -> tuple[jax.Array, jax.Array]:
    """log pi_T(tokens_t | tokens_<t) and the entropy of pi_T at each position, float32 [B, T]
    each (position 0, with no context, is 0), for tokens int [B, T] with attention mask [B, T];
    pi_T = softmax(logits / temperature) (`losses.head_logprobs`: no [B, T, V] array). `remat`:
    the decoder layers' checkpoint policy, `sharding`: the activations' (`Decoder.hidden`).
    With `shared`, each group's prompt is run once and the prompt columns are 0."""
    if shared is None:
        hidden = model.hidden(tokens[:, :-1], mask[:, :-1], remat=remat,
                              sharding=sharding)                             # [B, T-1, E]
        targets, width = tokens[:, 1:], 1
    else:
        g, width = shared.group_size, shared.prompt_width
        b, t = tokens.shape[0], tokens.shape[1] - width
        require(b % g == 0 and t >= 1, f"SharedPrompts({g}, {width}) needs rows in groups of "
                f"{g} and a prompt narrower than the tokens, got tokens {tokens.shape}")

        def groups(x):                   # [B, T] -> prompt [P, L], responses [P, G, T']
            return x[:, :width].reshape(-1, g, width)[:, 0], x[:, width:].reshape(-1, g, t)

        (prompt_ids, response_ids), (prompt_mask, response_mask) = groups(tokens), groups(mask)
        prompt, response = model.grouped_hidden(prompt_ids, prompt_mask, response_ids,
                                                response_mask, remat=remat, sharding=sharding)
        # Response token j is predicted from response position j - 1, token 0 from the
        # prompt's last position (shared by the group).
        last = jnp.broadcast_to(prompt[:, None, -1:], (*response.shape[:2], 1, prompt.shape[-1]))
        hidden = jnp.concatenate([last, response[:, :, :-1]], axis=2).reshape(
            b, t, -1)                                                        # [B, T', E]
        targets = tokens[:, width:]
    logp, ent = losses.head_logprobs(hidden, model.unembedding(), targets,
                                     temperature=temperature, chunk=chunk,
                                     entropy_grad=entropy_grad)
    return tuple(jnp.pad(x, ((0, 0), (width, 0))) for x in (logp, ent))


@functools.partial(jax.jit, static_argnames=("graphdef", "temperature", "chunk", "shared"))
def policy_logprobs(graphdef: nnx.GraphDef, params: nnx.State, tokens: jax.Array,
                    mask: jax.Array | None = None, *, temperature: float = 1.0,
                    chunk: int = 512, shared: SharedPrompts | None = None) -> jax.Array:
    """log pi_T(tokens_t | tokens_<t) float32 [B, T] (position 0 is 0): the `old_logp` /
    `ref_logp` of a `PolicyBatch`, computed exactly as the step computes its own (mask None:
    every token is real; `shared`: each group's prompt run once, its columns 0)."""
    mask = jnp.ones(tokens.shape, jnp.int32) if mask is None else mask
    return sequence_logprobs(nnx.merge(graphdef, params), tokens, mask,
                             temperature=temperature, chunk=chunk, shared=shared)[0]


def batch_indices(key: jax.Array, step: jax.Array, num_examples: int,
                  batch_size: int) -> jax.Array:
    """The examples of step `step`: int32 [batch_size], from a fresh permutation of the
    `num_examples` examples each epoch (the last incomplete batch of an epoch is dropped).
    A function of (key, step) only, so a resumed run reads exactly the batches it would have."""
    require(0 < batch_size <= num_examples,
            f"batch_size={batch_size} must lie in [1, num_examples={num_examples}]")
    per_epoch = num_examples // batch_size
    epoch, position = jnp.divmod(step, per_epoch)
    order = jax.random.permutation(jax.random.fold_in(key, epoch), num_examples)
    return jax.lax.dynamic_slice(order, (position * batch_size,), (batch_size,)).astype(jnp.int32)


def whole_groups(size: int, num_shards: int, microbatches: int, group_size: int) -> bool:
    """Whether each device's micro-batch of a `size`-row batch holds whole groups of
    `group_size` rows (what `SharedPrompts` needs)."""
    return size % (num_shards * microbatches * group_size) == 0


def check_batch(batch: PolicyBatch, num_shards: int, microbatches: int,
                shared: SharedPrompts | None = None) -> None:
    """Raises ValueError naming the first field whose shape or dtype is wrong."""
    require(batch.tokens.ndim == 2 and batch.tokens.shape[1] >= 2,
            f"PolicyBatch.tokens must have shape [B, T] with T >= 2, got {batch.tokens.shape}")
    require(jnp.issubdtype(batch.tokens.dtype, jnp.integer),
            f"PolicyBatch.tokens must hold integers, got {batch.tokens.dtype}")
    size = batch.tokens.shape[0]
    for name in ("mask", "loss_mask", "old_logp", "ref_logp"):
        shape = getattr(batch, name).shape
        require(shape == batch.tokens.shape,
                f"PolicyBatch.{name} must have the shape of tokens {batch.tokens.shape}, "
                f"got {shape}")
    require(batch.advantages.shape == (size,),
            f"PolicyBatch.advantages must have shape [B]=({size},), got {batch.advantages.shape}")
    require(size % (num_shards * microbatches) == 0,
            f"the batch size {size} must be a multiple of the data-axis devices ({num_shards}) "
            f"x microbatches ({microbatches})")
    if shared is not None:
        require(whole_groups(size, num_shards, microbatches, shared.group_size),
                f"SharedPrompts: each device's micro-batch of {size} rows / ({num_shards} "
                f"devices x {microbatches} microbatches) must hold whole groups of "
                f"{shared.group_size} rows")
        require(0 < shared.prompt_width < batch.tokens.shape[1],
                f"SharedPrompts.prompt_width={shared.prompt_width} must lie in [1, T) for "
                f"tokens of {batch.tokens.shape[1]} columns")


def _local_step(state: TrainState, batch: PolicyBatch, *, graphdef: nnx.GraphDef,
                config: TrainConfig, temperature: float, num_shards: int, axis: str | None,
                rows: jax.sharding.Sharding | None = None,
                shared: SharedPrompts | None = None,
                ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One device's part of the step, on its slice of the batch (inside shard_map over `axis`),
    or the whole step (axis None, num_shards 1: under XLA's partitioner, the activations held
    in the `rows` sharding)."""
    def psum(x):
        return x if axis is None else jax.lax.psum(x, axis)

    def pmean(x):
        return x if axis is None else jax.lax.pmean(x, axis)

    weights, count = losses.AGGREGATIONS[config.loss.aggregation](batch.loss_mask[:, 1:])
    count = psum(count)  # over the whole batch
    empty = count == 0  # no loss at all: no update, not even by the optimizer's momentum
    count = jnp.maximum(count, 1.0)
    # This slice's share of the whole-batch loss, times the device count: pmean of the
    # gradients is then the gradient of the whole-batch loss.
    scale = num_shards / count

    def loss_fn(params, part: PolicyBatch, part_weights):
        logp, ent = sequence_logprobs(
            nnx.merge(graphdef, params), part.tokens, part.mask,
            temperature=temperature, chunk=config.logprob_chunk,
            entropy_grad=config.loss.entropy_coef > 0, remat=config.remat,
            sharding=rows, shared=shared)                                # [b, T] each
        per_token, terms = losses.policy_loss_per_token(
            logp[:, 1:], ent[:, 1:], part.old_logp[:, 1:], part.advantages,
            part.ref_logp[:, 1:] if config.loss.kl_coef > 0 else None, config.loss)
        total = jnp.sum(part_weights * per_token)
        metrics = {name: jnp.sum(part_weights * x) / count for name, x in terms.items()}
        return total * scale, {**metrics, "loss": total / count}

    grads_and_metrics = jax.grad(loss_fn, has_aux=True)

    def accumulate(total, part):
        return jax.tree.map(jnp.add, total, grads_and_metrics(state.params, *part)), None

    parts = jax.tree.map(lambda x: x.reshape(config.microbatches, -1, *x.shape[1:]),
                         (batch, weights))                               # [micro, b, ...]
    first = jax.tree.map(lambda x: x[0], parts)
    rest = jax.tree.map(lambda x: x[1:], parts)
    (grads, metrics), _ = jax.lax.scan(accumulate, grads_and_metrics(state.params, *first), rest)
    grads = pmean(grads)
    metrics = psum(metrics)
    metrics["grad_norm"] = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
    metrics["count"] = count

    # A non-finite loss or gradient (NaN advantages, overflow) must not reach the weights.
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    metrics["finite"] = finite.astype(jnp.float32)
    return apply_if_finite(state, grads, config.optimizer, finite, empty), metrics


def apply_if_finite(state: TrainState, grads, config: OptimizerConfig, finite: jax.Array,
                    empty: jax.Array | bool = False) -> TrainState:
    """One `make_optimizer(config)` update of `state` by `grads`, taken only where `finite`
    ([] bool) holds and the loss is not `empty` ([] bool: its mask covers no token, e.g. every
    BRPO group was dropped). Not finite: the state comes back unchanged, its step count
    included (the run stops). Empty: parameters and optimizer moments come back unchanged (no
    AdamW momentum step either) and the step is counted, as the RL step took place."""
    updates, opt_state = make_optimizer(config).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    apply = finite & ~jnp.asarray(empty)
    keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(apply, new, old))
    return state.replace(params=keep(params, state.params),
                         opt_state=keep(opt_state, state.opt_state),
                         step=state.step + finite.astype(state.step.dtype))


# The state is replaced by its successor, so its buffers are donated.
@functools.partial(jax.jit, static_argnames=("graphdef", "config", "mesh", "temperature",
                                             "shared"), donate_argnames="state")
def train_step(state: TrainState, batch: PolicyBatch, *, graphdef: nnx.GraphDef,
               config: TrainConfig, mesh: Mesh, temperature: float,
               shared: SharedPrompts | None = None,
               ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One policy-gradient step on the whole batch: data-parallel over `mesh`'s DATA axis, or,
    on a mesh that splits the model (`parallel.is_split_model`), partitioned by XLA over
    (data, fsdp, tensor) with the state kept in its `parallel.tree_shardings`.

    Loss (token-level, section 2 step 5): the aggregation of `config.loss` over every response
    token of the batch of

      l_t = PPO-clip_t(rho_t, A) + kl_coef * KL_t - entropy_coef * H_t

    Args:
      state: train state (donated): replicated, or on a split-model mesh in its
        `parallel.tree_shardings` (`parallel.init_sharded`).
      batch: PolicyBatch with B a multiple of (devices on DATA, and FSDP if any) x
        config.microbatches, best placed with `parallel.batch_sharding(mesh)`.
      graphdef: the model's `nnx.split` graph definition.
      mesh: a mesh with a `parallel.DATA` axis (`parallel.single_device_mesh()`: one device).
      temperature: T of the policy pi_T = softmax(logits / T), the rollouts' sampling
        temperature (> 0): the ratios compare pi_T with the `old_logp` sampled at T.
      shared: the batch's rows in groups that share their prompt columns, each prompt run once
        (`SharedPrompts`; each device's micro-batch must hold whole groups); None: row by row.
    Returns:
      the next state and metrics ([] float32 each): loss, policy, entropy, clipped (fraction of
      ratios outside the clip range), kl (when kl_coef > 0), grad_norm, count (the
      aggregation's count: tokens for token_mean, sequences for sequence_mean), finite (0 when
      the loss or the gradient was not finite: the state is then returned unchanged, step
      included).
    """
    require_temperature(temperature)
    require(parallel.DATA in mesh.axis_names,
            f"the mesh must have a {parallel.DATA!r} axis, got axes {mesh.axis_names}")
    if parallel.is_split_model(mesh):
        check_batch(batch, parallel.batch_devices(mesh), config.microbatches, shared)
        state, metrics = _local_step(state, batch, graphdef=graphdef, config=config,
                                     temperature=temperature, num_shards=1, axis=None,
                                     rows=parallel.batch_sharding(mesh), shared=shared)
        return jax.lax.with_sharding_constraint(state, parallel.tree_shardings(state, mesh)), \
            metrics
    num_shards = mesh.shape[parallel.DATA]
    check_batch(batch, num_shards, config.microbatches, shared)
    local = functools.partial(_local_step, graphdef=graphdef, config=config,
                              temperature=temperature, num_shards=num_shards,
                              axis=parallel.DATA, shared=shared)
    # check_vma=False keeps the gradients of the replicated parameters per device, as under
    # pmap, for the explicit pmean (with the check on, autodiff would already sum them).
    return jax.shard_map(local, mesh=mesh, check_vma=False,
                         in_specs=(PartitionSpec(), PartitionSpec(parallel.DATA)),
                         out_specs=(PartitionSpec(), PartitionSpec()))(state, batch)


def placed_state(model: nnx.Module, optimizer: OptimizerConfig, mesh: Mesh,
                 ) -> tuple[nnx.GraphDef, TrainState, parallel.Parts]:
    """The train state of `model` as abstract arrays (nothing allocated) placed as a step holds
    it on `mesh` (in its `parallel.tree_shardings` on a mesh that splits the model, else
    replicated), and the bytes one device holds of it: {"parameters and optimizer state",
    "gradients"}."""
    graphdef, state = abstract_train_state(lambda: model, optimizer)
    placed = (parallel.tree_shardings(state, mesh) if parallel.is_split_model(mesh)
              else jax.tree.map(lambda _: parallel.replicated(mesh), state))
    parts = {"parameters and optimizer state": parallel.shard_bytes(state, placed),
             "gradients": parallel.shard_bytes(state.params, placed.params)}
    return graphdef, jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                  state, placed), parts


def require_policy_step_fits(model: nnx.Module, rows: int, width: int, config: TrainConfig,
                             mesh: Mesh, temperature: float, shared: SharedPrompts | None = None,
                             device_bytes: int | None = None, *,
                             loop: tuple[int, int, int] | None = None) -> int | None:
    """Refuses, before anything is allocated, a `train_step` of `model` (a `Decoder`, its
    parameters float32) on batches of `rows` x `width` tokens on `mesh` that would not fit in
    `device_bytes` per device (default: `parallel.free_bytes(mesh)`): `parallel.require_fits`
    with the per-device estimate

      S + G + 4 (5 T + 1) R / s  (certain)  +  a T b layers x itemsize + 8 b min(chunk, T) V

    (S the parameters and AdamW moments and G the gradients as they are placed on `mesh`,
    R = `rows`, T = `width`, s the batch's devices (data x fsdp), b = R / (s microbatches)
    rows of one micro-batch: the batch's five [R, T] float32/int32 fields; what each layer
    keeps for the backward pass, a = E (its input) with remat="full", else about 6 E + 3 I
    (its projections' outputs), and the head's float32 logits and their gradient per chunk,
    both approximate), and the compiled step's peak only when that estimate passes half of
    the memory. The settings it suggests, named as in `jaxlab.rl.loop.LoopConfig`: more
    `train.microbatches`, a smaller `train.logprob_chunk`, `train.remat="full"`, fewer rows
    (with `loop` = (prompts, group_size, minibatches), the loop's rows per step prompts x
    group_size / minibatches: fewer prompts or more minibatches). Returns the compiled peak
    when it was compiled, else None."""
    c, shards = model.config, parallel.batch_devices(mesh)
    graphdef, state, held = placed_state(model, config.optimizer, mesh)
    itemsize = jnp.dtype(c.compute_dtype).itemsize

    def settings(change: dict) -> tuple[int, TrainConfig]:
        return change.get("rows", rows), dataclasses.replace(
            config, **{k: v for k, v in change.items() if k != "rows"})

    def estimate(change: dict) -> parallel.Parts:
        r, cfg = settings(change)
        b = r // (shards * cfg.microbatches)
        return {**held, "batch": 4 * (5 * width + 1) * r // shards,
                "layer activations": width * b * c.num_layers * itemsize * (
                    c.hidden_size if cfg.remat == "full"
                    else 6 * c.hidden_size + 3 * c.intermediate_size),
                "output head": 8 * b * min(cfg.logprob_chunk, width) * c.vocab_size}

    def compiled(change: dict) -> parallel.Parts:
        r, cfg = settings(change)
        rows_on = parallel.batch_sharding(mesh)
        field = functools.partial(jax.ShapeDtypeStruct, (r, width), sharding=rows_on)
        batch = PolicyBatch(field(jnp.int32), field(jnp.int32), *(field(jnp.float32),) * 3,
                            jax.ShapeDtypeStruct((r,), jnp.float32, sharding=rows_on))
        fit = shared if shared is None or whole_groups(r, shards, cfg.microbatches,
                                                         shared.group_size) else None
        return parallel.compiled_parts(train_step.lower(
            state, batch, graphdef=graphdef, config=cfg, mesh=mesh, temperature=temperature,
            shared=fit).compile())

    def rows_text(r: int) -> str:
        return f"{r} rows" if loop is None else f"prompts x group_size / minibatches = {r} rows"

    def rows_setting(r: int) -> str:  # `r` divides `rows`: more minibatches always give it
        if loop is None:
            return f"rows={r}"
        prompts, group, minibatches = loop
        fewer = r * minibatches // group if r * minibatches % group == 0 else None
        return (f"{rows_text(r)}, e.g. " + f"prompts={fewer} or " * (fewer is not None)
                + f"minibatches={prompts * group // r}")

    def name(change: dict) -> str:
        return ", ".join(rows_setting(v) if k == "rows" else f"train.{k}={v!r}"
                         for k, v in change.items())

    per_device = rows // shards
    knobs = [[{"microbatches": m} for m in (2 ** i for i in range(1, per_device.bit_length()))
              if m > config.microbatches and per_device % m == 0],
             [{"logprob_chunk": n} for n in parallel.halvings(config.logprob_chunk)],
             [{"remat": "full"}] if config.remat != "full" else [],
             [{"rows": r} for r in parallel.halvings(rows)
              if rows % r == 0 and r % (shards * config.microbatches) == 0]]
    return parallel.require_fits(
        f"the policy step on {rows_text(rows)} x {width} tokens with "
        f"train.microbatches={config.microbatches}, train.logprob_chunk={config.logprob_chunk}, "
        f"train.remat={config.remat!r}",
        parallel.free_bytes(mesh) if device_bytes is None else device_bytes, estimate, compiled,
        [k for k in knobs if k], certain=("parameters and optimizer state", "gradients", "batch"),
        name=name)
