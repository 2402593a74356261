"""Memory of the Writing-Zero jobs on real Qwen3 shapes, from XLA's analysis of the compiled
steps (nothing is allocated): what configs/writing_zero/*_qwen3_gpu.yaml need per device.

    python experiments/writing_zero_memory.py [--sizes 0.6B 1.7B 4B] [--remat full] [--out FILE]

For each size, with float32 master weights and AdamW state, bfloat16 compute, each step in
MICROBATCHES parts and the decoder layers under the `--remat` policy (as the GPU configs set):
  rm      one Bradley-Terry step (`sft.fit`'s step on `reward_model.pair_loss`), B pairs x L
  sft     one GenRM cold-start step (`sft.sft_loss`), B rows x (prompt + judge text)
  policy  one `train.train_step` (GenRM GRPO / writer), B rows x (prompt + response)
  shared  the same step with each group of G rows' prompt run once (`train.SharedPrompts`, as
          `loop.run` passes it): 2,048 + G x 1,024 tokens per group instead of G x 3,072
  kv      the sampler's KV cache for the rollouts (`sampling.memory.kv_cache_bytes`, bfloat16)
Each step is lowered on `jax.ShapeDtypeStruct`s and compiled for the default backend;
reported: arguments + outputs - aliased + temporaries (`compile().memory_analysis()`), GiB.
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlab import parallel
from jaxlab.models import zoo
from jaxlab.models.decoder import REMAT_POLICIES, Decoder, DecoderConfig
from jaxlab.rl import reward_model, sft, train
from jaxlab.sampling import memory, sampler

# the Qwen3 sizes measured by default (any of `zoo.QWEN3_SIZES` can be asked for)
SIZES = ("0.6B", "1.7B", "4B")
# (batch, length) per job, as the GPU configs set them
RM, SFT, POLICY = (32, 1024), (16, 3072), (32, 3072)
MICROBATCHES = 4
ROLLOUT = dict(prompts=16, group_size=8, max_prompt_tokens=2048, max_new_tokens=1024)


def decoder_config(size: str) -> DecoderConfig:
    return zoo.qwen3(size, param_dtype="float32", compute_dtype="bfloat16")


def gib(compiled) -> float:
    m = compiled.memory_analysis()
    return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
            + m.temp_size_in_bytes) / 2 ** 30


def fit_step_gib(module_fn, loss_fn, data: dict, remat: str) -> float:
    config = sft.FitConfig(batch_size=next(iter(data.values())).shape[0],
                           microbatches=MICROBATCHES, remat=remat)
    graphdef, state = train.abstract_train_state(module_fn, config.optimizer)
    return gib(sft.lower_step(graphdef, state, data, loss_fn, config).compile())


def job_memory(size: str, remat: str) -> dict[str, float]:
    c = decoder_config(size)
    sds = jax.ShapeDtypeStruct

    def rows(shape, dtype=jnp.int32):
        return sds(shape, dtype)

    rm_data = {f"{side}_{kind}": rows(RM) for side in ("chosen", "rejected")
               for kind in ("tokens", "mask")}
    sft_data = {"tokens": rows(SFT), "mask": rows(SFT), "loss_mask": rows(SFT, jnp.float32)}
    policy_config = train.TrainConfig(microbatches=MICROBATCHES, logprob_chunk=512, remat=remat)
    graphdef, state = train.abstract_train_state(lambda: Decoder(c, nnx.Rngs(0)),
                                                 policy_config.optimizer)
    batch = train.PolicyBatch(tokens=rows(POLICY), mask=rows(POLICY),
                              loss_mask=rows(POLICY, jnp.float32),
                              old_logp=rows(POLICY, jnp.float32),
                              ref_logp=rows(POLICY, jnp.float32),
                              advantages=rows(POLICY[:1], jnp.float32))
    sampling = sampler.SamplingConfig(max_new_tokens=ROLLOUT["max_new_tokens"],
                                      group_size=ROLLOUT["group_size"])
    policy = functools.partial(train.train_step.lower, state, batch, graphdef=graphdef,
                               config=policy_config, mesh=parallel.single_device_mesh(),
                               temperature=1.0)
    return {
        "rm": fit_step_gib(lambda: reward_model.ScalarRewardModel(
            Decoder(c, nnx.Rngs(0)), c.hidden_size, rngs=nnx.Rngs(0)),
            reward_model.pair_loss, rm_data, remat),
        "sft": fit_step_gib(lambda: Decoder(c, nnx.Rngs(0)), sft.sft_loss, sft_data, remat),
        "policy": gib(policy().compile()),
        "shared": gib(policy(shared=train.SharedPrompts(
            ROLLOUT["group_size"], ROLLOUT["max_prompt_tokens"])).compile()),
        "kv": memory.kv_cache_bytes(c, ROLLOUT["prompts"], ROLLOUT["max_prompt_tokens"],
                                     sampling) / 2 ** 30,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES),
                        choices=list(zoo.QWEN3_SIZES))
    parser.add_argument("--remat", default="full", choices=list(REMAT_POLICIES))
    parser.add_argument("--out", default="results/writing_zero_memory.json")
    args = parser.parse_args()
    table = {}
    print(f"GiB per device on {jax.devices()[0].device_kind} ({jax.default_backend()}): rm "
          f"{RM[0]} pairs x {RM[1]}, sft {SFT[0]} x {SFT[1]}, policy {POLICY[0]} x {POLICY[1]} "
          f"({MICROBATCHES} micro-batches each, remat {args.remat}), kv {ROLLOUT['prompts']} x "
          f"{ROLLOUT['group_size']} slots x "
          f"{ROLLOUT['max_prompt_tokens'] + ROLLOUT['max_new_tokens']}")
    for size in args.sizes:
        table[size] = job_memory(size, args.remat)
        print(f"Qwen3-{size}: " + "  ".join(f"{k} {v:.1f}" for k, v in table[size].items()),
              flush=True)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
