"""Sampler speed and memory: our compiled decode loop (with and without DeepConf confidence)
against transformers' `generate` in PyTorch on the same weights, prompts and settings, and the
engine's own targets (live-length attention, one copy of each prompt, compiled memory).

    python experiments/bench_sampler.py [--size cpu|gpu] [--batches 1 64 256] [--out FILE]
        [--parts generate refill allocation prompt memory kernels deepconf paged layers]
        [--kernels auto portable] [--baseline dynamic|static]

Parts beside `generate` and `refill`:
  allocation  one prompt, 256 traces on 64 refilled slots, stop tokens ending every trace well
              before 256 tokens: tokens/s with max_new_tokens 4096 against the same traces
              with 256 (a loop that reads only live KV runs both at the same speed)
  prompt      one 1,024-token prompt, n = 1..64 traces: KV bytes of the compiled loop against
              the prompt once + the generated tokens (and against a copy of the prompt per
              trace), and the decode step's time per trace
  memory      XLA's memory analysis of the compiled prefill and loop at the Qwen3-0.6B shape
              (bfloat16, 256 prompts of 128 tokens, 256 new tokens; abstract inputs, nothing
              allocated): peak against weights + KV + outputs
  paged       a paged cache (`kv_pages`) against slots of max_new_tokens each: the compiled
              loop's memory at the Qwen3-0.6B shape (one 1,024-token prompt, 64 slots of up to
              32,768 tokens, a pool for 4,096 live tokens per slot), and the tok/s of the
              allocation workload above with max_new_tokens 4096, paged and not
  kernels     decode attention alone at the model's head shape, 256 rows, a 4,096-slot cache
              with 512 live slots per row: each kernel of `attention.DECODE_KERNELS` that runs
              here against the portable path (largest difference) and its time
  deepconf    DeepConf's workload: one prompt, 512 traces of up to 8,192 tokens on 64 refilled
              slots, stop tokens ending traces after ~256 tokens; 16 warm-up traces set the
              threshold (their lowest group confidence's 90th percentile, DeepConf-low), then
              the other 496 decode with early stop, against the same 496 decoded to the end
              (one compiled loop: budget and threshold are traced)
  layers      (not run by default) the layers unrolled against one scan over their stacked
              weights (`scan_layers`), at 2, 8 and 28 layers of the model's width: the first
              call's time (compiling prefill and loop) and the decode speed after it; and the
              compiled loop's peak at the Qwen3-0.6B shape (the `memory` part's request)

Both sides decode exactly `--new-tokens` tokens per row at temperature 0.6 / top-p 0.95; the
PyTorch side returns the logits and computes the same token confidence from them. Our side runs
once per decode kernel in `--kernels`; transformers runs with its dynamic cache or (`--baseline
static`, the default on a GPU) a static cache, whose forward `generate` compiles with
`torch.compile`. Reported:
tokens/s and ratios, the KV-cache bytes, on GPU the fraction of the memory-bandwidth roofline
(weights + KV bytes read per decode step at the measured HBM bandwidth), and the refill workload:
wall time per finished trace when half of the traces stop early, with and without slot refill.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import pathlib
import tempfile
import time

# JAX and PyTorch share a GPU in one process: JAX allocates on demand, not 75% up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp
import numpy as np

from jaxlab import results
from jaxlab.models import hf, zoo
from jaxlab.models.attention import DECODE_KERNELS
from jaxlab.sampling import sampler
from jaxlab.sampling.memory import decode_memory, kv_cache_bytes
from jaxlab.sampling.sampler import SamplingConfig
from jaxlab.timing import best_of

# cpu: a small Qwen3; gpu: the released Qwen3-0.6B shape in bfloat16.
SIZES = {
    "cpu": dict(size="tiny", dtype="float32", prompt=32,
                overrides=dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                               vocab_size=8192)),
    "gpu": dict(size="released", dtype="bfloat16", prompt=128, overrides={}),
}


PARTS = ("generate", "refill", "allocation", "prompt", "memory", "kernels", "deepconf", "paged",
         "layers")
REPEATS = 3  # every timing is the fastest of this many calls after a warm-up, on both sides


def _timed(fn, repeats: int = REPEATS) -> float:
    """Seconds of `best_of`."""
    return best_of(fn, repeats)[1]


def bench_ours(model, prompts, new_tokens: int, confidence: bool, kernel: str = "auto") -> float:
    config = SamplingConfig(max_new_tokens=new_tokens, temperature=0.6, top_p=0.95,
                            confidence=confidence, decode_kernel=kernel)
    return _timed(lambda: sampler.sample(model, prompts, jax.random.key(0), config).tokens)


def bench_generate(path, prompts, new_tokens: int, dtype: str, static: bool) -> float:
    """transformers generate + the same token confidence from its returned logits; with a
    static cache (`static`) generate compiles the model's forward (`torch.compile`) on a GPU."""
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
                                 pad_token_id=0, eos_token_id=None,
                                 cache_implementation="static" if static else None)
            confidence = torch.stack([  # per step: [B, T, V] float32 would not fit
                -torch.log_softmax(step.float(), -1).topk(20, dim=-1).values.mean(-1)
                for step in out.logits], dim=1)
            if device == "cuda":
                torch.cuda.synchronize()
            return confidence.cpu().numpy()

    seconds = _timed(run)
    model = None  # frees the model and its static cache on the device for the parts after
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return seconds


