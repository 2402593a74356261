"""LIMIT-style retrieval datasets: a seeded generator, BEIR/MTEB JSON Lines, Hugging Face datasets.

LIMIT (Weller et al. 2025, arXiv 2508.21038), section 2 of `papers/limit.md`. A document says what
one person likes, "<Name> likes A, B, ..., Y and Z.", with a fixed number of liked attributes; a
query asks "Who likes X?" and is relevant to exactly the k documents that list X. Which documents
those are is the relevance pattern (`PATTERNS`); the paper's hard one, "dense", asks for as many
distinct k-subsets of as few documents as possible. Every document is padded to its number of
attributes with attributes no query asks about, and filler documents (relevant to no query) bring
the corpus to its size: LIMIT is 46 relevant + 49,954 filler documents, LIMIT-small the 46 alone.

Names come from Faker (seeded, en_US first and last names); attributes from `attributes.txt`
beside this module: 1,654 everyday things, one per line, deduplicated (case-insensitively). It
holds every attribute of the released LIMIT-small and LIMIT (corpus and queries) plus everyday
objects added for this project, so that 1,000 query attributes leave enough others for padding.

The on-disk format is BEIR / MTEB JSON Lines, one folder per dataset:
  corpus.jsonl   {"_id": str, "title": str, "text": str}
  queries.jsonl  {"_id": str, "text": str}
  qrels.jsonl    {"query-id": str, "corpus-id": str, "score": int}   (relevant: score > 0)
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import itertools
import math
import pathlib
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from jaxlab.config import is_int, require, require_positive_ints
from jaxlab.extras import require_extra
from jaxlab.jsonl import DataError, Field, check_unique, field_value, jsonl_text, read_jsonl
from jaxlab.results import write_text

PATTERNS = ("random", "cycle", "disjoint", "dense")
FILES = ("corpus.jsonl", "queries.jsonl", "qrels.jsonl")


class Document(NamedTuple):
    id: str
    title: str
    text: str


class Query(NamedTuple):
    id: str
    text: str


class Judgment(NamedTuple):
    query_id: str
    doc_id: str
    score: int  # relevant iff > 0


# --------------------------------------------------------------------------------------------
# The dataset


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A corpus, its queries and their relevance judgments, checked when built.

    Raises DataError, naming the record as `source:line` (`sources` are the files it was read
    from, or the part's name for data built in memory; records count from 1), for an empty
    corpus, query set or qrels, a duplicate document, query or judgment, or a judgment naming an
    unknown query or document. Queries without a relevant document are allowed (and are left out
    of recall, as trec_eval does).
    """

    corpus: tuple[Document, ...]
    queries: tuple[Query, ...]
    qrels: tuple[Judgment, ...]
    sources: tuple[str, str, str] = dataclasses.field(
        default=("corpus", "queries", "qrels"), compare=False, repr=False)

    def __post_init__(self):
        corpus_src, queries_src, qrels_src = self.sources
        for part, source in ((self.corpus, corpus_src), (self.queries, queries_src),
                             (self.qrels, qrels_src)):
            if not part:
                raise DataError(f"{source}: no records (an empty corpus, query set or qrels "
                                f"cannot be evaluated)")
        check_unique([d.id for d in self.corpus], "corpus id", corpus_src)
        check_unique([q.id for q in self.queries], "query id", queries_src)
        check_unique([(j.query_id, j.doc_id) for j in self.qrels], "judgment", qrels_src)
        _check_known([j.query_id for j in self.qrels], self.query_index, "query id", qrels_src)
        _check_known([j.doc_id for j in self.qrels], self.doc_index, "corpus id", qrels_src)

    @functools.cached_property
    def doc_index(self) -> dict[str, int]:
        return {d.id: i for i, d in enumerate(self.corpus)}

    @functools.cached_property
    def query_index(self) -> dict[str, int]:
        return {q.id: i for i, q in enumerate(self.queries)}

    @functools.cached_property
    def relevant_pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """(query index [J], document index [J]) of the J judgments with score > 0, in qrels
        order."""
        pairs = [(self.query_index[j.query_id], self.doc_index[j.doc_id])
                 for j in self.qrels if j.score > 0]
        rows = np.asarray(pairs, np.int64).reshape(-1, 2)
        return rows[:, 0], rows[:, 1]

    def relevant_sets(self, k: int) -> np.ndarray:
        """int [m, k]: each query's k relevant documents (ascending); DataError unless every
        query has exactly k."""
        query, doc = self.relevant_pairs
        counts = np.bincount(query, minlength=len(self.queries))
        wrong = np.flatnonzero(counts != k)
        if len(wrong):
            i = int(wrong[0])
            raise DataError(f"{self.sources[2]}: query {self.queries[i].id!r} has {counts[i]} "
                            f"relevant documents; expected exactly k={k} for every query "
                            f"({len(wrong)} queries differ)")
        order = np.lexsort((doc, query))
        return doc[order].reshape(-1, k)


