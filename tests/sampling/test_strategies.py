"""Sampling strategies against a sorted NumPy reference (float64): kept sets, draws, log-probs."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab import parallel
from jaxlab.sampling import strategies as st
from jaxlab.sampling.strategies import Nucleus

DRAWS = 20_000  # per distinct row


def _order(z):
    """Token ids by decreasing logit, ties by increasing id (jax.lax.top_k's order)."""
    return np.lexsort((np.arange(len(z)), -z))


def _strictly_above(p):
    """g_j = sum of p_i > p_j for each entry of p [n] (float64)."""
    return np.array([p[p > x].sum() for x in p])


def _reference(z, temperature, top_k, top_p):
    """(truncated, renormalised distribution over the vocabulary [V] float64, the smallest
    distance of any survivor's g_j from top_p, which float32 rounding must not cross)."""
    z = z.astype(np.float64) / temperature
    survivors = _order(z)[:top_k] if top_k else np.arange(len(z))
    p = np.exp(z[survivors] - z.max())
    p /= np.exp(z - z.max()).sum() if not top_k else p.sum()
    g = _strictly_above(p)
    kept = survivors[g < top_p] if top_p < 1 else survivors
    probs = np.zeros(len(z))
    probs[kept] = np.exp(z[kept] - z.max())
    margin = np.min(np.abs(g - top_p)) if top_p < 1 else np.inf
    return probs / probs.sum(), margin


def _chi_square_threshold(df, z=3.719):
    """The chi-square(df) quantile at 1 - 1e-4 (z = its normal quantile), Wilson-Hilferty."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _tie_bins(z, top_k):
    """Bin of each token [V]: itself, except that the tokens tied at the k-th largest logit
    share one bin when the tie runs past k (top-k keeps as many of them as fit, and which ones
    is the search's choice)."""
    bins = np.arange(len(z))
    ranked = z[_order(z)]
    if top_k and top_k < len(z) and ranked[top_k - 1] == ranked[top_k]:
        tied = np.nonzero(z == ranked[top_k - 1])[0]
        bins[tied] = tied[0]
    return bins


def _check_draws(tokens, probs, bins):
    """Draws tokens [N] of one distribution probs [V] (observed per bin, bins [V]): none outside
    the support's bins, every bin expected 30+ times seen, and Pearson's statistic (bins expected
    < 5 times pooled) below its 1 - 1e-4 quantile. The key is fixed, so the test is
    deterministic; an exact sampler fails it for a fraction 1e-4 of keys."""
    n = len(tokens)
    counts = np.bincount(bins[tokens], minlength=len(probs))
    probs = np.bincount(bins, weights=probs, minlength=len(probs))
    assert counts[probs == 0].sum() == 0, np.nonzero(counts * (probs == 0))
    assert np.all(counts[probs * n >= 30] > 0)
    expected = probs * n
    big = expected >= 5
    observed = np.append(counts[big], counts[~big].sum())
    expected = np.append(expected[big], expected[~big].sum())
    if expected[-1] == 0:
        observed, expected = observed[:-1], expected[:-1]
    if len(observed) == 1:
        return
    statistic = np.sum((observed - expected) ** 2 / expected)
    assert statistic < _chi_square_threshold(len(observed) - 1), statistic


_step = jax.jit(lambda strategy, logits, key: strategy(logits, key))


def _draw(strategy, rows, key=0):
    """The strategy applied to DRAWS copies of each of rows [R, V]: Draw with [R * DRAWS] rows."""
    logits = jnp.repeat(jnp.asarray(rows, jnp.float32), DRAWS, axis=0)
    return jax.device_get(_step(strategy, logits, jax.random.key(key)))


def _log_softmax(z):
    z = z.astype(np.float64)
    return z - z.max(-1, keepdims=True) - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(
        -1, keepdims=True))


def _normal(seed, scale, vocab=64):
    return np.random.default_rng(seed).normal(size=(2, vocab)).astype(np.float32) * scale


def _at_floor():
    """Two rows where token 40 is 1e-5 above the rest: at t = 1e-5 it has p = e / (e + 63)."""
    return np.zeros((2, 64), np.float32) + np.float32(1e-5) * (np.arange(64) == 40)


# Few static shapes of the strategy serve several cases each, so that the file compiles few
# programs.
TOP_5 = dict(top_k=5, num_top_logits=20)
CAP_8 = dict(cap=8)
CASES = {  # name: (rows [2, V], strategy, the path it takes)
    "top-k": (_normal(0, 2.0), Nucleus(0.8, 1.0, **TOP_5), "top-k"),
    "top-k then top-p": (_normal(1, 1.5), Nucleus(0.7, 0.8, top_k=8), "top-k"),
    "top-p inside the cap": (_normal(0, 2.0), Nucleus(0.7, 0.7, **CAP_8), "cap"),
    "top-p past the cap": (_normal(1, 1.0), Nucleus(1.0, 0.8, **CAP_8), "fallback"),
    "no truncation past the cap": (_normal(0, 1.0), Nucleus(1.3, 1.0, **CAP_8), "fallback"),
    "rows inside and past the cap": (_normal(2, np.array([[3.0], [0.5]], np.float32)),
                                     Nucleus(1.0, 0.8, **CAP_8), "mixed"),
    "ties at the k-th logit": (np.round(_normal(0, 4.0)) / 2, Nucleus(1.0, 0.9, top_k=8),
                               "tie at k"),
    "ties at the nucleus edge": (np.round(_normal(0, 4.0)) / 2, Nucleus(1.0, 0.7, top_k=8),
                                 "tie at p"),
    "the temperature floor samples": (_at_floor(), Nucleus(st.TEMPERATURE_FLOOR, 1.0, **TOP_5),
                                      "tie at k"),
    "top-k in blocks of a wider vocabulary": (_normal(5, 3.0, vocab=512),
                                              Nucleus(0.6, 0.9, top_k=20), "top-k"),
}


def _settings(strategy):
    return float(strategy.temperature), strategy.top_k, float(strategy.top_p)


@pytest.mark.parametrize("name", list(CASES))
def test_draws_follow_the_truncated_distribution(name):
    rows, strategy, _ = CASES[name]
    temperature, top_k, top_p = _settings(strategy)
    draw = _draw(strategy, rows)
    tokens = draw.tokens.reshape(len(rows), DRAWS)
    for row, drawn in zip(rows, tokens, strict=True):
        probs, margin = _reference(row, temperature, top_k, top_p)
        assert margin > 1e-4  # float32 sums cannot move a token across the nucleus boundary
        _check_draws(drawn, probs, _tie_bins(row, top_k))
    # Log-probs under the tempered distribution before truncation; the raw top logits and
    # log-normaliser give DeepConf's confidence without another pass.
    logp = _log_softmax(rows.astype(np.float64) / temperature)
    np.testing.assert_allclose(draw.logprobs.reshape(tokens.shape),
                               np.take_along_axis(logp, tokens, axis=1), rtol=1e-5, atol=1e-5)
    k = min(20, draw.top_logits.shape[1])
    confidence = -np.sort(_log_softmax(rows), axis=-1)[:, ::-1][:, :k].mean(-1)
    np.testing.assert_allclose(
        st.token_confidence_from_top(draw.top_logits, draw.log_normalizer, k)[::DRAWS],
        confidence, rtol=1e-5)


@pytest.mark.parametrize("name", list(CASES))
def test_each_case_takes_the_path_it_names(name):
    rows, strategy, path = CASES[name]
    temperature, top_k, top_p = _settings(strategy)
    sizes = [np.count_nonzero(_reference(r, temperature, top_k, top_p)[0]) for r in rows]
    if path == "top-k":
        assert max(sizes) <= top_k < rows.shape[1]
    elif path == "cap":
        assert max(sizes) < strategy.cap, sizes
    elif path == "fallback":
        assert min(sizes) > strategy.cap, sizes
    elif path == "mixed":
        assert sizes[0] < strategy.cap < sizes[1], sizes
    else:
        for row, size in zip(rows, sizes, strict=True):
            z = row[_order(row)]
            if path == "tie at k":   # the k-th logit recurs past k; the nucleus reaches it
                assert z[top_k - 1] == z[top_k] and size == top_k
            else:                    # the nucleus ends inside a run of tied logits
                assert z[size - 1] == z[size - 2] and size < top_k
                probs = np.exp(z[:top_k] - z[0]) / np.exp(z[:top_k] - z[0]).sum()
                assert np.cumsum(probs)[size - 2] >= top_p  # its last tie is past top_p


@pytest.mark.parametrize("temperature", [0.0, 5e-6])
@pytest.mark.parametrize("shape", [TOP_5, CAP_8])
def test_below_the_floor_is_greedy(temperature, shape):
    rows = _normal(7, 1.0)
    rows[0, [9, 40]] = 5.0                            # a tie at the top: the first wins
    rows[1] = -1e30                                   # a peaked row whose max is not token 0
    rows[1, 33] = 0.0
    draw = _draw(Nucleus(temperature, 0.9, **shape), rows)
    want = np.repeat(np.argmax(rows, axis=-1), DRAWS)
    assert want[0] == 9 and want[-1] == 33
    np.testing.assert_array_equal(draw.tokens, want)
    # Greedy log-probs are under the raw logits (Samples.logprobs' meaning).
    logp = np.repeat(_log_softmax(rows), DRAWS, axis=0)
    np.testing.assert_allclose(draw.logprobs, logp[np.arange(len(want)), want],
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.75, 0.9, 0.999, 1.0])
def test_nucleus_keeps_the_reference_set(top_p):
    rng = np.random.default_rng(2)
    probs = rng.dirichlet(np.full(40, 0.4), size=5)
    probs[1] = 1 / 40                                                      # all tied
    probs[2] = np.repeat([0.32, 0.1, 0.03, 0.0], [2, 3, 2, 33])            # runs of ties
    probs[3] = np.repeat([0.2, 0.15, 0.05, 0.01], [2, 3, 5, 30]) / 1.4
    probs = -np.sort(-probs, axis=-1).astype(np.float32)
    kept = np.asarray(st.nucleus(jnp.asarray(probs), jnp.float32(top_p)))
    for row, got in zip(probs.astype(np.float64), kept, strict=True):
        above = _strictly_above(row)
        if top_p == 1:
            assert got.all()
            continue
        assert np.min(np.abs(above - top_p)) > 1e-5  # float32 sums cannot cross top_p
        np.testing.assert_array_equal(got, above < top_p)


