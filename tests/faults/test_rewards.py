"""Every reward is a finite real number: a reward function that returns anything else (a string,
None, NaN, inf, a complex, a list, the wrong keys), batched or per response, stops the run naming
the step, prompt, response, value and type, before the step's update, metrics or checkpoint."""

import dataclasses
import decimal
import fractions
import json
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlab.models.decoder import Decoder
from jaxlab.rl import loop
from tests.rl import loop_job

from .conftest import snapshot

BAD = {  # the value at prompt 1, response 2 -> how the message shows it
    "high": "'high' (str)",
    None: "None (NoneType)",
    float("nan"): "nan (float)",
    float("inf"): "inf (float)",
    1 + 2j: "(1+2j) (complex)",
    (0.5,): "(0.5,) (tuple)",
}
BAD_VALUES = [pytest.param(value, re.escape(shown), id=repr(value)) for value, shown in BAD.items()]
TOKENS = r" \(prompt tokens \[(\d+, ){0,19}\d+\], response \[((\d+, ){0,19}\d+)?\]\)"  # first 20


def _run(out, reward_fn, steps):
    config = dataclasses.replace(loop_job.config(steps), checkpoint_every=1)
    return loop.run(Decoder(loop_job.CONFIG, nnx.Rngs(0)), loop_job.prompt_fn, reward_fn,
                    config, out, key=jax.random.key(0))


@pytest.fixture(scope="module")
def one_step(tmp_path_factory):
    """A run folder after step 0 (its metrics line and checkpoint)."""
    out = tmp_path_factory.mktemp("rewards") / "run"
    _run(out, loop_job.reward_fn, 1)
    return out


def _stops_at_step_1(one_step, tmp_path, reward_fn, message, error=loop.RewardError):
    """Step 1 of the run with `reward_fn` raises `error` matching `message`, and leaves the run
    folder as step 0 left it: no metrics line, no checkpoint; returns the error."""
    out = tmp_path / "run"
    shutil.copytree(one_step, out)
    before = snapshot(out)
    with pytest.raises(error, match=message) as raised:
        _run(out, reward_fn, 2)
    assert snapshot(out) == before
    return raised.value


def _good(prompts, responses, truncated):
    return loop_job.reward_fn(prompts, responses, truncated).tolist()     # [4][4] floats


def _with_bad(value, name="reward"):
    def reward_fn(prompts, responses, truncated):
        rewards = _good(prompts, responses, truncated)
        rows = {"reward": rewards, "accuracy": [list(r) for r in rewards]}
        rows[name][1][2] = value
        return rows
    return reward_fn


def _per_response_with_bad(value, keyed=False):
    """A per-response reward function whose seventh response (prompt 1, response 2) gets
    `value` (with `keyed`, as a mapping with the other keys)."""
    calls = []

    def score(prompt, response, truncated):
        calls.append(1)
        if len(calls) % 16 != 7:
            return 0.5
        return {"reward": 0.5, "accuracy": value} if keyed else value
    return loop.per_response(score)


@pytest.mark.parametrize(("value", "shown"), BAD_VALUES)
@pytest.mark.parametrize("name", ["reward", "accuracy"])
def test_a_bad_batched_value_is_named(one_step, tmp_path, value, shown, name):
    _stops_at_step_1(one_step, tmp_path, _with_bad(value, name),
                     rf"^step 1: the reward function's '{name}' for prompt 1, response 2 is "
                     rf"{shown}, not a finite real number{TOKENS}$")


@pytest.mark.parametrize(("value", "shown"), BAD_VALUES)
def test_a_bad_per_response_value_is_named(one_step, tmp_path, value, shown):
    _stops_at_step_1(one_step, tmp_path, _per_response_with_bad(value),
                     rf"^step 1: the reward function's 'reward' for prompt 1, response 2 is "
                     rf"{shown}, not a finite real number{TOKENS}$")


