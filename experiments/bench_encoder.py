"""Encoding speed: our Flax MiniLM (jitted, length-bucketed) vs sentence-transformers, same texts.

    python experiments/bench_encoder.py [--texts 512] [--batch-size 32] [--out bench_encoder.json]

Texts are documents of a generated LIMIT-style corpus (~160 tokens each). Both encoders embed the
same texts once to warm up (our compilation, their lazy setup), then are timed on a second pass;
the agreement of their embeddings is reported beside the speed. Prints a table with the ratio and
writes JSON.
"""

from __future__ import annotations

import argparse
import pathlib

import numpy as np

from jaxlab import results
from jaxlab.limit import data
from jaxlab.models import hf
from jaxlab.timing import best_of


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", default="bench_encoder.json")
    args = parser.parse_args()
    import torch
    from sentence_transformers import SentenceTransformer

    corpus = data.generate(data.GeneratorConfig(num_docs=args.texts, seed=1)).corpus
    texts = [d.text for d in corpus]
    ours = hf.load_sentence_encoder(batch_size=args.batch_size)
    theirs = SentenceTransformer(str(hf.minilm_folder()), device="cpu")
    ours_vectors, ours_seconds = best_of(lambda: ours.encode(texts), repeats=1)
    with torch.inference_mode():
        st_vectors, st_seconds = best_of(lambda: theirs.encode(
            texts, batch_size=args.batch_size, normalize_embeddings=True), repeats=1)
    cosine = np.sum(ours_vectors * st_vectors, axis=1)
    report = {
        "texts": len(texts), "batch_size": args.batch_size,
        "mean_tokens": float(np.mean([len(r) for r in ours.tokenize(texts)])),
        "torch_threads": torch.get_num_threads(),
        "jaxlab_docs_per_s": len(texts) / ours_seconds,
        "sentence_transformers_docs_per_s": len(texts) / st_seconds,
        "ratio_jaxlab_over_st": st_seconds / ours_seconds,
        "max_cosine_distance": float(np.max(1.0 - cosine)),
    }
    print(f"{'encoder':>24} {'docs/s':>9}\n"
          f"{'jaxlab (Flax NNX, jit)':>24} {report['jaxlab_docs_per_s']:9.1f}\n"
          f"{'sentence-transformers':>24} {report['sentence_transformers_docs_per_s']:9.1f}\n"
          f"ratio (jaxlab / sentence-transformers): {report['ratio_jaxlab_over_st']:.2f}x; "
          f"max cosine distance {report['max_cosine_distance']:.1e}; {len(texts)} texts of "
          f"{report['mean_tokens']:.0f} tokens on average")
    results.write_json(pathlib.Path(args.out), report)
    return report


if __name__ == "__main__":
    main()
