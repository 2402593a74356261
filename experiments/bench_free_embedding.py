"""Free-embedding optimizer speed: our compiled loop against a plain PyTorch loop of the same math.

    python experiments/bench_free_embedding.py [--size cpu|gpu] [--steps N] [--runs R] [--out FILE]

Both sides run the same problem (n documents, all C(n, 2) queries, d dimensions): a full-batch
softmax loss (per-positive), Adam (lr 0.01), unit-norm projection, and the exact solved check
every 50 steps. Reported: optimizer steps/s of one run (ratio ours / PyTorch), and run-steps/s of
a batch of R independent runs in one call (vmapped and spread over every device).
"""

from __future__ import annotations

import argparse
import math
import pathlib
import time

import jax
import numpy as np

from jaxlab import parallel, results
from jaxlab.limit import free_embedding as fe

SIZES = {"cpu": (120, 20), "gpu": (600, 45)}  # (n, d)
CHECK_EVERY = 50


def bench_ours(n: int, d: int, steps: int, runs: int, mesh) -> float:
    """Run-steps per second of `runs` runs advanced `steps` steps in one call (after a warm-up)."""
    config = fe.SolverConfig(check_every=CHECK_EVERY, patience=10**9, steps=10**8)
    state, relevant = fe.start_runs(list(range(runs)), [n] * runs, d, config, mesh)
    state = fe.advance_runs(state, relevant, steps=CHECK_EVERY, config=config, mesh=mesh)
    jax.block_until_ready(state)
    start = time.perf_counter()
    state = fe.advance_runs(state, relevant, steps=steps, config=config, mesh=mesh)
    jax.block_until_ready(state)
    elapsed = time.perf_counter() - start
    done = int(np.min(np.asarray(state.step))) - CHECK_EVERY
    if done != steps:
        raise RuntimeError(f"expected {steps} steps per run, ran {done} (a run stopped early)")
    return runs * steps / elapsed


def bench_torch(n: int, d: int, steps: int) -> float:
    """Steps per second of the same math written plainly in PyTorch (the official code's loop)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    relevant = torch.as_tensor(fe.ground_truth(n, 2), dtype=torch.long, device=device)
    m = relevant.shape[0]
    generator = torch.Generator(device="cpu").manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(m, d, generator=generator), dim=-1).to(device)
    docs = torch.nn.functional.normalize(torch.randn(n, d, generator=generator), dim=-1).to(device)
    q.requires_grad_(True)
    docs.requires_grad_(True)
    optimizer = torch.optim.Adam([q, docs], lr=0.01)
    rows = torch.arange(m, device=device)[:, None]

    def step():
        logp = torch.log_softmax(q @ docs.T / 0.1, dim=-1)
        loss = -logp.gather(1, relevant).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            q.copy_(torch.nn.functional.normalize(q, dim=-1))
            docs.copy_(torch.nn.functional.normalize(docs, dim=-1))

    def solved():
        with torch.no_grad():
            scores = q @ docs.T
            lowest = scores.gather(1, relevant).min(dim=1).values
            others = scores.index_put((rows.expand_as(relevant), relevant),
                                      torch.tensor(-torch.inf, device=device))
            return bool((lowest > others.max(dim=1).values).all())

    def loop(count):
        for i in range(count):
            step()
            if (i + 1) % CHECK_EVERY == 0:
                solved()
        if device == "cuda":
            torch.cuda.synchronize()

    loop(CHECK_EVERY)
    start = time.perf_counter()
    loop(steps)
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES),
                        default=None, help="problem size (default: gpu on a GPU, else cpu)")
    parser.add_argument("--steps", type=int, default=500, help="timed steps (multiple of 50)")
    parser.add_argument("--runs", type=int, default=0, help="batch size (default: 8 x devices)")
    parser.add_argument("--out", default="results/bench_free_embedding.json")
    args = parser.parse_args()
    parallel.cpu_cores_as_devices()  # before JAX starts its CPU backend
    n, d = SIZES[args.size or ("gpu" if jax.default_backend() == "gpu" else "cpu")]
    mesh = parallel.make_mesh(parallel.RUNS)
    runs = args.runs or 8 * mesh.size

    ours = bench_ours(n, d, args.steps, 1, None)
    batched = bench_ours(n, d, args.steps, runs, mesh)
    torch_steps = bench_torch(n, d, args.steps)
    rows = [
        ("jaxlab, one run", ours, ours / torch_steps),
        (f"jaxlab, {runs} runs in one call ({mesh.size} device(s))", batched,
         batched / torch_steps),
        ("PyTorch, one run", torch_steps, 1.0),
    ]
    print(f"free-embedding step, n={n}, d={d}, {math.comb(n, 2)} queries, "
          f"{jax.devices()[0].device_kind} ({jax.default_backend()})")
    print(f"{'':48s} {'run-steps/s':>12s} {'vs PyTorch':>11s}")
    for name, rate, ratio in rows:
        print(f"{name:48s} {rate:12.1f} {ratio:10.2f}x")
    results.write_json(pathlib.Path(args.out), {
        "n": n, "d": d, "steps": args.steps, "runs": runs, "device": jax.devices()[0].device_kind,
        "backend": jax.default_backend(), "devices": mesh.size,
        "ours_steps_per_s": ours, "ours_batched_run_steps_per_s": batched,
        "torch_steps_per_s": torch_steps, "ratio": ours / torch_steps,
        "batched_ratio": batched / torch_steps})


if __name__ == "__main__":
    main()
