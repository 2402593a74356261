import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.limit import free_embedding as fe

# ---------------------------------------------------------------- ground truth

def test_ground_truth_k2_colex_by_hand():
    expected = [(0, 1), (0, 2), (1, 2), (0, 3), (1, 3), (2, 3)]
    np.testing.assert_array_equal(fe.ground_truth(4, 2), np.array(expected))


def test_ground_truth_k3_colex_by_hand():
    expected = [(0, 1, 2), (0, 1, 3), (0, 2, 3), (1, 2, 3), (0, 1, 4), (0, 2, 4), (1, 2, 4),
                (0, 3, 4), (1, 3, 4), (2, 3, 4)]
    np.testing.assert_array_equal(fe.ground_truth(5, 3), np.array(expected))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_ground_truth_is_every_subset_once_and_prefix_closed(k):
    n = 9
    gt = fe.ground_truth(n, k)
    assert gt.shape == (math.comb(n, k), k) and gt.dtype == np.int32
    assert {tuple(r) for r in gt} == set(itertools.combinations(range(n), k))
    for smaller in range(k, n):  # the queries of n' documents are the first C(n', k) rows
        prefix = gt[: math.comb(smaller, k)]
        assert prefix.max() < smaller
        np.testing.assert_array_equal(prefix, fe.ground_truth(smaller, k))


@pytest.mark.parametrize("n,k,d,match", [
    (1, 2, 4, "n=1"), (5, 0, 4, "k=0"), (5, 2, 0, "d=0"), (5, 2, -3, "d=-3"),
    (5.5, 2, 4, "n=5.5"), (5, 2, 2.0, "d=2.0")])
def test_bad_problem_is_named(n, k, d, match):
    with pytest.raises(ValueError, match=match):
        fe.check_problem(n, k, d)


@pytest.mark.parametrize("field,value", [
    ("k", 0), ("check_every", 0), ("patience", -1), ("steps", 1.5), ("temperature", 0.0),
    ("learning_rate", -1.0), ("loss", "hinge")])
def test_bad_solver_config_is_named(field, value):
    with pytest.raises(ValueError, match=field):
        fe.SolverConfig(**{field: value})


def test_max_steps_must_be_a_multiple_of_check_every():
    with pytest.raises(ValueError, match="multiple"):
        fe.SolverConfig(check_every=50, steps=120)


# ---------------------------------------------------------------- losses

def _numpy_losses(q, docs, n, k, temperature):
    """Loop-by-loop reference: the paper's log-sum and the official per-positive mean."""
    log_sum, per_positive = [], []
    for rel in itertools.combinations(range(n), k):
        s = np.array([q[len(log_sum)] @ docs[j] for j in range(n)]) / temperature
        p = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
        log_sum.append(-np.log(sum(p[j] for j in rel)))
        per_positive.append(-np.mean([np.log(p[j]) for j in rel]))
    return np.mean(log_sum), np.mean(per_positive)


def _colex_to_lex(n, k):
    """Row order mapping ground_truth (colex) onto itertools.combinations (lex)."""
    index = {tuple(r): i for i, r in enumerate(fe.ground_truth(n, k))}
    return np.array([index[c] for c in itertools.combinations(range(n), k)])


