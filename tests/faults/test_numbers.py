"""Non-finite numbers stop where they appear: the policy step refuses a batch whose loss or
gradient is not finite and leaves the state as it was; advantage functions refuse NaN and inf
with the group index; the caller's model and key survive the donating step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlab import parallel
from jaxlab.rl import advantages as adv
from jaxlab.rl import train
from tests.rl.test_train import PLAIN, TEMPERATURE, VOCAB, make_batch, on, tiny

# The batch, config and mesh of tests/rl/test_train.py: in one session the step compiles once.
CONFIG = PLAIN
MESH = parallel.single_device_mesh()


@pytest.fixture(scope="module")
def setup():
    """A model, its train state and a batch with old_logp near the model's own, placed as the
    step wants them."""
    model = tiny()
    graphdef, state = train.init_train_state(model, CONFIG.optimizer, jax.random.key(7))
    state, batch = on(MESH, state, make_batch(graphdef, state.params))
    return model, graphdef, state, batch


def _params(state):
    return [np.asarray(x) for x in jax.tree.leaves(state.params)]


@pytest.mark.parametrize("fault", [
    "advantage",     # case 16: one NaN advantage
    "old_logp",      # case 17: one NaN sampling log-prob
    "token",         # case 18: one token outside the vocabulary
])
def test_one_bad_value_leaves_the_state_unchanged(setup, fault):
    _, graphdef, state, batch = setup
    bad = {"advantage": lambda b: b._replace(advantages=b.advantages.at[3].set(jnp.nan)),
           "old_logp": lambda b: b._replace(old_logp=b.old_logp.at[3, 4].set(jnp.nan)),
           "token": lambda b: b._replace(tokens=b.tokens.at[3, 4].set(VOCAB + 7))}[fault](batch)
    before = _params(state)
    copy = jax.tree.map(jnp.copy, state)                  # the step donates its state
    after, metrics = train.train_step(copy, bad, graphdef=graphdef, config=CONFIG,
                                      temperature=TEMPERATURE, mesh=MESH)
    assert metrics["finite"] == 0 and not np.isfinite(metrics["loss"])
    assert int(after.step) == int(state.step)
    for x, y in zip(_params(after), before, strict=True):
        np.testing.assert_array_equal(x, y)
    # the same state then trains on the clean batch: a real step, every weight finite
    after, metrics = train.train_step(after, batch, graphdef=graphdef, config=CONFIG,
                                      temperature=TEMPERATURE, mesh=MESH)
    assert metrics["finite"] == 1 and int(after.step) == int(state.step) + 1
    assert all(np.isfinite(x).all() for x in _params(after))
    assert any((x != y).any() for x, y in zip(_params(after), before, strict=True))


def test_callers_model_and_key_survive_the_step(setup):                          # case 22
    model, _, _, batch = setup
    key = jax.random.key(7)

    def logprobs():  # the caller's model, read through its own (not the state's) parameters
        return np.asarray(train.policy_logprobs(graphdef, nnx.state(model, nnx.Param),
                                                batch.tokens, batch.mask))

    graphdef, state = train.init_train_state(model, CONFIG.optimizer, key)
    state, _ = on(MESH, state, batch)
    want = logprobs()
    for _ in range(2):                                    # each step donates the state
        state, metrics = train.train_step(state, batch, graphdef=graphdef, config=CONFIG,
                                          temperature=TEMPERATURE, mesh=MESH)
        assert metrics["finite"] == 1
    np.testing.assert_array_equal(logprobs(), want)
    np.testing.assert_array_equal(jax.random.key_data(key),
                                  jax.random.key_data(jax.random.key(7)))
    np.asarray(batch.tokens)                              # the batch is not donated either


@pytest.mark.parametrize("function", [adv.grpo_advantages, adv.rloo_advantages,
                                      adv.dr_grpo_advantages, adv.has_variance])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_advantages_refuse_nonfinite_rewards(function, value):                  # case 19
    rewards = jnp.array([[1.0, 0.0, 1.0], [0.5, 0.5, 0.5], [2.0, 1.0, 0.0]]).at[2, 1].set(value)
    with pytest.raises(ValueError, match=r"rewards of group 2 are not finite \(response 1"):
        function(rewards)
    if function is not adv.has_variance:
        # traced (values unknown), the group's advantages are NaN, for the step to refuse
        got = np.asarray(jax.jit(function)(rewards))
        assert np.isnan(got[2]).all() and np.isfinite(got[:2]).all()
        np.testing.assert_array_equal(got[:2], np.asarray(function(rewards[:2])))


def test_grpo_equal_infinite_rewards_are_not_a_degenerate_group():
    got = np.asarray(jax.jit(adv.grpo_advantages)(jnp.full((1, 4), jnp.inf)))
    assert np.isnan(got).all()                            # not the 0 of an all-equal group


def test_brpo_refuses_a_reference_outside_the_group():                           # case 26
    wins = jnp.ones((2, 4, 1), bool)
    with pytest.raises(ValueError, match=r"ref_index of group 1 is 4, outside \[0, G=4\)"):
        adv.brpo_rewards(wins, jnp.array([0, 4]))
    with pytest.raises(ValueError, match=r"ref_index of group 0 is -1"):
        adv.brpo_advantages(wins, jnp.array([-1, 0]))
    rewards = np.asarray(adv.brpo_rewards(wins, jnp.array([0, 3])))
    assert (rewards == 0).sum(axis=1).tolist() == [1, 1]

