"""Sampler speed: our compiled decode loop (with and without DeepConf confidence) against
transformers' `generate` in PyTorch on the same weights, prompts and settings.

    python experiments/bench_sampler.py [--size cpu|gpu] [--batches 1 64 256] [--out FILE]

Both sides decode exactly `--new-tokens` tokens per row at temperature 0.6 / top-p 0.95; the
PyTorch side returns the logits and computes the same token confidence from them. Reported:
tokens/s and ratios, the KV-cache bytes, on GPU the fraction of the memory-bandwidth roofline
(weights + KV bytes read per decode step at the measured HBM bandwidth), and the refill workload:
wall time per finished trace when half of the traces stop early, with and without slot refill.
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from timing import best_of

from jaxlab import results
from jaxlab.models import hf, zoo
from jaxlab.sampling import sampler
from jaxlab.sampling.sampler import SamplingConfig

# cpu: a small Qwen3; gpu: the released Qwen3-0.6B shape in bfloat16.
SIZES = {
    "cpu": dict(size="tiny", dtype="float32", prompt=32,
                overrides=dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                               vocab_size=8192)),
    "gpu": dict(size="released", dtype="bfloat16", prompt=128, overrides={}),
}


REPEATS = 3  # every timing is the fastest of this many calls after a warm-up, on both sides


def _timed(fn, repeats: int = REPEATS) -> float:
    """Seconds of `best_of`."""
    return best_of(fn, repeats)[1]


def bench_ours(model, prompts, new_tokens: int, confidence: bool) -> float:
    config = SamplingConfig(max_new_tokens=new_tokens, temperature=0.6, top_p=0.95,
                            confidence=confidence)
    return _timed(lambda: sampler.sample(model, prompts, jax.random.key(0), config).tokens)


def bench_generate(path, prompts, new_tokens: int, dtype: str) -> float:
    """transformers generate + the same token confidence from its returned logits."""
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=getattr(torch, dtype)).to(device).eval()
    ids = torch.as_tensor(np.asarray(prompts), device=device)

    def run():
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                 temperature=0.6, top_p=0.95, top_k=0,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 output_logits=True, return_dict_in_generate=True,
                                 pad_token_id=0, eos_token_id=None)
            logits = torch.stack(out.logits, dim=1).float()
            confidence = -torch.log_softmax(logits, -1).topk(20, dim=-1).values.mean(-1)
            if device == "cuda":
                torch.cuda.synchronize()
            return confidence.cpu().numpy()

    return _timed(run)


def hbm_bandwidth() -> float | None:
    """Bytes/s of a device-to-device copy (read + write counted), or None off-GPU."""
    if jax.default_backend() != "gpu":
        return None
    x = jnp.ones((1 << 30,), jnp.uint8)
    copy = jax.jit(lambda x: x + 1)
    seconds = _timed(lambda: copy(x), repeats=5)
    return 2 * x.nbytes / seconds


def roofline_tokens_per_s(model, batch: int, context: int, bandwidth: float) -> float:
    """Decode tokens/s if every step read all weights and the batch's KV once at `bandwidth`."""
    weights = sum(x.nbytes for x in jax.tree.leaves(model))
    c = model.config
    kv = 2 * c.num_layers * batch * context * c.num_kv_heads * c.head_dim * jnp.dtype(
        c.dtype).itemsize
    return batch * bandwidth / (weights + kv)


