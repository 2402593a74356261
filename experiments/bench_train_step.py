"""Policy-gradient step speed: our jitted step against a plain PyTorch step of the same loss.

    python experiments/bench_train_step.py [--size cpu|gpu] [--steps N] [--out FILE]

Both sides train the same small causal transformer (pre-LayerNorm blocks of causal multi-head
attention and a GELU MLP, float32) on the same batch with the same loss: token-level PPO-clip
(epsilon 0.2) + 0.05 x k3 KL to a reference policy, entropy reported, global-norm clipping at 1
and AdamW. The PyTorch model starts from our weights, and the first-step losses are compared
before anything is timed. Reported: trained tokens per second (batch x sequence length per step)
and the ratio ours / PyTorch; on a GPU also the model FLOP utilization (MFU) of our step.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlab import parallel, results
from jaxlab.rl import losses, train


@dataclasses.dataclass(frozen=True)
class Shape:
    batch: int
    seq: int
    vocab: int
    width: int
    layers: int
    heads: int


SIZES = {
    "cpu": Shape(batch=16, seq=128, vocab=512, width=128, layers=2, heads=4),
    "gpu": Shape(batch=64, seq=512, vocab=32_768, width=1024, layers=8, heads=16),
}
CONFIG = train.TrainConfig(learning_rate=1e-4, max_grad_norm=1.0,
                           loss=losses.PolicyLossConfig(kl_coef=0.05, kl_estimator="k3"))
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 tensor-core peaks


class Block(nnx.Module):
    def __init__(self, width: int, heads: int, rngs: nnx.Rngs):
        self.heads = heads
        self.ln1 = nnx.LayerNorm(width, rngs=rngs)
        self.qkv = nnx.Linear(width, 3 * width, rngs=rngs)
        self.proj = nnx.Linear(width, width, rngs=rngs)
        self.ln2 = nnx.LayerNorm(width, rngs=rngs)
        self.up = nnx.Linear(width, 4 * width, rngs=rngs)
        self.down = nnx.Linear(4 * width, width, rngs=rngs)

    def __call__(self, x):                                               # [B, T, D]
        b, t, d = x.shape
        q, k, v = jnp.split(self.qkv(self.ln1(x)), 3, axis=-1)
        q, k, v = (y.reshape(b, t, self.heads, d // self.heads) for y in (q, k, v))
        attended = jax.nn.dot_product_attention(q, k, v, is_causal=True)  # [B, T, H, D/H]
        x = x + self.proj(attended.reshape(b, t, d))
        return x + self.down(jax.nn.gelu(self.up(self.ln2(x))))


class TransformerLM(nnx.Module):
    def __init__(self, shape: Shape, rngs: nnx.Rngs):
        self.embed = nnx.Embed(shape.vocab, shape.width, rngs=rngs)
        self.blocks = nnx.List([Block(shape.width, shape.heads, rngs) for _ in range(shape.layers)])
        self.ln_f = nnx.LayerNorm(shape.width, rngs=rngs)
        self.unembed = nnx.Linear(shape.width, shape.vocab, rngs=rngs)

    def __call__(self, tokens):                                          # [B, T] -> [B, T, V]
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.unembed(self.ln_f(x))


def make_batch(graphdef, params, shape: Shape) -> train.PolicyBatch:
    """Random sequences: a prompt quarter, then response tokens with advantages of +-1."""
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, shape.vocab, (shape.batch, shape.seq)), jnp.int32)
    mask = jnp.broadcast_to(jnp.arange(shape.seq) >= shape.seq // 4, tokens.shape)
    logp = train.policy_logprobs(graphdef, params, tokens)
    noise = jnp.asarray(rng.normal(0, 0.1, (2, *tokens.shape)), jnp.float32)
    return train.PolicyBatch(tokens=tokens, loss_mask=mask.astype(jnp.float32),
                             old_logp=logp + noise[0], ref_logp=logp + noise[1],
                             advantages=jnp.asarray(rng.choice([-1.0, 1.0], shape.batch),
                                                    jnp.float32))


def flops_per_step(shape: Shape, num_params: int) -> float:
    """Training FLOPs: 6 per parameter per token (embedding lookups excluded) plus attention
    scores and values, 12 x layers x T x D per token (forward + backward, no causal saving)."""
    tokens = shape.batch * shape.seq
    dense = num_params - shape.vocab * shape.width
    return tokens * (6 * dense + 12 * shape.layers * shape.seq * shape.width)


def bench_ours(shape: Shape, steps: int):
    """(tokens/s, first-step loss, parameters as NumPy, batch, parameter count)."""
    graphdef, state = train.init_train_state(TransformerLM(shape, nnx.Rngs(0)), CONFIG,
                                             jax.random.key(0))
    weights = jax.device_get(state.params)
    batch = make_batch(graphdef, state.params, shape)
    mesh = parallel.single_device_mesh()
    step = lambda s: train.train_step(s, batch, graphdef=graphdef, config=CONFIG, mesh=mesh)
    state, metrics = step(state)  # compiles
    first_loss = float(metrics["loss"])
    state, _ = step(state)
    jax.block_until_ready(state)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state)
    jax.block_until_ready(state)
    rate = steps * shape.batch * shape.seq / (time.perf_counter() - start)
    num_params = sum(x.size for x in jax.tree.leaves(weights))
    return rate, first_loss, weights, batch, num_params


def torch_names(params) -> dict[str, np.ndarray]:
    """Our parameters under PyTorch's names; a Flax kernel [in, out] is a torch weight [out, in]."""
    named = {}
    for path, value in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(params)):
        *module, leaf = (str(key.key) for key in path)
        suffix = "bias" if leaf == "bias" else "weight"
        named[".".join([*module, suffix])] = np.array(value.T if leaf == "kernel" else value)
    return named


