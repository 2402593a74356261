"""experiments/bench_train_step.py's correctness check at a tiny size: our jitted policy step and
transformers' Qwen3ForCausalLM + PyTorch AdamW, loaded from one folder, take the same first two
steps; a baseline that disagrees stops the benchmark."""

import os

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from flax import nnx

from jaxlab.models import hf, zoo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "experiments"))  # it imports timing.py
    import bench_train_step
    return bench_train_step


def test_train_step_matches_pytorch(bench, tmp_path):
    path = zoo.create("qwen3", tmp_path / "model", size="tiny")
    model = hf.load_pretrained(path)
    batch = bench.make_batch(*nnx.split(model), 2, 32, model.config.vocab_size)
    ours = bench.bench_ours(model, batch, repeats=1)
    theirs = bench.bench_torch(path, batch, "float32", repeats=1, threads=1)
    gaps = bench.check_agreement(ours, theirs, tolerance=1e-4)
    assert gaps["loss"] < 1e-5 and gaps["loss_2"] < 1e-5, gaps
    assert ours["loss"] != ours["loss_2"]  # the first update changed the weights
    with pytest.raises(RuntimeError, match="disagree"):
        bench.check_agreement(ours, {**theirs, "loss_2": theirs["loss_2"] * 1.001}, 1e-4)
