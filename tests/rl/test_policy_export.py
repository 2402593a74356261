"""The trained policy as a Hugging Face folder: `scaffold.run` hands each checkpointed state to
`on_save`, `hf.save_policy` swaps a whole folder in, a policy/ left mid-run by a training job
loads in transformers with jaxlab's logits and the parameters of its checkpoint, and the RL
loop writes one at each checkpoint."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from jaxlab.checkpoint import Checkpointer
from jaxlab.deepconf import arithmetic, arithmetic_model
from jaxlab.models import hf
from jaxlab.models.decoder import Decoder
from jaxlab.rl import loop, scaffold, sft, train
from tests.rl import loop_job
from tests.rl.test_scaffold import _state, _step, _weights


class Killed(Exception):
    """Stands for a kill at a chosen moment."""


def _recorder(seen: list, fail_at: int | None = None):
    """An on_save noting (optimizer step, weights) of each state; raises at step `fail_at`."""
    def on_save(state):
        if int(state.step) == fail_at:
            raise Killed
        seen.append((int(state.step), _weights(state)))
    return on_save


def test_on_save_sees_each_checkpointed_state_and_the_state_a_run_resumes_from(tmp_path):
    start = _weights(_state())
    seen = []
    # 5 steps, a checkpoint every 2: after steps 1 and 3 (0-based) and at the end.
    scaffold.run(_state(), _step, scaffold.Schedule(5, checkpoint_every=2, keep_checkpoints=5),
                 tmp_path / "whole", on_save=_recorder(seen))
    assert [step for step, _ in seen] == [2, 4, 5]
    with Checkpointer(tmp_path / "whole" / "checkpoints") as checkpointer:
        assert checkpointer.all_steps() == [2, 4, 5]
    for step, weights in seen:  # step s adds 1 to every weight: the saved state's own
        for got, before in zip(weights, start, strict=True):
            np.testing.assert_array_equal(got, before + step)

    # Killed in on_save after the checkpoint of step 4: the rerun hands the restored state
    # over first, then the checkpoints it saves.
    cut, seen = tmp_path / "cut", []
    with pytest.raises(Killed):
        scaffold.run(_state(), _step, scaffold.Schedule(5, checkpoint_every=2), cut,
                     on_save=_recorder(seen, fail_at=4))
    assert [step for step, _ in seen] == [2]
    seen = []
    scaffold.run(_state(), _step, scaffold.Schedule(5, checkpoint_every=2), cut,
                 on_save=_recorder(seen))
    assert [step for step, _ in seen] == [4, 5]
    seen = []  # a finished run, rerun: its final state once
    scaffold.run(_state(), _step, scaffold.Schedule(5, checkpoint_every=2), cut,
                 on_save=_recorder(seen))
    assert [step for step, _ in seen] == [5]
    for got, before in zip(seen[0][1], start, strict=True):
        np.testing.assert_array_equal(got, before + 5)


def _leaves(params) -> dict:
    """{path: array} of a parameter tree (a model's nnx.Param state, a train state's params)."""
    return {jax.tree_util.keystr(path): np.asarray(x)
            for path, x in jax.tree_util.tree_leaves_with_path(params)}


def _params(model) -> dict:
    return _leaves(nnx.state(model, nnx.Param))


def test_save_policy_swaps_a_whole_folder_in_even_after_a_kill(tmp_path, monkeypatch):
    first, second = (Decoder(loop_job.CONFIG, nnx.Rngs(seed)) for seed in (0, 1))
    policy = tmp_path / "policy"
    with pytest.raises(ValueError, match=r"\['bogus'\] are not fields"):
        hf.save_policy(first, policy, eos_token_id=1, bogus=1)
    with pytest.raises(ValueError, match="`do_sample` is not set to `True`"):
        hf.save_policy(first, policy, eos_token_id=1, temperature=0.5)
    with pytest.raises(ValueError, match="`do_sample` is not set to `True`"):  # before a run
        scaffold.export_policy(first, policy, eos_token_id=1, top_p=0.9)
    assert not list(tmp_path.glob("policy*"))  # refused before anything was written
    hf.save_policy(first, policy, eos_token_id=1, **hf.generation_fields(0.0))
    assert sorted(p.name for p in tmp_path.glob("policy*")) == ["policy"]
    assert json.loads((policy / "generation_config.json").read_text())["do_sample"] is False

    # Killed between the swap's two renames: policy/ is absent, the old folder and the whole
    # new one beside it; the next save finishes that swap first (here a save that fails).
    replace = os.replace

    def killed_at_the_second_rename(src, dst):
        if str(src).endswith("policy.partial") and str(dst) == str(policy):
            raise Killed
        replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_at_the_second_rename)
    with pytest.raises(Killed):
        hf.save_policy(second, policy, eos_token_id=1)
    monkeypatch.setattr(os, "replace", replace)
    assert sorted(p.name for p in tmp_path.glob("policy*")) == ["policy.old", "policy.partial"]

    def fails(*args, **kwargs):
        raise Killed

    monkeypatch.setattr(hf, "save_pretrained", fails)
    with pytest.raises(Killed):
        hf.save_policy(first, policy, eos_token_id=1)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.glob("policy*")) == ["policy"]
    loaded, want = _params(hf.load_pretrained(policy)), _params(second)
    for path, value in want.items():
        np.testing.assert_array_equal(loaded[path], value, err_msg=path)
    # A leftover of a write cut short (a partial folder) is removed by the next save.
    (tmp_path / "policy.partial").mkdir()
    (tmp_path / "policy.partial" / "model.safetensors").write_bytes(b"cut")
    hf.save_policy(first, policy, eos_token_id=1)
    assert sorted(p.name for p in tmp_path.glob("policy*")) == ["policy"]


def _tiny_arithmetic() -> arithmetic_model.Config:
    return arithmetic_model.Config(
        terms=2, length=40, hidden_size=16, layers=1, heads=2, eval_problems=2,
        fit=sft.FitConfig(steps=6, batch_size=4, log_every=1, checkpoint_every=2,
                          keep_checkpoints=2, optimizer=train.OptimizerConfig(
                              learning_rate=3e-3, warmup_steps=1, decay_steps=6)))


def test_a_policy_left_mid_run_loads_in_transformers_as_its_checkpoint(tmp_path, monkeypatch):
    """The arithmetic model (SFT) killed at step 5 of 6: policy/ holds checkpoint 4, which
    transformers loads with jaxlab's logits; the finished run's model folder is policy/ too."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    monkeypatch.setattr(arithmetic, "greedy_accuracy", lambda *a: 0.25)  # no evaluation
    cfg, out = _tiny_arithmetic(), tmp_path / "model"
    step, calls = sft._step, []

    def dies_at_step_5(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise Killed
        return step(*args, **kwargs)

    monkeypatch.setattr(sft, "_step", dies_at_step_5)
    with pytest.raises(Killed):
        arithmetic_model.train(cfg, out)
    monkeypatch.setattr(sft, "_step", step)
    assert not (out / "config.json").exists()  # the model folder: once it is trained
    policy = out / arithmetic_model.POLICY
    _, target = train.init_train_state(
        Decoder(arithmetic_model.decoder_config(cfg), nnx.Rngs(0)), cfg.fit.optimizer,
        jax.random.key(0))
    with Checkpointer(out / "checkpoints") as checkpointer:
        assert checkpointer.all_steps() == [2, 4]
        saved = _leaves(checkpointer.restore(target).params)
    ours = hf.load_pretrained(policy)
    got = _params(ours)
    assert got.keys() == saved.keys()
    for path, value in saved.items():  # checkpoint 4's parameters, exactly
        np.testing.assert_array_equal(got[path], value, err_msg=path)
    settings = json.loads((policy / "generation_config.json").read_text())
    assert settings["eos_token_id"] == arithmetic.VOCAB.index(arithmetic.EOS)
    assert settings["pad_token_id"] == arithmetic.VOCAB.index(arithmetic.PAD)
    ids = transformers.AutoTokenizer.from_pretrained(policy)("Q: 12+34\nA:")["input_ids"]
    assert ids == arithmetic.encode("Q: 12+34\nA:")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(policy).eval()
    assert theirs.generation_config.eos_token_id == settings["eos_token_id"]
    with torch.no_grad():
        want = theirs(torch.tensor([ids])).logits.numpy()
    logits = np.asarray(ours(np.asarray([ids]), np.ones((1, len(ids)), np.int32)))
    np.testing.assert_allclose(logits, want, atol=2e-5, rtol=1e-4)

    # The rerun resumes at 4 (policy/ written again from it), trains on and at the end writes
    # policy/ and the model folder: the same parameters, the folder with its tokenizer and
    # held-out problems.
    arithmetic_model.train(cfg, out)
    final = _params(hf.load_pretrained(policy))
    assert any(not np.array_equal(final[path], value) for path, value in saved.items())
    for path, value in _params(hf.load_pretrained(out)).items():
        np.testing.assert_array_equal(value, final[path], err_msg=path)
    assert hf.load_tokenizer(out).encode("1+2") == arithmetic.encode("1+2")
    for name in (*arithmetic.HELD_OUT_FILES.values(), "train_metrics.json"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in out.glob("policy*")) == ["policy"]


def test_the_rl_loop_writes_the_policy_with_its_sampling_at_each_checkpoint(tmp_path):
    """`loop.run(on_save=)`: after each step (checkpoint_every=1), the policy of that step, with
    the rollouts' sampling as generation settings (loop_job's run: programs test_loop
    compiles)."""
    config = loop_job.config(2)
    model = Decoder(loop_job.CONFIG, nnx.Rngs(0))
    policy = tmp_path / "run" / "policy"
    export = scaffold.export_policy(
        model, policy, eos_token_id=2,
        **hf.generation_fields(config.temperature, config.top_k, config.top_p))
    saved = []

    def on_save(state):  # the state, and the folder as it left it
        export(state)
        saved.append((int(state.step), _leaves(state.params),
                      _params(hf.load_pretrained(policy))))

    _, final = loop.run(model, loop_job.prompt_fn, loop_job.reward_fn, config, tmp_path / "run",
                        key=jax.random.key(0), on_save=on_save)
    assert [s for s, _, _ in saved] == [2, 4]  # 2 minibatches (optimizer steps) per step
    for path, value in _leaves(final.params).items():
        np.testing.assert_array_equal(saved[-1][1][path], value, err_msg=path)
    for _, params, written in saved:
        assert written.keys() == params.keys()
        for path, value in params.items():
            np.testing.assert_array_equal(written[path], value, err_msg=path)
    assert any(not np.array_equal(saved[0][1][p], saved[1][1][p]) for p in saved[0][1])
    settings = json.loads((policy / "generation_config.json").read_text())
    assert {k: settings[k] for k in ("eos_token_id", "do_sample", "temperature", "top_k",
                                     "top_p")} == {"eos_token_id": 2, "do_sample": True,
                                                   "temperature": 0.9, "top_k": 0, "top_p": 1.0}