@pytest.mark.parametrize("k", [1, 20, 100, 700])
def test_block_top_k_finds_the_k_largest(k):
    rng = np.random.default_rng(3)
    x = np.round(rng.normal(size=(5, 5003)) * 4).astype(np.float32)   # many ties
    x[1, :4000] = -np.inf                                              # a masked vocabulary
    x[2] = 1.0                                                         # one big tie
    values, indices = jax.device_get(st.block_top_k(jnp.asarray(x), k))
    assert indices.dtype == np.int32
    for row, got_values, got in zip(x, values, indices, strict=True):
        want = _order(row)[:k]
        np.testing.assert_array_equal(got_values, row[want])           # descending, exact
        np.testing.assert_array_equal(row[got], got_values)
        assert len(set(got.tolist())) == k                             # k distinct tokens
        assert set(want[row[want] > row[want[-1]]]) <= set(got.tolist())


def test_new_temperature_or_top_p_does_not_retrace():
    traces = []

    @jax.jit
    def step(strategy, logits, key):
        traces.append(strategy)
        return strategy(logits, key).tokens

    logits, key = jnp.zeros((2, 50)), jax.random.key(0)
    for temperature, top_p in [(0.6, 0.95), (1.0, 0.5), (0.0, 1.0), (2.0, 0.3)]:
        step(Nucleus(temperature, top_p, top_k=20), logits, key)
    assert len(traces) == 1
    step(Nucleus(0.6, 0.95, top_k=10), logits, key)   # a shape: compiles anew
    assert len(traces) == 2


