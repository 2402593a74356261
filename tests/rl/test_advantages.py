import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from jaxlab.rl import advantages as adv


def examples(n):
    return settings(max_examples=n, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# Rewards on a coarse grid: groups are often degenerate (all equal) or nearly so. A few shapes
# only, since each new shape compiles anew.
REWARDS = st.tuples(st.sampled_from([1, 4]), st.sampled_from([2, 3, 8])).flatmap(
    lambda shape: hnp.arrays(np.float32, shape, elements=st.sampled_from(
        [-3.0, -1.0, -0.5, 0.0, 0.25, 1.0, 2.0, 7.5])))


def wins_and_refs():
    @st.composite
    def build(draw):
        groups = draw(st.sampled_from([1, 4]))
        g = draw(st.sampled_from([2, 5, 16]))
        conditions = draw(st.sampled_from([1, 4]))
        p = draw(st.sampled_from([0.1, 0.5, 0.9, 1.0]))
        seed = draw(st.integers(0, 2**31 - 1))
        rng = np.random.default_rng(seed)
        wins = rng.random((groups, g, conditions)) < p
        return wins, rng.integers(0, g, groups).astype(np.int32)
    return build()


# ---------------------------------------------------------------- GRPO family

def test_grpo_hand_computed():
    # [1, 3, 2]: mean 2, population std sqrt(2/3); [0, 0, 6]: mean 2, std sqrt(8); [4, 4, 4]: 0.
    rewards = jnp.array([[1.0, 3.0, 2.0], [0.0, 0.0, 6.0], [4.0, 4.0, 4.0]])
    s23, s8 = np.sqrt(2 / 3), np.sqrt(8.0)
    want = [[-1 / s23, 1 / s23, 0], [-2 / s8, -2 / s8, 4 / s8], [0, 0, 0]]
    np.testing.assert_allclose(adv.grpo_advantages(rewards, eps=0.0), want, rtol=1e-6, atol=1e-7)
    # eps enters the denominator: [1, 3] has std 1, so A = [-1, 1] / (1 + 0.5).
    np.testing.assert_allclose(adv.grpo_advantages(jnp.array([[1.0, 3.0]]), eps=0.5),
                               [[-1 / 1.5, 1 / 1.5]], rtol=1e-6)


def test_grpo_equal_rewards_give_zero_not_nan():
    # 0.1 * 3 / 3 != 0.1 in float32 rounding: only the exact degenerate check gives 0.
    rewards = jnp.full((2, 3), 0.1, jnp.float32).at[1].set(jnp.float32(1e-30))
    got = adv.grpo_advantages(rewards)
    np.testing.assert_array_equal(got, np.zeros((2, 3)))
    np.testing.assert_array_equal(adv.has_variance(rewards), [False, False])


@examples(200)
@given(REWARDS)
def test_grpo_properties(rewards):
    got = np.asarray(jax.jit(adv.grpo_advantages)(rewards))
    assert np.isfinite(got).all()
    live = rewards.max(axis=1) > rewards.min(axis=1)
    np.testing.assert_array_equal(adv.has_variance(rewards), live)
    np.testing.assert_array_equal(got[~live], 0.0)
    np.testing.assert_allclose(got[live].mean(axis=1), 0.0, atol=1e-5)
    np.testing.assert_allclose(got[live].std(axis=1), 1.0, rtol=1e-4)
    # The NumPy formula, in float64.
    r = rewards.astype(np.float64)
    want = (r - r.mean(1, keepdims=True)) / (r.std(1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(got[live], want[live], rtol=1e-4, atol=1e-5)


@examples(100)
@given(REWARDS)
def test_dr_grpo_and_rloo_match_numpy(rewards):
    r = rewards.astype(np.float64)
    g = r.shape[1]
    np.testing.assert_allclose(adv.dr_grpo_advantages(rewards), r - r.mean(1, keepdims=True),
                               atol=1e-5)
    loo = np.stack([r[:, i] - np.delete(r, i, axis=1).mean(1) for i in range(g)], axis=1)
    np.testing.assert_allclose(adv.rloo_advantages(rewards), loo, atol=1e-5)


def test_rloo_hand_computed():
    # Response 0: 3 - mean(0, 0) = 3; the others: 0 - mean(3, 0) = -1.5.
    np.testing.assert_allclose(adv.rloo_advantages(jnp.array([[3.0, 0.0, 0.0]])),
                               [[3.0, -1.5, -1.5]])


@pytest.mark.parametrize("fn", [adv.grpo_advantages, adv.dr_grpo_advantages,
                                adv.rloo_advantages, adv.has_variance])
def test_group_functions_vmap_over_experiments(fn):
    rewards = jax.random.normal(jax.random.key(0), (3, 4, 5))
    np.testing.assert_allclose(jax.vmap(fn)(rewards), np.stack([fn(r) for r in rewards]),
                               rtol=1e-6)


@pytest.mark.parametrize("shape,match", [((4,), r"\[groups, G\]"), ((3, 1), "G=1"),
                                         ((2, 3, 4), r"\[groups, G\]")])
def test_bad_rewards_are_named(shape, match):
    for fn in (adv.grpo_advantages, adv.dr_grpo_advantages, adv.rloo_advantages,
               adv.has_variance):
        with pytest.raises(ValueError, match=match):
            fn(jnp.zeros(shape))


# ---------------------------------------------------------------- BRPO

def test_brpo_hand_computed():
    # One group of G = 4, reference 2, conditions = (forward, backward) x 1 vote.
    wins = jnp.array([[[True, True], [True, False], [False, False], [False, False]]])
    rewards, keep = adv.brpo_advantages(wins, jnp.array([2]))
    np.testing.assert_array_equal(rewards, [[1, -1, 0, -1]])
    assert keep[0]  # |1 - 1 + 0 - 1| / 4 = 0.25
    # The reference's own row is ignored, whatever it holds.
    all_win = jnp.ones((1, 4, 2), bool)
    rewards, keep = adv.brpo_advantages(all_win, jnp.array([0]))
    np.testing.assert_array_equal(rewards, [[0, 1, 1, 1]])
    assert not keep[0]  # 3 / 4 > 0.6
    _, keep = adv.brpo_advantages(all_win, jnp.array([0]), outlier_threshold=0.75)
    assert keep[0]  # the mask keeps |sum| / G == threshold


def _numpy_brpo(wins, ref, threshold):
    groups, g, _ = wins.shape
    r = np.zeros((groups, g))
    for k in range(groups):
        for i in range(g):
            r[k, i] = 0 if i == ref[k] else (1 if wins[k, i].all() else -1)
    return r, np.abs(r.sum(1)) / g <= threshold


@examples(200)
@given(wins_and_refs(), st.sampled_from([0.0, 0.3, 0.6, 1.0]))
def test_brpo_properties(case, threshold):
    wins, ref = case
    rewards, keep = jax.jit(adv.brpo_advantages, static_argnums=2)(wins, ref, threshold)
    rewards, keep = np.asarray(rewards), np.asarray(keep)
    assert set(np.unique(rewards)) <= {-1.0, 0.0, 1.0}
    np.testing.assert_array_equal((rewards == 0).sum(axis=1), 1)
    np.testing.assert_array_equal(rewards[np.arange(len(ref)), ref], 0)
    np.testing.assert_array_equal(keep, np.abs(rewards.sum(1)) / rewards.shape[1] <= threshold)
    want_r, want_keep = _numpy_brpo(wins, ref, threshold)
    np.testing.assert_array_equal(rewards, want_r)
    np.testing.assert_array_equal(keep, want_keep)


def test_brpo_vmaps_over_experiments():
    rng = np.random.default_rng(1)
    wins = rng.random((3, 4, 6, 2)) < 0.6
    refs = rng.integers(0, 6, (3, 4)).astype(np.int32)
    rewards, keep = jax.vmap(adv.brpo_advantages)(wins, refs)
    for e in range(3):
        want_r, want_keep = _numpy_brpo(wins[e], refs[e], 0.6)
        np.testing.assert_array_equal(rewards[e], want_r)
        np.testing.assert_array_equal(keep[e], want_keep)


def test_choose_reference_is_uniform_and_keyed():
    refs = adv.choose_reference(jax.random.key(0), 16_000, 16)
    assert refs.shape == (16_000,) and refs.dtype == jnp.int32
    counts = np.bincount(np.asarray(refs), minlength=16)
    assert counts.min() > 850 and counts.max() < 1150  # 1000 expected, sd ~ 31
    np.testing.assert_array_equal(refs, adv.choose_reference(jax.random.key(0), 16_000, 16))
    assert not np.array_equal(refs, adv.choose_reference(jax.random.key(1), 16_000, 16))


@pytest.mark.parametrize("wins,ref,match", [
    (np.ones((2, 4), bool), np.zeros(2, np.int32), r"\[groups, G, conditions\]"),
    (np.ones((2, 4, 2), np.float32), np.zeros(2, np.int32), "boolean"),
    (np.ones((2, 1, 2), bool), np.zeros(2, np.int32), "G=1"),
    (np.ones((2, 4, 2), bool), np.zeros(3, np.int32), "ref_index"),
])
def test_bad_brpo_input_is_named(wins, ref, match):
    with pytest.raises(ValueError, match=match):
        adv.brpo_advantages(jnp.asarray(wins), jnp.asarray(ref))


def test_bad_reference_group_size_and_threshold():
    with pytest.raises(ValueError, match="group_size"):
        adv.choose_reference(jax.random.key(0), 4, 1)
    with pytest.raises(ValueError, match="outlier_threshold"):
        adv.brpo_advantages(jnp.ones((1, 4, 2), bool), jnp.zeros(1, jnp.int32), 1.5)
