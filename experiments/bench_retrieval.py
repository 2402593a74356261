"""Exact dense retrieval speed: 1000 queries over 50k embedded documents, top-100.

    python experiments/bench_retrieval.py [--docs 50000] [--queries 1000] [--dim 384] [--k 100]
                                          [--out bench_retrieval.json]

Ours: `retrieval.search` (chunked scores + lax.top_k, the corpus split over every device of the
process; on a CPU each core is a device). Baseline: NumPy, one float32 matmul and
argpartition + argsort of the top-k. Vectors are random unit rows (speed does not depend on their
values); the two rankings are compared. Times are the best of 3 after a warm-up call.
"""

from __future__ import annotations

import argparse
import pathlib

import jax
import numpy as np

from jaxlab import parallel, results
from jaxlab.limit import retrieval
from jaxlab.timing import best_of


def numpy_top_k(queries: np.ndarray, docs: np.ndarray, k: int) -> np.ndarray:
    scores = queries @ docs.T                                             # [m, n]
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]                  # [m, k] unordered
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
    return np.take_along_axis(top, order, axis=1)


def main() -> dict:
    parallel.cpu_cores_as_devices()  # before JAX starts its CPU backend
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=50_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--out", default="bench_retrieval.json")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    docs = unit(rng.normal(size=(args.docs, args.dim)))
    queries = unit(rng.normal(size=(args.queries, args.dim)))
    mesh = parallel.make_mesh(parallel.DATA)
    index = retrieval.build_index(docs, mesh)
    (_, ours), ours_seconds = best_of(lambda: retrieval.search(index, queries, args.k))
    theirs, numpy_seconds = best_of(lambda: numpy_top_k(queries, docs, args.k))
    report = {"docs": args.docs, "queries": args.queries, "dim": args.dim, "k": args.k,
              "devices": mesh.size, "platform": jax.devices()[0].platform,
              "jaxlab_seconds": ours_seconds, "numpy_seconds": numpy_seconds,
              "ratio_numpy_over_jaxlab": numpy_seconds / ours_seconds,
              "same_top_k": float(np.mean(ours == theirs))}
    print(f"{'search':>10} {'seconds':>9}\n{'jaxlab':>10} {ours_seconds:9.3f}\n"
          f"{'numpy':>10} {numpy_seconds:9.3f}\n"
          f"{args.queries} queries x {args.docs} docs, d={args.dim}, top-{args.k}, "
          f"{mesh.size} {report['platform']} device(s): jaxlab is "
          f"{report['ratio_numpy_over_jaxlab']:.2f}x NumPy; identical ids: "
          f"{100 * report['same_top_k']:.2f}%")
    results.write_json(pathlib.Path(args.out), report)
    return report


if __name__ == "__main__":
    main()