def test_confidence_needs_enough_top_logits():
    top, log_normalizer = jnp.zeros((3, 20)), jnp.zeros(3)
    assert st.token_confidence_from_top(top, log_normalizer, 20).shape == (3,)
    with pytest.raises(ValueError, match="num_top_logits >= 21"):
        st.token_confidence_from_top(top, log_normalizer, 21)


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("top_p", float("nan")),
    ("top_k", -1), ("top_k", 2.0), ("cap", 0), ("num_top_logits", -3)])
def test_bad_settings_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"Nucleus.{field}"):
        Nucleus(**{field: value})


def test_tree_transformations_build_placeholders_freely():
    strategy = Nucleus(0.6, 0.95, top_k=20)
    assert jax.tree.leaves(strategy) == [0.6, 0.95]             # the static fields are not leaves
    assert jax.tree.map(lambda x: None, strategy).top_p is None
    assert jax.eval_shape(lambda s: s, strategy).top_p.shape == ()


def test_rows_sharded_over_devices_draw_the_same_tokens(data_mesh8):
    # One row per device whose nucleus fits the cap and one that takes the fallback.
    rows = np.tile(CASES["rows inside and past the cap"][0], (8, 1))                # [16, 64]
    strategy = Nucleus(1.0, 0.8, **CAP_8)
    one = jax.device_get(_step(strategy, jnp.asarray(rows), jax.random.key(3)))
    sharded = jax.device_put(jnp.asarray(rows), parallel.batch_sharding(data_mesh8))
    many = jax.device_get(_step(strategy, sharded, jax.random.key(3)))
    np.testing.assert_array_equal(one.tokens, many.tokens)
    np.testing.assert_allclose(one.logprobs, many.logprobs, rtol=1e-6)
    assert len(set(one.tokens[1::2].tolist())) > 1   # the fallback rows drew, not one token


