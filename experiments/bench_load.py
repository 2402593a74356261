"""Checkpoint loading: our `load_pretrained` against transformers' `from_pretrained`; bf16 error.

    python experiments/bench_load.py [--checkpoint DIR] [--repeats N] [--out FILE]

Loading. A Qwen3-0.6B-shaped checkpoint (random weights, one model.safetensors, bfloat16 like the
released model unless --checkpoint-dtype says otherwise) is written once by `zoo.create` to DIR and
reused when present. Each load runs in a fresh Python process on the CPU, so that peaks are
independent:
  ours:          jaxlab.models.hf.load_pretrained(DIR, param_dtype=...)
  transformers:  AutoModelForCausalLM.from_pretrained(DIR, dtype=...)
with bfloat16 and with float32 parameters. Measured inside that process, after its imports:
  call s     the loading call;
  ready s    the call, then until every weight is in memory: ours waits for its arrays;
             transformers keeps tensors already in the file's dtype memory-mapped and reads them
             from the file on first use, so one byte of every page of every parameter is read;
  peak       the high-water mark of the resident set over both (reset through
             /proc/self/clear_refs, read from VmHWM) minus the resident set just before the call;
  held       the resident set once ready, minus the same baseline; file-mapped is the part of it
             that maps the checkpoint's pages (shared with the page cache).
The checkpoint files are read once beforehand, so every load finds them in the page cache
(warm-cache times; a load from a cold disk adds the disk read to both). Repeats alternate the
loaders; reported are the fastest times, the largest memory figures, and the ratios
ours / transformers of ready time and peak (< 1: ours is faster or smaller).

bfloat16 error. On the tiny zoo checkpoint of each family (float32, random weights), the max abs
difference between the logits of the bfloat16 and the float32 model on the same random tokens, for
ours and, as a reference point, for transformers; ours vs transformers in float32 checks that both
sides compute the same function.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

from jaxlab import results

DTYPES = ("bfloat16", "float32")
LOADERS = ("ours", "transformers")
DEFAULT_CHECKPOINT = pathlib.Path(tempfile.gettempdir()) / "jaxlab_bench_load"
TOKENS_SHAPE = (2, 32)  # [batch, time] of the random tokens of the bfloat16 error table
MIB = 1024 * 1024
# How repeated runs are summarized: the fastest times, the largest memory figures.
SUMMARY = {"call_s": min, "ready_s": min, "import_s": min, "peak_mib": max, "held_mib": max,
           "mapped_mib": max, "baseline_mib": max}


# ---------------------------------------------------------------- one load, in its own process

def _ours():
    """Imports our loader; returns (load(path, dtype) -> model, ready(model) -> parameters)."""
    import jax
    from flax import nnx

    from jaxlab.models import hf

    def ready(model) -> int:
        """Waits for every parameter (they are in memory once computed) and counts them."""
        params = jax.block_until_ready(jax.tree.leaves(nnx.state(model, nnx.Param)))
        return sum(int(p.size) for p in params)

    return (lambda path, dtype: hf.load_pretrained(path, param_dtype=dtype)), ready


def _transformers():
    """Imports transformers' loader; returns (load(path, dtype) -> model, ready(model) ->
    parameters)."""
    import torch
    from transformers import AutoModelForCausalLM

    def ready(model) -> int:
        """Reads one byte of every 4 KiB page of every parameter and counts them: parameters kept
        in the file's dtype stay memory-mapped, and are read from the file only when first used."""
        for p in model.parameters():
            int(p.detach().reshape(-1).view(torch.uint8)[::4096].sum())
        return sum(p.numel() for p in model.parameters())

    def load(path, dtype):
        return AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))

    return load, ready


def _status_mib() -> dict[str, float]:
    """The memory fields of /proc/self/status (VmRSS, VmHWM, RssAnon, RssFile, ...) in MiB."""
    fields = {}
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if value.strip().endswith(" kB"):
            fields[name] = int(value.split()[0]) / 1024
    return fields


