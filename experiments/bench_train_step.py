"""Policy-gradient step speed: our jitted `train_step` on jaxlab's Qwen3 `Decoder` against
transformers' `Qwen3ForCausalLM` with the same weights, loss and optimizer in PyTorch eager;
and (`--memory`) the step's compiled memory at the Qwen3-0.6B shape, without allocating it.

    python experiments/bench_train_step.py [--size cpu|gpu] [--repeats N] [--torch-threads N ..]
    python experiments/bench_train_step.py --memory [--memory-batch 8 --memory-seq 4096]
        [--memory-model 0.6B|1.7B|4B] [--memory-layers L] [--memory-fsdp N]
        [--remat none full dots]

Speed: both sides load one random-init Qwen3 folder (`zoo.create`; `hf.load_pretrained` and
`AutoModelForCausalLM.from_pretrained`) and train it on one batch with one loss: token-mean
PPO-clip (epsilon 0.2) over the response tokens, global-norm clipping at 1, AdamW. cpu: a small
Qwen3 (4 layers, width 256, vocabulary 8192), 8 x 256 tokens, float32; PyTorch with one thread
per core and with one thread, the faster being the baseline. gpu: the Qwen3-0.6B shape, 8 x 1024
tokens, float32 master weights with bfloat16 compute (ours: compute_dtype; PyTorch:
autocast). Before anything is timed the first-step losses, gradient norms and second-step
losses (after one AdamW update) of the two sides must agree, or the run stops. Reported:
trained tokens per second (batch x sequence per step, `timing.best_of`), the ratio ours /
PyTorch, and on a GPU the MFU of each side.

Memory: `train_step.lower(...)` on `jax.ShapeDtypeStruct`s (state from `nnx.eval_shape`: nothing
is allocated) and `compile().memory_analysis()` for the Qwen3-0.6B shape with float32 master
weights and bfloat16 compute, once with `logprob_chunk` 512 and once with one chunk covering the
whole sequence (the unchunked head), and with 512 in B micro-batches of one sequence; next to
the size of one [B, T, V] float32 array and of one layer's [B, H, T, T] float32 attention scores.
With `--remat`, one row per decoder-layer remat policy (`TrainConfig.remat`) instead; with
`--memory-fsdp N`, per device of an fsdp mesh of N devices (the state in its
`parallel.tree_shardings`, the batch split by rows; on a CPU, XLA_FLAGS=
--xla_force_host_platform_device_count=N); `--memory-model` another released Qwen3 shape,
`--memory-layers` fewer layers (per-layer scaling). docs/parallel.md has the figures.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import tempfile
import time

# JAX and PyTorch share the GPU in one process: JAX allocates on demand, not 75% up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlab import aot, parallel, results
from jaxlab.models import hf, zoo
from jaxlab.models.decoder import REMAT_POLICIES, Decoder, DecoderConfig
from jaxlab.rl import losses, train
from jaxlab.timing import best_of

# cpu: a small Qwen3 in float32; gpu: the released Qwen3-0.6B shape, float32 master weights and
# bfloat16 compute. `tolerance`: the relative gap allowed between the two sides' first steps.
SIZES = {
    "cpu": dict(size="tiny", compute="float32", batch=8, seq=256, tolerance=1e-4,
                overrides=dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                               vocab_size=8192)),
    "gpu": dict(size="released", compute="bfloat16", batch=8, seq=1024, tolerance=2e-2,
                overrides={}),
}
CONFIG = train.TrainConfig(
    optimizer=train.OptimizerConfig(learning_rate=1e-5, weight_decay=0.0, max_grad_norm=1.0),
    loss=losses.PolicyLossConfig(clip_low=0.2, clip_high=0.2))
TEMPERATURE = 1.0
# Dense bfloat16 tensor-core peaks (TFLOP/s, without sparsity) from the vendors' data sheets:
# H100 SXM and H200 989.4, A100 312. The MFU of a step is 6 x parameters x tokens/s / peak
# (attention scores and the embedding lookup are not counted).
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
REPEATS = 5  # each timing is the fastest of this many steps after a warm-up, on both sides


def make_batch(graphdef, params, batch: int, seq: int, vocab: int) -> train.PolicyBatch:
    """Random sequences: a prompt quarter, then responses of random lengths (right padding is
    attended but not trained); old_logp = the model's log-probs + noise, so that some ratios
    fall outside the clip range; advantages ~ N(0.5, 1)."""
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, vocab, (batch, seq)), jnp.int32)           # [B, T]
    ends = rng.integers(seq // 2, seq + 1, batch)                                    # [B]
    t = np.arange(seq)
    loss_mask = (t >= seq // 4) & (t < ends[:, None])                               # [B, T]
    logp = train.policy_logprobs(graphdef, params, tokens, temperature=TEMPERATURE,
                                 chunk=CONFIG.logprob_chunk)                         # [B, T]
    noise = jnp.asarray(rng.normal(0, 0.1, tokens.shape), jnp.float32)
    return train.PolicyBatch(tokens=tokens, mask=jnp.ones(tokens.shape, jnp.int32),
                             loss_mask=jnp.asarray(loss_mask, jnp.float32),
                             old_logp=(logp + noise) * loss_mask, ref_logp=logp * loss_mask,
                             advantages=jnp.asarray(rng.normal(0.5, 1.0, batch), jnp.float32))


def bench_ours(model: Decoder, batch: train.PolicyBatch, repeats: int) -> dict:
    """First two steps' metrics, then seconds per step."""
    graphdef, state = train.init_train_state(model, CONFIG.optimizer, jax.random.key(0))
    mesh = parallel.single_device_mesh()
    box = {"state": state}

    def step():
        box["state"], metrics = train.train_step(box["state"], batch, graphdef=graphdef,
                                                 config=CONFIG, mesh=mesh,
                                                 temperature=TEMPERATURE)
        return metrics

    first, second = jax.device_get(step()), jax.device_get(step())
    _, seconds = best_of(step, repeats)
    return {"loss": float(first["loss"]), "grad_norm": float(first["grad_norm"]),
            "loss_2": float(second["loss"]), "seconds": seconds}


