"""Retrieval on LIMIT-style datasets: exact dense search in JAX, BM25, free embeddings, recall@k,
and the qrel-graph statistics that explain why LIMIT is hard.

LIMIT (Weller et al. 2025, arXiv 2508.21038), sections 2-3 of `papers/limit.md`.

Dense search is exact: every query is scored against every document, in chunks of documents
(`lax.scan`, a running `lax.top_k` per chunk), with the corpus split over the devices of a mesh
(`jax.shard_map`; each device keeps the top-k of its own documents, and the D candidate lists are
reduced to the global top-k). Ties go to the lower document index, on any number of devices.
Scores are computed in full float32 on every backend (`free_embedding.exact_scores`).

Shapes: m queries, n documents, d dimensions, k results per query, D devices.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from jaxlab import parallel
from jaxlab.config import is_int, require
from jaxlab.extras import require_extra
from jaxlab.limit import free_embedding
from jaxlab.limit.data import Dataset

RECALL_KS = (2, 10, 20, 100)

# --------------------------------------------------------------------------------------------
# Exact dense search


class DenseIndex(NamedTuple):
    docs: jax.Array     # [n_pad, d] float32, rows >= num_docs are padding; split over the mesh
    num_docs: int       # n
    chunk: int          # documents scored per step on one device
    mesh: Mesh | None   # None: one device, no shard_map


def build_index(docs: np.ndarray, mesh: Mesh | None = None, chunk: int = 4096) -> DenseIndex:
    """Places document vectors [n, d] on the devices for `search`: padded to a multiple of
    chunk * D rows and split row-wise over the mesh's first axis (replicated nowhere).

    The chunk shrinks to ceil(n / D) for small corpora, so little padding is scored.
    """
    docs = np.asarray(docs, np.float32)
    require(docs.ndim == 2 and len(docs) > 0, f"docs must be [n >= 1, d], got {docs.shape}")
    devices = 1 if mesh is None else mesh.size
    chunk = max(1, min(chunk, math.ceil(len(docs) / devices)))
    padded = np.zeros((math.ceil(len(docs) / (chunk * devices)) * chunk * devices,
                       docs.shape[1]), np.float32)                         # [n_pad, d]
    padded[:len(docs)] = docs
    placed = jax.device_put(padded, None if mesh is None else parallel.batch_sharding(mesh))
    return DenseIndex(placed, len(docs), chunk, mesh)


def _merge_top_k(best: tuple[jax.Array, jax.Array], scores: jax.Array, ids: jax.Array,
                 k: int) -> tuple[jax.Array, jax.Array]:
    """The top-k of the union of a running top-k ([m, k] scores, ids) and new candidates
    ([m, c] scores, ids). Earlier candidates come first, so ties keep the earlier one."""
    all_scores = jnp.concatenate([best[0], scores], axis=1)               # [m, k + c]
    all_ids = jnp.concatenate([best[1], ids], axis=1)                     # [m, k + c]
    top, position = jax.lax.top_k(all_scores, k)                          # [m, k]
    return top, jnp.take_along_axis(all_ids, position, axis=1)


def _local_top_k(queries: jax.Array, docs: jax.Array, first_id: jax.Array, num_docs: int,
                 k: int, chunk: int, axis: str | None = None) -> tuple[jax.Array, jax.Array]:
    """Top-k of s_ij = <q_i, d_j> over the documents [n_local, d] whose ids start at first_id,
    one chunk of documents per `lax.scan` step; ids >= num_docs (padding) score -inf. Inside
    shard_map, `axis` names the mesh axis the documents vary over."""
    m, d = queries.shape
    blocks = docs.reshape(-1, chunk, d)                                   # [b, chunk, d]
    starts = first_id + chunk * jnp.arange(blocks.shape[0], dtype=jnp.int32)  # [b]

    def step(best, block_start):
        block, start = block_start
        ids = start + jnp.arange(chunk, dtype=jnp.int32)                  # [chunk]
        scores = free_embedding.exact_scores(queries, block)             # [m, chunk]
        scores = jnp.where(ids < num_docs, scores, -jnp.inf)
        return _merge_top_k(best, scores, jnp.broadcast_to(ids, scores.shape), k), None

    init = (jnp.full((m, k), -jnp.inf, jnp.float32), jnp.zeros((m, k), jnp.int32))
    if axis is not None:  # the running top-k differs per device, like the documents
        init = tuple(jax.lax.pcast(x, (axis,), to="varying") for x in init)
    return jax.lax.scan(step, init, (blocks, starts))[0]


@functools.partial(jax.jit, static_argnames=("num_docs", "k", "chunk", "mesh"))
def _search_batch(queries, docs, *, num_docs: int, k: int, chunk: int, mesh: Mesh | None):
    """(scores [m, k], ids [m, k]) of one query batch [m, d] against the whole index."""
    if mesh is None:
        return _local_top_k(queries, docs, jnp.int32(0), num_docs, k, chunk)
    axis = mesh.axis_names[0]

    def on_device(queries, docs):  # docs: this device's [n_pad / D, d]
        first_id = jax.lax.axis_index(axis).astype(jnp.int32) * docs.shape[0]
        return _local_top_k(queries, docs, first_id, num_docs, k, chunk, axis)  # [m, k] each

    # Each device's top-k side by side: [m, D*k], in device order, which is id order, so the
    # final top-k keeps ties with the lower id first.
    per_device = PartitionSpec(None, axis)
    scores, ids = jax.shard_map(on_device, mesh=mesh,
                                in_specs=(PartitionSpec(), PartitionSpec(axis)),
                                out_specs=(per_device, per_device))(queries, docs)
    top, position = jax.lax.top_k(scores, k)                              # [m, k]
    return top, jnp.take_along_axis(ids, position, axis=1)


def search(index: DenseIndex, queries: np.ndarray, k: int,
           batch: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product: (scores [m, k] float32, ids [m, k] int32), best first.

    Queries go in batches of `batch` rows (the last one zero-padded: one compiled shape).
    """
    queries = np.asarray(queries, np.float32)
    require(queries.ndim == 2 and queries.shape[1] == index.docs.shape[1],
            f"queries must be [m, d={index.docs.shape[1]}], got {queries.shape}")
    require(1 <= k <= index.num_docs, f"k must lie in [1, n={index.num_docs}], got {k}")
    batch = min(batch, len(queries))
    padded = np.zeros((math.ceil(len(queries) / batch) * batch, queries.shape[1]), np.float32)
    padded[:len(queries)] = queries                                       # [m_pad, d]
    outputs = [_search_batch(padded[i:i + batch], index.docs, num_docs=index.num_docs, k=k,
                             chunk=index.chunk, mesh=index.mesh)
               for i in range(0, len(padded), batch)]
    scores, ids = (np.concatenate([np.asarray(o[j]) for o in outputs])[:len(queries)]
                   for j in range(2))
    return scores, ids


