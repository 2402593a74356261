"""Rollouts: prompts -> the compiled sampler -> a `PolicyBatch` the policy step trains on.

A row of the batch is its prompt, left-padded to L, followed by the response and right padding
to T (the sampler's own layout, so positions agree; L and T are the longest prompt and response
of the batch rounded up by `bucket`, so that few shapes are compiled):

    tokens     [pad pad p1 p2 p3 | r1 r2 r3 eos 0 0]
    mask       [ 0   0  1  1  1  |  1  1  1  1  0 0]      attention
    loss_mask  [ 0   0  0  0  0  |  1  1  1  1  0 0]      response tokens, stop token included
    old_logp   [ 0   0  0  0  0  |  l1 l2 l3 l4 0 0]      from the sampler

`old_logp` is the log-prob of each sampled token under softmax(logits / temperature), the
distribution the step evaluates (`train_step`'s `temperature`, the sampling one). Top-k
and top-p truncation are not part of it, on either side of the ratio (as in TRL and verl): the
truncated distribution is not differentiable in a useful way, and the sampled tokens always lie
inside it, so the on-policy ratio is 1 (up to rounding: 1e-6 in float32, about 1e-2 with
bfloat16 compute, where decoding and the full forward pass round differently) and truncation
only shifts which tokens get sampled.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlab import parallel
from jaxlab.config import require
from jaxlab.rl import train
from jaxlab.sampling import sampler


@functools.partial(jax.jit, static_argnames=("graphdef", "config", "temperature", "group_size"))
def _assemble(graphdef, ref_params, prompt_ids, prompt_mask, tokens, lengths, logprobs, rows,
              *, config: train.TrainConfig, temperature: float, group_size: int | None,
              ) -> train.PolicyBatch:
    """The batch whose row i is trace rows[i, 1] of the sampler output (`tokens`, `logprobs`
    [N, T], `lengths` [N]) after prompt rows[i, 0] of `prompt_ids`/`prompt_mask` [P, L]."""
    prompt_of, trace = rows[:, 0], rows[:, 1]
    response = tokens[trace]                                                  # [N, T]
    real = jnp.arange(response.shape[1]) < lengths[trace][:, None]            # [N, T]
    out_tokens = jnp.concatenate([prompt_ids[prompt_of], response], axis=1)   # [N, L + T]
    mask = jnp.concatenate([prompt_mask[prompt_of], real], axis=1).astype(jnp.int32)
    loss_mask = jnp.concatenate([jnp.zeros_like(prompt_mask[prompt_of]), real], axis=1)
    old_logp = jnp.concatenate([jnp.zeros(prompt_ids[prompt_of].shape, jnp.float32),
                                jnp.where(real, logprobs[trace], 0.0)], axis=1)
    if config.loss.kl_coef > 0:
        shared = None if group_size is None else train.SharedPrompts(group_size,
                                                                     prompt_ids.shape[1])
        ref_logp = train.policy_logprobs(graphdef, ref_params, out_tokens, mask,
                                         temperature=temperature,
                                         chunk=config.logprob_chunk, shared=shared) * loss_mask
    else:  # no KL in the loss: no reference forward pass (the step ignores ref_logp)
        ref_logp = old_logp
    return train.PolicyBatch(tokens=out_tokens, mask=mask,
                             loss_mask=loss_mask.astype(jnp.float32), old_logp=old_logp,
                             ref_logp=ref_logp,
                             advantages=jnp.zeros(out_tokens.shape[0], jnp.float32))


def policy_batch(prompts: Sequence[Sequence[int]], samples: sampler.Samples,
                 rows: np.ndarray, max_prompt_tokens: int, reference: nnx.Module,
                 config: train.TrainConfig, temperature: float,
                 widths: tuple[int, int] | None = None, group_size: int | None = None,
                 ) -> train.PolicyBatch:
    """A `PolicyBatch` (advantages 0, to be filled) of sampled traces.

    Args:
      prompts: the P prompts the samples came from (token lists).
      samples: the sampler's output for them (N traces).
      rows: int [B, 2], (prompt index, trace index) of each row of the batch, in order.
      max_prompt_tokens: L, the padded prompt length (the sampler's).
      reference: the frozen reference policy; `ref_logp` is its log-probs (0 off the response).
      config: the step's settings (the log-prob chunk, whether the loss has a KL term).
      temperature: the sampling temperature T (the reference's log-probs are under pi_T).
      widths: (L', T'), the prompt and response columns to keep (default: `batch_widths` of
        these rows; batches that will be concatenated must share them).
      group_size: G when the rows come in groups of G consecutive rows of one prompt: the
        reference pass then runs each prompt once (`train.SharedPrompts`).
    """
    if group_size is not None:
        require(len(rows) % group_size == 0 and (
            rows[:, 0].reshape(-1, group_size) == rows[::group_size, :1]).all(),
            f"group_size={group_size}: the rows' prompts {rows[:, 0].tolist()} do not come in "
            f"groups of {group_size} consecutive rows")
    width, steps = widths or batch_widths(
        [len(prompts[p]) for p in rows[:, 0]], parallel.host_array(samples.lengths)[rows[:, 1]],
        max_prompt_tokens, samples.tokens.shape[1])
    ids, mask = sampler.left_pad(prompts, width=max_prompt_tokens)
    graphdef, params = nnx.split(reference)
    return _assemble(graphdef, params, jnp.asarray(ids[:, -width:]),
                     jnp.asarray(mask[:, -width:]), samples.tokens[:, :steps], samples.lengths,
                     samples.logprobs[:, :steps], jnp.asarray(rows, jnp.int32), config=config,
                     temperature=temperature, group_size=group_size)


BUCKET = 16  # the finest step of `bucket`, in tokens


def bucket(size: int, limit: int) -> int:
    """`size` rounded up to a multiple of max(BUCKET, 2^ceil(log2 size) / 8), at most `limit`.

    Multiples of 16 up to 128, then 4 steps per doubling (160, 192, 224, 256, 320, ...): a
    bucket pads at most 25% above 128 tokens, and widths up to W take 8 + 4 log2(W / 128)
    buckets (20 up to 1,024, against 64 multiples of 16), each a compiled policy step.
    """
    step = max(BUCKET, 1 << max(0, (int(size) - 1).bit_length() - 3))
    return min(limit, -(-int(size) // step) * step)


def batch_widths(prompt_lengths: Sequence[int], response_lengths: Sequence[int],
                 max_prompt_tokens: int, max_new_tokens: int) -> tuple[int, int]:
    """(L', T'): the columns a batch of these rows uses, the prompt's last L' of L and the
    response's first T' of T, each the longest one's `bucket` (few compiled shapes)."""
    return (bucket(max(prompt_lengths), max_prompt_tokens),
            bucket(max(response_lengths), max_new_tokens))


def truncated(samples: sampler.Samples) -> np.ndarray:
    """bool [N]: traces that hit max_new_tokens before a stop token (a reward may treat them
    apart)."""
    return parallel.host_array(samples.finish_reason) == sampler.LENGTH