def bench_torch(path: pathlib.Path, batch: train.PolicyBatch, compute: str, repeats: int,
                threads: int) -> dict:
    """The same step as a user writes it in PyTorch eager: transformers' model, log_softmax of
    the full [B, T, V] logits, the same PPO-clip token mean, clip_grad_norm_, AdamW."""
    import torch
    import transformers

    torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=CONFIG.optimizer.learning_rate,
                                  betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=CONFIG.optimizer.weight_decay)
    b = {k: torch.from_numpy(np.array(v)).to(device) for k, v in batch._asdict().items()}
    ids, attention = b["tokens"].long(), b["mask"].long()
    targets, mask = ids[:, 1:], b["loss_mask"][:, 1:]                        # [B, T-1]
    old, adv = b["old_logp"][:, 1:], b["advantages"][:, None]
    low, high = 1 - CONFIG.loss.clip_low, 1 + CONFIG.loss.clip_high

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=compute == "bfloat16"):
            logits = model(input_ids=ids[:, :-1], attention_mask=attention[:, :-1]).logits
        logp_all = torch.log_softmax(logits.float() / TEMPERATURE, dim=-1)  # [B, T-1, V]
        logp = logp_all.gather(-1, targets[..., None])[..., 0]
        ratio = torch.exp(logp - old)
        per_token = -torch.minimum(ratio * adv, torch.clamp(ratio, low, high) * adv)
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
        with torch.no_grad():  # reported, as by our step
            entropy = -(logp_all.exp() * logp_all).sum(-1)
            entropy = (entropy * mask).sum() / mask.sum().clamp(min=1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CONFIG.optimizer.max_grad_norm)
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        return float(loss.detach()), float(norm), float(entropy)

    first, second = step(), step()
    _, seconds = best_of(step, repeats)
    return {"loss": first[0], "grad_norm": first[1], "loss_2": second[0], "seconds": seconds,
            "device": device, "threads": threads}


