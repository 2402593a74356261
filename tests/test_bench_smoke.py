"""experiments/bench_train_step.py's correctness check at a tiny size: our jitted policy step and
transformers' Qwen3ForCausalLM + PyTorch AdamW, loaded from one folder, take the same first two
steps; a baseline that disagrees stops the benchmark.

The benchmark runs in a fresh process, as a user runs it: late in a full test session, XLA's CPU
compiler (JAX 0.10.2) crashed compiling this step in-process after hundreds of other programs,
while the same compile passes alone."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, "experiments")   # bench_train_step.py, a script
    import bench_train_step as bench
    from flax import nnx
    from jaxlab.models import hf, zoo

    path = zoo.create("qwen3", sys.argv[1], size="tiny")
    model = hf.load_pretrained(path)
    batch = bench.make_batch(*nnx.split(model), 2, 32, model.config.vocab_size)
    ours = bench.bench_ours(model, batch, repeats=1)
    theirs = bench.bench_torch(path, batch, "float32", repeats=1, threads=1)
    gaps = bench.check_agreement(ours, theirs, tolerance=1e-4)
    try:
        bench.check_agreement(ours, {**theirs, "loss_2": theirs["loss_2"] * 1.001}, 1e-4)
        refused = False
    except RuntimeError as error:
        refused = "disagree" in str(error)
    print(json.dumps({"gaps": gaps, "ours": ours, "refused": refused}))
""")


def test_train_step_matches_pytorch(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "model")], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    gaps, ours = result["gaps"], result["ours"]
    assert gaps["loss"] < 1e-5 and gaps["loss_2"] < 1e-5, gaps
    assert ours["loss"] != ours["loss_2"]  # the first update changed the weights
    assert result["refused"]               # a baseline that disagrees stops the benchmark
