"""The RL loop every policy-training experiment runs: sample, reward, advantages, train, repeat.

    state = loop.run(policy, prompt_fn, reward_fn, LoopConfig(...), out_dir, key=key)

Per step s (all randomness a function of the run's key and s, so a restarted run repeats
exactly what the uninterrupted one did):

1. `prompt_fn(key_s, count)` draws `count` prompts; the compiled sampler draws G responses for
   each from the train state's current parameters (cast to the compute dtype on device: no
   host round trip of weights).
2. `reward_fn(prompts, responses, truncated)` scores them ([groups, G]). With dynamic sampling,
   groups whose rewards are all equal carry no signal: they are dropped and new prompts drawn,
   up to `max_refills` extra rounds (the count is logged).
3. Advantages by `advantage` (`jaxlab.rl.advantages`: GRPO, Dr. GRPO, RLOO, or BRPO for
   rewards already relative to a reference), one per response, broadcast to its tokens.
4. `ppo_epochs` passes over the batch in `minibatches` shuffled parts (by whole groups under
   `share_prompts`, each group's prompt then run once), each one `train_step`.
5. Metrics to `metrics.jsonl` (one line per step) and an Orbax checkpoint every
   `checkpoint_every` steps; a rerun of the same out_dir resumes from the latest one (the
   resumable loop of every training job, `jaxlab.rl.scaffold`).

Every reward, and every other value a reward function returns, must be a finite real number
(`finite_real`: an int, float or bool, a NumPy real scalar, a 0-d real array; not a string,
None, a complex or a list), one per response. A reward function that raises
(`RewardFunctionError`) or returns anything else (`RewardError`), a prompt longer than
`max_prompt_tokens`, and a non-finite loss or gradient stop the run with an error naming the
step (and the prompt and response, their first 20 tokens) before its update; checkpoints and
metrics already written are kept as they are.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import numbers
import pathlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxlab import parallel, results
from jaxlab.config import require, require_positive_ints
from jaxlab.models.decoder import Decoder
from jaxlab.rl import advantages as adv
from jaxlab.rl import rollout, scaffold, train
from jaxlab.sampling import sampler

log = logging.getLogger("jaxlab")

ADVANTAGES = {"grpo": adv.grpo_advantages, "dr_grpo": adv.dr_grpo_advantages,
              "rloo": adv.rloo_advantages, "brpo": None}  # BRPO: the rewards are the advantages


@dataclasses.dataclass(frozen=True)
class Prompt:
    tokens: tuple[int, ...]  # the prompt's token ids
    data: Any = None         # whatever the reward function needs (a reference answer, ...)


# prompt_fn(key, count) -> count prompts; reward_fn(prompts, responses [groups][G] token lists,
# truncated bool [groups, G]) -> rewards [groups, G], or a mapping with "reward" and other
# [groups, G] arrays whose means are logged (e.g. "accuracy").
PromptFn = Callable[[jax.Array, int], Sequence[Prompt]]
RewardFn = Callable[[Sequence[Prompt], list[list[list[int]]], np.ndarray],
                    "np.ndarray | Mapping[str, np.ndarray]"]


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """Settings of an RL run (the step's own are in `train`)."""

    steps: int = 100                 # the run's length: sample-reward-train rounds, each of
    #                                  ppo_epochs x minibatches optimizer steps
    prompts: int = 16                # groups per step
    group_size: int = 8              # G responses per prompt
    max_prompt_tokens: int = 64      # prompts are left-padded to this; longer ones are an error
    max_new_tokens: int = 128
    temperature: float = 1.0         # the rollouts' sampling temperature T > 0: the policy
    #                                  the step trains is softmax(logits / T)
    top_k: int = 0                   # the rollouts' truncation: the k most likely tokens (0: all)
    top_p: float = 1.0               # and the smallest set of tokens with this much mass
    stop_ids: tuple[int, ...] = ()   # tokens that end a response (kept in it)
    advantage: str = "grpo"          # one of ADVANTAGES
    outlier_threshold: float = 0.6   # BRPO: drop groups with |sum r| / G above this
    dynamic_sampling: bool = True    # drop groups whose rewards are all equal, draw new ones
    max_refills: int = 2             # extra sampling rounds per step for dynamic sampling
    ppo_epochs: int = 1              # passes over each rollout batch
    minibatches: int = 1             # optimizer steps per pass
    share_prompts: bool = True       # the step runs each group's prompt once
    #                                  (`train.SharedPrompts`), where every device's micro-batch
    #                                  holds whole groups (else row by row); minibatches are
    #                                  then drawn by groups, on any mesh
    checkpoint_every: int = 10       # steps between checkpoints (and at the end)
    keep_checkpoints: int = 2
    train: train.TrainConfig = dataclasses.field(default_factory=train.TrainConfig)

    def __post_init__(self):
        require_positive_ints(self, "steps", "prompts", "max_prompt_tokens",
                              "max_new_tokens", "ppo_epochs", "minibatches", "checkpoint_every",
                              "keep_checkpoints")
        require(isinstance(self.group_size, int) and self.group_size >= 2,
                f"LoopConfig.group_size must be an integer >= 2, got {self.group_size!r}")
        require(isinstance(self.max_refills, int) and self.max_refills >= 0,
                f"LoopConfig.max_refills must be an integer >= 0, got {self.max_refills!r}")
        require(self.advantage in ADVANTAGES,
                f"LoopConfig.advantage must be one of {list(ADVANTAGES)}, got {self.advantage!r}")
        require(0 <= self.outlier_threshold <= 1,
                f"LoopConfig.outlier_threshold must lie in [0, 1], got {self.outlier_threshold}")
        require((self.prompts * self.group_size) % self.minibatches == 0,
                f"LoopConfig.minibatches={self.minibatches} must divide prompts x group_size = "
                f"{self.prompts * self.group_size}")
        train.require_temperature(self.temperature)
        object.__setattr__(self, "stop_ids", tuple(int(i) for i in self.stop_ids))

    @property
    def sampling(self) -> sampler.SamplingConfig:
        return sampler.SamplingConfig(
            max_new_tokens=self.max_new_tokens, temperature=self.temperature,
            top_k=self.top_k, top_p=self.top_p, group_size=self.group_size, stop_ids=self.stop_ids,
            confidence=False)


def group_advantages(rewards: np.ndarray, config: LoopConfig) -> tuple[jax.Array, jax.Array]:
    """(advantages float32 [groups, G], keep bool [groups]) by `config.advantage`; for "brpo"
    the rewards are BRPO's +-1 / 0 against the group's reference and the outlier filter sets
    keep."""
    if config.advantage == "brpo":
        bad = np.argwhere(~np.isin(rewards, (-1.0, 0.0, 1.0)))
        if len(bad):
            i, j = (int(x) for x in bad[0])
            raise ValueError(f"BRPO rewards must be -1, 0 or +1 (against the group's "
                             f"reference), got {rewards[i, j]} for prompt {i}, response {j}")
        rewards = jnp.asarray(rewards, jnp.float32)
        imbalance = jnp.abs(jnp.sum(rewards, axis=1)) / rewards.shape[1]
        return rewards, imbalance <= config.outlier_threshold
    rewards = jnp.asarray(rewards, jnp.float32)
    return ADVANTAGES[config.advantage](rewards), jnp.ones(rewards.shape[0], bool)


class RewardError(ValueError):
    """A reward, or another value a reward function returns, that is not a finite real number,
    or a reward function's output of the wrong form; the message names the step, the prompt and
    the response."""


class RewardFunctionError(RuntimeError):
    """A reward function that raised (its exception is the cause); the message names the step,
    and for a per-response one (`per_response`) the prompt and response."""


# The dtypes of real numbers: bool (0 or 1), integers and floats (bfloat16 included).
_REAL_DTYPES = (jnp.bool_, jnp.integer, jnp.floating)


def _real_dtype(dtype) -> bool:
    return any(jnp.issubdtype(dtype, kind) for kind in _REAL_DTYPES)


def finite_real(value: Any) -> bool:
    """Whether `value` is one finite real number, as every reward and logged value must be.

    Real numbers: Python int and float, bool (0 or 1: a verdict such as "correct" is a reward),
    `fractions.Fraction` (any `numbers.Real`), NumPy bool, integer and floating scalars, and 0-d
    NumPy or JAX arrays of such a dtype. Not: str, bytes, None, complex, `decimal.Decimal` (not
    a `numbers.Real`), lists, tuples, mappings, or arrays of any other shape. Finite: neither
    NaN nor infinite as a float64 (an int beyond float64's range is not).
    """
    if isinstance(value, np.ndarray | np.generic | jax.Array):
        real = value.ndim == 0 and _real_dtype(value.dtype)
    else:
        real = isinstance(value, numbers.Real)
    try:
        return real and math.isfinite(float(value))
    except OverflowError:
        return False


def finite_reals(value: Any, shape: tuple[int, ...], name: str,
                 labels: Sequence[str] = ("prompt", "response"),
                 shown: Callable[[tuple[int, ...]], str] | None = None) -> np.ndarray:
    """`value` (an array, nested lists, ...) as float64 [shape], once it is checked to hold one
    `finite_real` per index: element by element before any conversion, so that no string, None
    or complex is ever converted. Raises RewardError naming `name` and the first bad element's
    index, one `labels` word per axis (e.g. "prompt 1, response 2"), its value and its type
    (then `shown(index)` in parentheses, if given: e.g. the prompt and response), or the shape
    found."""
    numeric = isinstance(value, np.ndarray | jax.Array) and _real_dtype(value.dtype)
    cells = np.asarray(value) if numeric else _cells(value, shape)  # else an object array
    if cells is None or cells.shape != shape:
        raise RewardError(f"{name} has shape {_shape(value)} ({type(value).__name__}), expected "
                          f"[{', '.join(f'{label}s' for label in labels)}] = {shape}")
    if numeric:
        bad = np.argwhere(~np.isfinite(cells.astype(np.float64)))
        first = tuple(int(k) for k in bad[0]) if len(bad) else None
    else:
        first = next((i for i, cell in np.ndenumerate(cells) if not finite_real(cell)), None)
    if first is not None:
        cell = cells[first].item() if numeric else cells[first]
        kind = cells.dtype.name if numeric else type(cell).__name__
        where = ", ".join(f"{label} {k}" for label, k in zip(labels, first, strict=True))
        raise RewardError(f"{name} for {where} is {cell!r} ({kind}), not a finite real number"
                          + (f" ({shown(first)})" if shown else ""))
    return cells.astype(np.float64)


def _cells(value: Any, shape: tuple[int, ...]) -> np.ndarray | None:
    """`value` as an object array [shape] of what it holds at each index (a number, a string, a
    list: anything), or None when it is not nested to that shape."""
    if isinstance(value, np.ndarray | jax.Array):
        return np.asarray(value).astype(object) if value.shape == shape else None
    cells = np.empty(shape, object)

    def fill(part, index: tuple[int, ...]) -> bool:
        if len(index) == len(shape):
            cells[index] = part
            return True
        if (not isinstance(part, Sequence | np.ndarray | jax.Array) or isinstance(part, str | bytes)
                or len(part) != shape[len(index)]):
            return False
        return all(fill(x, (*index, k)) for k, x in enumerate(part))

    return cells if fill(value, ()) else None


def _shape(value: Any) -> tuple[int, ...] | str:
    """`value`'s shape as NumPy reads it, or "ragged"."""
    try:
        return np.shape(value)
    except ValueError:
        return "ragged"


def per_response(score: Callable[[Prompt, list[int], bool], float | Mapping[str, float]],
                 ) -> RewardFn:
    """A batched reward function from one that scores a single response (score(prompt,
    response tokens, truncated) -> a reward, or a mapping with "reward" and other values to log).
    Its values come back as they are (object arrays [prompts, G]) for `checked_rewards` to check;
    an exception, or keys other than the first response's, name the prompt and response."""
    def batched(prompts, responses, truncated):
        cells: dict[str, np.ndarray] = {}
        for i, (prompt, group) in enumerate(zip(prompts, responses, strict=True)):
            for j, response in enumerate(group):
                try:
                    value = score(prompt, response, bool(truncated[i, j]))
                except Exception as e:
                    raise RewardFunctionError(
                        f"the reward function raised on prompt {i}, response {j} "
                        f"({_tokens(prompt, response)}): {e!r}") from e
                row = dict(value) if isinstance(value, Mapping) else {"reward": value}
                if cells and set(row) != set(cells):
                    raise RewardError(f"the reward function returned keys {list(row)} for "
                                      f"prompt {i}, response {j}, and {list(cells)} for prompt "
                                      f"0, response 0")
                for name, x in row.items():
                    cells.setdefault(name, np.empty(truncated.shape, object))[i, j] = x
        return cells
    return batched


def checked_rewards(reward_fn: RewardFn, prompts: Sequence[Prompt],
                    responses: list[list[list[int]]], truncated: np.ndarray, where: str,
                    ) -> dict[str, np.ndarray]:
    """reward_fn's output as {"reward": float64 [groups, G], ...}, every value checked
    (`reward_values`); an exception or a bad value raises naming `where` (e.g. "step 3"), and
    the prompt and response where known."""
    shape = truncated.shape
    try:
        out = reward_fn(prompts, responses, truncated)
    except (RewardError, RewardFunctionError) as e:  # `per_response`'s: they name the response
        raise type(e)(f"{where}: {e}") from e.__cause__
    except Exception as e:
        raise RewardFunctionError(f"{where}: the reward function raised on a batch of "
                                  f"{shape[0]} prompts x {shape[1]} responses: {e!r}") from e
    return reward_values(out, prompts, responses, shape, where)


def reward_values(out: Any, prompts: Sequence[Prompt], responses: list[list[list[int]]],
                  shape: tuple[int, int], where: str) -> dict[str, np.ndarray]:
    """A reward function's output (the rewards, or a mapping with "reward" and other values to
    log, each [prompts, G]) as {name: float64 [prompts, G]}, each value `finite_reals`; a bad
    one is named with its prompt and response (their first 20 tokens)."""
    out = dict(out) if isinstance(out, Mapping) else {"reward": out}
    if "reward" not in out or not all(isinstance(name, str) for name in out):
        raise RewardError(f"{where}: the reward function returned the keys {list(out)}: they "
                          f"must be names (str), 'reward' among them")

    def shown(index: tuple[int, ...]) -> str:
        i, j = index
        return _tokens(prompts[i], responses[i][j])

    return {name: finite_reals(value, shape, f"{where}: the reward function's {name!r}",
                               shown=shown)
            for name, value in out.items()}


def _tokens(prompt: Prompt, response: list[int]) -> str:
    """The prompt's and the response's first 20 tokens, as error messages show them."""
    return f"prompt tokens {list(prompt.tokens)[:20]}, response {list(response)[:20]}"


@dataclasses.dataclass
class _Groups:
    """The groups kept for one step (host arrays, [groups, G] unless said)."""

    prompts: list[Prompt]
    samples: list[sampler.Samples]         # one per sampling round
    rows: list[tuple[int, int, int]]       # per kept group: (round, prompt in round, first trace)
    values: dict[str, list[np.ndarray]]    # reward_fn's outputs, one [G] per kept group
    responses: list[list[list[int]]] = dataclasses.field(default_factory=list)  # per kept
    #                                        group: its G responses (token lists)
    longest: list[int] = dataclasses.field(default_factory=list)  # per kept group: its longest
    #                                        response (tokens)
    spare: list[bool] = dataclasses.field(default_factory=list)  # per kept group: taken
    #                                        back after being dropped (no reward variance)
    dropped: int = 0                       # groups without reward variance
    rounds: int = 0
    tokens: int = 0                        # response tokens generated


def _rollouts(model: Decoder, prompt_fn: PromptFn, reward_fn: RewardFn, config: LoopConfig,
              key: jax.Array, step: int, mesh: Mesh | None) -> _Groups:
    """Samples and scores groups until `config.prompts` have reward variance (dynamic sampling)
    or `max_refills` extra rounds are spent; then fills up with the groups dropped last."""
    g = config.group_size
    kept = _Groups(prompts=[], samples=[], rows=[], values={})
    spare, names = [], None
    for round_ in range(1 + (config.max_refills if config.dynamic_sampling else 0)):
        round_key = jax.random.fold_in(key, round_)
        prompts = list(results.together(functools.partial(
            prompt_fn, jax.random.fold_in(round_key, 0), config.prompts),
            f"step {step}: prompt_fn"))
        require(len(prompts) == config.prompts, f"step {step}: prompt_fn returned "
                f"{len(prompts)} prompts, expected {config.prompts}")
        long = [(i, len(p.tokens)) for i, p in enumerate(prompts)
                if len(p.tokens) > config.max_prompt_tokens]
        require(not long, f"step {step}: prompts (index, tokens) {long[:5]} are "
                          f"longer than LoopConfig.max_prompt_tokens={config.max_prompt_tokens}")
        samples = sampler.sample(model, [p.tokens for p in prompts],
                                 jax.random.fold_in(round_key, 1), config.sampling, mesh=mesh,
                                 max_prompt_tokens=config.max_prompt_tokens)
        tokens, lengths = (parallel.host_array(x) for x in (samples.tokens, samples.lengths))
        kept.tokens += int(lengths.sum())
        responses = [[tokens[i * g + j, :lengths[i * g + j]].tolist() for j in range(g)]
                     for i in range(len(prompts))]
        truncated = rollout.truncated(samples).reshape(-1, g)
        values = results.together(functools.partial(
            checked_rewards, reward_fn, prompts, responses, truncated, f"step {step}"),
            f"step {step}: the reward function")
        if names is not None and set(values) != names:
            raise RewardError(f"step {step}: the reward function returned the keys "
                              f"{list(values)} in sampling round {round_}, and {sorted(names)} "
                              f"in round 0")
        names = set(values)
        varied = np.asarray(adv.has_variance(jnp.asarray(values["reward"])))
        kept.samples.append(samples)
        kept.rounds += 1
        for i, prompt in enumerate(prompts):
            entry = (prompt, (round_, i, i * g), {k: v[i] for k, v in values.items()},
                     int(lengths[i * g:(i + 1) * g].max()), responses[i])
            if config.dynamic_sampling and not varied[i]:
                kept.dropped += 1
                spare.append(entry)
            elif len(kept.prompts) < config.prompts:
                _keep(kept, entry, spare=False)
        if len(kept.prompts) == config.prompts:
            break
    for entry in spare[::-1][:config.prompts - len(kept.prompts)]:
        _keep(kept, entry, spare=True)  # fills the batch; trained on only through a KL term
    return kept


def _keep(groups: _Groups, entry, spare: bool) -> None:
    prompt, row, values, longest, responses = entry
    groups.longest.append(longest)
    groups.responses.append(responses)
    groups.spare.append(spare)
    groups.prompts.append(prompt)
    groups.rows.append(row)
    for k, v in values.items():
        groups.values.setdefault(k, []).append(v)


def _batch(groups: _Groups, reference: Decoder, config: LoopConfig
           ) -> tuple[train.PolicyBatch, int]:
    """The PolicyBatch of the kept groups (advantages filled in), rows in group order, and its
    prompt width L'."""
    g = config.group_size
    widths = rollout.batch_widths([len(p.tokens) for p in groups.prompts], groups.longest,
                                  config.max_prompt_tokens, config.max_new_tokens)
    parts = []
    for r, samples in enumerate(groups.samples):
        mine = [(k, row) for k, row in enumerate(groups.rows) if row[0] == r]
        if not mine:
            continue
        # (the group's place in the batch, its trace in this round's samples) per row
        rows = np.asarray([(k, first + j) for k, (_, _, first) in mine for j in range(g)])
        parts.append((rows[:, 0], rollout.policy_batch(
            [p.tokens for p in groups.prompts], samples, rows, config.max_prompt_tokens,
            reference, config.train, config.temperature, widths,
            group_size=g if config.share_prompts else None)))
    order = np.argsort(np.concatenate([k for k, _ in parts]), kind="stable")
    batch = jax.tree.map(lambda *xs: jnp.concatenate(xs)[order], *[b for _, b in parts])
    advantages, keep = group_advantages(np.stack(groups.values["reward"]), config)
    rows = trained_rows(advantages, keep, jnp.asarray(groups.spare), config)
    return batch._replace(advantages=advantages.reshape(-1),
                          loss_mask=batch.loss_mask * rows[:, None]), widths[0]


def trained_rows(advantages: jax.Array, keep: jax.Array, spare: jax.Array, config: LoopConfig,
                 ) -> jax.Array:
    """Which responses the loss covers, bool [groups * G]: those of kept groups. Without a KL or
    entropy term, a row whose loss would be zero whatever the policy is left out too, as it
    would only dilute the token mean: the spare groups (which only fill the batch) and, for
    BRPO, each group's reference (advantage 0 by definition)."""
    rows = jnp.repeat(keep, advantages.shape[1])
    if config.train.loss.kl_coef == 0:
        rows &= ~jnp.repeat(spare, advantages.shape[1])
        if config.advantage == "brpo" and config.train.loss.entropy_coef == 0:
            rows &= advantages.reshape(-1) != 0
    return rows


@functools.partial(jax.jit, static_argnames="dtype")
def _cast(params: nnx.State, dtype) -> nnx.State:
    """params in `dtype`, on device (an unchanged leaf may be the same buffer)."""
    return jax.tree.map(lambda x: x.astype(dtype), params)


# on_step(step, prompts, responses [groups][G] token lists, values {name: [groups,
# G]}) sees each step's kept groups and their rewards (to write samples, say).
StepHook = Callable[[int, Sequence[Prompt], list[list[list[int]]],
                          Mapping[str, np.ndarray]], None]


def run(policy: Decoder, prompt_fn: PromptFn, reward_fn: RewardFn, config: LoopConfig,
        out_dir: str | pathlib.Path, *, key: jax.Array, mesh: Mesh | None = None,
        on_step: StepHook | None = None, on_save: scaffold.OnSave | None = None,
        ) -> tuple[nnx.GraphDef, train.TrainState]:
    """Trains `policy` (float32 parameters) by RL; returns its graph and final train state.

    The reference policy (for the KL) is `policy` as given. Rollouts sample from the current
    parameters cast to the model's compute dtype (`policy.config.compute_dtype`). `out_dir`
    receives `metrics.jsonl` and `checkpoints/`; a run that finds checkpoints there resumes
    from the latest one (`scaffold.run`; the caller checks that the config is the same, e.g.
    with `results.open_run`). `on_step`, if given, is called after each step's metrics
    are written; `on_save(state)` after each checkpoint with the state saved, and first, in a
    resumed run, with the restored one (`scaffold.run`; `scaffold.export_policy` writes the
    policy as a Hugging Face folder).

    `mesh` (default: this process's first device): a `parallel.make_mesh(parallel.DATA)` mesh
    or a `parallel.make_train_mesh`, each minibatch's rows split over its (data, fsdp) devices.
    The train state and the reference policy are replicated on it, or, on a mesh that splits the
    model (fsdp or tensor > 1), held in their `parallel.tree_shardings`: 1/fsdp of the parameter
    and optimizer bytes per device (x 1/tensor for the matrices split over tensor), restored so
    from a checkpoint. It may span the devices of several processes
    (a run of several processes, `results.join_processes`): every process then calls `run`
    alike, with the same policy, prompt and reward functions, and computes the same steps;
    the reward function scores the whole batch on every process, process 0 alone writes the
    metrics and every process its shards of the checkpoints (Orbax).
    """
    mesh = mesh or parallel.make_mesh(parallel.DATA, jax.local_devices()[:1])
    rows, shards = config.prompts * config.group_size, parallel.batch_devices(mesh)
    require(rows % shards == 0 and (rows // config.minibatches) % (
        shards * config.train.microbatches) == 0,
        f"LoopConfig.prompts x group_size = {rows} responses in minibatches={config.minibatches} "
        f"must split evenly over the mesh's {shards} data devices (data x fsdp) x "
        f"train.microbatches={config.train.microbatches}")
    # The widest step the loop can build must fit before the state is placed (the rollouts'
    # memory is checked by `sample`).
    train.require_policy_step_fits(
        policy, rows // config.minibatches, config.max_prompt_tokens + config.max_new_tokens,
        config.train, mesh, config.temperature,
        shared_prompts(config, config.max_prompt_tokens, shards),
        loop=(config.prompts, config.group_size, config.minibatches))
    graphdef, state = scaffold.init_state(policy, config.train.optimizer, key, mesh)  # copies
    dtype = jnp.dtype(policy.config.compute_dtype)
    reference = _cast(nnx.state(policy, nnx.Param), dtype)
    reference = nnx.merge(graphdef, parallel.put(reference, _placement(reference, mesh)))

    last: dict[str, _Groups] = {}

    def step(state: train.TrainState, s: int):
        key_s = jax.random.fold_in(state.key, s)
        t0 = time.perf_counter()
        model = nnx.merge(graphdef, _cast(state.params, dtype))
        groups = _rollouts(model, prompt_fn, reward_fn, config, jax.random.fold_in(key_s, 0),
                           s, mesh)
        batch, prompt_width = _batch(groups, reference, config)
        jax.block_until_ready(batch)
        t1 = time.perf_counter()
        state, step_metrics = _update(state, batch, graphdef, config, mesh,
                                      jax.random.fold_in(key_s, 1),
                                      shared_prompts(config, prompt_width, shards))
        t2 = time.perf_counter()
        last["groups"] = groups
        return state, _step_metrics(groups, batch, step_metrics, t1 - t0, t2 - t1,
                                    config.ppo_epochs)

    def after(s: int) -> None:  # once the step's record is written
        groups = last.pop("groups")
        results.together(functools.partial(
            on_step, s, groups.prompts, groups.responses,
            {k: np.stack(v) for k, v in groups.values.items()}),
            f"step {s}: on_step")

    state = scaffold.run(
        state, step, scaffold.Schedule(config.steps, config.checkpoint_every,
                                       config.keep_checkpoints,
                                       config.ppo_epochs * config.minibatches),
        out_dir, postfix=_postfix, after=None if on_step is None else after, on_save=on_save)
    return graphdef, state


def _postfix(record: dict) -> dict:
    """What the progress bar shows of a step's record: the reward (and accuracy, if any)."""
    return {"reward": f"{record['reward_mean']:.3f}",
            **({"acc": f"{record['accuracy']:.3f}"} if "accuracy" in record else {})}


def _placement(tree, mesh: Mesh):
    """Where parameters (or a train state) live on `mesh`: in their `parallel.tree_shardings`
    on a mesh that splits the model (`parallel.is_split_model`), else replicated."""
    if parallel.is_split_model(mesh):
        return parallel.tree_shardings(tree, mesh)
    return parallel.replicated(mesh)


def shared_prompts(config: LoopConfig, prompt_width: int, shards: int,
                   ) -> train.SharedPrompts | None:
    """The step's `train.SharedPrompts` for a batch of this prompt width, or None (row by row)
    when `config.share_prompts` is off or a device's micro-batch (rows / (minibatches x data
    devices x train.microbatches)) would not hold whole groups."""
    size = config.prompts * config.group_size // config.minibatches
    if not config.share_prompts or not train.whole_groups(
            size, shards, config.train.microbatches, config.group_size):
        return None
    return train.SharedPrompts(config.group_size, prompt_width)


def _update(state, batch, graphdef, config: LoopConfig, mesh, key,
            shared: train.SharedPrompts | None):
    """ppo_epochs passes of `minibatches` optimizer steps over a shuffled batch (whole groups
    under `config.share_prompts`, on every mesh); raises `scaffold.NonFinite` on a non-finite
    step (which leaves the state unchanged)."""
    rows, g = batch.tokens.shape[0], config.group_size
    size = rows // config.minibatches
    history = []
    for epoch in range(config.ppo_epochs):
        epoch_key = jax.random.fold_in(key, epoch)
        if not config.share_prompts:
            order = jax.random.permutation(epoch_key, rows)
        else:
            order = (jax.random.permutation(epoch_key, rows // g)[:, None] * g
                     + jnp.arange(g)).reshape(-1)
        for part in range(config.minibatches):
            chosen = order[part * size:(part + 1) * size]
            mini = jax.device_put(jax.tree.map(lambda x, r=chosen: x[r], batch),
                                  parallel.batch_sharding(mesh))
            state, metrics = train.train_step(state, mini, graphdef=graphdef,
                                              config=config.train, mesh=mesh,
                                              temperature=config.temperature, shared=shared)
            metrics = jax.tree.map(parallel.host_array, metrics)
            if not metrics["finite"]:
                raise scaffold.NonFinite(
                    f"optimizer step {int(state.step) + 1}: loss {metrics['loss']}, gradient "
                    f"norm {metrics['grad_norm']}")
            history.append(metrics)
    return state, {k: float(np.mean([m[k] for m in history])) for k in history[0]}


def _step_metrics(groups: _Groups, batch, step_metrics, rollout_s, train_s,
                       passes: int) -> dict:
    """One metrics.jsonl record: rewards and the reward function's other values (means over the
    kept groups), sampling counts, the optimizer steps' metrics (means), and speeds: generated
    tokens per rollout second, real tokens trained on (x passes) per train second."""
    rewards = np.stack(groups.values["reward"])                          # [groups, G]
    metrics = {"reward_mean": float(rewards.mean()),
               "reward_std": float(rewards.std())}
    for name, values in groups.values.items():
        if name != "reward":
            metrics[name] = float(np.mean(values))
    real = float(jnp.sum(batch.mask)) * passes
    metrics.update({
        "response_length": groups.tokens / (groups.rounds * rewards.size),
        "groups_dropped": groups.dropped, "sampling_rounds": groups.rounds,
        **{k: v for k, v in step_metrics.items() if k not in ("finite", "count")},
        "rollout_seconds": rollout_s, "train_seconds": train_s,
        "rollout_tokens_per_s": groups.tokens / rollout_s, "train_tokens_per_s": real / train_s,
    })
    return metrics