def check_agreement(ours: dict, theirs: dict, tolerance: float) -> dict:
    """Relative gaps of the first steps; raises if a loss's exceeds `tolerance`."""
    gaps = {k: abs(ours[k] - theirs[k]) / max(abs(theirs[k]), 1e-12)
            for k in ("loss", "grad_norm", "loss_2")}
    # The gradient norm sums ~1e7 squares in another order on each side: 10x the losses' bound.
    allowed = {"loss": tolerance, "grad_norm": 10 * tolerance, "loss_2": tolerance}
    bad = {k: (ours[k], theirs[k]) for k, gap in gaps.items() if gap > allowed[k]}
    if bad:
        raise RuntimeError(f"the two steps disagree beyond {tolerance:g} relative (ours, "
                           f"PyTorch): {bad}; nothing was timed")
    return gaps


def peak_flops(device_kind: str) -> float | None:
    return next((v * 1e12 for k, v in PEAK_BF16_TFLOPS.items() if k in device_kind), None)


def speed(name: str, repeats: int, threads: list[int], out: pathlib.Path) -> None:
    """Times both sides; PyTorch on a CPU once per thread count in `threads`, the fastest being
    the baseline (on a busy CPU one thread can beat one per core: spinning OpenMP workers)."""
    size = SIZES[name]
    if name == "gpu" and jax.default_backend() != "gpu":
        config = DecoderConfig.from_hf(zoo.hf_config("qwen3", size["size"], **size["overrides"]),
                                       param_dtype="float32", compute_dtype=size["compute"])
        print(f"--size gpu needs a GPU (JAX backend: {jax.default_backend()}); built its config "
              f"({config.num_layers} layers, width {config.hidden_size}, {config.compute_dtype} "
              f"compute, batch {size['batch']} x {size['seq']}); skipped")
        return
    import torch

    threads = threads[:1] if torch.cuda.is_available() else threads
    tokens = size["batch"] * size["seq"]
    with tempfile.TemporaryDirectory() as folder:
        path = zoo.create("qwen3", folder, size=size["size"], param_dtype="float32",
                          **size["overrides"])
        model = hf.load_pretrained(path, param_dtype="float32", compute_dtype=size["compute"])
        params = nnx.state(model, nnx.Param)
        num_params = sum(x.size for x in jax.tree.leaves(params))
        batch = make_batch(*nnx.split(model), size["batch"], size["seq"],
                           model.config.vocab_size)
        ours = bench_ours(model, batch, repeats)
        del model, params
        runs, gaps = {}, {}
        for n in threads:
            runs[n] = bench_torch(path, batch, size["compute"], repeats, n)
            gaps[n] = check_agreement(ours, runs[n], size["tolerance"])
    best = min(runs, key=lambda n: runs[n]["seconds"])
    device = jax.devices()[0].device_kind
    rate, rate_torch = tokens / ours["seconds"], tokens / runs[best]["seconds"]
    record = {"size": name, "device": device, "backend": jax.default_backend(),
              "params": num_params, "batch": size["batch"], "seq": size["seq"],
              "compute_dtype": size["compute"], "repeats": repeats, "config": repr(CONFIG),
              "ours": ours, "torch_by_threads": runs, "torch_threads": best,
              "relative_gaps": gaps[best], "ours_tokens_per_s": rate,
              "torch_tokens_per_s": rate_torch, "ratio": rate / rate_torch}
    peak = peak_flops(device) if jax.default_backend() == "gpu" else None
    if peak:
        record.update(peak_flops=peak, mfu_ours=6 * num_params * rate / peak,
                      mfu_torch=6 * num_params * rate_torch / peak)
    print(f"policy step, Qwen3 {name} size ({num_params / 1e6:.1f}M parameters, "
          f"{size['compute']} compute, float32 master weights), batch {size['batch']} x "
          f"{size['seq']} tokens, on {device}; PyTorch on {runs[best]['device']}")
    print("first steps agree (relative gap): " + ", ".join(f"{k} {v:.1e}"
                                                           for k, v in gaps[best].items()))
    print(f"{'':34s} {'ms/step':>9s} {'tokens/s':>10s} {'ratio':>6s}" + (
        f" {'MFU':>6s}" if peak else ""))
    rows = [("jaxlab train_step (jit)", ours["seconds"])] + [
        (f"PyTorch eager, {n} thread(s)" if runs[n]["device"] == "cpu" else "PyTorch eager",
         runs[n]["seconds"]) for n in runs]
    for label, s in rows:
        r = tokens / s
        print(f"{label:34s} {1000 * s:9.1f} {r:10.0f} {r / rate_torch:5.2f}x" + (
            f" {100 * 6 * num_params * r / peak:5.1f}%" if peak else ""))
    print("(ratio: tokens/s over the fastest PyTorch row's)")
    results.write_json(out, record)
    print(f"wrote {out}")


