import itertools
import json
import math
import pathlib
import re

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from jaxlab.limit import data

SHARED = pathlib.Path(__file__).parents[2] / ".." / "shared" / "data"
needs_shared = pytest.mark.skipif(not (SHARED / "limit-small").is_dir(),
                                  reason="the released LIMIT data is not in ../shared/data")

# Attributes that cannot be confused when a sentence is split back into them.
PLAIN = tuple(f"Thing{i:04d}" for i in range(400))


def parse_likes(text: str) -> tuple[str, list[str]]:
    """Independent reading of '<Name> likes A, B and C.' (attributes without ', ' or ' and ')."""
    match = re.fullmatch(r"(.+?) likes (.+)\.", text)
    name, body = match.groups()
    head, _, last = body.rpartition(" and ")
    return name, (head.split(", ") if head else []) + [last]


def judged(dataset) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for j in dataset.qrels:
        out.setdefault(j.query_id, set()).add(j.doc_id)
    return out


def check_limit_invariants(dataset, config):
    """What a LIMIT-style dataset promises, read back from its text alone."""
    liked = {}
    for doc in dataset.corpus:
        name, attrs = parse_likes(doc.text)
        assert name == doc.id and doc.title == ""
        assert len(attrs) == len(set(attrs)) == config.attributes_per_doc
        liked[doc.id] = set(attrs)
    assert len(dataset.corpus) == config.num_docs
    assert len(dataset.queries) == config.num_queries
    rel = judged(dataset)
    for query in dataset.queries:
        attr = re.fullmatch(r"Who likes (.+)\?", query.text).group(1)
        holders = {d for d, attrs in liked.items() if attr in attrs}
        assert holders == rel[query.id]          # relevant == exactly the docs that like it
        assert len(holders) == config.k
    assert all(j.score == 1 for j in dataset.qrels)
    return rel


# ---------------------------------------------------------------- the shipped attribute list

def test_shipped_attributes_are_many_distinct_and_clean():
    attrs = data.shipped_attributes()
    assert 1000 <= len(attrs) <= 2000
    assert len({a.lower() for a in attrs}) == len(attrs)
    assert all(a == a.strip() and a and ", " not in a for a in attrs)


# ---------------------------------------------------------------- relevance patterns by hand

def test_patterns_by_hand():
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(data.relevance_pattern("dense", 5, 2, 4, rng),
                                  [[0, 1], [0, 2], [0, 3], [1, 2], [1, 3]])
    np.testing.assert_array_equal(data.relevance_pattern("cycle", 4, 2, 3, rng),
                                  [[0, 1], [1, 2], [2, 0], [0, 1]])
    np.testing.assert_array_equal(data.relevance_pattern("disjoint", 3, 2, 6, rng),
                                  [[0, 1], [2, 3], [4, 5]])
    random = data.relevance_pattern("random", 50, 3, 7, rng)
    assert random.shape == (50, 3) and random.min() >= 0 and random.max() < 7
    assert all(len(set(row)) == 3 for row in random)


def test_pool_sizes_per_pattern():
    expected = {"dense": 46, "cycle": 1000, "disjoint": 2000, "random": 50_000}
    for pattern, pool in expected.items():
        assert data.pool_size(data.GeneratorConfig(num_docs=50_000, pattern=pattern)) == pool
    assert data.smallest_dense_pool(1000, 2) == 46 and math.comb(45, 2) < 1000


# ---------------------------------------------------------------- the generator

@pytest.mark.parametrize("pattern", data.PATTERNS)
def test_generated_dataset_keeps_its_promises(pattern):
    config = data.GeneratorConfig(num_docs=130, num_queries=40, k=2, attributes_per_doc=12,
                                  pattern=pattern, seed=3)
    dataset = data.generate(config, PLAIN)
    rel = check_limit_invariants(dataset, config)
    doc_degree = {}
    for docs in rel.values():
        for d in docs:
            doc_degree[d] = doc_degree.get(d, 0) + 1
    pairs = [frozenset(v) for v in rel.values()]
    if pattern == "dense":   # the first 40 pairs of 10 documents: C(9, 2) = 36 < 40 <= 45
        assert len(doc_degree) == 10 and len(set(pairs)) == 40
        assert sorted(doc_degree.values(), reverse=True)[0] == 9
    elif pattern == "cycle":  # 40 documents, each in 2 queries, consecutive queries share one
        assert len(doc_degree) == 40 and set(doc_degree.values()) == {2}
    elif pattern == "disjoint":
        assert len(doc_degree) == 80 and set(doc_degree.values()) == {1}
    # every document that is not relevant is a filler: it likes no query's attribute
    asked = {re.fullmatch(r"Who likes (.+)\?", q.text).group(1) for q in dataset.queries}
    for doc in dataset.corpus:
        if doc.id not in doc_degree:
            assert not set(parse_likes(doc.text)[1]) & asked