def bench_torch(shape: Shape, steps: int, weights, batch: train.PolicyBatch, threads: int):
    """(tokens/s, first-step loss, device) of the same model, weights, batch and loss, with
    `threads` CPU threads."""
    import torch
    import torch.nn.functional as F

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(threads)

    class TorchBlock(torch.nn.Module):
        def __init__(self):
            super().__init__()
            d = shape.width
            self.ln1, self.ln2 = torch.nn.LayerNorm(d, eps=1e-6), torch.nn.LayerNorm(d, eps=1e-6)
            self.qkv, self.proj = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)
            self.up, self.down = torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)

        def forward(self, x):
            b, t, d = x.shape
            q, k, v = (y.reshape(b, t, shape.heads, -1).transpose(1, 2)
                       for y in self.qkv(self.ln1(x)).chunk(3, dim=-1))
            attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.proj(attended.transpose(1, 2).reshape(b, t, d))
            return x + self.down(F.gelu(self.up(self.ln2(x)), approximate="tanh"))

    class TorchLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(shape.vocab, shape.width)
            self.blocks = torch.nn.ModuleList(TorchBlock() for _ in range(shape.layers))
            self.ln_f = torch.nn.LayerNorm(shape.width, eps=1e-6)
            self.unembed = torch.nn.Linear(shape.width, shape.vocab)

        def forward(self, tokens):
            x = self.embed(tokens)
            for block in self.blocks:
                x = block(x)
            return self.unembed(self.ln_f(x))

    model = TorchLM()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in torch_names(weights).items()})
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=CONFIG.learning_rate,
                                  weight_decay=CONFIG.weight_decay, eps=1e-8)
    b = {k: torch.from_numpy(np.array(v)).to(device) for k, v in batch._asdict().items()}
    targets, mask = b["tokens"][:, 1:].long(), b["loss_mask"][:, 1:]
    old, ref, adv = b["old_logp"][:, 1:], b["ref_logp"][:, 1:], b["advantages"][:, None]
    clip, kl_coef = CONFIG.loss.clip_low, CONFIG.loss.kl_coef

    def step():
        logits = model(b["tokens"][:, :-1].long())
        logp_all = torch.log_softmax(logits.float(), dim=-1)
        logp = logp_all.gather(-1, targets[..., None])[..., 0]
        ratio = torch.exp(logp - old)
        ppo = -torch.minimum(ratio * adv, torch.clamp(ratio, 1 - clip, 1 + clip) * adv)
        d = ref - logp
        per_token = ppo + kl_coef * (torch.expm1(d) - d)
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
        with torch.no_grad():  # reported, as by our step
            entropy = -(logp_all.exp() * logp_all).sum(-1)
            entropy = (entropy * mask).sum() / mask.sum().clamp(min=1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CONFIG.max_grad_norm)
        optimizer.step()
        return loss.detach(), entropy

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    first_loss = float(step()[0])
    step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return steps * shape.batch * shape.seq / (time.perf_counter() - start), first_loss, device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES),
                        default="gpu" if jax.default_backend() == "gpu" else "cpu")
    parser.add_argument("--steps", type=int, default=10, help="timed steps, after two untimed")
    parser.add_argument("--out", default=None,
                        help="JSON file (default: results/bench_train_step/<size>.json)")
    args = parser.parse_args()
    shape = SIZES[args.size]
    out = pathlib.Path(args.out or f"results/bench_train_step/{args.size}.json")

    ours, our_loss, weights, batch, num_params = bench_ours(shape, args.steps)
    import torch

    # On a busy CPU PyTorch's default thread count can be several times slower than one thread
    # (spinning OpenMP workers); the baseline is the faster of the two.
    thread_counts = sorted({torch.get_num_threads(), 1})
    torch_runs = {n: bench_torch(shape, args.steps, weights, batch, n) for n in thread_counts}
    best_threads = max(torch_runs, key=lambda n: torch_runs[n][0])
    theirs, torch_loss, torch_device = torch_runs[best_threads]
    loss_gap = abs(our_loss - torch_loss) / max(abs(torch_loss), 1e-12)
    if loss_gap > 1e-3:
        raise RuntimeError(f"the two steps disagree: first-step loss {our_loss} (ours) vs "
                           f"{torch_loss} (PyTorch)")

    device = jax.devices()[0].device_kind
    record = {"shape": dataclasses.asdict(shape), "params": num_params, "steps": args.steps,
              "device": device, "backend": jax.default_backend(), "torch_device": torch_device,
              "ours_tokens_per_s": ours, "torch_tokens_per_s": theirs, "ratio": ours / theirs,
              "torch_threads": best_threads,
              "torch_tokens_per_s_by_threads": {n: r[0] for n, r in torch_runs.items()},
              "first_loss_ours": our_loss, "first_loss_torch": torch_loss}
    print(f"policy-gradient step, {num_params / 1e6:.2f}M parameters, batch {shape.batch} x "
          f"{shape.seq} tokens, {device} ({jax.default_backend()}); first-step losses agree to "
          f"{loss_gap:.1e}")
    print(f"{'':28s} {'tokens/s':>12s} {'vs PyTorch':>11s}")
    print(f"{'jaxlab train_step (jit)':28s} {ours:12.0f} {ours / theirs:10.2f}x")
    for n, (rate, _, _) in torch_runs.items():
        name = f"PyTorch eager, {n} thread(s)" if torch_device == "cpu" else "PyTorch eager"
        print(f"{name:28s} {rate:12.0f} {rate / theirs:10.2f}x")
    if jax.default_backend() == "gpu":
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in device), None)
        achieved = flops_per_step(shape, num_params) / (shape.batch * shape.seq) * ours / 1e12
        record.update(achieved_tflops=achieved, mfu=None if peak is None else achieved / peak)
        mfu = "unknown peak" if peak is None else f"MFU {achieved / peak:.1%} of {peak:g} TFLOP/s"
        print(f"our step: {achieved:.1f} TFLOP/s ({mfu}, float32 weights)")
    results.write_json(out, record)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