# --------------------------------------------------------------------------------------------
# BM25


def bm25_search(docs: Sequence[str], queries: Sequence[str], k: int, k1: float = 1.5,
                b: float = 0.75) -> tuple[np.ndarray, np.ndarray]:
    """BM25 (Lucene's variant, through `bm25s`): (scores [m, k], ids [m, k]), best first.

      score(q, d) = sum_{t in q} idf(t) * tf(t, d) / (tf(t, d) + k1 (1 - b + b |d| / avgdl))
      idf(t) = ln(1 + (n - df(t) + 0.5) / (df(t) + 0.5))

    (Lucene drops the constant factor k1 + 1 of the classic formula; rankings are the same.)

    Tokens: lower-cased words of two or more characters, English stopwords removed (bm25s's
    defaults).
    """
    bm25s = require_extra("bm25s", "limit", "BM25 search")
    require(1 <= k <= len(docs), f"k must lie in [1, n={len(docs)}], got {k}")
    retriever = bm25s.BM25(k1=k1, b=b)
    retriever.index(bm25s.tokenize(list(docs), stopwords="en", show_progress=False),
                    show_progress=False)
    query_tokens = bm25s.tokenize(list(queries), stopwords="en", show_progress=False)
    ids, scores = retriever.retrieve(query_tokens, k=k, show_progress=False)
    return np.asarray(scores, np.float32), np.asarray(ids, np.int32)


# --------------------------------------------------------------------------------------------
# The free-embedding upper bound