def hbm_bandwidth() -> float | None:
    """Bytes/s of a float32 device-to-device pass over 1 GiB (read + write counted), or None
    off-GPU. (Bytes, uint8, ran at a third of the copy bandwidth on an H200: 1.38 TB/s.)"""
    if jax.default_backend() != "gpu":
        return None
    x = jnp.ones((1 << 28,), jnp.float32)
    copy = jax.jit(lambda x: x + 1)
    seconds = _timed(lambda: copy(x), repeats=5)
    return 2 * x.nbytes / seconds


def roofline_tokens_per_s(model, batch: int, context: int, bandwidth: float) -> float:
    """Decode tokens/s if every step read all weights and the batch's KV once at `bandwidth`."""
    weights = sum(x.nbytes for x in jax.tree.leaves(model))
    c = model.config
    kv = 2 * c.num_layers * batch * context * c.num_kv_heads * c.head_dim * jnp.dtype(
        c.compute_dtype).itemsize
    return batch * bandwidth / (weights + kv)


def bench_refill(model, prompt, slots: int, new_tokens: int, rounds: int = 4) -> dict:
    """Seconds per finished trace for `rounds` x `slots` traces of one prompt when about half stop
    early: `rounds` static batches of `slots` (each waits for its longest trace) vs one call that
    refills finished slots."""
    base = dict(max_new_tokens=new_tokens, temperature=1.0, window=8)
    free = sampler.sample(model, [prompt], jax.random.key(1), SamplingConfig(group_size=slots,
                                                                             **base))
    threshold = float(np.median(np.asarray(free.lowest_group_confidence)))
    static = SamplingConfig(group_size=slots, stop_threshold=threshold, **base)
    refill = SamplingConfig(group_size=slots, budget=rounds * slots, stop_threshold=threshold,
                            **base)

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


