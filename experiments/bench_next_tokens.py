"""Cost of one sampling step over a large vocabulary: `strategies.Nucleus` against one softmax over
the same logits and against the bisection draw the decode loop used before it.

    python experiments/bench_next_tokens.py [--batch 256] [--vocab 151936] [--repeats 7]
                                            [--out results/bench_next_tokens.json]

Each side does what a decode step needs from the logits [B, V] (float32, random): the next
tokens, their log-probs under softmax(logits / 0.6) and DeepConf's token confidence over the top
20 log-probs. Ours: one `Nucleus` call, confidence from its top logits. Baseline:
`bisection_tokens` (top-k mask, softmax, top-p by bisection over the vocabulary, inverse-CDF
draw), plus the log-sum-exp and `confidence.token_confidence` the decode loop adds to it.
Settings: top-k 20 + top-p 0.95, and top-p 0.95 alone (top_k = 0); logits N(0, 1) ("flat": the
nucleus holds ~75k tokens, so top_k = 0 takes the whole-vocabulary fallback) and 4 N(0, 1)
("peaked": nuclei of tens of tokens, inside the 256-token cap). Reported: the median wall and CPU
time of `--repeats` calls after a warm-up, their ratio to one softmax (the target: at most 2
passes' worth), and the bytes XLA's cost analysis says each compiled function accesses (a gather
counts its whole operand; the fallback branch of a conditional counts although it may not run).
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp

from jaxlab import results
from jaxlab.sampling.confidence import token_confidence, top_k_values
from jaxlab.sampling.sampler import SamplingConfig
from jaxlab.sampling.strategies import (
    Nucleus,
    block_top_k,
    inverse_cdf,
    nucleus,
    nucleus_floor,
    token_confidence_from_top,
)

TEMPERATURE, CONFIDENCE_K = 0.6, 20
SETTINGS = {"top-k 20, top-p 0.95": dict(top_k=20, top_p=0.95),
            "top-p 0.95": dict(top_k=0, top_p=0.95)}
SCALES = {"flat": 1.0, "peaked": 4.0}  # logits = scale x N(0, 1)


def median_seconds(fn, args: tuple, repeats: int) -> tuple[float, float]:
    """Median (wall, CPU) seconds of `repeats` calls fn(*args) after one warm-up call
    (compilation). CPU time adds up the process's threads; on a busy machine it varies less
    than wall time."""
    jax.block_until_ready(fn(*args))
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn(*args))
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def bytes_accessed(jitted, *args) -> float:
    return float(jitted.lower(*args).compile().cost_analysis()["bytes accessed"])


@jax.jit
def ours(strategy: Nucleus, logits, key):
    draw = strategy(logits, key)
    confidence = token_confidence_from_top(draw.top_logits, draw.log_normalizer, CONFIDENCE_K)
    return draw.tokens, draw.logprobs, confidence


def bisection_tokens(logits, key, config: SamplingConfig):
    """Draws over the whole vocabulary, as the decode loop did before `strategies`: the top-k
    mask, a softmax, the top-p floor by bisection over the vocabulary, an inverse-CDF draw."""
    scaled = logits.astype(jnp.float32) / config.temperature
    if config.top_k:
        kth = top_k_values(scaled, config.top_k)[:, -1:]
        scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
    probs = jax.nn.softmax(scaled, axis=-1)                                   # [B, V]
    if config.top_p < 1:
        probs = jnp.where(probs < nucleus_floor(probs, config.top_p)[:, None], 0.0, probs)
    return inverse_cdf(probs, jax.random.uniform(key, probs.shape[:1]))


def baseline(config: SamplingConfig):
    """The decode loop's sampling work before `strategies`: the bisection draw, the tempered
    log-sum-exp for the log-prob, and token confidence."""
    @jax.jit
    def step(logits, key):
        tokens = bisection_tokens(logits, key, config)
        tempered = logits / config.temperature
        logp = (jnp.take_along_axis(tempered, tokens[:, None], axis=-1)[:, 0]
                - jax.nn.logsumexp(tempered, axis=-1))
        return tokens, logp, token_confidence(logits, CONFIDENCE_K)
    return step


def past_the_cap(strategy: Nucleus, logits) -> float:
    """Fraction of rows whose nucleus is wider than the strategy's cap (0 when top_k > 0)."""
    if strategy.top_k:
        return 0.0
    tempered = logits / TEMPERATURE
    top, _ = block_top_k(tempered, strategy.cap)
    candidates = jnp.exp(top - jax.nn.logsumexp(tempered, axis=-1, keepdims=True))  # [B, cap]
    return float(jnp.mean(nucleus(candidates, strategy.top_p)[:, -1]))