def free_embedding_search(dataset: Dataset, dim: int, config: free_embedding.SolverConfig,
                          k: int, seed: int = 0
                          ) -> tuple[free_embedding.RunResult, np.ndarray]:
    """The best any d-dimensional single-vector retriever could do on `dataset`: free query and
    document vectors optimized against its qrels (`free_embedding.fit`, every query having
    exactly config.k relevant documents), then searched exactly.

    Returns (the run's result, ids [m, k] of each query's top-k documents).
    """
    relevant = dataset.relevant_sets(config.k)                            # [m, k_rel]
    result, emb = free_embedding.fit(relevant, len(dataset.corpus), dim, config, seed)
    _, ids = search(build_index(np.asarray(emb.docs)), np.asarray(emb.queries), k)
    return result, ids


# --------------------------------------------------------------------------------------------
# Recall


def _cutoff(k: int, depth: int, num_docs: int, metric: str) -> int:
    """How many ranked results a metric @k reads: k, or the whole ranking when it holds every
    document (then results past it do not exist, as in trec_eval); else ValueError."""
    require(is_int(k) and k >= 1, f"{metric}@k needs an integer k >= 1, got {k!r}")
    require(k <= depth or depth >= num_docs,
            f"{metric}@{k} needs at least {k} results per query, got {depth}")
    return min(k, depth)


