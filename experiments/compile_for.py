"""Compile jaxlab's jobs for a TPU or GPU target on this machine (no accelerator needed): memory
per device against the chip's HBM, the Pallas kernel in the program, and on TPU a roofline.

    python experiments/compile_for.py --target tpu-v5e-8 --jobs decode,prefill,train,pallas \
        [--model qwen3-0.6b] [--out FILE] [size options, see --help]

Targets: jaxlab/targets.py (tpu-v5e-8, tpu-v6e-8, tpu-v5p-8, tpu-v5p-64, h100-8, h200-1); jobs
and what is reported: jaxlab/aot.py. Needs the `tpu` extra (libtpu) for TPU targets and the
`gpu-compile` extra (XLA's CUDA plugin, ptxas) for GPU targets. TPU compiles run on one thread:
a Qwen3-0.6B train step takes minutes. Writes JSON {"target", "devices", "jobs": {job: ...}}
and prints a table.
"""

from __future__ import annotations

import os

# Before JAX starts: the CPU is the only backend started here (the targets' compilers are
# reached through jax.experimental.topologies), and libtpu looks for no cloud metadata server.
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

import argparse
import dataclasses
import pathlib

from jaxlab import aot, results, targets


def parse_args() -> argparse.Namespace:
    defaults = aot.JobSizes()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, choices=sorted(targets.TARGETS))
    parser.add_argument("--jobs", default=",".join(aot.JOBS),
                        help=f"comma-separated, of {', '.join(aot.JOBS)} (default: all)")
    parser.add_argument("--out", default=None,
                        help="JSON file (default: results/compile_for/<target>-<model>.json)")
    for field in dataclasses.fields(aot.JobSizes):
        value = getattr(defaults, field.name)
        flag = "--" + field.name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, action="store_true")
        elif field.name == "model":
            parser.add_argument(flag, default=value,
                                choices=[f"qwen3-{s.lower()}" for s in aot.zoo.QWEN3_SIZES])
        elif field.name in ("decode_split", "remat"):
            parser.add_argument(flag, default=value)
        else:  # integers; None-default ones stay None unless given
            parser.add_argument(flag, type=int, default=value)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    sizes = aot.JobSizes(**{f.name: getattr(args, f.name)
                            for f in dataclasses.fields(aot.JobSizes)})
    jobs = [job.strip() for job in args.jobs.split(",") if job.strip()]

    def progress(job, record):
        state = "compiled" if record["compiled"] else f"failed ({record['error']})"
        seconds = record["compile_seconds"] or 0.0
        print(f"{args.target} {job}: {state} in {record['lower_seconds']:.1f} s lowering + "
              f"{seconds:.1f} s compiling", flush=True)

    result = aot.compile_for(args.target, jobs, sizes, progress)
    print(aot.table(result))
    out = pathlib.Path(args.out or f"results/compile_for/{args.target}-{sizes.model}.json")
    results.write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