def bench(batch: int, vocab: int, repeats: int) -> list[dict]:
    softmax = jax.jit(lambda x: jax.nn.softmax(x, axis=-1))
    key = jax.random.key(0)
    rows = []
    for kind, scale in SCALES.items():
        logits = scale * jax.random.normal(jax.random.key(1), (batch, vocab), jnp.float32)
        softmax_s, softmax_cpu = median_seconds(softmax, (logits,), repeats)
        softmax_bytes = bytes_accessed(softmax, logits)
        for name, setting in SETTINGS.items():
            strategy = Nucleus(TEMPERATURE, **setting)
            old = baseline(SamplingConfig(temperature=TEMPERATURE, **setting))
            ours_s, ours_cpu = median_seconds(ours, (strategy, logits, key), repeats)
            old_s, old_cpu = median_seconds(old, (logits, key), repeats)
            rows.append(dict(
                logits=kind, setting=name, softmax_ms=1e3 * softmax_s, ours_ms=1e3 * ours_s,
                baseline_ms=1e3 * old_s, ours_over_softmax=ours_s / softmax_s,
                baseline_over_ours=old_s / ours_s, softmax_cpu_ms=1e3 * softmax_cpu,
                ours_cpu_ms=1e3 * ours_cpu, baseline_cpu_ms=1e3 * old_cpu,
                ours_over_softmax_cpu=ours_cpu / softmax_cpu,
                baseline_over_ours_cpu=old_cpu / ours_cpu,
                ours_bytes_over_softmax=bytes_accessed(ours, strategy, logits, key)
                / softmax_bytes,
                baseline_bytes_over_softmax=bytes_accessed(old, logits, key) / softmax_bytes,
                rows_past_cap=past_the_cap(strategy, logits)))
            print(f"  {kind}, {name}: ours {1e3 * ours_s:.1f} ms, softmax "
                  f"{1e3 * softmax_s:.1f} ms, baseline {1e3 * old_s:.1f} ms (wall)", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default="results/bench_next_tokens.json")
    args = parser.parse_args()
    device = jax.devices()[0].device_kind
    print(f"next-token step, batch {args.batch}, vocabulary {args.vocab}, float32, "
          f"temperature {TEMPERATURE}, on {device}; median of {args.repeats} after a warm-up")
    rows = bench(args.batch, args.vocab, args.repeats)
    print("wall ms (CPU ms); ratios of wall (CPU) times; bytes accessed over the softmax's")
    print(f"{'logits':>7} {'setting':>21} {'softmax':>15} {'ours':>15} {'ours/softmax':>13} "
          f"{'baseline':>17} {'baseline/ours':>13} {'bytes ours':>10} {'baseline':>8} "
          f"{'past cap':>8}")
    for r in rows:
        print(f"{r['logits']:>7} {r['setting']:>21} "
              f"{r['softmax_ms']:6.1f} ({r['softmax_cpu_ms']:6.1f}) "
              f"{r['ours_ms']:6.1f} ({r['ours_cpu_ms']:6.1f}) "
              f"{r['ours_over_softmax']:5.2f} ({r['ours_over_softmax_cpu']:4.2f}) "
              f"{r['baseline_ms']:7.1f} ({r['baseline_cpu_ms']:7.1f}) "
              f"{r['baseline_over_ours']:5.1f} ({r['baseline_over_ours_cpu']:4.1f}) "
              f"{r['ours_bytes_over_softmax']:9.2f}x {r['baseline_bytes_over_softmax']:7.2f}x "
              f"{r['rows_past_cap']:8.1%}")
    results.write_json(pathlib.Path(args.out), {
        "device": device, "batch": args.batch, "vocab": args.vocab, "repeats": args.repeats,
        "temperature": TEMPERATURE, "confidence_k": CONFIDENCE_K, "rows": rows})


if __name__ == "__main__":
    main()