def _location(source: str, index: int) -> str:
    return f"{source}:{index + 1}"


def _check_known(keys: Sequence[str], known: dict[str, int], what: str, source: str) -> None:
    for i, key in enumerate(keys):
        if key not in known:
            raise DataError(f"{_location(source, i)}: qrels name unknown {what} {key!r}")


# --------------------------------------------------------------------------------------------
# BEIR / MTEB JSON Lines


_CORPUS = (Field("_id", str, is_id=True), Field("title", str, required=False),
           Field("text", str))
_QUERIES = (Field("_id", str, is_id=True), Field("text", str))
_QRELS = (Field("query-id", str, is_id=True), Field("corpus-id", str, is_id=True),
          Field("score", int))


def load(folder: str | pathlib.Path) -> Dataset:
    """The dataset in `folder` (corpus.jsonl, queries.jsonl, qrels.jsonl)."""
    folder = pathlib.Path(folder)
    paths = [folder / name for name in FILES]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"{folder} lacks {', '.join(missing)} (a BEIR/MTEB dataset folder holds "
                        f"{', '.join(FILES)}); to build a LIMIT-style corpus, see "
                        f"jaxlab.limit.data.generate")
    corpus, queries, qrels = (read_jsonl(p, f) for p, f in
                              zip(paths, (_CORPUS, _QUERIES, _QRELS), strict=True))
    return Dataset(tuple(itertools.starmap(Document, corpus)),
                   tuple(itertools.starmap(Query, queries)),
                   tuple(itertools.starmap(Judgment, qrels)), sources=tuple(map(str, paths)))


def save(dataset: Dataset, folder: str | pathlib.Path) -> pathlib.Path:
    """Writes `dataset` to `folder` as BEIR/MTEB JSON Lines (each file replaced atomically)."""
    folder = pathlib.Path(folder)
    corpus, queries, qrels = _columns(dataset)
    for name, columns in zip(FILES, (corpus, queries, qrels), strict=True):
        rows = (dict(zip(columns, row, strict=True)) for row in zip(*columns.values(),
                                                                     strict=True))
        write_text(folder / name, jsonl_text(rows))
    return folder


# --------------------------------------------------------------------------------------------
# Hugging Face datasets


def _columns(dataset: Dataset) -> tuple[dict[str, list], dict[str, list], dict[str, list]]:
    """The three parts as columns named as in BEIR/MTEB."""
    def columns(records, fields):
        return {f.key: [getattr(r, name) for r in records]
                for f, name in zip(fields, records[0]._fields, strict=True)}
    return (columns(dataset.corpus, _CORPUS), columns(dataset.queries, _QUERIES),
            columns(dataset.qrels, _QRELS))


def to_hf(dataset: Dataset):
    """A `datasets.DatasetDict` with splits "corpus", "queries" and "qrels" (BEIR/MTEB columns)."""
    import datasets

    parts = dict(zip(("corpus", "queries", "qrels"), _columns(dataset), strict=True))
    return datasets.DatasetDict({name: datasets.Dataset.from_dict(columns)
                                 for name, columns in parts.items()})


def from_hf(parts) -> Dataset:
    """The Dataset held by a mapping with "corpus", "queries" and "qrels" (e.g. a
    `datasets.DatasetDict` from `to_hf`, or three `datasets.Dataset`s loaded from the hub's
    MTEB configs)."""
    records = []
    for name, fields, record in (("corpus", _CORPUS, Document), ("queries", _QUERIES, Query),
                                 ("qrels", _QRELS, Judgment)):
        if name not in parts:
            raise DataError(f"missing split {name!r}; got {sorted(parts)}")
        table = parts[name]
        missing = [f.key for f in fields if f.required and f.key not in table.column_names]
        if missing:
            raise DataError(f"split {name!r} lacks columns {missing}; has {table.column_names}")
        rows = (tuple(field_value(row, f, f"{name}:{i + 1}") for f in fields)
                for i, row in enumerate(table))
        records.append(tuple(itertools.starmap(record, rows)))
    return Dataset(*records)


# --------------------------------------------------------------------------------------------
# The generator