@pytest.mark.parametrize(("reward_fn", "message"), [
    (lambda p, r, t: {"rewards": _good(p, r, t)},
     r"^step 1: the reward function returned the keys \['rewards'\]: they must be names \(str\), "
     r"'reward' among them$"),
    (lambda p, r, t: {"reward": _good(p, r, t), 0: _good(p, r, t)},
     r"returned the keys \['reward', 0\]"),
    (lambda p, r, t: np.asarray(_good(p, r, t))[:, :3],
     r"^step 1: the reward function's 'reward' has shape \(4, 3\) \(ndarray\), expected "
     r"\[prompts, responses\] = \(4, 4\)$"),
    (lambda p, r, t: [[0.5] * 4] * 3 + [[0.5] * 3],
     r"'reward' has shape ragged \(list\)"),
    (lambda p, r, t: np.asarray(_good(p, r, t))[..., None],
     r"'reward' has shape \(4, 4, 1\) \(ndarray\)"),
    (lambda p, r, t: np.asarray(_good(p, r, t)) * 1j,
     r"'reward' for prompt 0, response 0 is [0-9.]+j \(complex\)"),
    (lambda p, r, t: jnp.asarray(_good(p, r, t)).at[1, 2].set(jnp.inf),
     r"'reward' for prompt 1, response 2 is inf \(float32\)"),
    (_per_response_with_bad(1.0, keyed=True),
     r"^step 1: the reward function returned keys \['reward', 'accuracy'\] for prompt 1, "
     r"response 2, and \['reward'\] for prompt 0, response 0$"),
], ids=["no reward", "a key not a name", "shape", "ragged", "a list per response", "complex",
        "jax inf", "per-response keys"])
def test_a_wrong_form_is_named(one_step, tmp_path, reward_fn, message):
    _stops_at_step_1(one_step, tmp_path, reward_fn, message)


def test_keys_that_change_between_sampling_rounds_are_named(one_step, tmp_path):
    """Round 0's rewards are all equal (no group is kept), round 1 logs a new value."""
    calls = []

    def reward_fn(prompts, responses, truncated):
        calls.append(1)
        if len(calls) == 1:
            return np.zeros(truncated.shape)
        return {"reward": _good(prompts, responses, truncated), "accuracy": _good(
            prompts, responses, truncated)}

    _stops_at_step_1(one_step, tmp_path, reward_fn,
                     r"^step 1: the reward function returned the keys \['reward', 'accuracy'\] "
                     r"in sampling round 1, and \['reward'\] in round 0$")


@pytest.mark.parametrize("batched", [False, True], ids=["per response", "batched"])
def test_a_raising_reward_function_is_one_error_with_its_cause(one_step, tmp_path, batched):
    def score(prompt, response, truncated):
        raise KeyError("no answer")

    reward_fn = (lambda p, r, t: score(p, r, t)) if batched else loop.per_response(score)
    where = (r"a batch of 4 prompts x 4 responses" if batched else
             rf"prompt 0, response 0{TOKENS}")
    error = _stops_at_step_1(one_step, tmp_path, reward_fn, rf"^step 1: the reward function "
                             rf"raised on {where}: KeyError\('no answer'\)$",
                             error=loop.RewardFunctionError)
    assert isinstance(error.__cause__, KeyError)


def test_every_kind_of_real_number_is_a_reward(one_step, tmp_path):
    """bool (0 or 1), int, NumPy scalars, 0-d NumPy and JAX arrays and Fraction are rewards; the
    step's record holds their mean."""
    kinds = [True, 1, 0.25, np.float32(0.5), np.int8(0), np.array(0.75), jnp.asarray(0.5),
             fractions.Fraction(1, 4)]
    calls = []

    def score(prompt, response, truncated):
        calls.append(1)
        return kinds[len(calls) % len(kinds)]

    out = tmp_path / "run"
    shutil.copytree(one_step, out)
    _run(out, loop.per_response(score), 2)
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 1
    assert record["reward_mean"] == pytest.approx(np.mean([float(k) for k in kinds]))


@pytest.mark.parametrize(("value", "real"), [
    (True, True), (0, True), (-2.5, True), (np.float16(1), True), (np.uint64(3), True),
    (np.array(1.0), True), (jnp.asarray(1.0, jnp.bfloat16), True), (fractions.Fraction(1, 3), True),
    ("1", False), (b"1", False), (None, False), (1j, False), (np.complex64(1), False),
    (decimal.Decimal(1), False), ([1.0], False), (np.array([1.0]), False), ({"r": 1}, False),
    (float("nan"), False), (-np.inf, False), (10 ** 400, False), (np.str_("1"), False)])
def test_finite_real(value, real):
    assert loop.finite_real(value) is real