# --------------------------------------------------------------------------------------------
# Compiled memory, nothing allocated


def step_memory(config: DecoderConfig, train_config: train.TrainConfig, batch: int,
                seq: int, mesh: jax.sharding.Mesh | None = None) -> dict:
    """Bytes per device of the compiled step (`memory_analysis`) on the default backend, on
    `mesh` (default: one device), and the seconds lowering and compiling took."""
    mesh = mesh or parallel.single_device_mesh()
    graphdef, state, policy_batch = aot.abstract_train_inputs(config, train_config, batch,
                                                               seq, mesh)
    start = time.perf_counter()
    compiled = train.train_step.lower(state, policy_batch, graphdef=graphdef,
                                      config=train_config, mesh=mesh,
                                      temperature=TEMPERATURE).compile()
    seconds = time.perf_counter() - start
    analysis = compiled.memory_analysis()
    fields = ("temp", "argument", "output", "alias", "generated_code")
    out = {f: int(getattr(analysis, f"{f}_size_in_bytes")) for f in fields}
    peak = getattr(analysis, "peak_memory_in_bytes", None)
    out["peak"] = int(peak) if peak else None
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    out["compile_seconds"] = seconds
    return out


def qwen3_config(model: str, layers: int | None = None) -> DecoderConfig:
    """The released Qwen3 shape `model` (a key of `zoo.QWEN3_SIZES`), optionally with `layers`
    layers, float32 master weights and bfloat16 compute."""
    layers = {} if layers is None else dict(num_hidden_layers=layers)
    return zoo.qwen3(model, param_dtype="float32", compute_dtype="bfloat16", **layers)


