"""Evaluate retrievers on LIMIT-style datasets: BM25, MiniLM (also truncated), free embeddings.

    python experiments/limit_eval.py --config configs/limit_eval/small.yaml out_dir=DIR [key=value]

Datasets are BEIR/MTEB folders (e.g. the released LIMIT-small) or generated (`data.generate`).
Writes to `out_dir`: config.yaml, log.txt, metrics.json ({dataset: {retriever: {"recall@k": ...,
"ndcg@10": ...}}}, written after every retriever; a rerun skips what is there), mteb/<retriever>/
<task>.json (MTEB results records: nDCG@k and recall@k for MTEB's k list, main score recall@2 as
MTEB's LIMIT tasks; task LIMITRetrieval / LIMITSmallRetrieval for `paper: limit / limit-small`,
else the dataset's name), details.json (dataset sizes, qrel-graph
statistics, timings, free-embedding runs), embeddings/ (MiniLM vectors as chunked zarr arrays,
`embeddings/<dataset>-docs/vectors` [documents, 384] and `-queries/vectors` [queries, 384], written
`minilm_chunk` texts at a time; a rerun encodes only the chunks not marked complete, see
jaxlab/arrays.py), data/ (generated datasets as JSON Lines) and recall.png; prints a table beside
the paper's numbers.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import sys
import time

import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from tqdm import tqdm

from jaxlab import arrays, cli, parallel, results
from jaxlab import config as config_lib
from jaxlab.limit import data, retrieval
from jaxlab.limit.free_embedding import SolverConfig
from jaxlab.models import hf

log = logging.getLogger("jaxlab")

# Reported recall x100 (section 3 of papers/limit.md), for the table.
PAPER = {
    "limit-small": {"BM25": {2: 97.8, 10: 100, 20: 100},
                    "GTE-ModernColBERT": {2: 83.5, 10: 97.6, 20: 99.1},
                    "Promptriever": {2: 54.3, 10: 90.0, 20: 97.7},
                    "E5-Mistral": {2: 29.5, 10: 68.1, 20: 85.2},
                    "Qwen3-Embed": {2: 19.0, 10: 52.3, 20: 73.8}},
    "limit": {"BM25": {2: 85.7, 10: 90.4, 100: 93.6},
              "GTE-ModernColBERT": {2: 23.1, 10: 34.6, 100: 54.8},
              "Promptriever": {2: 3.0, 10: 6.8, 100: 18.9},
              "E5-Mistral": {2: 1.3, 10: 2.2, 100: 8.3},
              "Qwen3-Embed": {2: 0.8, 10: 1.8, 100: 4.8}},
}


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    name: str = "limit-small"        # key in metrics.json
    path: str | None = None          # a BEIR/MTEB folder (relative to the working directory) ...
    generate: data.GeneratorConfig | None = None  # ... or a dataset to generate
    paper: str | None = None         # show the paper's numbers for "limit-small" or "limit"

    def __post_init__(self):
        config_lib.require((self.path is None) != (self.generate is None),
                           f"dataset {self.name!r}: give exactly one of path and generate")
        config_lib.require(self.paper in (None, *PAPER),
                           f"dataset {self.name!r}: paper must be one of {sorted(PAPER)} or "
                           f"null, got {self.paper!r}")


@dataclasses.dataclass(frozen=True)
class Config:
    out_dir: str = "results/limit_eval"
    datasets: list[DatasetSpec] = dataclasses.field(default_factory=lambda: [
        DatasetSpec(name="limit-small", path="../shared/data/limit-small", paper="limit-small")])
    ks: list[int] = dataclasses.field(default_factory=lambda: [2, 10, 20, 100])  # recall@k
    bm25: bool = True
    minilm: bool = True
    minilm_folder: str | None = None     # a sentence-transformers folder (default: the package's)
    # MiniLM embedding sizes to evaluate: the model's full size (384) is reported as "minilm", the
    # others, truncated and renormalized, as "minilm-d<dim>"
    minilm_dims: list[int] = dataclasses.field(default_factory=lambda: [384, 128, 64, 32])
    minilm_batch_size: int = 64
    minilm_chunk: int = 4096             # texts per stored chunk and encode call (resume unit)
    free_dims: list[int] = dataclasses.field(default_factory=lambda: [8, 12])
    free_max_docs: int = 5000            # free embeddings only on corpora up to this size
    free_seed: int = 0
    solver: SolverConfig = dataclasses.field(default_factory=SolverConfig)
    search_chunk: int = 4096             # documents scored per step and device

    def __post_init__(self):
        config_lib.require(len(self.datasets) > 0, "datasets must not be empty")
        names = [d.name for d in self.datasets]
        config_lib.require(len(set(names)) == len(names), f"dataset names repeat: {names}")
        for name in ("ks", "minilm_dims", "free_dims"):
            values = getattr(self, name)
            config_lib.require(all(config_lib.is_int(v) and v >= 1 for v in values),
                               f"{name} must hold integers >= 1, got {values}")
        config_lib.require(len(self.ks) > 0, "ks must not be empty")
        config_lib.require(self.bm25 or self.minilm or len(self.free_dims) > 0,
                           "no retriever to evaluate: bm25 and minilm are false and free_dims is "
                           "empty")
        config_lib.require_positive_ints(self, "minilm_batch_size", "minilm_chunk",
                                         "free_max_docs", "search_chunk")


def main(argv: list[str] | None = None) -> dict:
    parallel.cpu_cores_as_devices()  # before JAX starts its CPU backend
    results.join_processes()  # before JAX touches a backend
    cfg = config_lib.from_command_line(Config, argv, __doc__.splitlines()[0])
    _check_ks(cfg)
    out = results.open_run(cfg.out_dir, cfg)
    results.check_inputs(out, minilm_folder=cfg.minilm_folder,
                         **{f"dataset.{d.name}": d.path for d in cfg.datasets})
    metrics = results.read_json(out / "metrics.json", default={})
    details = results.read_json(out / "details.json", default={})
    mesh = parallel.make_mesh(parallel.DATA)
    encoder = None
    log.info("LIMIT evaluation: %s; %d %s device(s); writing %s", [d.name for d in cfg.datasets],
             mesh.size, jax.devices()[0].platform, out)

    def record(spec: DatasetSpec, retriever: str, ranked: np.ndarray, dataset, seconds: float):
        dataset_name = spec.name
        values = {**retrieval.recall_at_k(ranked, dataset, _ks(cfg, dataset)),
                  **retrieval.ndcg_at_k(ranked, dataset, (10,))}
        metrics.setdefault(dataset_name, {})[retriever] = values
        task = retrieval.MTEB_TASKS.get(spec.paper, spec.name)
        results.write_json(out / "mteb" / retriever / f"{task}.json", retrieval.mteb_result(
            task, retrieval.mteb_scores(ranked, dataset), round(seconds, 3)))
        details[dataset_name].setdefault("seconds", {})[retriever] = round(seconds, 3)
        results.write_json(out / "metrics.json", metrics)
        results.write_json(out / "details.json", details)
        tqdm.write(f"{dataset_name:>14} {retriever:>14} " + "  ".join(
            f"{k}={v:.3f}" for k, v in values.items()), file=sys.stderr)

    for spec in cfg.datasets:
        dataset = _dataset(spec, out)
        done = metrics.get(spec.name, {})
        depth = min(max(*cfg.ks, *retrieval.MTEB_KS), len(dataset.corpus))
        details.setdefault(spec.name, {}).update(_describe(dataset))
        stats = details[spec.name]
        log.info("%s: %d documents, %d queries, %d judgments; qrel graph density %.4f, average "
                 "query strength %.2f", spec.name, stats["documents"], stats["queries"],
                 stats["judgments"], stats["graph_density"], stats["average_query_strength"])
        if cfg.bm25 and "bm25" not in done:
            start = time.perf_counter()
            _, ranked = retrieval.bm25_search([d.text for d in dataset.corpus],
                                              [q.text for q in dataset.queries], depth)
            record(spec, "bm25", ranked, dataset, time.perf_counter() - start)
        if cfg.minilm:
            encoder = encoder or hf.load_sentence_encoder(cfg.minilm_folder,
                                                          batch_size=cfg.minilm_batch_size)
            config_lib.require(max(cfg.minilm_dims) <= encoder.dim,
                               f"minilm_dims {cfg.minilm_dims} exceed the model's {encoder.dim}")
            todo = [d for d in cfg.minilm_dims if _minilm_name(d, encoder.dim) not in done]
            if todo:
                docs, queries = _minilm_embeddings(encoder, spec.name, dataset, out, details,
                                                   cfg.minilm_chunk)
            for dim in todo:
                name = _minilm_name(dim, encoder.dim)
                start = time.perf_counter()
                index = retrieval.build_index(_truncate(docs, dim), mesh, cfg.search_chunk)
                _, ranked = retrieval.search(index, _truncate(queries, dim), depth)
                record(spec, name, ranked, dataset, time.perf_counter() - start)
        if len(dataset.corpus) > cfg.free_max_docs and cfg.free_dims:
            log.info("%s: no free embeddings (%d documents > free_max_docs=%d)", spec.name,
                     len(dataset.corpus), cfg.free_max_docs)
            continue
        for dim in cfg.free_dims:
            name = f"free-d{dim}"
            if name in done:
                continue
            start = time.perf_counter()
            run, ranked = retrieval.free_embedding_search(dataset, dim, cfg.solver, depth,
                                                          cfg.free_seed)
            details[spec.name].setdefault("free_embedding", {})[name] = {
                "solved": bool(run.solved), "steps": int(run.steps),
                "accuracy": float(run.accuracy), "loss": float(run.loss)}
            record(spec, name, ranked, dataset, time.perf_counter() - start)
    _plot(out / "recall.png", metrics, [d.name for d in cfg.datasets])
    print(_table(metrics, cfg))
    log.info("results in %s", out)
    return metrics


def _ks(cfg: Config, dataset) -> list[int]:
    """The configured k that the corpus can fill (recall@100 of 46 documents is meaningless)."""
    return [k for k in cfg.ks if k <= len(dataset.corpus)]


def _check_ks(cfg: Config) -> None:
    """ConfigError naming a dataset whose corpus is smaller than every k of `ks`, before
    anything is written (folders are read: a bad dataset stops the run here too)."""
    for spec in cfg.datasets:
        size = (spec.generate.num_docs if spec.generate is not None
                else len(data.load(spec.path).corpus))
        if min(cfg.ks) > size:
            raise config_lib.ConfigError(
                f"ks={list(cfg.ks)}: no k fits dataset {spec.name!r} of {size} documents "
                f"(recall@k needs k <= the corpus size)")


def _minilm_name(dim: int, full: int) -> str:
    """"minilm" for the model's full embedding size, "minilm-d<dim>" for a truncation."""
    return "minilm" if dim == full else f"minilm-d{dim}"