def measure(loader: str, dtype: str, path: str) -> dict:
    """Seconds and host memory (MiB above the post-import baseline) of one load in this process.

    call_s: the loading call; ready_s: the call and `ready` (every weight in memory). peak_mib: the
    high-water mark of the resident set during both; held_mib: the resident set after them, of
    which mapped_mib is file-backed (pages of the checkpoint mapped into the process).
    """
    start = time.perf_counter()
    load, ready = {"ours": _ours, "transformers": _transformers}[loader]()
    import_s = time.perf_counter() - start
    before = _status_mib()
    pathlib.Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    start = time.perf_counter()
    model = load(path, dtype)
    call_s = time.perf_counter() - start
    num_params = ready(model)
    ready_s = time.perf_counter() - start
    after = _status_mib()
    return {"call_s": call_s, "ready_s": ready_s, "peak_mib": after["VmHWM"] - before["VmRSS"],
            "held_mib": after["VmRSS"] - before["VmRSS"],
            "mapped_mib": after["RssFile"] - before["RssFile"], "baseline_mib": before["VmRSS"],
            "import_s": import_s, "params": num_params}


# ---------------------------------------------------------------- the loading benchmark

def ensure_checkpoint(folder: pathlib.Path, dtype: str) -> pathlib.Path:
    """The checkpoint in `folder`, or a Qwen3-0.6B-shaped one written there first if the folder
    has none (atomically, so an interrupted run never leaves a partial checkpoint to reuse)."""
    if (folder / "config.json").is_file():
        print(f"reusing the checkpoint in {folder}", flush=True)
        return folder
    from jaxlab.models import zoo

    partial = folder.with_name(folder.name + ".partial")
    print(f"writing a Qwen3-0.6B-shaped {dtype} checkpoint to {folder} ...", flush=True)
    zoo.create("qwen3", partial, size="released", param_dtype=dtype)
    partial.rename(folder)
    return folder


def read_once(folder: pathlib.Path) -> tuple[int, float]:
    """Reads every file of `folder` once, so the timed loads find them in the page cache;
    returns (bytes, seconds)."""
    total, start = 0, time.perf_counter()
    for file in sorted(folder.iterdir()):
        with file.open("rb") as f:
            while chunk := f.read(64 * MIB):
                total += len(chunk)
    return total, time.perf_counter() - start


def run_isolated(loader: str, path: pathlib.Path, dtype: str) -> dict:
    """`measure` in a fresh Python process (JAX on the CPU); its record."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, __file__, "--measure", loader, dtype, str(path)],
                          capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"loading with {loader} ({dtype}) failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_loading(path: pathlib.Path, repeats: int) -> list[dict]:
    """Every loader and dtype `repeats` times, alternating; one summary row per loader and dtype
    (fastest times, largest memory figures) with every run's record."""
    runs = {(loader, dtype): [] for dtype in DTYPES for loader in LOADERS}
    for repeat in range(repeats):
        for (loader, dtype), records in runs.items():
            record = run_isolated(loader, path, dtype)
            records.append(record)
            print(f"  [{repeat + 1}/{repeats}] {loader:12s} {dtype:8s} ready in "
                  f"{record['ready_s']:5.2f} s, peak +{record['peak_mib']:.0f} MiB", flush=True)
    rows = [{"loader": loader, "dtype": dtype,
             **{key: best(r[key] for r in records) for key, best in SUMMARY.items()},
             "params": records[0]["params"], "runs": records}
            for (loader, dtype), records in runs.items()]
    params = {row["params"] for row in rows}
    if len(params) != 1:
        raise RuntimeError(f"the loaders disagree on the number of parameters: {params}")
    return rows