def shipped_attributes() -> tuple[str, ...]:
    """The everyday things of `attributes.txt`, in file order."""
    text = importlib.resources.files(__package__).joinpath("attributes.txt").read_text("utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip())


@dataclasses.dataclass(frozen=True)
class GeneratorConfig:
    """What to generate (defaults: LIMIT-small's shape; num_docs=50_000 gives LIMIT's)."""

    num_docs: int = 46             # corpus size: documents carrying relevance + filler
    num_queries: int = 1000        # M queries, one attribute each ("Who likes X?")
    k: int = 2                     # relevant documents per query
    attributes_per_doc: int = 45   # liked attributes per document (query ones + padding)
    pattern: str = "dense"         # one of PATTERNS: which documents each query finds relevant
    relevant_docs: int | None = None  # documents that carry relevance (None: `pool_size`)
    seed: int = 0

    def __post_init__(self):
        require_positive_ints(self, "num_docs", "num_queries", "k", "attributes_per_doc")
        require(self.pattern in PATTERNS,
                f"GeneratorConfig.pattern must be one of {PATTERNS}, got {self.pattern!r}")
        require(self.relevant_docs is None or (is_int(self.relevant_docs)
                                               and self.relevant_docs >= self.k),
                f"GeneratorConfig.relevant_docs must be None or an integer >= k={self.k}, got "
                f"{self.relevant_docs!r}")
        require(is_int(self.seed), f"GeneratorConfig.seed must be an integer, got {self.seed!r}")



def smallest_dense_pool(num_queries: int, k: int) -> int:
    """The smallest n with C(n, k) >= num_queries (46 for 1000 queries, k = 2)."""
    n = k
    while math.comb(n, k) < num_queries:
        n += 1
    return n


def pool_size(config: GeneratorConfig) -> int:
    """How many documents carry relevance: `relevant_docs` if set, else per pattern
      dense:    the smallest n with C(n, k) >= M;
      cycle:    M (each document relevant to k queries);
      disjoint: M * k (each document relevant to one query);
      random:   every document of the corpus."""
    if config.relevant_docs is not None:
        return config.relevant_docs
    return {"dense": smallest_dense_pool(config.num_queries, config.k),
            "cycle": max(config.num_queries, config.k),
            "disjoint": config.num_queries * config.k,
            "random": config.num_docs}[config.pattern]


def relevance_pattern(pattern: str, num_queries: int, k: int, pool: int,
                      rng: np.random.Generator) -> np.ndarray:
    """int [M, k]: query i's relevant documents, indices into range(pool).

      dense:    the first M k-subsets of range(pool) in lexicographic order
                ((0, 1), (0, 2), ..., as in the released LIMIT); needs C(pool, k) >= M;
      cycle:    documents (i + j) mod pool, j < k;
      disjoint: documents i*k + j, j < k; needs pool >= M*k;
      random:   k distinct documents drawn uniformly for each query.
    Raises DataError saying what would work when the request cannot be met.
    """
    m = num_queries
    if pattern == "dense":
        if math.comb(pool, k) < m:
            raise DataError(
                f"dense pattern: {m} queries with k={k} need C(n, {k}) >= {m} relevant "
                f"documents, i.e. n >= {smallest_dense_pool(m, k)}, but only {pool} are available; "
                f"use num_docs (and relevant_docs) >= {smallest_dense_pool(m, k)} or num_queries "
                f"<= {math.comb(pool, k)}")
        flat = itertools.chain.from_iterable(itertools.combinations(range(pool), k))
        return np.fromiter(itertools.islice(flat, m * k), np.int64, m * k).reshape(m, k)
    if pattern == "cycle":
        return (np.arange(m)[:, None] + np.arange(k)) % pool
    if pattern == "disjoint":
        if pool < m * k:
            raise DataError(f"disjoint pattern: {m} queries with k={k} need {m * k} relevant "
                            f"documents, but only {pool} are available; use num_docs (and "
                            f"relevant_docs) >= {m * k} or num_queries <= {pool // k}")
        return np.arange(m * k).reshape(m, k)
    if pattern == "random":
        return np.stack([rng.choice(pool, size=k, replace=False) for _ in range(m)])
    raise DataError(f"unknown pattern {pattern!r}; expected one of {PATTERNS}")


def generate(config: GeneratorConfig, attributes: Sequence[str] | None = None) -> Dataset:
    """A LIMIT-style dataset, the same for the same config (and Faker version).

    Query i asks "Who likes a_i?" with a_i the i-th of the shuffled attributes; its relevant
    documents (`relevance_pattern` over the first `pool_size` documents) list a_i; every document
    is padded to `attributes_per_doc` attributes with ones no query asks about, drawn without
    replacement; the corpus order is then shuffled, so relevant documents are spread among the
    filler ones. Ids: documents are named by their (unique) person, queries "query_<i>".

    Raises DataError saying what would work when the request cannot be met: too few documents
    for the pattern, a document relevant to more queries than it has attributes, too few
    attributes for the queries and the padding.
    """
    attributes = list(shipped_attributes() if attributes is None else attributes)
    check_unique([a.lower() for a in attributes], "attribute", "attributes")
    m, k, per_doc, n = (config.num_queries, config.k, config.attributes_per_doc,
                        config.num_docs)
    pool = pool_size(config)
    if pool > n:
        raise DataError(f"{config.pattern} pattern: {m} queries with k={k} use {pool} relevant "
                        f"documents but num_docs={n}; use num_docs >= {pool}"
                        + (f" or num_queries <= {math.comb(n, k)}" if config.pattern == "dense"
                           else ""))
    rng = np.random.default_rng(config.seed)
    relevant = relevance_pattern(config.pattern, m, k, pool, rng)         # [M, k]
    load = np.bincount(relevant.ravel(), minlength=n)                     # [n] queries per doc
    if load.max() > per_doc:
        raise DataError(
            f"a document is relevant to {load.max()} queries but holds attributes_per_doc="
            f"{per_doc}; use attributes_per_doc >= {load.max()}, or fewer queries per document "
            f"(a larger relevant_docs, or another pattern)")
    spare = len(attributes) - m
    if spare < per_doc - load.min():
        raise DataError(
            f"{len(attributes)} attributes: {m} go to queries, leaving {max(spare, 0)} for "
            f"padding, but a document needs {per_doc - load.min()}; use num_queries <= "
            f"{len(attributes) - (per_doc - load.min())}, attributes_per_doc <= "
            f"{max(spare, 0) + load.min()}, or a longer attribute list")
    order = rng.permutation(len(attributes))
    query_attrs = [attributes[i] for i in order[:m]]
    padding_attrs = [attributes[i] for i in order[m:]]
    likes = _likes(relevant, n, per_doc, len(padding_attrs), rng)         # n lists of indices
    names = person_names(n, config.seed)
    placement = rng.permutation(n)                                        # doc j -> position
    texts = [_sentence(names[j], [query_attrs[a] if a < m else padding_attrs[a - m]
                                  for a in likes[j]]) for j in range(n)]
    corpus = [None] * n
    for j in range(n):
        corpus[placement[j]] = Document(names[j], "", texts[j])
    queries = tuple(Query(f"query_{i}", f"Who likes {a}?") for i, a in enumerate(query_attrs))
    qrels = tuple(Judgment(f"query_{i}", names[j], 1)
                  for i in range(m) for j in relevant[i])
    return Dataset(tuple(corpus), queries, qrels)


def _likes(relevant: np.ndarray, num_docs: int, per_doc: int, num_padding: int,
           rng: np.random.Generator, block: int = 4096) -> list[list[int]]:
    """Each document's attributes, shuffled: the queries it is relevant to (index i < M) and
    padding drawn without replacement from the non-query attributes (index M + p)."""
    m = len(relevant)
    own: list[list[int]] = [[] for _ in range(num_docs)]
    for i, docs in enumerate(relevant):
        for j in docs:
            own[j].append(i)
    likes = []
    for start in range(0, num_docs, block):
        rows = min(block, num_docs - start)
        # the r smallest of P uniform keys: a uniform r-subset of the padding attributes
        picks = np.argsort(rng.random((rows, num_padding)), axis=1)[:, :per_doc]  # [rows, <=a]
        for r in range(rows):
            mine = own[start + r]
            chosen = mine + [m + int(p) for p in picks[r, :per_doc - len(mine)]]
            likes.append([chosen[i] for i in rng.permutation(len(chosen))])
    return likes


def _sentence(name: str, attributes: Sequence[str]) -> str:
    """ "<Name> likes A, B and C." (the released LIMIT's wording)."""
    if len(attributes) == 1:
        return f"{name} likes {attributes[0]}."
    return f"{name} likes {', '.join(attributes[:-1])} and {attributes[-1]}."


def person_names(count: int, seed: int, locale: str = "en_US") -> list[str]:
    """`count` distinct "First Last" names, in draw order, from a Faker seeded with `seed`
    (repeats are redrawn, up to 20 draws per name)."""
    faker = require_extra("faker", "limit", "LIMIT dataset generation (person names)")
    fake = faker.Faker(locale)
    fake.seed_instance(seed)
    names: dict[str, None] = {}
    draws = 20 * count + 100
    for _ in range(draws):
        if len(names) == count:
            break
        names[f"{fake.first_name()} {fake.last_name()}"] = None
    if len(names) < count:
        raise DataError(f"Faker ({locale}) gave only {len(names)} distinct names in {draws} "
                        f"draws; ask for at most {len(names)} documents")
    return list(names)