@pytest.mark.parametrize("k", [2, 3])
def test_losses_match_numpy(k):
    n, d, temperature = 6, 3, 0.1
    rng = np.random.default_rng(0)
    m = math.comb(n, k)
    q = rng.normal(size=(m, d)).astype(np.float32)
    docs = rng.normal(size=(n, d)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    order = _colex_to_lex(n, k)
    want_log_sum, want_per_positive = _numpy_losses(q[order], docs, n, k, temperature)
    emb = fe.Embeddings(jnp.asarray(q), jnp.asarray(docs))
    rel = jnp.asarray(fe.ground_truth(n, k))
    for kind, want in (("log_sum", want_log_sum), ("per_positive", want_per_positive)):
        got = fe.loss_fn(emb, rel, n, m, temperature=temperature, kind=kind)
        np.testing.assert_allclose(got, want, rtol=1e-5)


def test_loss_hand_computed_case():
    # n = 2, k = 1, d = 1 and temperature 1: q0 = +1, q1 = -1, d0 = +1, d1 = -1.
    # Each query puts softmax mass e / (e + 1/e) on its document: L = -log(e^2 / (e^2 + 1)).
    emb = fe.Embeddings(jnp.array([[1.0], [-1.0]]), jnp.array([[1.0], [-1.0]]))
    rel = jnp.asarray(fe.ground_truth(2, 1))
    want = -math.log(math.e**2 / (math.e**2 + 1))
    for kind in fe.LOSSES:  # with k = 1 both losses agree
        np.testing.assert_allclose(fe.loss_fn(emb, rel, 2, 2, temperature=1.0, kind=kind), want,
                                   rtol=1e-6)


@pytest.mark.parametrize("kind", fe.LOSSES)
def test_padding_does_not_change_loss_or_gradient(kind):
    n, slots, d, k = 5, 8, 3, 2
    m, m_slots = math.comb(n, k), math.comb(slots, k)
    emb = fe.init_embeddings(jax.random.key(0), m_slots, slots, d)
    small = fe.Embeddings(emb.queries[:m], emb.docs[:n])

    def loss(e, rel, nd, nq):
        return fe.loss_fn(e, rel, nd, nq, temperature=0.1, kind=kind)

    want, want_grad = jax.value_and_grad(loss)(small, jnp.asarray(fe.ground_truth(n, k)), n, m)
    got, grad = jax.value_and_grad(loss)(emb, jnp.asarray(fe.ground_truth(slots, k)), n, m)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(grad.queries[:m], want_grad.queries, atol=1e-6)
    np.testing.assert_allclose(grad.docs[:n], want_grad.docs, atol=1e-6)
    assert not np.any(grad.queries[m:]) and not np.any(grad.docs[n:])
    assert np.all(np.isfinite(grad.queries)) and np.all(np.isfinite(grad.docs))


def test_init_rows_do_not_depend_on_padding():
    a = fe.init_embeddings(jax.random.key(3), 10, 5, 4)
    b = fe.init_embeddings(jax.random.key(3), 28, 8, 4)
    np.testing.assert_array_equal(a.queries, b.queries[:10])
    np.testing.assert_array_equal(a.docs, b.docs[:5])
    np.testing.assert_allclose(np.linalg.norm(b.docs, axis=1), 1.0, rtol=1e-6)


# ---------------------------------------------------------------- the solved check

def _numpy_correct(q, docs, rel):
    s = q @ docs.T
    out = []
    for i, r in enumerate(rel):
        others = np.delete(s[i], r)
        out.append(s[i, r].min() > (others.max() if len(others) else -np.inf))
    return np.array(out)


def test_query_correct_counts_a_boundary_tie_as_failure():
    # Documents 0 and 2 are the same vector, so query {0, 1} ties document 2 with document 0.
    docs = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    q = jnp.array([[1.0, 1.0]] * 3) / math.sqrt(2)
    rel = jnp.asarray(fe.ground_truth(3, 2))  # (0,1), (0,2), (1,2)
    got = fe.query_correct(fe.Embeddings(q, docs), rel, 3, 3)
    np.testing.assert_array_equal(got, [False, False, False])
    # Query {0, 2} pointing at (1, 0) wins strictly: 1 > 0.
    q2 = q.at[1].set(jnp.array([1.0, 0.0]))
    got = fe.query_correct(fe.Embeddings(q2, docs), rel, 3, 3)
    np.testing.assert_array_equal(got, [False, True, False])


@pytest.mark.parametrize("k", [2, 3])
def test_query_correct_matches_numpy(k):
    n, d = 7, 3
    rng = np.random.default_rng(1)
    q = rng.normal(size=(math.comb(n, k), d)).astype(np.float32)
    docs = rng.normal(size=(n, d)).astype(np.float32)
    rel = fe.ground_truth(n, k)
    q[:5] = docs[rel[:5]].sum(axis=1)  # some queries answered correctly
    got = fe.query_correct(fe.Embeddings(jnp.asarray(q), jnp.asarray(docs)), jnp.asarray(rel),
                           n, len(rel))
    want = _numpy_correct(q, docs, rel)
    np.testing.assert_array_equal(got, want)
    assert want.any() and not want.all()


# ---------------------------------------------------------------- runs

FAST = fe.SolverConfig(check_every=10, patience=200, steps=3000)


@pytest.mark.parametrize("k", [2, 3])
def test_orthogonal_room_is_solved(k):
    # With d >= n the documents can be orthonormal; every k-subset is then realizable.
    result = fe.solve([0], [5], 5, fe.SolverConfig(k=k, check_every=10, steps=3000))
    assert result.solved[0] and result.accuracy[0] == 1.0
    assert result.steps[0] % 10 == 0 and result.steps[0] < 3000


def test_one_dimension_cannot_realize_every_pair():
    # On the line, unit vectors are +-1: of three documents two share a value, so some pair
    # always ties with the third. The run must stop unsolved, by patience before FAST.steps.
    result = fe.solve([0, 1], [3, 3], 1, FAST)
    assert not result.solved.any() and (result.accuracy < 1).all()
    assert (result.steps < FAST.steps).all()


def test_max_steps_stops_a_run():
    config = fe.SolverConfig(check_every=10, patience=10**6, steps=40)
    result = fe.solve([0], [3], 1, config)
    assert result.steps[0] == 40 and not result.solved[0]


def test_n_equal_k_is_solved_without_steps():
    result = fe.solve([0], [2], 3, FAST)
    assert result.solved[0] and result.steps[0] == 0


def test_batched_runs_equal_runs_one_by_one():
    seeds, ns, d = [0, 1, 2, 3], [6, 8, 7, 8], 5  # solved early: no long chaotic tail
    batch = fe.solve(seeds, ns, d, FAST)
    for r, (seed, n) in enumerate(zip(seeds, ns, strict=True)):
        alone = fe.solve([seed], [n], d, FAST)
        assert batch.solved[r] == alone.solved[0]
        assert batch.steps[r] == alone.steps[0]
        np.testing.assert_allclose(batch.loss[r], alone.loss[0], rtol=1e-4)
        np.testing.assert_allclose(batch.accuracy[r], alone.accuracy[0], atol=1e-6)


def test_sharded_batch_equals_unsharded(mesh8):
    seeds, ns, d = list(range(10)), [5, 6, 7, 8, 9] * 2, 5  # 10 runs: padded to 16 on 8 devices
    sharded = fe.solve(seeds, ns, d, FAST, mesh=mesh8)
    plain = fe.solve(seeds, ns, d, FAST)
    assert sharded.solved.shape == (10,)
    np.testing.assert_array_equal(sharded.solved, plain.solved)
    np.testing.assert_array_equal(sharded.steps, plain.steps)
    np.testing.assert_allclose(sharded.loss, plain.loss, rtol=1e-4)


def test_advance_in_segments_equals_one_call():
    state, rel = fe.start_runs([0, 1], [7, 7], 3, FAST)
    whole = fe.advance_runs(state, rel, steps=FAST.steps, config=FAST)
    state, rel = fe.start_runs([0, 1], [7, 7], 3, FAST)
    for _ in range(FAST.steps // 30):
        state = fe.advance_runs(state, rel, steps=30, config=FAST)
    for a, b in zip(fe.result(whole), fe.result(state), strict=True):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- memory

def test_too_large_a_batch_is_refused_with_its_size():
    with pytest.raises(ValueError, match=r"need \d+\.\d+ GiB per device.*at most 1\b"):
        fe.solve([0, 1], [600, 600], 45, fe.SolverConfig(), memory_bytes=3 * 2**30)


def test_memory_estimate_bounds_xla_memory_analysis():
    for n, d, runs in [(30, 8, 4), (60, 16, 2)]:
        rel = jnp.asarray(fe.ground_truth(n, 2))
        keys = jax.vmap(jax.random.key)(jnp.arange(runs, dtype=jnp.uint32))
        state = jax.eval_shape(
            lambda keys, rel, nd, n=n, d=d: fe.init_runs(keys, rel, nd, num_doc_slots=n, dim=d,
                                                          config=FAST),
            keys, rel, jnp.full((runs,), n, jnp.int32))
        stats = fe.advance_runs.lower(state, rel, steps=50, config=FAST).compile().memory_analysis()
        if stats is None:
            pytest.skip("this backend reports no memory analysis")
        used = (stats.temp_size_in_bytes + stats.argument_size_in_bytes
                + stats.output_size_in_bytes - stats.alias_size_in_bytes)
        estimate = runs * fe.run_bytes(n, d, 2)
        assert used <= estimate <= 2 * used, (n, d, used, estimate)


# ---------------------------------------------------------------- any relevance pattern

def test_fit_solves_a_small_qrel_pattern_and_returns_its_embeddings():
    # A cycle: query i is relevant to documents i and i + 1 (mod 6); easy in d = 6.
    relevant = np.stack([np.arange(6), (np.arange(6) + 1) % 6], axis=1)
    result, emb = fe.fit(relevant, 6, 6, FAST)
    assert result.solved and emb.queries.shape == (6, 6) and emb.docs.shape == (6, 6)
    correct = _numpy_correct(np.asarray(emb.queries), np.asarray(emb.docs), relevant)
    assert correct.all()


@pytest.mark.parametrize("relevant,match", [
    (np.array([[0, 1, 2]]), "shape"), (np.array([[0, 6]]), r"\[0, 6\)"),
    (np.array([[1, 1]]), "repeat"), (np.array([[0.0, 1.0]]), "integer")])
def test_fit_rejects_bad_relevance(relevant, match):
    with pytest.raises(ValueError, match=match):
        fe.fit(relevant, 6, 4, FAST)


def test_scores_run_at_highest_precision_and_match_numpy():
    # The solved check, the loss and exact search ask for full float32 products (HIGHEST) in the
    # program itself, so no backend may lower them to TF32 or one bf16 pass; on the CPU the
    # values equal a float64 NumPy product rounded to float32.
    rng = np.random.default_rng(0)
    q, docs = rng.normal(size=(5, 7)).astype(np.float32), rng.normal(size=(4, 7)).astype(np.float32)
    relevant = jnp.asarray(fe.ground_truth(4, 2))[:5]
    emb = fe.Embeddings(jnp.asarray(q), jnp.asarray(docs))
    args = (emb, relevant, jnp.int32(4), jnp.int32(5))
    for fn in (fe.query_correct,
               lambda *a: fe.loss_fn(*a, temperature=0.1, kind="per_positive")):
        hlo = jax.jit(fn).lower(*args).as_text()
        assert "HIGHEST" in hlo, hlo
    np.testing.assert_allclose(fe.exact_scores(q, docs), q.astype(np.float64) @ docs.T.astype(
        np.float64), rtol=1e-6, atol=1e-6)