def bench_refill(model, prompt, slots: int, new_tokens: int, rounds: int = 4) -> dict:
    """Seconds per finished trace for `rounds` x `slots` traces of one prompt when about half stop
    early: `rounds` static batches of `slots` (each waits for its longest trace) vs one call that
    refills finished slots."""
    base = dict(max_new_tokens=new_tokens, temperature=1.0, window=8)
    free = sampler.sample(model, [prompt], jax.random.key(1), SamplingConfig(n=slots, **base))
    threshold = float(np.median(np.asarray(free.lowest_group_confidence)))
    static = SamplingConfig(n=slots, stop_threshold=threshold, **base)
    refill = SamplingConfig(n=slots, budget=rounds * slots, stop_threshold=threshold, **base)

    def static_batches():
        return [sampler.sample(model, [prompt], jax.random.key(2 + r), static)
                for r in range(rounds)]

    without = _timed(lambda: [s.tokens for s in static_batches()])
    with_refill = _timed(lambda: sampler.sample(model, [prompt], jax.random.key(2), refill).tokens)
    batches = static_batches()
    refilled = sampler.sample(model, [prompt], jax.random.key(2), refill)
    early = float(np.mean(np.asarray(refilled.finish_reason) == sampler.LOW_CONFIDENCE))
    return {"slots": slots, "traces": rounds * slots, "stopped_early": early,
            "tokens_per_trace": float(np.mean(np.asarray(refilled.lengths))),
            "steps_static": int(sum(int(s.steps) for s in batches)),
            "steps_refill": int(refilled.steps),
            "seconds_per_trace_static": without / (rounds * slots),
            "seconds_per_trace_refill": with_refill / (rounds * slots),
            "speedup": without / with_refill}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default=None,
                        help="model size (default: gpu on a GPU, else cpu)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--out", default="results/bench_sampler.json")
    args = parser.parse_args()
    name = args.size or ("gpu" if jax.default_backend() == "gpu" else "cpu")
    size = SIZES[name]
    with tempfile.TemporaryDirectory() as folder:
        path = zoo.create("qwen3", folder, size=size["size"], dtype=size["dtype"],
                          **size["overrides"])
        model = hf.load_pretrained(path, dtype=size["dtype"])
        rng = np.random.default_rng(0)
        bandwidth = hbm_bandwidth()
        rows = []
        for batch in args.batches:
            prompts = rng.integers(1, model.config.vocab_size, (batch, size["prompt"])).tolist()
            tokens = batch * args.new_tokens
            ours = tokens / bench_ours(model, prompts, args.new_tokens, confidence=True)
            plain = tokens / bench_ours(model, prompts, args.new_tokens, confidence=False)
            theirs = tokens / bench_generate(path, prompts, args.new_tokens, size["dtype"])
            row = {"batch": batch, "ours_tok_s": ours, "ours_no_confidence_tok_s": plain,
                   "generate_tok_s": theirs, "ratio": ours / theirs,
                   "confidence_overhead": plain / ours - 1,
                   "kv_cache_bytes": sampler.kv_cache_bytes(
                       model.config, batch, size["prompt"], SamplingConfig(
                           max_new_tokens=args.new_tokens))}
            if bandwidth:
                context = size["prompt"] + args.new_tokens // 2
                row["roofline_fraction"] = ours / roofline_tokens_per_s(model, batch, context,
                                                                        bandwidth)
            rows.append(row)
            print(f"batch {batch}: ours {ours:.0f} tok/s, without confidence {plain:.0f}, "
                  f"generate {theirs:.0f}", flush=True)
        refill = bench_refill(model, prompts[0], slots=min(args.batches[-1], 32),
                              new_tokens=args.new_tokens)
    device = jax.devices()[0].device_kind
    print(f"sampler, Qwen3 {name} size ({size['dtype']}), prompt {size['prompt']}, "
          f"{args.new_tokens} new tokens, temperature 0.6, top-p 0.95, on {device}")
    print(f"{'batch':>5} {'ours tok/s':>11} {'no conf':>9} {'generate':>9} {'ratio':>6} "
          f"{'conf cost':>9} {'KV MiB':>8}" + (f" {'roofline':>8}" if bandwidth else ""))
    for r in rows:
        print(f"{r['batch']:5d} {r['ours_tok_s']:11.0f} {r['ours_no_confidence_tok_s']:9.0f} "
              f"{r['generate_tok_s']:9.0f} {r['ratio']:5.1f}x "
              f"{100 * r['confidence_overhead']:8.1f}% {r['kv_cache_bytes'] / 2**20:8.1f}"
              + (f" {100 * r['roofline_fraction']:7.1f}%" if bandwidth else ""))
    print(f"refill: {refill['traces']} traces on {refill['slots']} slots, "
          f"{100 * refill['stopped_early']:.0f}% stopped early: "
          f"{1000 * refill['seconds_per_trace_static']:.1f} ms/trace static, "
          f"{1000 * refill['seconds_per_trace_refill']:.1f} ms/trace with refill "
          f"({refill['speedup']:.2f}x); decode steps {refill['steps_static']} static, "
          f"{refill['steps_refill']} with refill, {refill['tokens_per_trace']:.0f} of "
          f"{args.new_tokens} tokens per trace")
    results.write_json(pathlib.Path(args.out), {"device": device, "size": name, "rows": rows,
                                                "refill": refill, "hbm_bytes_per_s": bandwidth})


if __name__ == "__main__":
    main()
