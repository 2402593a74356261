"""experiments/rl_memory.py on a tiny Qwen3 folder, compiled for this machine's CPU: its figures
against independent counts (the checkpoint's tensors, the KV from shapes, the memory check
`loop.run` makes), and the GPU configs it measured load as train_grpo reads them."""

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from jaxlab import config as config_lib
from jaxlab.models import hf, zoo
from jaxlab.rl import loop, train
from jaxlab.sampling import memory

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "experiments"))
import rl_memory  # noqa: E402
import train_grpo  # noqa: E402

GPU_CONFIGS = ("configs/rl/math_qwen3_0.6b_gpu.yaml", "configs/rl/math_qwen3_1.7b_gpu.yaml")
# 4 prompts x 4 responses in 2 minibatches of 8 rows, 2 micro-batches of one group each;
# prompts of up to 16 tokens (padded to the sampler's bucket of 64), 16 new tokens.
TINY = """compute_dtype: bfloat16
eval_samples: 2
task: {kind: math, path: "", eval_limit: 3}
loop:
  prompts: 4
  group_size: 4
  max_prompt_tokens: 16
  max_new_tokens: 16
  minibatches: 2
  train: {microbatches: 2, remat: full, logprob_chunk: 8}
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = zoo.create("qwen3", tmp_path_factory.mktemp("model") / "tiny")
    path = tmp_path_factory.mktemp("config") / "tiny.yaml"
    path.write_text(TINY)
    cfg = rl_memory.load_config(str(path), [f"model={folder}"])  # no task file: not read
    arch, source = rl_memory.architecture(cfg, shape=None)
    found = rl_memory.compile_devices("cpu", cfg.mesh.size)
    return SimpleNamespace(folder=folder, path=path, cfg=cfg, arch=arch, source=source,
                           found=found,
                           figures=rl_memory.measure(cfg, arch, found.devices))


def parameter_count(folder: Path) -> int:
    """Entries of the checkpoint's tensors, from the safetensors headers."""
    return sum(math.prod(json.loads(spec[spec.index("["):]))
               for spec in hf.tensor_specs(folder).values())


def test_the_architecture_is_the_model_folders_and_the_state_is_three_float32_copies(tiny):
    arch, figures = tiny.arch, tiny.figures
    assert tiny.source == str(tiny.folder) and arch.num_layers == 2 and arch.vocab_size == 512
    assert (arch.param_dtype, arch.compute_dtype) == ("float32", "bfloat16")
    n = parameter_count(tiny.folder)
    step = figures["step"]
    assert step["parameters"] == n
    # parameters and AdamW's two moments, float32; besides them a few scalars (step, key, count)
    assert 12 * n <= figures["state"] <= 12 * n + 64
    assert step["gradients"] == 4 * n
    assert "CPU compiler" in tiny.found.compiler and tiny.found.jax_bytes is None


def test_the_step_is_the_one_loop_run_builds_and_checks(tiny):
    cfg, figures = tiny.cfg, tiny.figures
    s, step = figures["settings"], figures["step"]
    # prompts x group_size / minibatches rows of prompt + response tokens, groups shared
    assert (s["rows"], s["width"], s["shared_prompts"]) == (8, 32, True)
    assert step["peak"] == step["arguments"] + step["new outputs"] + step["temporaries"]
    # tokens, mask, loss mask, old log-probs, advantages (the reference log-probs are read only
    # with a KL term: kl_coef is 0)
    assert step["arguments"] == figures["state"] + 8 * 32 * 4 * 4 + 8 * 4
    # the memory check loop.run makes, made to compile the step (its estimate > half of this)
    policy = hf.load_pretrained(tiny.folder, param_dtype="float32", compute_dtype="bfloat16")
    mesh = rl_memory.loop_mesh(cfg, tiny.found.devices)
    checked = train.require_policy_step_fits(
        policy, 8, 32, cfg.loop.train, mesh, cfg.loop.temperature,
        loop.shared_prompts(cfg.loop, cfg.loop.max_prompt_tokens, 1), device_bytes=step["peak"])
    assert checked == step["peak"]