def _gains(ranked: np.ndarray, dataset: Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(gain of each ranked document int [m, K] (its judgment score, 0 if unjudged or <= 0),
    each query's judged gains sorted descending int [m, G] (0-padded), judged bool [m])."""
    ranked = np.asarray(ranked)
    m, n = len(dataset.queries), len(dataset.corpus)
    require(ranked.ndim == 2 and ranked.shape[0] == m,
            f"ranked must have one row per query ({m}), got shape {ranked.shape}")
    judged = [(dataset.query_index[j.query_id], dataset.doc_index[j.doc_id], j.score)
              for j in dataset.qrels if j.score > 0]
    require(judged, f"{dataset.sources[2]}: no judgment has a score > 0")
    query, doc, score = (np.asarray(c, np.int64) for c in zip(*judged, strict=True))
    keys, order = np.unique(query * n + doc, return_index=True)
    wanted = np.arange(m)[:, None] * n + ranked                                 # [m, K]
    at = np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)
    gains = np.where(keys[at] == wanted, score[order][at], 0)                   # [m, K]
    counts = np.bincount(query, minlength=m)
    ideal = np.zeros((m, max(counts.max(), 1)), np.int64)
    by_query = np.lexsort((-score, query))
    ideal[query[by_query], np.arange(len(query)) - np.repeat(np.cumsum(counts) - counts,
                                                             counts)] = score[by_query]
    return gains, ideal, counts > 0


def recall_at_k(ranked: np.ndarray, dataset: Dataset,
                ks: Iterable[int] = RECALL_KS) -> dict[str, float]:
    """{"recall@k": ...} for each k:

      recall@k = mean over queries q with R_q != {} of |top_k(q) ∩ R_q| / |R_q|,

    with R_q the documents judged relevant (score > 0) and top_k(q) the first k of `ranked`
    (int [m, K] document indices, best first), as trec_eval's recall_k and MTEB compute it.
    k may exceed K only when the ranking holds every document.
    """
    gains, _, judged = _gains(ranked, dataset)
    hits = gains > 0
    num_relevant = np.bincount(dataset.relevant_pairs[0], minlength=len(hits))
    out = {}
    for k in ks:
        cut = _cutoff(k, hits.shape[1], len(dataset.corpus), "recall")
        found = hits[:, :cut].sum(axis=1)
        out[f"recall@{k}"] = float(np.mean(found[judged] / num_relevant[judged]))
    return out


def ndcg_at_k(ranked: np.ndarray, dataset: Dataset, ks: Iterable[int] = (10,),
              ) -> dict[str, float]:
    """{"ndcg@k": ...} for each k, as trec_eval's ndcg_cut (MTEB's main retrieval score):

      DCG@k = sum_{i=1..k} g_i / log2(i + 1),   nDCG@k = DCG@k / IDCG@k,

    with g_i the judgment score of the i-th ranked document (linear gain, 0 if unjudged) and
    IDCG@k the DCG@k of the query's judged documents sorted by score; the mean over queries with
    a relevant document. k may exceed K only when the ranking holds every document.
    """
    gains, ideal, judged = _gains(ranked, dataset)
    out = {}
    for k in ks:
        cut = _cutoff(k, gains.shape[1], len(dataset.corpus), "ndcg")
        discount = 1.0 / np.log2(np.arange(2, k + 2))                          # [k]
        dcg = gains[:, :cut] @ discount[:cut]
        idcg = ideal[:, :k] @ discount[:min(k, ideal.shape[1])]
        out[f"ndcg@{k}"] = float(np.mean(dcg[judged] / idcg[judged]))
    return out


# MTEB's LIMIT tasks (mteb/tasks/retrieval/eng/LIMITRetrieval.py): their k list and main score.
MTEB_KS = (1, 2, 3, 5, 10, 20, 100, 1000)
MTEB_TASKS = {"limit": "LIMITRetrieval", "limit-small": "LIMITSmallRetrieval"}
MTEB_MAIN_SCORE = "recall_at_2"


def mteb_scores(ranked: np.ndarray, dataset: Dataset, ks: Sequence[int] = MTEB_KS,
                main_score: str = MTEB_MAIN_SCORE) -> dict[str, float]:
    """nDCG@k and recall@k for MTEB's k list under MTEB's names ("ndcg_at_10", "recall_at_2",
    ..., "main_score"): the k a ranking cannot fill (k > K < n) are left out."""
    n, depth = len(dataset.corpus), np.asarray(ranked).shape[1]
    ks = [k for k in ks if k <= depth or depth >= n]
    values = {**ndcg_at_k(ranked, dataset, ks), **recall_at_k(ranked, dataset, ks)}
    scores = {name.replace("@", "_at_"): value for name, value in values.items()}
    require(main_score in scores, f"main_score {main_score!r} is not among {sorted(scores)}")
    return {**scores, "main_score": scores[main_score]}


def mteb_result(task_name: str, scores: dict[str, float], seconds: float) -> dict:
    """An MTEB results record (the layout of `results/<model>/<revision>/<task>.json`) for one
    retriever on one task's test split."""
    return {"task_name": task_name, "mteb_version": None, "dataset_revision": None,
            "evaluation_time": seconds, "kg_co2_emissions": None,
            "scores": {"test": [{**scores, "hf_subset": "default", "languages": ["eng-Latn"]}]}}


# --------------------------------------------------------------------------------------------
# Qrel-graph statistics


class QrelGraphStats(NamedTuple):
    num_queries: int
    num_edges: int                  # |E|
    density: float                  # |E| / C(m, 2)
    average_query_strength: float   # mean_i s_i


def qrel_graph_stats(dataset: Dataset, block: int = 1024) -> QrelGraphStats:
    """Statistics of the query graph of the binary qrels (relevant: score > 0), the measures the
    LIMIT paper uses to show how interconnected its relevance pattern is.

    Nodes are the m queries; queries i != j are joined by an edge of weight
    w_ij = |R_i ∩ R_j| (the relevant documents they share) when w_ij > 0. Then
      graph density          = |E| / C(m, 2),
      query strength         s_i = sum_{j != i} w_ij = sum_{d in R_i} (deg(d) - 1),
      average query strength = (1/m) sum_i s_i,
    with deg(d) the number of queries for which d is relevant. On the released LIMIT-small
    (dense pattern over 46 documents) every query shares a document with 85.4 others on average.
    """
    query, doc = dataset.relevant_pairs
    m = len(dataset.queries)
    used, column = np.unique(doc, return_inverse=True)                    # relevant docs only
    adjacency = np.zeros((m, len(used)), np.float32)                      # [m, n_rel]
    adjacency[query, column] = 1.0
    degree = adjacency.sum(axis=0)                                        # [n_rel]
    strength = adjacency @ (degree - 1.0)                                 # [m]
    edges = 0
    for start in range(0, m, block):
        shared = adjacency[start:start + block] @ adjacency.T             # [b, m] w_ij
        rows = np.arange(start, min(start + block, m))
        shared[rows - start, rows] = 0.0                                  # no self-loops
        edges += int(np.count_nonzero(shared))
    edges //= 2
    return QrelGraphStats(m, edges, edges / math.comb(m, 2) if m > 1 else 0.0,
                          float(strength.mean()))
