import json
import os
import subprocess
import sys

import numpy as np

from jaxlab import arrays

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")

CONFIG = """
datasets:
  - name: tiny
    generate: {num_docs: 20, num_queries: 30, k: 2, attributes_per_doc: 10, pattern: dense, seed: 0}
ks: [2, 10]
bm25: true
minilm: true
minilm_dims: [128, 32]
free_dims: [6]
solver: {k: 2, steps: 3000}
minilm_chunk: 8
"""


def _cli(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.path.abspath(ROOT))
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "experiments", "limit_eval.py"), "--config",
         str(tmp_path / "config.in.yaml"), f"out_dir={tmp_path / 'out'}"],
        capture_output=True, text=True, env=env, timeout=600)


def test_cli_names_every_retriever_and_redoes_only_what_is_missing(tmp_path):
    (tmp_path / "config.in.yaml").write_text(CONFIG)
    first = _cli(tmp_path)
    assert first.returncode == 0, first.stderr
    out = tmp_path / "out"
    metrics = json.loads((out / "metrics.json").read_text())
    # truncations are "minilm-d<dim>" even when the full size (384, "minilm") is not asked for
    assert set(metrics["tiny"]) == {"bm25", "minilm-d128", "minilm-d32", "free-d6"}
    for retriever, values in metrics["tiny"].items():
        assert set(values) == {"recall@2", "recall@10", "ndcg@10"}
        assert all(0 <= v <= 1 for v in values.values())
        # The MTEB record holds the same figures under MTEB's names, its whole k list (the
        # rankings hold all 20 documents) and LIMIT's main score, recall@2.
        mteb = json.loads((out / "mteb" / retriever / "tiny.json").read_text())
        scores = mteb["scores"]["test"][0]
        assert mteb["task_name"] == "tiny" and scores["main_score"] == values["recall@2"]
        assert scores["ndcg_at_10"] == values["ndcg@10"] and scores["recall_at_1000"] == 1.0
    details = json.loads((out / "details.json").read_text())["tiny"]
    assert details["free_embedding"]["free-d6"]["solved"]
    assert metrics["tiny"]["free-d6"]["recall@2"] == 1.0  # solved: every top-2 exact
    # MiniLM vectors in zarr chunks of 8 texts: docs 3 chunks, queries 4, every one complete
    embeddings = {part: arrays.open_store(out / "embeddings" / f"tiny-{part}",
                                          {"vectors": ((rows, 384), "float32")}, 8)
                  for part, rows in (("docs", 20), ("queries", 30))}
    docs = arrays.read(embeddings["docs"], "vectors")
    np.testing.assert_allclose(np.linalg.norm(docs, axis=1), 1, atol=1e-5)  # unit, all written
    assert [arrays.missing_chunks(s) for s in embeddings.values()] == [[], []]
    assert details["encoding"]["docs"] == {**details["encoding"]["docs"], "texts": 20, "chunks": 3}
    assert (out / "recall.png").stat().st_size > 0

    # Drop one retriever: a rerun computes it again and leaves the others as they were. It
    # needs the embeddings: a docs chunk without its done flag (as a kill between the chunk's
    # data and its flag leaves it) is encoded again, the complete chunks are read back.
    del metrics["tiny"]["minilm-d32"]
    (out / "metrics.json").write_text(json.dumps(metrics))
    arrays.write_rows(embeddings["docs"].done, 1, np.zeros(1, np.uint8))
    kept = (out / "embeddings" / "tiny-docs" / "vectors" / "c" / "0" / "0").stat().st_mtime_ns
    second = _cli(tmp_path)
    assert second.returncode == 0, second.stderr
    again = json.loads((out / "metrics.json").read_text())["tiny"]
    assert set(again) == {"bm25", "minilm-d128", "minilm-d32", "free-d6"}
    seconds = json.loads((out / "details.json").read_text())["tiny"]["seconds"]
    for name in ("bm25", "minilm-d128", "free-d6"):  # not rerun: their timings are unchanged
        assert seconds[name] == details["seconds"][name]
    encoding = json.loads((out / "details.json").read_text())["tiny"]["encoding"]
    assert encoding["docs"]["texts"] == 8 and encoding["docs"]["chunks"] == 1  # chunk 1 only
    assert encoding["queries"] == details["encoding"]["queries"]  # every query chunk reused
    assert (out / "embeddings" / "tiny-docs" / "vectors" / "c" / "0" / "0").stat().st_mtime_ns \
        == kept
    np.testing.assert_allclose(arrays.read(embeddings["docs"], "vectors"), docs, atol=1e-5)
