import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxlab.sampling import confidence as cf


def _np_token_confidence(logits, k):
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return -np.sort(logp, axis=-1)[..., ::-1][..., :k].mean(-1)


def test_token_confidence_matches_numpy_and_orders_peakedness():
    for vocab in (50, 3000):  # one top-k, and the block search over a larger vocabulary
        logits = np.random.default_rng(0).normal(size=(3, 5, vocab)).astype(np.float32) * 3
        np.testing.assert_allclose(cf.token_confidence(logits, 20),
                                   _np_token_confidence(logits, 20), rtol=1e-5)
    flat, peaked = np.zeros((1, 50)), np.zeros((1, 50))
    peaked[0, 0] = 10.0
    assert cf.token_confidence(peaked, 5)[0] > cf.token_confidence(flat, 5)[0]
    # A uniform distribution over V tokens: every log-prob is -log V.
    np.testing.assert_allclose(cf.token_confidence(flat, 5), [np.log(50)], rtol=1e-6)


def _windows(c, length, w):
    """Reference: every stride-1 window of a trace, or its overall mean when shorter."""
    c = c[:length]
    if length < w:
        return [c.mean()]
    return [c[i - w + 1:i + 1].mean() for i in range(w - 1, length)]


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 30), min_size=4, max_size=4), window=st.integers(1, 8),
       tail=st.integers(1, 40), data=st.data())
def test_offline_statistics_match_numpy(lengths, window, tail, data):
    # one shape [4, 30] for every example (the eager ops compile once per window and tail)
    rng = np.random.default_rng(data.draw(st.integers(0, 1000)))
    c = rng.uniform(5, 20, size=(4, 30)).astype(np.float32)
    lengths = np.array(lengths)
    lowest = np.asarray(cf.lowest_group_confidence(c, lengths, window))
    bottom = np.asarray(cf.bottom_group_confidence(c, lengths, window, 0.25))
    tails = np.asarray(cf.tail_confidence(c, lengths, tail))
    means = np.asarray(cf.mean_confidence(c, lengths))
    for b, length in enumerate(lengths):
        groups = np.sort(_windows(c[b], length, window))
        np.testing.assert_allclose(lowest[b], groups[0], rtol=1e-5)
        keep = max(int(len(groups) * 0.25), 1)  # the official count: floor, at least one
        np.testing.assert_allclose(bottom[b], groups[:keep].mean(), rtol=1e-5)
        np.testing.assert_allclose(tails[b], c[b, max(0, length - tail):length].mean(),
                                   rtol=1e-5)
        np.testing.assert_allclose(means[b], c[b, :length].mean(), rtol=1e-5)


def _official_bottom(confs, window_size, bottom_percent):
    """facebookresearch/deepconf `calculate_bottom_window_confidence`, transcribed."""
    if len(confs) < window_size:
        return np.mean(confs)
    window_means = [np.mean(confs[i:i + window_size])
                    for i in range(len(confs) - window_size + 1)]
    num_bottom = max(1, int(len(window_means) * bottom_percent))
    return np.mean(np.partition(window_means, num_bottom - 1)[:num_bottom])


def test_bottom_ten_percent_and_tail_follow_the_official_implementation():
    rng = np.random.default_rng(4)
    lengths = np.array([9, 34, 40, 72, 3])
    c = rng.uniform(5, 20, size=(5, 72)).astype(np.float32)
    got = np.asarray(cf.bottom_group_confidence(c, lengths, 3, 0.1))
    tails = np.asarray(cf.tail_confidence(c, lengths, 20))
    for b, n in enumerate(lengths):
        confs = c[b, :n].astype(np.float64)
        np.testing.assert_allclose(got[b], _official_bottom(confs, 3, 0.1), rtol=1e-5)
        # the official calculate_tail_confidence: confs[-tail:] if longer, else all
        np.testing.assert_allclose(tails[b], np.mean(confs[-20:] if n > 20 else confs),
                                   rtol=1e-5)


@pytest.mark.parametrize("name", ["window", "tail"])
@pytest.mark.parametrize("value", [0, -2])
def test_window_and_tail_below_one_are_errors_naming_them(name, value):
    c, lengths = np.ones((1, 4), np.float32), np.array([4])
    call = (cf.tail_confidence if name == "tail" else cf.lowest_group_confidence)
    with pytest.raises(ValueError, match=f"{name} must be an integer >= 1"):
        call(c, lengths, value)


@pytest.mark.parametrize("block", [1, 4, 8])
def test_top_k_values_equal_a_full_sort_with_ties_and_padding(block):
    rng = np.random.default_rng(2)
    x = rng.integers(0, 12, size=(6, 301)).astype(np.float32)  # many ties; 301 pads every block
    x[0] = 5.0                                                   # a row of one value
    got = np.asarray(cf.top_k_values(jnp.asarray(x), 20, block))
    np.testing.assert_array_equal(got, -np.sort(-x, axis=1)[:, :20])


def test_group_window_is_the_running_then_sliding_mean():
    rng = np.random.default_rng(1)
    c = rng.uniform(0, 10, size=(2, 12)).astype(np.float32)
    active = np.ones((2, 12), bool)
    active[1, 4:7] = False  # row 1 pauses: its window must not move
    window = cf.GroupWindow.create(2, 4)
    seen = [[], []]
    for t in range(12):
        window = window.push(c[:, t], active[:, t])
        for b in range(2):
            if active[b, t]:
                seen[b].append(c[b, t])
            np.testing.assert_allclose(window.mean[b], np.mean(seen[b][-4:]), rtol=1e-5)
            assert bool(window.full[b]) == (len(seen[b]) >= 4)
    window = window.reset(np.array([True, False]))
    assert window.mean[0] == 0 and window.count[0] == 0 and window.count[1] == 9
    # a reset window starts over: what the ring held before never reaches the new mean
    fresh = rng.uniform(0, 10, size=6).astype(np.float32)
    for t in range(6):
        window = window.push(np.array([fresh[t], 0.0], np.float32), np.array([True, False]))
        np.testing.assert_allclose(window.mean[0], np.mean(fresh[max(0, t - 3):t + 1]),
                                   rtol=1e-5)


@pytest.mark.parametrize("fraction,count,keep", [(0.1, 30, 3), (0.1, 10, 1), (0.1, 9, 1),
                                                 (0.1, 25, 2), (0.1, 70, 7), (0.5, 3, 1)])
def test_bottom_fraction_counts_windows_exactly(fraction, count, keep):
    # count windows of size 1 with values 0..count-1: the bottom mean is mean(0..keep-1).
    c = np.arange(count, dtype=np.float32)[None]
    got = cf.bottom_group_confidence(c, np.array([count]), 1, fraction)
    np.testing.assert_allclose(got, [np.mean(np.arange(keep))])