def test_the_samplers_kv_is_the_one_counted_from_shapes(tiny):
    figures = tiny.figures
    rollouts, held_out = figures["sampler"], figures["eval"]
    assert rollouts["loop"] == held_out["loop"] == "compiled"
    # 2 layers x (K, V) x 2 kv heads x 16 dims, bfloat16: 256 bytes a token; prompts padded to
    # 64 tokens once each, 16 generated slots for each response
    assert rollouts["prompt KV"] + rollouts["generated KV"] == 256 * (4 * 64 + 4 * 4 * 16)
    assert rollouts["prompt KV"] + rollouts["generated KV"] == memory.kv_cache_bytes(
        tiny.arch, 4, 16, tiny.cfg.loop.sampling)
    assert rollouts["weights"] == 2 * figures["step"]["parameters"]  # the compute dtype
    # held out: min(tasks.evaluate's batch, eval_limit=3) prompts x eval_samples, float32
    assert (held_out["prompts"], held_out["slots"]) == (3, 6)
    assert held_out["weights"] == 4 * figures["step"]["parameters"]
    for need in (rollouts, held_out):
        assert need["peak"] == max(need["loop peak"], need["prefill peak"])
        assert need["loop peak"] >= need["weights"] + need["prompt KV"] + need["generated KV"]


def test_each_phase_adds_what_the_run_holds_at_once(tiny):
    figures = tiny.figures
    n = figures["step"]["parameters"]
    phases = figures["phases"]
    assert phases["rollouts"] == {
        "parameters and AdamW state": figures["state"], "reference policy": 2 * n,
        "policy as loaded": 4 * n, "sampler peak": figures["sampler"]["peak"],
        "total": figures["state"] + 6 * n + figures["sampler"]["peak"]}
    assert phases["policy step"]["total"] == (figures["step"]["peak"] + 6 * n
                                              + 16 * (4 * 5 * 32 + 4))
    # after training the optimizer state and the loaded policy are freed: the sampler alone,
    # whose peak holds the trained weights it samples from
    assert phases["evaluation after training"]["total"] == figures["eval"]["peak"]
    assert figures["eval"]["weights"] == 4 * n


def test_the_command_prints_the_table_and_writes_the_json(tiny, tmp_path, capsys):
    out = tmp_path / "memory.json"
    # the fixture's run again (its programs are compiled already)
    result = rl_memory.main(["--config", str(tiny.path), "--target", "cpu", "--out", str(out),
                             f"model={tiny.folder}"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["figures"] == json.loads(json.dumps(tiny.figures))
    text = capsys.readouterr().out
    assert "XLA's CPU compiler" in text and "policy step: 8 rows x 32 tokens" in text
    assert "held-out eval sampler: 3 prompts, 6 slots" in text


@pytest.mark.parametrize("path", GPU_CONFIGS)
def test_the_gpu_configs_load_as_train_grpo_reads_them(path, capsys):
    with pytest.raises(SystemExit) as stop:
        config_lib.from_command_line(train_grpo.Config, ["--config", str(ROOT / path), "model=x",
                                                         "task.path=y", "--check"])
    assert stop.value.code == 0 and "a valid config" in capsys.readouterr().out
    cfg = config_lib.load_config(train_grpo.Config, ROOT / path, ["model=x", "task.path=y"])
    assert cfg.compute_dtype == "bfloat16" and cfg.task.kind == "math"
    assert cfg.task.rewards == {"accuracy": 1.0, "format": 0.1}
    assert (cfg.model, cfg.task.path) == ("x", "y")
    # what loop.run requires of one device: rows in minibatches and micro-batches, and whole
    # groups per micro-batch (each prompt run once in the step)
    rows = cfg.loop.prompts * cfg.loop.group_size // cfg.loop.minibatches
    assert rows % cfg.loop.train.microbatches == 0
    assert loop.shared_prompts(cfg.loop, cfg.loop.max_prompt_tokens, 1) is not None
    # rl_memory reads them with neither model nor task file
    assert rl_memory.load_config(str(ROOT / path), []).loop == cfg.loop


def test_without_a_model_folder_the_shape_is_a_released_qwen3():
    cfg = rl_memory.load_config(str(ROOT / GPU_CONFIGS[0]), [])
    arch, source = rl_memory.architecture(cfg, "1.7B")
    assert (arch.hidden_size, arch.num_layers, arch.compute_dtype) == (2048, 28, "bfloat16")
    assert "1.7B" in source
    with pytest.raises(ValueError, match="--shape"):
        rl_memory.architecture(cfg, None)
    assert arch.param_dtype == "float32"
