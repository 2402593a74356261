"""Compiling for TPU and GPU targets with no device present (`jaxlab.targets`, `jaxlab.aot`): the
targets' own compilers (libtpu, XLA's CUDA plugin) compile the real programs, which are read
back: their arguments per device, their kernels, whether they fit.

The Qwen3-0.6B decode loop (256 slots) and policy step (fsdp 8) are compiled for one TPU target
(v5e-8) and one GPU target (H100 x 8) with 4 of the model's 28 layers: every shape of the model
but its depth, so every check below holds at any depth, in a fifth of the compile time (the
full depth: `experiments/compile_for.py`, docs/benchmarks.md). Also each Pallas kernel for its
target, and programs larger than HBM.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from jaxlab import aot, parallel, targets
from jaxlab.models.backend import POLICIES
from jaxlab.models.decoder import Decoder
from jaxlab.sampling import sampler
from jaxlab.sampling.memory import lower_decode

TPU, GPU = "tpu-v5e-8", "h100-8"
# 32 prompts x n = 8: 256 slots; short prompts and traces (the program is the same for any
# length; only its buffers grow). The policy step: 8 rows x 2,048 tokens, remat full.
SIZES = aot.JobSizes(model="qwen3-0.6b", layers=4, prompts=32, group_size=8, max_prompt_tokens=64,
                     max_new_tokens=128, rows=8, width=2048, remat="full")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def compiled_jobs(target: str, jobs: tuple[str, ...]):
    programs: dict = {}
    records = {job: aot.compile_job(job, target, SIZES, programs) for job in jobs}
    return records, programs


@pytest.fixture(scope="module")
def tpu():
    return compiled_jobs(TPU, ("decode", "train"))


@pytest.fixture(scope="module")
def gpu():
    return compiled_jobs(GPU, ("decode", "train"))


def entry_parameters(hlo: str) -> dict[str, str]:
    """The compiled program's parameters: {argument name: per-device shape, e.g.
    "bf16[32,8,128,128]"}."""
    entry = hlo[hlo.index("\nENTRY"):]
    entry = entry[:entry.index("\n}")]
    return {name: shape for shape, name in re.findall(
        r"= (\w+\[[\d,]*\])\S* parameter\(\d+\).*?op_name=\"([^\"]+)\"", entry)}


def num_params(config) -> int:
    model = nnx.eval_shape(lambda: Decoder(config, nnx.Rngs(0), "tpu"))
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


# --------------------------------------------------------------------------------------------
# Targets


@pytest.mark.parametrize("name, count, platform", [
    ("tpu-v5e-8", 8, "tpu"), ("tpu-v6e-8", 8, "tpu"), ("tpu-v5p-8", 4, "tpu"),
    ("tpu-v5p-64", 32, "tpu"), ("h100-8", 8, "gpu"), ("h200-1", 1, "gpu")])
def test_a_target_gives_its_compile_only_devices_and_their_memory(name, count, platform):
    devices = targets.devices(name)
    assert len(devices) == count
    assert {d.device_kind for d in devices} == {targets.TARGETS[name].device_kind}
    assert {d.platform for d in devices} == {platform}
    # memory_stats() fails on a compile-only device: the table answers
    assert parallel.device_memory_bytes(devices[-1]) == targets.hbm_bytes(name)
    mesh = parallel.MeshConfig(fsdp=count).build(devices)
    assert list(mesh.devices.flat) == list(devices)
    assert parallel.single_device_mesh(devices=devices).devices.flat[0] == devices[0]


def test_an_unknown_target_is_an_error_listing_the_targets():
    with pytest.raises(ValueError, match=r"unknown compile target 'tpu-v9'.*h100-8"):
        targets.devices("tpu-v9")


# --------------------------------------------------------------------------------------------
# TPU: the decode loop and the policy step


def test_the_tpu_decode_loop_holds_a_bfloat16_cache_split_over_the_chips(tpu):
    records, programs = tpu
    r = records["decode"]
    assert r["compiled"] and r["fits"] and r["policy"] == "tpu", r
    # XLA cannot partition a Mosaic kernel: over 8 chips the loop runs the portable attention
    assert r["decode_kernel"] == "portable" and r["kernel"] is None
    c = aot.decoder_config(SIZES, training=False)
    slots, t_gen, length = 256 // 8, sampler.generated_slots(128), 64
    params = entry_parameters(programs["decode"].as_text())
    cache = {k: v for k, v in params.items() if re.fullmatch(r"cache\.(keys|values)\[\d+\]", k)}
    assert len(cache) == 2 * c.num_layers
    assert set(cache.values()) == {f"bf16[{slots},{c.num_kv_heads},{t_gen},{c.head_dim}]"}
    assert not [k for k, v in params.items() if v.startswith("u16")]
    # per device: the bfloat16 weights (replicated), 1/8 of the generated KV, each prompt's KV,
    # the prompts' last logits [P, V] float32, the output rows [P n, T] (4 arrays of 4 bytes)
    kv = 2 * c.num_layers * c.num_kv_heads * c.head_dim * 2  # bytes per token
    want = (2 * num_params(c) + kv * slots * t_gen + kv * 32 * length
            + 32 * c.vocab_size * 4 + 256 * 128 * 4 * 4)
    assert abs(r["argument_bytes"] - want) < 2**16, (r["argument_bytes"], want)
    assert r["alias_bytes"] >= kv * slots * t_gen  # the generated KV is updated in place
    assert r["flops"] > 0 and 0 < r["roofline_seconds"] < 1


def test_the_cpu_policy_would_hold_the_cache_as_bits():
    """What the test above rules out: the CPU policy's loop, lowered for the same devices,
    holds its bfloat16 cache as uint16 bits."""
    devices = targets.devices(TPU)
    mesh = aot.decode_mesh(devices, SIZES)
    programs = lower_decode(aot.decoder_config(SIZES, training=False), 32, 64,
                            aot.sampling_config(SIZES), mesh, POLICIES["cpu"])
    dtypes = {jax.tree_util.keystr(path): leaf.dtype
              for path, leaf in jax.tree_util.tree_leaves_with_path(programs.loop.args_info)}
    # `decode_loop`'s argument 4, the generated KV (the prefix of one block is read as floats)
    cache = {k: v for k, v in dtypes.items() if re.match(r"\[0\]\[4\]\.(keys|values)", k)}
    layers = aot.decoder_config(SIZES, training=False).num_layers
    assert len(cache) == 2 * layers and {str(v) for v in cache.values()} == {"uint16"}


@pytest.mark.parametrize("which", ["tpu", "gpu"])
def test_the_fsdp_policy_step_holds_an_eighth_of_the_state_per_device(which, request):
    records, _ = request.getfixturevalue(which)
    r = records["train"]
    assert r["compiled"] and r["fits"] and r["mesh"]["fsdp"] == 8, r
    params = num_params(aot.decoder_config(SIZES, training=True))
    # float32 master weights + AdamW's two float32 moments, split 8 ways (norm scales, a few
    # KiB, replicated), and 1/8 of the batch: tokens, masks, log-probs [B, T] of 4 bytes
    state = params * 12 / 8
    batch = SIZES.rows * SIZES.width * 5 * 4 / 8
    assert state + batch <= r["argument_bytes"] <= 1.002 * state + batch + 2**20, r
    assert r["alias_bytes"] >= state  # the state is donated and updated in place


# --------------------------------------------------------------------------------------------
# GPU


def test_the_gpu_decode_loop_runs_the_triton_kernel(gpu):
    records, _ = gpu
    r = records["decode"]
    assert r["compiled"] and r["fits"] and r["policy"] == "gpu", r
    assert r["kernel"] == "triton" and r["kernel_calls"] >= SIZES.layers
    assert r["flops"] is None and r["roofline_seconds"] is None  # no GPU cost analysis


@pytest.mark.parametrize("paging", [dict(kv_pages=64), dict(scan_layers=True)])
def test_the_gpu_decode_loop_reads_paged_and_stacked_caches_with_the_paged_kernel(paging):
    # one device (a paged cache is not split over a mesh), 2 layers: the loop's program is the
    # same at any depth
    sizes = aot.JobSizes(prompts=4, group_size=2, max_prompt_tokens=64, max_new_tokens=256,
                         layers=2,
                         decode_devices=1, **paging)
    r = aot.compile_job("decode", GPU, sizes)
    assert r["compiled"] and r["fits"] and r["decode_kernel"] == "auto", r
    assert r["kernel"] == "triton" and r["kernel_calls"] >= 1


# --------------------------------------------------------------------------------------------
# Programs larger than HBM; Pallas kernels; failures recorded


BIG = aot.JobSizes(prompts=32, group_size=8, max_prompt_tokens=64, max_new_tokens=32768,
                   decode_devices=1)


def test_a_tpu_program_larger_than_hbm_is_refused_and_reported():
    # 256 slots x 32k tokens: 64 GiB of KV a layer pair, on one 15.75 GiB chip
    r = aot.compile_job("decode", TPU, aot.JobSizes(**{**vars(BIG), "layers": 2}))
    assert not r["compiled"] and r["fits"] is False
    assert "RESOURCE_EXHAUSTED" in r["error"] and r["peak_bytes"] is None


def test_a_gpu_program_larger_than_hbm_compiles_but_does_not_fit():
    r = aot.compile_job("decode", GPU, aot.JobSizes(**{**vars(BIG), "layers": 4}))
    assert r["compiled"] and r["fits"] is False
    assert r["peak_bytes"] > targets.hbm_bytes(GPU) > r["peak_bytes"] / 2


def test_the_tpu_kernel_compiles_and_a_failing_job_is_recorded_not_raised():
    sizes = aot.JobSizes(prompts=4, group_size=1, max_new_tokens=1024)
    result = aot.compile_for(TPU, ("decode", "pallas", "pallas_paged"), sizes)
    decode = result["jobs"]["decode"]
    assert not decode["compiled"] and "must divide evenly over 8 devices" in decode["error"]
    for job in ("pallas", "pallas_paged"):
        pallas = result["jobs"][job]
        assert pallas["compiled"] and pallas["kernel"] == "mosaic", pallas
        assert pallas["kernel_calls"] == 1 and pallas["decode_kernel"] == "pallas_tpu"
        assert pallas["flops"] > 0
    assert "must divide evenly" in aot.table(result)


def test_compile_for_writes_the_gpu_kernels_json(tmp_path):
    out = tmp_path / "h100.json"
    run = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "compile_for.py"),
                          "--target", GPU, "--jobs", "pallas,pallas_paged", "--prompts", "4",
                          "--out", str(out)], capture_output=True, text=True, cwd=tmp_path,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["target"] == GPU and result["devices"] == 8
    for job, kernel in (("pallas", "pallas_gpu"), ("pallas_paged", "pallas_gpu_paged")):
        r = result["jobs"][job]
        assert r["compiled"] and r["kernel"] == "triton" and r["policy"] == "gpu", r
        assert r["decode_kernel"] == kernel
        assert r["argument_bytes"] > 0 and r["peak_bytes"] == (
            r["argument_bytes"] + r["output_bytes"] + r["temp_bytes"] - r["alias_bytes"])
    assert "pallas" in run.stdout and "triton" in run.stdout
    assert np.isclose(r["hbm_bytes"] / 2**30, 79.11, atol=0.01)