def ratios(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per dtype: ours / transformers for the time until ready and the peak memory."""
    by_key = {(row["loader"], row["dtype"]): row for row in rows}
    return {dtype: {key: by_key["ours", dtype][key] / by_key["transformers", dtype][key]
                    for key in ("ready_s", "peak_mib")} for dtype in DTYPES}


def print_loading(rows: list[dict], file_bytes: int, checkpoint_dtype: str, repeats: int) -> None:
    ratio = ratios(rows)
    print(f"\nloading a Qwen3-0.6B-shaped checkpoint ({rows[0]['params'] / 1e6:.1f}M parameters, "
          f"{file_bytes / 1e9:.2f} GB of {checkpoint_dtype} safetensors) on the CPU, warm page "
          f"cache, best of {repeats}; ready = every weight in memory; x = ours / transformers")
    print(f"{'loader':13s} {'dtype':9s} {'call s':>7s} {'ready s':>8s} {'x':>6s} "
          f"{'peak +MiB':>10s} {'x':>6s} {'held +MiB':>10s} {'file-mapped':>12s}")
    for row in rows:
        ours = row["loader"] == "ours"
        time_x, peak_x = ((f"{ratio[row['dtype']][key]:6.2f}" if ours else f"{'':6s}")
                          for key in ("ready_s", "peak_mib"))
        print(f"{row['loader']:13s} {row['dtype']:9s} {row['call_s']:7.2f} {row['ready_s']:8.2f} "
              f"{time_x} {row['peak_mib']:10.0f} {peak_x} {row['held_mib']:10.0f} "
              f"{row['mapped_mib']:12.0f}")


# ---------------------------------------------------------------- bfloat16 logit error

def _torch_logits(path: pathlib.Path, dtype: str, ids: np.ndarray) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(ids)).logits.float().numpy()


def logit_errors(root: pathlib.Path) -> list[dict]:
    """Per family: max |logit| and max abs logit differences, bf16 vs fp32 and ours vs theirs."""
    import jax.numpy as jnp

    from jaxlab.models import hf, zoo

    rows = []
    for family in zoo.RELEASED:
        path = zoo.create(family, root / family)
        vocab = hf.load_decoder_config(path).vocab_size
        ids = np.random.default_rng(0).integers(0, vocab, TOKENS_SHAPE)
        ours = {d: np.asarray(hf.load_pretrained(path, param_dtype=d)(jnp.asarray(ids)))
                for d in DTYPES}
        theirs = {d: _torch_logits(path, d, ids) for d in DTYPES}
        rows.append({"family": family, "max_abs_logit": float(np.abs(ours["float32"]).max()),
                     "ours_bf16_vs_fp32": _max_diff(ours["bfloat16"], ours["float32"]),
                     "transformers_bf16_vs_fp32": _max_diff(theirs["bfloat16"],
                                                            theirs["float32"]),
                     "ours_vs_transformers_fp32": _max_diff(ours["float32"], theirs["float32"])})
    return rows


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max())


def print_errors(rows: list[dict]) -> None:
    print(f"\nbfloat16 vs float32 logits, tiny zoo checkpoints, random tokens "
          f"{list(TOKENS_SHAPE)}: max abs difference")
    print(f"{'family':8s} {'max |logit|':>12s} {'ours bf16':>10s} {'transformers bf16':>18s} "
          f"{'ours vs transformers fp32':>26s}")
    for row in rows:
        print(f"{row['family']:8s} {row['max_abs_logit']:12.3f} {row['ours_bf16_vs_fp32']:10.2e} "
              f"{row['transformers_bf16_vs_fp32']:18.2e} "
              f"{row['ours_vs_transformers_fp32']:26.2e}")


# ---------------------------------------------------------------- entry point

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=pathlib.Path, default=None,
                        help=f"checkpoint folder, created if absent (default: "
                             f"{DEFAULT_CHECKPOINT}/qwen3-0.6b-<dtype>)")
    parser.add_argument("--checkpoint-dtype", choices=DTYPES, default="bfloat16",
                        help="dtype the checkpoint's tensors are stored in")
    parser.add_argument("--repeats", type=int, default=2, help="loads per loader and dtype")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("results/bench_load.json"))
    parser.add_argument("--measure", nargs=3, metavar=("LOADER", "DTYPE", "PATH"),
                        help=argparse.SUPPRESS)  # one load in this process (used internally)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return

    folder = args.checkpoint or DEFAULT_CHECKPOINT / f"qwen3-0.6b-{args.checkpoint_dtype}"
    path = ensure_checkpoint(folder, args.checkpoint_dtype)
    file_bytes, read_s = read_once(path)
    print(f"read {file_bytes / 1e9:.2f} GB of checkpoint files once in {read_s:.1f} s "
          f"(page cache now warm)", flush=True)
    loading = bench_loading(path, args.repeats)
    with tempfile.TemporaryDirectory() as root:
        errors = logit_errors(pathlib.Path(root))
    print_loading(loading, file_bytes, args.checkpoint_dtype, args.repeats)
    print_errors(errors)

    record = {"checkpoint": str(path), "checkpoint_dtype": args.checkpoint_dtype,
              "checkpoint_bytes": file_bytes, "warm_read_s": read_s, "repeats": args.repeats,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
              "loading": loading, "ratios_ours_over_transformers": ratios(loading),
              "bf16_logit_error": errors}
    results.write_json(args.out, record)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
