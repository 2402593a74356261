import itertools
import math
import pathlib
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxlab.limit import data, retrieval
from jaxlab.limit.free_embedding import SolverConfig

SHARED = pathlib.Path(__file__).parents[2] / ".." / "shared" / "data"
needs_shared = pytest.mark.skipif(not (SHARED / "limit-small").is_dir(),
                                  reason="the released LIMIT data is not in ../shared/data")


def numpy_top_k(queries, docs, k):
    """Reference: full score matrix in float64, stable sort (ties: lower index first)."""
    scores = queries.astype(np.float64) @ docs.astype(np.float64).T
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, ids, axis=1), ids


def integer_vectors(rng, rows, dim):
    """Small-integer vectors: exact float32 scores with many ties."""
    return rng.integers(-2, 3, size=(rows, dim)).astype(np.float32)


# ---------------------------------------------------------------- exact dense search

@pytest.mark.parametrize("n,chunk,k", [(37, 3, 5), (64, 4096, 10), (5, 2, 5)])
def test_dense_search_matches_numpy_with_ties_unsharded_and_sharded(data_mesh8, n, chunk, k):
    rng = np.random.default_rng(n)
    queries, docs = integer_vectors(rng, 19, 6), integer_vectors(rng, n, 6)
    docs[n // 2] = docs[0]                      # exact duplicate documents tie everywhere
    want_scores, want_ids = numpy_top_k(queries, docs, k)
    for mesh in (None, data_mesh8):
        index = retrieval.build_index(docs, mesh=mesh, chunk=chunk)
        scores, ids = retrieval.search(index, queries, k, batch=8)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_array_equal(scores, want_scores)


def test_sharded_equals_unsharded_on_real_valued_vectors(data_mesh8):
    rng = np.random.default_rng(0)
    queries = rng.normal(size=(300, 32)).astype(np.float32)
    docs = rng.normal(size=(2001, 32)).astype(np.float32)
    single = retrieval.search(retrieval.build_index(docs, chunk=256), queries, 20, batch=128)
    index8 = retrieval.build_index(docs, mesh=data_mesh8, chunk=64)
    assert len(index8.docs.sharding.device_set) == 8
    sharded = retrieval.search(index8, queries, 20, batch=128)
    np.testing.assert_array_equal(sharded[1], single[1])
    np.testing.assert_allclose(sharded[0], single[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(single[1], numpy_top_k(queries, docs, 20)[1])


def test_dense_search_rejects_bad_requests():
    index = retrieval.build_index(np.eye(4, dtype=np.float32))
    with pytest.raises(ValueError, match=r"k must lie in \[1, n=4\]"):
        retrieval.search(index, np.eye(4), 5)
    with pytest.raises(ValueError, match="queries must be"):
        retrieval.search(index, np.ones((2, 3)), 1)


# ---------------------------------------------------------------- BM25

def numpy_bm25(docs, queries, k1=1.5, b=0.75):
    """Reference Lucene BM25 (no k1 + 1 factor) over the same tokens (words of 2+ characters,
    stopwords out)."""
    import bm25s.stopwords

    stop = set(bm25s.stopwords.STOPWORDS_EN)

    def tokens(text):
        return [t for t in re.findall(r"(?u)\b\w\w+\b", text.lower()) if t not in stop]

    doc_tokens = [tokens(d) for d in docs]
    avgdl = np.mean([len(t) for t in doc_tokens])
    n = len(docs)
    scores = np.zeros((len(queries), n))
    for i, q in enumerate(queries):
        for term in tokens(q):
            df = sum(term in t for t in doc_tokens)
            if df == 0:
                continue
            idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
            for j, t in enumerate(doc_tokens):
                tf = t.count(term)
                scores[i, j] += idf * tf / (tf + k1 * (1 - b + b * len(t) / avgdl))
    return scores


def test_bm25_matches_a_numpy_reference():
    docs = ["Ann likes kites, jam and elm trees.", "Bo likes trees and trees.",
            "Cy likes elm trees and kites.", "Di likes opera.", "Ed likes kites kites kites."]
    queries = ["Who likes kites?", "Who likes elm trees?", "Who likes opera?", "Who likes Zebras?"]
    want = numpy_bm25(docs, queries)
    scores, ids = retrieval.bm25_search(docs, queries, k=5)
    np.testing.assert_allclose(scores, np.sort(want, axis=1)[:, ::-1], rtol=1e-5, atol=1e-6)
    for i in range(3):  # queries whose scores have no ties at the top
        assert ids[i, 0] == np.argmax(want[i])
    np.testing.assert_allclose(np.take_along_axis(want, ids.astype(int), 1), scores, rtol=1e-5,
                               atol=1e-6)


# ---------------------------------------------------------------- recall@k

def small_dataset(relevant: dict[str, list[str]], docs=("a", "b", "c", "d", "e")):
    return data.Dataset(tuple(data.Document(d, "", d) for d in docs),
                        tuple(data.Query(q, q) for q in relevant),
                        tuple(data.Judgment(q, d, 1) for q, ds in relevant.items() for d in ds))


def test_recall_by_hand():
    dataset = small_dataset({"q1": ["a", "b"], "q2": ["c"], "q3": []})
    ranked = np.array([[1, 2, 0, 3, 4],    # q1: b then c then a -> @1 1/2, @2 1/2, @3 1
                       [4, 3, 1, 0, 2],    # q2: c only at rank 5
                       [0, 1, 2, 3, 4]])   # q3: no relevant document -> left out
    got = retrieval.recall_at_k(ranked, dataset, ks=(1, 2, 3, 5))
    assert got == {"recall@1": 0.25, "recall@2": 0.25, "recall@3": 0.5, "recall@5": 1.0}


def test_recall_ignores_zero_scores_and_needs_depth():
    dataset = data.Dataset(small_dataset({"q1": ["a"]}).corpus, (data.Query("q1", "x"),),
                           (data.Judgment("q1", "a", 1), data.Judgment("q1", "b", 0)))
    assert retrieval.recall_at_k(np.array([[1, 0]]), dataset, ks=(1, 2)) == {
        "recall@1": 0.0, "recall@2": 1.0}
    with pytest.raises(ValueError, match="recall@10 needs at least 10 results"):
        retrieval.recall_at_k(np.array([[1, 0]]), dataset, ks=(10,))


@settings(max_examples=30, deadline=None)
@given(st.data())
def test_recall_matches_a_loop_reference(draw):
    n = draw.draw(st.integers(3, 12))
    m = draw.draw(st.integers(1, 6))
    names = [f"d{j}" for j in range(n)]
    relevant = {f"q{i}": draw.draw(st.lists(st.sampled_from(names), unique=True, max_size=4))
                for i in range(m)}
    if not any(relevant.values()):
        relevant["q0"] = [names[0]]
    dataset = small_dataset(relevant, names)
    ranked = np.stack([np.random.default_rng(i).permutation(n) for i in range(m)])
    ks = sorted({1, 2, n})
    got = retrieval.recall_at_k(ranked, dataset, ks=ks)
    for k in ks:
        per_query = [len({names[j] for j in ranked[i, :k]} & set(rel)) / len(rel)
                     for i, rel in enumerate(relevant.values()) if rel]
        assert got[f"recall@{k}"] == pytest.approx(np.mean(per_query))


# ---------------------------------------------------------------- qrel-graph statistics

def test_graph_stats_by_hand():
    dataset = small_dataset({"q1": ["a", "b"], "q2": ["b", "c"], "q3": ["d"], "q4": ["a", "b"]})
    # edges: q1-q2 (b), q1-q4 (a, b: weight 2), q2-q4 (b); q3 alone
    stats = retrieval.qrel_graph_stats(dataset, block=3)
    assert stats == (4, 3, 0.5, (3 + 2 + 0 + 3) / 4)


@needs_shared
def test_graph_stats_of_released_limit_small_match_a_set_reference():
    dataset = data.load(SHARED / "limit-small")
    sets = [set(r) for r in dataset.relevant_sets(2)]
    edges = sum(bool(a & b) for a, b in itertools.combinations(sets, 2))
    strength = np.mean([sum(len(a & b) for j, b in enumerate(sets) if j != i)
                        for i, a in enumerate(sets)])
    stats = retrieval.qrel_graph_stats(dataset)
    assert stats.num_edges == edges == 42698
    assert stats.density == pytest.approx(edges / math.comb(1000, 2))
    assert stats.average_query_strength == pytest.approx(strength)


# ---------------------------------------------------------------- free embeddings

def test_free_embeddings_solve_a_small_dense_pattern():
    dataset = small_dataset({f"q{i}": [f"d{a}", f"d{b}"]
                             for i, (a, b) in enumerate(itertools.combinations(range(6), 2))},
                            [f"d{j}" for j in range(6)])
    config = SolverConfig(k=2, steps=5000)
    result, ids = retrieval.free_embedding_search(dataset, dim=4, config=config, k=3)
    assert bool(result.solved)
    for (a, b), top in zip(itertools.combinations(range(6), 2), ids, strict=True):
        assert {dataset.corpus[i].id for i in top[:2]} == {f"d{a}", f"d{b}"}
    assert retrieval.recall_at_k(ids, dataset, ks=(2,)) == {"recall@2": 1.0}


def test_dense_search_asks_for_full_float32_products():
    index = retrieval.build_index(np.eye(4, dtype=np.float32), chunk=4)
    lowered = retrieval._search_batch.lower(
        np.ones((2, 4), np.float32), index.docs, num_docs=4, k=2, chunk=4, mesh=None)
    assert "HIGHEST" in lowered.as_text()


def test_ndcg_by_hand():
    dataset = small_dataset({"q1": ["a", "b"], "q2": ["c"], "q3": []})
    ranked = np.array([[1, 2, 0, 3, 4],    # q1: hits at ranks 1 and 3
                       [4, 3, 1, 0, 2],    # q2: its one hit at rank 5
                       [0, 1, 2, 3, 4]])   # q3: no relevant document -> left out
    q1 = (1 + 1 / 2) / (1 + 1 / np.log2(3))
    q2_at_5 = (1 / np.log2(6)) / 1
    got = retrieval.ndcg_at_k(ranked, dataset, ks=(1, 3, 5, 10))
    assert got["ndcg@1"] == pytest.approx(0.5)                 # q1 1, q2 0
    assert got["ndcg@3"] == pytest.approx(q1 / 2)
    assert got["ndcg@5"] == pytest.approx((q1 + q2_at_5) / 2)
    assert got["ndcg@10"] == got["ndcg@5"]   # the ranking holds all 5 documents


@settings(max_examples=30, deadline=None)
@given(st.data())
def test_ndcg_with_graded_scores_matches_a_loop_reference(draw):
    n = draw.draw(st.integers(3, 10))
    names = [f"d{j}" for j in range(n)]
    judged = {f"q{i}": draw.draw(st.dictionaries(st.sampled_from(names), st.integers(0, 3),
                                                 max_size=4)) for i in range(4)}
    judged["q0"][names[0]] = 2
    dataset = data.Dataset(tuple(data.Document(d, "", d) for d in names),
                           tuple(data.Query(q, q) for q in judged),
                           tuple(data.Judgment(q, d, s) for q, ds in judged.items()
                                 for d, s in ds.items()))
    ranked = np.stack([np.random.default_rng(i).permutation(n) for i in range(4)])
    for k in (1, 2, n):
        got = retrieval.ndcg_at_k(ranked, dataset, ks=(k,))[f"ndcg@{k}"]
        per_query = []
        for i, scores in enumerate(judged.values()):
            gains = [scores.get(names[j], 0) for j in ranked[i, :k]]
            ideal = sorted((s for s in scores.values() if s > 0), reverse=True)[:k]
            if ideal:
                dcg = sum(g / np.log2(r + 2) for r, g in enumerate(gains))
                per_query.append(dcg / sum(g / np.log2(r + 2) for r, g in enumerate(ideal)))
        assert got == pytest.approx(np.mean(per_query))


def test_mteb_scores_use_mteb_names_and_main_score():
    dataset = small_dataset({"q1": ["a", "b"], "q2": ["c"]})
    ranked = np.array([[1, 2, 0, 3, 4], [4, 3, 1, 0, 2]])
    scores = retrieval.mteb_scores(ranked, dataset)
    assert scores["main_score"] == scores["recall_at_2"] == 0.25
    assert {f"ndcg_at_{k}" for k in retrieval.MTEB_KS} <= set(scores)
    assert scores["recall_at_1000"] == 1.0           # every document ranked
    shallow = retrieval.mteb_scores(ranked[:, :3], dataset)   # 3 of 5: k > 3 cannot be filled
    assert "recall_at_5" not in shallow and shallow["recall_at_3"] == 0.5  # q1 2/2, q2 0/1
    record = retrieval.mteb_result("LIMITSmallRetrieval", scores, 1.5)
    assert record["scores"]["test"][0]["main_score"] == 0.25
    assert record["task_name"] == "LIMITSmallRetrieval"