def test_dense_generator_reproduces_the_released_pattern_shape():
    """LIMIT-small's shape: 46 documents, 1000 queries, first 1000 pairs; 45 attributes each."""
    config = data.GeneratorConfig()
    dataset = data.generate(config)
    sets = dataset.relevant_sets(2)
    assert len(dataset.corpus) == 46 and sets.shape == (1000, 2)
    degrees = np.bincount(sets.ravel(), minlength=46)
    # pairs (a, b), a < b, lexicographic: document 0 is in 45 pairs, the last ones are cut
    assert degrees.max() == 45 and degrees.sum() == 2000
    assert len({tuple(r) for r in sets}) == 1000


def test_generator_is_deterministic_and_seeded():
    config = data.GeneratorConfig(num_docs=60, num_queries=30, attributes_per_doc=10, seed=1)
    first, again = data.generate(config, PLAIN), data.generate(config, PLAIN)
    other = data.generate(data.GeneratorConfig(num_docs=60, num_queries=30, attributes_per_doc=10,
                                               seed=2), PLAIN)
    assert first == again
    assert first.corpus != other.corpus


def test_names_come_from_faker_and_are_distinct():
    names = data.person_names(500, seed=0)
    assert len(set(names)) == 500
    assert all(re.fullmatch(r"\S+ \S+", n) for n in names)
    assert names == data.person_names(500, seed=0) and names != data.person_names(500, seed=1)


@settings(max_examples=12, deadline=None)
@given(pattern=st.sampled_from(data.PATTERNS), m=st.integers(1, 12), k=st.integers(1, 3),
       extra=st.integers(0, 5), per_doc=st.integers(12, 14), seed=st.integers(0, 2**31))
def test_generator_property(pattern, m, k, extra, per_doc, seed):
    probe = data.GeneratorConfig(num_docs=10**6, num_queries=m, k=k, pattern=pattern)
    pool = data.pool_size(probe) if pattern != "random" else k + extra
    config = data.GeneratorConfig(num_docs=pool + extra, num_queries=m, k=k, pattern=pattern,
                                  attributes_per_doc=per_doc, seed=seed)
    check_limit_invariants(data.generate(config, PLAIN[:60]), config)


# ---------------------------------------------------------------- requests that cannot be met

@pytest.mark.parametrize("kwargs,attrs,phrases", [
    (dict(num_docs=40), None, ["use 46 relevant documents", "num_docs >= 46",
                               "num_queries <= 780"]),
    (dict(num_docs=100, relevant_docs=40), None, ["n >= 46", "relevant_docs) >= 46",
                                                  "num_queries <= 780"]),
    (dict(num_docs=1500, pattern="disjoint"), None, ["use 2000", "num_docs >= 2000"]),
    (dict(num_docs=3000, relevant_docs=1500, pattern="disjoint"), None,
     ["need 2000", "num_queries <= 750"]),
    (dict(num_docs=999, pattern="cycle"), None, ["num_docs >= 1000"]),
    (dict(attributes_per_doc=30), None, ["relevant to 45 queries", "attributes_per_doc >= 45"]),
    (dict(num_docs=50, num_queries=40, attributes_per_doc=20), PLAIN[:50],
     ["leaving 10 for padding", "needs 20", "num_queries <= 30", "attributes_per_doc <= 10"]),
])
def test_unsatisfiable_requests_say_what_would_work(kwargs, attrs, phrases):
    with pytest.raises(data.DataError) as info:
        data.generate(data.GeneratorConfig(**kwargs), attrs)
    for phrase in phrases:
        assert phrase in str(info.value)