def bench_allocation(model, prompt, slots: int = 64, budget: int = 256,
                     allocations=(256, 4096)) -> dict:
    """Tokens/s of one prompt's `budget` traces on `slots` refilled slots for each
    max_new_tokens in `allocations`. A set of stop tokens holding ~3% of a random model's mass
    ends traces after ~30 tokens (all well before the smallest allocation), so that every run
    decodes the same traces (checked) and only the allocation differs."""
    v = model.config.vocab_size
    stop_ids = tuple(range(1, 1 + v // 32))
    rows = []
    for allocation in allocations:
        config = SamplingConfig(max_new_tokens=allocation, temperature=1.0, group_size=slots,
                                budget=budget, stop_ids=stop_ids, confidence=True)
        out, seconds = best_of(lambda c=config: sampler.sample(model, [prompt],
                                                               jax.random.key(3), c), REPEATS)
        tokens = int(np.sum(np.asarray(out.lengths)))
        rows.append({"max_new_tokens": allocation, "tok_s": tokens / seconds, "tokens": tokens,
                     "mean_length": tokens / budget, "longest": int(np.max(out.lengths)),
                     "steps": int(out.steps), "seconds": seconds,
                     "traces": np.asarray(out.tokens)[:, :allocations[0]]})
    same = all(np.array_equal(r["traces"], rows[0]["traces"]) for r in rows)
    for r in rows:
        del r["traces"]
    return {"slots": slots, "traces": budget, "rows": rows, "same_traces": same,
            "ratio": rows[-1]["tok_s"] / rows[0]["tok_s"]}


def bench_prompt(model, max_prompt_tokens: int = 1024, ns=(1, 4, 16, 64),
                 steps=(16, 64)) -> list[dict]:
    """One `max_prompt_tokens`-token prompt and n traces of exactly steps[1] tokens: KV bytes of
    the compiled loop (`decode_memory`) against the prompt once + generated tokens and against a
    copy of the prompt per trace, and seconds per decode step per trace, (t(steps[1]) -
    t(steps[0])) / (steps[1] - steps[0]) / n (prefill cancels out)."""
    c = model.config
    per_token = 2 * c.num_layers * c.num_kv_heads * c.head_dim * jnp.dtype(c.compute_dtype).itemsize
    prompt = np.random.default_rng(1).integers(1, c.vocab_size, max_prompt_tokens).tolist()
    rows = []
    for n in ns:
        def timed(t, n=n):
            config = SamplingConfig(max_new_tokens=t, temperature=1.0, group_size=n,
                                    confidence=True)
            return _timed(lambda: sampler.sample(model, [prompt], jax.random.key(4),
                                                 config).tokens)

        short, long = (timed(t) for t in steps)
        memory = decode_memory(c, 1, max_prompt_tokens, SamplingConfig(
            max_new_tokens=steps[1], group_size=n))
        ideal = per_token * (max_prompt_tokens + n * steps[1])
        rows.append({"n": n, "kv_bytes": memory.prefix + memory.generated,
                     "ideal_kv_bytes": ideal,
                     "copied_kv_bytes": per_token * n * (max_prompt_tokens + steps[1]),
                     "loop_peak_bytes": memory.loop,
                     "ms_per_step_per_trace": 1000 * (long - short) / (steps[1] - steps[0]) / n})
    return rows


def bench_memory(dtype: str = "bfloat16", prompts: int = 256, max_prompt_tokens: int = 128,
                 new_tokens: int = 256) -> dict:
    """`decode_memory` of the Qwen3-0.6B shape: the compiled programs' peak against weights + KV
    (prompt + generated) + outputs."""
    from jaxlab.models.decoder import DecoderConfig

    c = DecoderConfig.from_hf(zoo.hf_config("qwen3", "released"), param_dtype=dtype)
    m = decode_memory(c, prompts, max_prompt_tokens, SamplingConfig(
        max_new_tokens=new_tokens, group_size=1))
    floor = m.weights + m.prefix + m.generated + m.samples
    return {"dtype": dtype, "prompts": prompts, "max_prompt_tokens": max_prompt_tokens,
            "new_tokens": new_tokens,
            **dataclasses.asdict(m), "loop_peak": m.loop, "peak": m.peak,
            "weights_kv_outputs": floor, "ratio": m.peak / floor}


def bench_paged(model, prompt, dtypes=("bfloat16", "float32")) -> dict:
    """The paged cache's two sides: memory where it matters (`decode_memory` of the Qwen3-0.6B
    shape, nothing allocated) and its cost in time on this model (the allocation workload,
    max_new_tokens 4096: every trace fits one page of 128 tokens, a pool of one page per slot
    + scratch against 64 slots x 4096)."""
    from jaxlab.models.decoder import DecoderConfig

    memory = {}
    for dtype in dtypes:
        c = DecoderConfig.from_hf(zoo.hf_config("qwen3", "released"), param_dtype=dtype)
        for name, pages in (("slots", None), ("paged", 1 + 64 * 4096 // 128)):
            m = decode_memory(c, 1, 1024, SamplingConfig(max_new_tokens=32768, group_size=64,
                                                         kv_pages=pages))
            floor = m.weights + m.prefix + m.generated + m.samples
            memory[f"{name} {dtype}"] = {
                "kv_pages": pages, "generated": m.generated, "prefix": m.prefix,
                "weights": m.weights, "loop_peak": m.loop, "peak": m.peak,
                "ratio": m.loop / floor}
    v = model.config.vocab_size
    speed = {}
    for name, pages in (("slots", None), ("paged", 65)):
        config = SamplingConfig(max_new_tokens=4096, temperature=1.0, group_size=64, budget=256,
                                stop_ids=tuple(range(1, 1 + v // 32)), kv_pages=pages)
        out, seconds = best_of(lambda c=config: sampler.sample(model, [prompt],
                                                               jax.random.key(3)[None], c),
                               REPEATS)
        tokens = int(np.sum(np.asarray(out.lengths)))
        speed[name] = {"tok_s": tokens / seconds, "tokens": tokens, "steps": int(out.steps),
                       "traces": np.asarray(out.tokens)}
    same = bool(np.array_equal(speed["slots"].pop("traces"), speed["paged"].pop("traces")))
    return {"memory": memory, "speed": speed, "same_traces": same,
            "ratio": speed["paged"]["tok_s"] / speed["slots"]["tok_s"]}


def bench_layers(size: dict, depths=(2, 8, 28), batch: int = 16, new_tokens: int = 64) -> dict:
    """Unrolled layers against `scan_layers`, both with the portable attention (a stacked
    cache never uses the Pallas kernel): per depth, the first `sample` call's seconds (both
    programs compiled; nothing cached across depths) and the decode tok/s after it; and
    `decode_memory` of the Qwen3-0.6B shape both ways, in float32 and bfloat16."""
    from jaxlab.models.decoder import DecoderConfig

    rows = []
    for depth in depths:
        with tempfile.TemporaryDirectory() as folder:
            path = zoo.create("qwen3", folder, size=size["size"], param_dtype=size["dtype"],
                              **{**size["overrides"], "num_hidden_layers": depth})
            model = hf.load_pretrained(path, param_dtype=size["dtype"])
        prompts = np.random.default_rng(depth).integers(
            1, model.config.vocab_size, (batch, size["prompt"])).tolist()
        row = {"layers": depth}
        for scan in (False, True):
            config = SamplingConfig(max_new_tokens=new_tokens, temperature=0.6, top_p=0.95,
                                    scan_layers=scan, decode_kernel="portable")

            def run(model=model, prompts=prompts, config=config):
                return sampler.sample(model, prompts, jax.random.key(0), config).tokens

            first = time.perf_counter()
            want = np.asarray(run())
            first = time.perf_counter() - first
            seconds = _timed(run)
            name = "scanned" if scan else "unrolled"
            row[name] = {"first_call_s": first, "compile_s": first - seconds,
                         "tok_s": batch * new_tokens / seconds}
            row.setdefault("tokens", want)
        row["same_rows"] = float(np.mean(np.all(row.pop("tokens") == want, axis=1)))
        rows.append(row)
    memory = {}
    for dtype in ("float32", "bfloat16"):
        c = DecoderConfig.from_hf(zoo.hf_config("qwen3", "released"), param_dtype=dtype)
        for scan in (False, True):
            m = decode_memory(c, 256, 128, SamplingConfig(max_new_tokens=256,
                                                          scan_layers=scan))
            memory[f"{'scanned' if scan else 'unrolled'} {dtype}"] = {
                "loop_peak": m.loop, "weights": m.weights,
                "ratio": m.loop / (m.weights + m.prefix + m.generated + m.samples)}
    return {"rows": rows, "batch": batch, "new_tokens": new_tokens, "memory": memory}


def bench_kernels(c, rows: int = 256, size: int = 4096, live: int = 512) -> list[dict]:
    """Decode attention alone: grouped queries [rows, K, G, D] over a cache of `size` slots
    whose rows hold `live` live slots each (random starts), in the model's compute dtype. Each
    kernel that runs here against the portable path: largest |difference| of the outputs and
    the time of one call, next to the portable path over a cache of exactly `live` slots (what
    reading only the live slots costs). On a GPU also the Pallas kernel with at most 4 and 1
    splits and the paged kernel reading the rows as pages, and all of it again over a
    256-slot cache (the sampler's default 256 new tokens) with 192 live slots."""
    from jaxlab.models import attention

    rng = np.random.default_rng(5)
    k, g, d = c.num_kv_heads, c.num_heads // c.num_kv_heads, c.head_dim

    def case(slots, live):
        q, keys, values = (jnp.asarray(rng.normal(size=shape), c.compute_dtype) for shape in (
            (rows, k, g, d), (rows, k, slots, d), (rows, k, slots, d)))
        start = jnp.asarray(rng.integers(0, slots - live + 1, rows), jnp.int32)
        return q, keys, values, start, start + live

    def run(fn, inputs):
        compiled = jax.jit(fn)
        out, seconds = best_of(lambda: compiled(*inputs), 10)
        return np.asarray(out[0], np.float32), seconds

    def portable(*a):
        return attention.block_attention(*a[:3], None, None, *a[3:], block=128)

    report = []
    for slots, alive in ((size, live), (256, 192)):
        full = case(slots, alive)
        want, seconds = run(portable, full)
        report += [{"kernel": "portable", "cache": slots, "live": alive, "seconds": seconds,
                    "max_diff": 0.0},
                   {"kernel": "portable", "cache": alive, "live": alive,
                    "seconds": run(portable, case(alive, alive))[1], "max_diff": None}]
        if jax.default_backend() != "gpu":
            break
        for most in (16, 4, 1):
            got, seconds = run(lambda *a, m=most: attention.pallas_gpu_attention(
                *a, max_splits=m), full)
            report.append({"kernel": f"pallas<={most}", "cache": slots, "live": alive,
                           "splits": attention.pallas_splits(slots, 128, most)[0],
                           "seconds": seconds, "max_diff": float(np.max(np.abs(got - want)))})
        # the paged kernel (what paged and stacked caches run) over the same rows as pages
        got, seconds = run(lambda *a: attention.pallas_gpu_paged_attention(*a, block=128), full)
        report.append({"kernel": "pallas_paged", "cache": slots, "live": alive,
                       "seconds": seconds, "max_diff": float(np.max(np.abs(got - want)))})
    return report


def bench_deepconf(model, prompt, slots: int = 64, traces: int = 512, warmup: int = 16,
                   max_new_tokens: int = 8192, mean_length: int = 256, window: int = 256,
                   kernel: str = "auto") -> dict:
    """DeepConf-low online on one prompt (`papers/deepconf.md`): `warmup` traces decoded to
    the end set the threshold s = 90th percentile of their lowest group confidence; the other
    traces stop once a full window's group confidence falls below s. A set of stop tokens
    holding ~1/`mean_length` of a random model's mass ends traces after ~`mean_length` tokens.
    All three calls run one compiled loop (per-prompt budget and threshold are traced)."""
    v = model.config.vocab_size
    config = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.6, top_p=0.95,
                            top_k=20, group_size=slots, budget=traces - warmup, window=window,
                            stop_ids=tuple(range(1, 1 + v // mean_length)),
                            decode_kernel=kernel)
    never = [-1e30]

    def run(budget, threshold, seed):
        start = time.perf_counter()
        out = sampler.sample(model, [prompt], jax.random.key(seed), config,
                             stop_thresholds=threshold, budgets=[budget])
        tokens = int(np.sum(np.asarray(out.lengths)))
        return out, tokens, time.perf_counter() - start

    run(warmup, never, 0)                                          # compiles
    warm, warm_tokens, warm_seconds = run(warmup, never, 6)
    threshold = float(np.percentile(np.asarray(warm.lowest_group_confidence), 90))
    rows = {}
    for name, s in (("early_stop", [threshold]), ("to_the_end", never)):
        out, tokens, seconds = run(traces - warmup, s, 7)
        rows[name] = {"traces": traces - warmup, "tokens": tokens, "seconds": seconds,
                      "tok_s": tokens / seconds, "steps": int(out.steps),
                      "stopped_early": float(np.mean(np.asarray(out.finish_reason)
                                                     == sampler.LOW_CONFIDENCE)),
                      "mean_length": tokens / (traces - warmup),
                      "longest": int(np.max(np.asarray(out.lengths)))}
    return {"slots": slots, "traces": traces, "warmup": warmup, "window": window,
            "max_new_tokens": max_new_tokens, "threshold": threshold,
            "warmup_tokens": warm_tokens, "warmup_seconds": warm_seconds, **rows,
            "token_saving": 1 - rows["early_stop"]["tokens"] / rows["to_the_end"]["tokens"],
            "time_saving": 1 - rows["early_stop"]["seconds"] / rows["to_the_end"]["seconds"]}


def print_generate(rows, name, size, new_tokens, bandwidth, device) -> None:
    print(f"sampler, Qwen3 {name} size ({size['dtype']}), prompt {size['prompt']}, "
          f"{new_tokens} new tokens, temperature 0.6, top-p 0.95, on {device}")
    print(f"{'batch':>5} {'ours tok/s':>11} {'no conf':>9} {'generate':>9} {'ratio':>6} "
          f"{'conf cost':>9} {'KV MiB':>8}" + (f" {'roofline':>8}" if bandwidth else ""))
    for r in rows:
        print(f"{r['batch']:5d} {r['ours_tok_s']:11.0f} {r['ours_no_confidence_tok_s']:9.0f} "
              f"{r['generate_tok_s']:9.0f} {r['ratio']:5.1f}x "
              f"{100 * r['confidence_overhead']:8.1f}% {r['kv_bytes'] / 2**20:8.1f}"
              + (f" {100 * r['roofline_fraction']:7.1f}%" if bandwidth else ""))


def print_engine(report: dict) -> None:
    if "layers" in report:
        r = report["layers"]
        print(f"layers unrolled vs scanned ({r['batch']} prompts x {r['new_tokens']} new "
              "tokens): first call, its excess over a later call (compiling), decode speed")
        for row in r["rows"]:
            u, s = row["unrolled"], row["scanned"]
            print(f"  {row['layers']:2d} layers: first call {u['first_call_s']:5.1f} s vs "
                  f"{s['first_call_s']:5.1f} s scanned (compiling: {u['compile_s']:4.1f} vs "
                  f"{s['compile_s']:4.1f} s); {u['tok_s']:7.0f} vs {s['tok_s']:7.0f} "
                  f"tok/s ({s['tok_s'] / u['tok_s']:.2f}x); identical rows: "
                  f"{100 * row['same_rows']:.0f}%")
        for name, m in r["memory"].items():
            print(f"  {name:17s} loop peak (Qwen3-0.6B shape, 256 x (128 + 256)): "
                  f"{m['loop_peak'] / 2**30:.2f} GiB ({m['ratio']:.3f}x weights + KV + "
                  "outputs)")
    if "paged" in report:
        r, gib = report["paged"], 2**30
        for name, m in r["memory"].items():
            print(f"{name:14s} (Qwen3-0.6B shape, one 1,024-token prompt, 64 slots x 32,768 "
                  f"tokens, kv_pages {m['kv_pages']}): generated KV {m['generated'] / gib:7.2f} "
                  f"GiB, loop peak {m['loop_peak'] / gib:7.2f} GiB ({m['ratio']:.3f}x weights "
                  "+ KV + outputs)")
        speed = r["speed"]
        print(f"paged cache speed, max_new_tokens 4096, 64 slots: "
              f"{speed['paged']['tok_s']:.0f} vs {speed['slots']['tok_s']:.0f} tok/s "
              f"({r['ratio']:.2f}x), same traces: {r['same_traces']}, steps "
              f"{speed['paged']['steps']} vs {speed['slots']['steps']}")
    for r in report.get("kernels", ()):
        diff = "" if r["max_diff"] is None else f", max |diff| vs portable {r['max_diff']:.2e}"
        splits = f" ({r['splits']} splits)" if "splits" in r else ""
        print(f"decode attention {r['kernel']:>11}{splits} over a {r['cache']:5d}-slot cache "
              f"({r['live']} live): {1e6 * r['seconds']:9.1f} us{diff}")
    if "deepconf" in report:
        r = report["deepconf"]
        print(f"deepconf: one prompt, {r['traces']} traces of up to {r['max_new_tokens']} tokens"
              f" on {r['slots']} slots, window {r['window']}, threshold {r['threshold']:.3f} "
              f"from {r['warmup']} warm-up traces ({r['warmup_seconds']:.1f} s)")
        for name in ("early_stop", "to_the_end"):
            x = r[name]
            print(f"  {name:10s}: {x['tokens']:8d} tokens in {x['seconds']:7.1f} s = "
                  f"{x['tok_s']:8.0f} tok/s, {x['steps']} steps, "
                  f"{100 * x['stopped_early']:.0f}% stopped early, mean length "
                  f"{x['mean_length']:.0f} (longest {x['longest']})")
        print(f"  early stop saves {100 * r['token_saving']:.0f}% of the tokens and "
              f"{100 * r['time_saving']:.0f}% of the wall time")
    if "refill" in report:
        r = report["refill"]
        print(f"refill: {r['traces']} traces on {r['slots']} slots, "
              f"{100 * r['stopped_early']:.0f}% stopped early: "
              f"{1000 * r['seconds_per_trace_static']:.1f} ms/trace static, "
              f"{1000 * r['seconds_per_trace_refill']:.1f} ms/trace with refill "
              f"({r['speedup']:.2f}x); decode steps {r['steps_static']} static, "
              f"{r['steps_refill']} with refill, {r['tokens_per_trace']:.0f} tokens per trace")
    if "allocation" in report:
        a = report["allocation"]
        print(f"allocation: one prompt, {a['traces']} traces on {a['slots']} refilled slots")
        for r in a["rows"]:
            print(f"  max_new_tokens {r['max_new_tokens']:5d}: {r['tok_s']:8.0f} tok/s, "
                  f"{r['mean_length']:.0f} tokens per trace (longest {r['longest']}), "
                  f"{r['steps']} steps, same traces: {a['same_traces']}")
        print(f"  ratio {a['rows'][-1]['max_new_tokens']} / {a['rows'][0]['max_new_tokens']}: "
              f"{a['ratio']:.2f}x (target >= 0.8x)")
    if "prompt" in report:
        print("one 1,024-token prompt, n traces: KV of the compiled loop vs prompt once + "
              "generated (vs a prompt copy per trace); decode step per trace")
        for r in report["prompt"]:
            ratio = r["kv_bytes"] / r["ideal_kv_bytes"]
            print(f"  n {r['n']:3d}: KV {r['kv_bytes'] / 2**20:7.2f} MiB, ideal "
                  f"{r['ideal_kv_bytes'] / 2**20:7.2f} MiB ({ratio:.2f}x),"
                  f" copied {r['copied_kv_bytes'] / 2**20:8.2f} MiB; loop peak "
                  f"{r['loop_peak_bytes'] / 2**20:7.2f} MiB; "
                  f"{r['ms_per_step_per_trace']:.3f} ms per step per trace")
    for m in report.get("memory", ()):
        gib = 2**30
        print(f"memory (compiled, Qwen3-0.6B shape, {m['dtype']}, {m['prompts']} prompts x "
              f"{m['max_prompt_tokens']} + {m['new_tokens']} new tokens): peak "
              f"{m['peak'] / gib:.2f} "
              f"GiB (loop {m['loop_peak'] / gib:.2f}, prefill {m['prefill'] / gib:.2f}) vs "
              f"weights {m['weights'] / gib:.2f} + KV {(m['prefix'] + m['generated']) / gib:.2f}"
              f" + outputs {m['samples'] / gib:.2f} = {m['weights_kv_outputs'] / gib:.2f} GiB: "
              f"{m['ratio']:.2f}x (target <= 1.25x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default=None,
                        help="model size (default: gpu on a GPU, else cpu)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--out", default="results/bench_sampler.json")
    parser.add_argument("--parts", nargs="+", choices=PARTS,
                        default=[p for p in PARTS if p != "layers"])
    parser.add_argument("--kernels", nargs="+", default=["auto"], choices=DECODE_KERNELS,
                        help="decode attention kernels of our side (generate part; the first "
                        "also for the deepconf part)")
    parser.add_argument("--baseline", choices=("dynamic", "static"), default=None,
                        help="transformers' KV cache (default: static on a GPU, else dynamic)")
    args = parser.parse_args()
    static = (args.baseline or ("static" if jax.default_backend() == "gpu" else "dynamic")
              ) == "static"
    name = args.size or ("gpu" if jax.default_backend() == "gpu" else "cpu")
    size = SIZES[name]
    device = jax.devices()[0].device_kind
    report = {"device": device, "size": name, "baseline": "static" if static else "dynamic"}
    with tempfile.TemporaryDirectory() as folder:
        path = zoo.create("qwen3", folder, size=size["size"], param_dtype=size["dtype"],
                          **size["overrides"])
        model = hf.load_pretrained(path, param_dtype=size["dtype"])
        rng = np.random.default_rng(0)
        prompt = rng.integers(1, model.config.vocab_size, size["prompt"]).tolist()
        bandwidth = hbm_bandwidth()
        report["hbm_bytes_per_s"] = bandwidth
        if "layers" in args.parts:
            report["layers"] = bench_layers(size)
            print_engine({"layers": report["layers"]})
        if "paged" in args.parts:
            report["paged"] = bench_paged(model, prompt)
            print_engine({"paged": report["paged"]})
        if "kernels" in args.parts:
            report["kernels"] = bench_kernels(model.config)
            print_engine({"kernels": report["kernels"]})
        if "deepconf" in args.parts:
            report["deepconf"] = bench_deepconf(model, prompt, kernel=args.kernels[0])
            print_engine({"deepconf": report["deepconf"]})
        rows = []
        for batch in args.batches if "generate" in args.parts else ():
            prompts = rng.integers(1, model.config.vocab_size, (batch, size["prompt"])).tolist()
            tokens = batch * args.new_tokens
            per_kernel = {k: tokens / bench_ours(model, prompts, args.new_tokens, True, k)
                          for k in args.kernels}
            ours = per_kernel[args.kernels[0]]
            plain = tokens / bench_ours(model, prompts, args.new_tokens, False, args.kernels[0])
            print(f"batch {batch}: ours {per_kernel} tok/s, without confidence {plain:.0f}",
                  flush=True)
            theirs = tokens / bench_generate(path, prompts, args.new_tokens, size["dtype"],
                                             static)
            row = {"batch": batch, "ours_tok_s": ours, "ours_no_confidence_tok_s": plain,
                   "ours_tok_s_per_kernel": per_kernel,
                   "generate_tok_s": theirs, "ratio": ours / theirs,
                   "confidence_overhead": plain / ours - 1,
                   "kv_bytes": kv_cache_bytes(model.config, batch, size["prompt"],
                                              SamplingConfig(args.new_tokens))}
            if bandwidth:
                context = size["prompt"] + args.new_tokens // 2
                row["roofline_fraction"] = ours / roofline_tokens_per_s(model, batch, context,
                                                                        bandwidth)
            rows.append(row)
            print(f"batch {batch}: generate ({report['baseline']} cache) {theirs:.0f} tok/s",
                  flush=True)
        if rows:
            report["rows"] = rows
        if "refill" in args.parts:
            report["refill"] = bench_refill(model, prompt, slots=min(args.batches[-1], 32),
                                            new_tokens=args.new_tokens)
        if "allocation" in args.parts:
            report["allocation"] = bench_allocation(model, prompt)
        if "prompt" in args.parts:
            report["prompt"] = bench_prompt(model)
    if "memory" in args.parts:
        dtypes = ("bfloat16",) if jax.default_backend() == "gpu" else ("bfloat16", "float32")
        report["memory"] = [bench_memory(dtype) for dtype in dtypes]
    if rows:
        print_generate(rows, name, size, args.new_tokens, bandwidth, device)
    print_engine(report)
    results.write_json(pathlib.Path(args.out), report)


if __name__ == "__main__":
    main()