def memory(batch: int, seq: int, out: pathlib.Path, *, model: str = "0.6B",
           remats: list[str] | None = None, fsdp: int = 1, layers: int | None = None) -> None:
    """Compiled memory of the step. Without `remats`: the head-chunking rows (logprob_chunk
    512, one chunk, 512 in B micro-batches), no remat; with `remats`: logprob_chunk 512, one
    row per remat policy. On one device, or split over an fsdp mesh of `fsdp` devices."""
    config = qwen3_config(model, layers)
    num_params = sum(x.size for x in jax.tree.leaves(
        nnx.state(nnx.eval_shape(lambda: Decoder(config, nnx.Rngs(0))), nnx.Param)))
    if fsdp > 1:
        if jax.device_count() < fsdp:
            raise SystemExit(f"--memory-fsdp {fsdp} needs {fsdp} devices, {jax.device_count()} "
                             f"present (on a CPU: XLA_FLAGS=--xla_force_host_platform_device_"
                             f"count={fsdp})")
        mesh = parallel.make_train_mesh(fsdp=fsdp, devices=jax.devices()[:fsdp])
    else:
        mesh = parallel.single_device_mesh()
    per_device = batch // fsdp
    logits_bytes = per_device * seq * config.vocab_size * 4
    scores_bytes = per_device * config.num_heads * seq * seq * 4
    gib = 2 ** 30
    combos = ([(512, 1, "none"), (seq, 1, "none"), (512, batch, "none")] if not remats
              else [(512, 1, r) for r in remats])
    rows = {}
    for chunk, micro, remat in combos:
        train_config = train.TrainConfig(logprob_chunk=chunk, microbatches=micro, remat=remat)
        rows[chunk, micro, remat] = step_memory(config, train_config, batch, seq, mesh)
        print(f"logprob_chunk {chunk}, microbatches {micro}, remat {remat}: compiled in "
              f"{rows[chunk, micro, remat]['compile_seconds']:.0f} s", flush=True)
    device = jax.devices()[0].device_kind
    print(f"train_step memory per device (compiled, nothing allocated), Qwen3-{model} shape "
          f"({config.num_layers} layers, {num_params / 1e6:.0f}M parameters), float32 master "
          f"weights + AdamW, bfloat16 compute, batch {batch} x {seq}, on {mesh.size} "
          f"{device} device(s) ({jax.default_backend()}, mesh {dict(mesh.shape)})")
    print(f"per device: one [B, T, V] float32 array: {logits_bytes / gib:.2f} GiB; one layer's "
          f"attention scores [B, H, T, T] float32: {scores_bytes / gib:.2f} GiB")
    print(f"{'logprob_chunk':>14s} {'microbatches':>12s} {'remat':>6s} {'temp':>8s} "
          f"{'argument':>8s} {'output':>8s} {'alias':>8s} {'arg+out-alias+temp':>18s} "
          f"{'peak*':>7s}  (GiB)")
    for (chunk, micro, remat), r in rows.items():
        peak = "n/a" if r["peak"] is None else f"{r['peak'] / gib:.2f}"
        label = f"{chunk}" + (" (1 chunk)" if chunk >= seq else "")
        print(f"{label:>14s} {micro:12d} {remat:>6s} {r['temp'] / gib:8.2f} "
              f"{r['argument'] / gib:8.2f} {r['output'] / gib:8.2f} {r['alias'] / gib:8.2f} "
              f"{r['total'] / gib:18.2f} {peak:>7s}")
    print("* peak_memory_in_bytes as the backend reports it")
    if not remats:
        saved = rows[seq, 1, "none"]["temp"] - rows[512, 1, "none"]["temp"]
        print(f"chunking the head saves {saved / gib:.2f} GiB of temporaries "
              f"({saved / logits_bytes:.2f} x one [B, T, V] float32 array)")
    results.write_json(out, {"device": device, "backend": jax.default_backend(),
                             "model": f"Qwen3-{model}", "layers": config.num_layers,
                             "mesh": dict(mesh.shape), "params": num_params, "batch": batch,
                             "seq": seq, "bytes_one_btv_float32_per_device": logits_bytes,
                             "bytes_one_layer_scores_float32_per_device": scores_bytes,
                             "rows": [{"logprob_chunk": c, "microbatches": m, "remat": r, **v}
                                      for (c, m, r), v in rows.items()]})
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default=None,
                        help="model size (default: gpu on a GPU, else cpu)")
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--torch-threads", type=int, nargs="+", default=None,
                        help="PyTorch CPU thread counts to try (default: one per core, and 1)")
    parser.add_argument("--memory", action="store_true",
                        help="compiled memory of the Qwen3-0.6B step instead of speed")
    parser.add_argument("--memory-batch", type=int, default=8)
    parser.add_argument("--memory-seq", type=int, default=4096)
    parser.add_argument("--memory-model", default="0.6B", choices=list(zoo.QWEN3_SIZES),
                        help="the Qwen3 shape of --memory")
    parser.add_argument("--memory-layers", type=int, default=None,
                        help="--memory with this many layers instead of the model's")
    parser.add_argument("--memory-fsdp", type=int, default=1,
                        help="--memory per device of an fsdp mesh of this many devices")
    parser.add_argument("--remat", nargs="+", default=None, choices=list(REMAT_POLICIES),
                        help="--memory: one row per decoder-layer remat policy")
    parser.add_argument("--out", default=None, help="JSON file (default: "
                        "results/bench_train_step/<size>.json or memory.json)")
    args = parser.parse_args()
    if args.memory:
        memory(args.memory_batch, args.memory_seq,
               pathlib.Path(args.out or "results/bench_train_step/memory.json"),
               model=args.memory_model, remats=args.remat, fsdp=args.memory_fsdp,
               layers=args.memory_layers)
        return
    name = args.size or ("gpu" if jax.default_backend() == "gpu" else "cpu")
    cores = len(os.sched_getaffinity(0))
    threads = sorted(set(args.torch_threads or [cores, 1]), reverse=True)
    speed(name, args.repeats, threads,
          pathlib.Path(args.out or f"results/bench_train_step/{name}.json"))


if __name__ == "__main__":
    main()