@pytest.mark.parametrize("field,value", [("num_docs", 0), ("k", 1.5), ("pattern", "star"),
                                         ("relevant_docs", 1), ("attributes_per_doc", -2)])
def test_bad_generator_config_is_named(field, value):
    with pytest.raises(ValueError, match=field):
        data.GeneratorConfig(**{field: value})


def test_duplicate_attributes_are_refused():
    with pytest.raises(data.DataError, match="duplicate attribute 'apples'"):
        data.generate(data.GeneratorConfig(num_docs=3, num_queries=1, attributes_per_doc=2),
                      ["Apples", "Pears", "apples", "Plums"])


# ---------------------------------------------------------------- the released data

@needs_shared
def test_released_limit_small_is_the_dense_pattern():
    dataset = data.load(SHARED / "limit-small")
    assert (len(dataset.corpus), len(dataset.queries), len(dataset.qrels)) == (46, 1000, 2000)
    # the released documents are listed in the order of the pattern's document indices
    np.testing.assert_array_equal(
        dataset.relevant_sets(2),
        data.relevance_pattern("dense", 1000, 2, 46, np.random.default_rng(0)))
    first = json.loads((SHARED / "limit-small" / "qrels.jsonl").read_text().splitlines()[0])
    assert dataset.qrels[0] == data.Judgment(first["query-id"], first["corpus-id"], 1)


@needs_shared
def test_released_limit_without_corpus_says_what_is_missing():
    with pytest.raises(data.DataError, match=r"lacks corpus\.jsonl.*generate"):
        data.load(SHARED / "limit")


# ---------------------------------------------------------------- JSON Lines and datasets

def tiny() -> data.Dataset:
    return data.Dataset(
        corpus=(data.Document("d1", "", "Ann likes Kites."),
                data.Document("d2", "T", "Bo likes Kites and Jam — ü.")),
        queries=(data.Query("q1", "Who likes Kites?"), data.Query("q2", "Who likes Jam?")),
        qrels=(data.Judgment("q1", "d1", 1), data.Judgment("q1", "d2", 1),
               data.Judgment("q2", "d2", 2)))


def test_jsonl_round_trip(tmp_path):
    folder = data.save(tiny(), tmp_path / "tiny")
    lines = (folder / "qrels.jsonl").read_text().splitlines()
    assert json.loads(lines[2]) == {"query-id": "q2", "corpus-id": "d2", "score": 2}
    loaded = data.load(folder)
    assert loaded == tiny()
    assert loaded.sources[0] == str(folder / "corpus.jsonl")


def test_hf_datasets_round_trip():
    hf = data.to_hf(tiny())
    assert set(hf) == {"corpus", "queries", "qrels"}
    assert hf["qrels"].column_names == ["query-id", "corpus-id", "score"]
    assert hf["corpus"][1] == {"_id": "d2", "title": "T", "text": "Bo likes Kites and Jam — ü."}
    assert data.from_hf(hf) == tiny()
    with pytest.raises(data.DataError, match="missing split 'qrels'"):
        data.from_hf({"corpus": hf["corpus"], "queries": hf["queries"]})


@settings(max_examples=25, deadline=None)
@given(texts=st.lists(st.text(min_size=0, max_size=30), min_size=1, max_size=6, unique=True))
def test_jsonl_round_trip_property(tmp_path_factory, texts):
    corpus = tuple(data.Document(t or "empty", t, t + "\n\"x\"") for t in texts)
    ids = [d.id for d in corpus]
    assume(len(set(ids)) == len(ids))  # "" and "empty" would both become "empty"
    dataset = data.Dataset(corpus, (data.Query("q", texts[0]),),
                           (data.Judgment("q", ids[-1], 1),))
    folder = data.save(dataset, tmp_path_factory.mktemp("rt"))
    assert data.load(folder) == dataset


def test_relevant_pairs_and_sets_by_hand():
    query, doc = tiny().relevant_pairs
    np.testing.assert_array_equal(query, [0, 0, 1])
    np.testing.assert_array_equal(doc, [0, 1, 1])
    with pytest.raises(data.DataError, match="'q2' has 1 relevant documents; expected exactly"):
        tiny().relevant_sets(2)