def test_nucleus_floor_equals_a_sorted_reference():
    rng = np.random.default_rng(4)
    probs = rng.dirichlet(np.full(300, 0.3), size=5).astype(np.float32)
    probs[1] = rng.dirichlet(np.full(300, 50.0)).astype(np.float32)  # nearly flat
    probs[2, 40:] = 0.0                                               # zeros, as after top-k
    probs[2] /= probs[2].sum()
    probs[3] = 0.0
    probs[3, 7] = 1.0                                                 # one token
    probs[4, :4] = probs[4, :4].max()                                 # ties at the top
    for top_p in (0.1, 0.5, 0.9, 0.999):
        floor = np.asarray(st.nucleus_floor(jnp.asarray(probs), top_p))
        for row, t in zip(probs.astype(np.float64), floor, strict=True):
            above = np.array([row[row > x].sum() for x in row])
            np.testing.assert_array_equal(row >= t, (above < top_p) & (row > 0))


@pytest.mark.parametrize("block", [128, 2])  # one block, and blocks with no weight at all
def test_inverse_cdf_never_draws_a_zero_weight_token(block):
    weights = jnp.asarray([[0.0, 0.0, 0.0, 1.0, 0.0, 2.0, 0.0],
                           [0.0, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0]])
    u = jnp.asarray([0.0, 0.3334, 0.999999, 1 - 2**-24])  # up to the largest float32 below 1
    drawn = jax.vmap(lambda u: st.inverse_cdf(weights, jnp.full(2, u), block))(u)
    np.testing.assert_array_equal(drawn, [[3, 2], [5, 2], [5, 2], [5, 2]])


@pytest.mark.parametrize("block", [128, 3])
def test_inverse_cdf_draws_in_proportion_to_the_weights(block):
    weights = jnp.asarray([[0.5, 0.0, 2.0, 1.0, 0.0, 0.0, 3.5, 1.0]])
    u = (jnp.arange(80_000) + 0.5) / 80_000  # evenly spread: frequencies are exact up to 1/80k
    drawn = jax.vmap(lambda u: st.inverse_cdf(weights, u[None], block))(u)[:, 0]
    np.testing.assert_allclose(np.bincount(drawn, minlength=8) / 80_000, weights[0] / 8.0,
                               atol=2 / 80_000)