def _truncate(vectors: np.ndarray, dim: int) -> np.ndarray:
    """The first `dim` coordinates, renormalized to unit length: [N, H] -> [N, dim]."""
    head = vectors[:, :dim]
    return head / np.maximum(np.linalg.norm(head, axis=1, keepdims=True), 1e-12)


def _dataset(spec: DatasetSpec, out: pathlib.Path) -> data.Dataset:
    """The spec's dataset: loaded from its folder, or generated (and saved under out/data)."""
    if spec.path is not None:
        return data.load(spec.path)
    folder = out / "data" / spec.name
    if (folder / "qrels.jsonl").is_file():
        return data.load(folder)
    log.info("%s: generating %s", spec.name, spec.generate)
    dataset = data.generate(spec.generate)
    data.save(dataset, folder)
    return dataset


def _describe(dataset: data.Dataset) -> dict:
    stats = retrieval.qrel_graph_stats(dataset)
    return {"documents": len(dataset.corpus), "queries": len(dataset.queries),
            "judgments": len(dataset.qrels), "graph_edges": stats.num_edges,
            "graph_density": stats.density,
            "average_query_strength": stats.average_query_strength}


def _minilm_embeddings(encoder, name: str, dataset, out: pathlib.Path, details: dict,
                       chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """Document [n, H] and query [m, H] embeddings, kept in out/embeddings/<name>-<part>/vectors
    (zarr, `chunk` rows per chunk): chunks an earlier run completed are read back, the others
    encoded, one encode call per chunk."""
    vectors = []
    for part, texts in (("docs", [d.text for d in dataset.corpus]),
                        ("queries", [q.text for q in dataset.queries])):
        store = arrays.open_store(out / "embeddings" / f"{name}-{part}",
                                  {"vectors": ((len(texts), encoder.dim), "float32")}, chunk)

        def encode(first: int, stop: int, texts=texts) -> dict[str, np.ndarray]:
            return {"vectors": encoder.encode(texts[first:stop])}              # [rows, H]

        began = time.perf_counter()
        encoded = arrays.fill(store, encode, progress=f"{name} {part}")
        seconds = time.perf_counter() - began
        if encoded:  # what this run encoded; a run that reuses every chunk keeps the record
            count = sum(stop - first for first, stop in
                        (arrays.chunk_bounds(c, store.rows, chunk) for c in encoded))
            details[name].setdefault("encoding", {})[part] = {
                "texts": count, "chunks": len(encoded), "seconds": round(seconds, 2),
                "texts_per_second": round(count / seconds, 2)}
        vectors.append(arrays.read(store, "vectors"))
    return vectors[0], vectors[1]


def _recall_ks(values: dict) -> list[int]:
    """The k of the "recall@k" entries of one retriever's metrics."""
    return [int(name.split("@")[1]) for name in values if name.startswith("recall@")]


def _table(metrics: dict, cfg: Config) -> str:
    ks = sorted({k for per in metrics.values() for r in per.values() for k in _recall_ks(r)})
    header = (f"{'dataset':>14} {'retriever':>18} " + " ".join(f"{'R@' + str(k):>7}" for k in ks)
              + f" {'nDCG@10':>8}")
    lines = [header]
    for spec in cfg.datasets:
        for retriever, values in metrics.get(spec.name, {}).items():
            lines.append(f"{spec.name:>14} {retriever:>18} " + " ".join(
                f"{100 * values[f'recall@{k}']:7.1f}" if f"recall@{k}" in values else f"{'-':>7}"
                for k in ks) + (f" {100 * values['ndcg@10']:8.1f}" if "ndcg@10" in values
                                else f" {'-':>8}"))
        for model, values in PAPER.get(spec.paper, {}).items():
            lines.append(f"{'(paper) ' + spec.paper:>14} {model:>18} " + " ".join(
                f"{values[k]:7.1f}" if k in values else f"{'-':>7}" for k in ks) + f" {'-':>8}")
    lines.append("recall@k and nDCG@10 x 100; (paper): Weller et al. 2025, reported on the "
                 "released data")
    return "\n".join(lines)


def _plot(path: pathlib.Path, metrics: dict, names: list[str]) -> None:
    names = [n for n in names if n in metrics]
    fig, axes = plt.subplots(len(names), 1, figsize=(9, 3.2 * len(names)), dpi=110,
                             squeeze=False)
    for ax, name in zip(axes[:, 0], names, strict=True):
        retrievers = list(metrics[name])
        ks = sorted({k for r in metrics[name].values() for k in _recall_ks(r)})
        width = 0.8 / len(ks)
        for i, k in enumerate(ks):
            values = [metrics[name][r].get(f"recall@{k}", np.nan) for r in retrievers]
            ax.bar(np.arange(len(retrievers)) + (i - (len(ks) - 1) / 2) * width, values, width,
                   label=f"recall@{k}")
        ax.set_xticks(np.arange(len(retrievers)), retrievers, rotation=20, fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_title(name)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, ncol=len(ks))
    fig.tight_layout()
    results.save_figure(fig, path)
    plt.close(fig)


if __name__ == "__main__":
    cli.run(main)