# ---------------------------------------------------------------- bad input

def write_folder(tmp_path, corpus=None, queries=None, qrels=None):
    good = {"corpus.jsonl": ['{"_id": "d1", "title": "", "text": "a"}',
                             '{"_id": "d2", "title": "", "text": "b"}'],
            "queries.jsonl": ['{"_id": "q1", "text": "a?"}'],
            "qrels.jsonl": ['{"query-id": "q1", "corpus-id": "d1", "score": 1}']}
    for name, lines in (("corpus.jsonl", corpus), ("queries.jsonl", queries),
                        ("qrels.jsonl", qrels)):
        text = "".join(line + "\n" for line in (good[name] if lines is None else lines))
        (tmp_path / name).write_text(text)
    return tmp_path


def test_good_folder_loads(tmp_path):
    dataset = data.load(write_folder(tmp_path))
    assert [d.id for d in dataset.corpus] == ["d1", "d2"]


@pytest.mark.parametrize("part,lines,pattern", [
    ("qrels", ['{"query-id": "q1", "corpus-id": "d1", "score": 1}', '{"query-id": "q1", '],
     r"qrels.jsonl:2: not valid JSON"),
    ("corpus", ['{"_id": "d1", "text": "a"}', "", '{"_id": "d2", "text": "b"}'],
     r"corpus.jsonl:2: not valid JSON"),
    ("queries", ['["q1", "a?"]'], r"queries.jsonl:1: expected a JSON object"),
    ("queries", ['{"_id": "q1"}'], r"queries.jsonl:1: missing key 'text'"),
    ("qrels", ['{"query-id": "q1", "corpus-id": "d1", "score": "1"}'],
     r"qrels.jsonl:1: 'score' must be int, got str"),
    ("qrels", ['{"query-id": "q1", "corpus-id": "d1", "score": 1}',
               '{"query-id": "q1", "corpus-id": "d7", "score": 1}'],
     r"qrels.jsonl:2: qrels name unknown corpus id 'd7'"),
    ("qrels", ['{"query-id": "q9", "corpus-id": "d1", "score": 1}'],
     r"qrels.jsonl:1: qrels name unknown query id 'q9'"),
    ("corpus", ['{"_id": "d1", "text": "a"}', '{"_id": "d2", "text": "b"}',
                '{"_id": "d1", "text": "c"}'],
     r"corpus.jsonl:3: duplicate corpus id 'd1' \(first at .*corpus.jsonl:1\)"),
    ("qrels", ['{"query-id": "q1", "corpus-id": "d1", "score": 1}'] * 2,
     r"qrels.jsonl:2: duplicate judgment \('q1', 'd1'\)"),
    ("corpus", [], r"corpus.jsonl: no records"),
    ("queries", [], r"queries.jsonl: no records"),
])
def test_bad_files_name_file_and_line(tmp_path, part, lines, pattern):
    folder = write_folder(tmp_path, **{part: lines})
    with pytest.raises(data.DataError, match=pattern):
        data.load(folder)


def test_numeric_ids_are_read_as_strings(tmp_path):
    folder = write_folder(tmp_path, corpus=['{"_id": 1, "text": "a"}'],
                          qrels=['{"query-id": "q1", "corpus-id": 1, "score": 1}'])
    assert data.load(folder).corpus[0].id == "1"


def test_missing_files_are_named(tmp_path):
    write_folder(tmp_path)
    (tmp_path / "qrels.jsonl").unlink()
    with pytest.raises(data.DataError, match=r"lacks qrels\.jsonl"):
        data.load(tmp_path)


def test_in_memory_errors_name_the_record():
    with pytest.raises(data.DataError, match=r"queries:2: duplicate query id 'q1'"):
        data.Dataset(tiny().corpus, (data.Query("q1", "a"), data.Query("q1", "b")),
                     (data.Judgment("q1", "d1", 1),))
    with pytest.raises(data.DataError, match="qrels: no records"):
        data.Dataset(tiny().corpus, tiny().queries, ())


def test_pairs_are_itertools_combinations_order():
    dense = data.relevance_pattern("dense", 10, 3, 5, np.random.default_rng(0))
    assert [tuple(r) for r in dense] == list(itertools.combinations(range(5), 3))
