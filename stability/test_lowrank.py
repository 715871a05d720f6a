"""kl_lowrank beyond the shared suite: identities with the other families, ranks that differ,
zero factors, the O(k r^2) and dense routes, and clear errors."""

import numpy as np
import pytest

import kl_bench
from kl_bench.suite import cases, metrics, reference

RNG = np.random.default_rng(7)


def _params(n, k, r, scale=1.0):
    return RNG.normal(size=(n, k)), scale * RNG.normal(size=(n, k, r)), np.exp(RNG.uniform(-1, 1, (n, k)))


def _worst_ulps(computed, *arrays):
    exact = reference.kl_lowrank(*arrays, cache=False)
    return max(metrics.ulps(float(c), e, "float64") for c, e in zip(computed, exact))


@pytest.mark.parametrize("method", ["stable", "naive"])
def test_zero_factors_give_the_diagonal_family(method):
    """W = 0 on both sides is the diagonal family with log-variances ln d."""
    mu_p, _, d_p = _params(5, 9, 2)
    mu_q, _, d_q = _params(5, 9, 2)
    zeros = np.zeros((5, 9, 2))
    low_rank = kl_bench.kl_lowrank(mu_p, zeros, d_p, mu_q, zeros, d_q, method=method)
    diagonal = kl_bench.kl_diag(mu_p, np.log(d_p), mu_q, np.log(d_q))
    np.testing.assert_allclose(low_rank, diagonal, rtol=1e-13)


@pytest.mark.parametrize("k, r_p, r_q", [(10, 2, 4), (10, 4, 1), (4, 3, 5)])  # O(k r^2) and dense routes
def test_ranks_may_differ(k, r_p, r_q):
    mu_p, w_p, d_p = _params(4, k, r_p)
    mu_q, w_q, d_q = _params(4, k, r_q)
    computed = kl_bench.kl_lowrank(mu_p, w_p, d_p, mu_q, w_q, d_q)
    assert _worst_ulps(computed, mu_p, w_p, d_p, mu_q, w_q, d_q) <= 16


def test_near_equal_ranks_agree_on_both_routes():
    """The same near-equal pair through the O(k r^2) route (k > 2r) and, padded with zero columns
    to r >= k / 2, through the dense one: both within the bound of the certified reference."""
    mu, w, d = _params(6, 8, 3)
    w_q = w * (1 + 1e-7 * RNG.uniform(-1, 1, w.shape))
    pad = np.zeros((6, 8, 1))
    for args in ((w, w_q), (np.concatenate([w, pad], -1), np.concatenate([w_q, pad], -1))):
        computed = kl_bench.kl_lowrank(mu, args[0], d, mu, args[1], d)
        assert _worst_ulps(computed, mu, w, d, mu, w_q, d) <= 16, args[0].shape


def test_a_shared_q_broadcasts_against_a_batch_of_p():
    mu_p, w_p, d_p = _params(3, 6, 2)
    mu_q, w_q, d_q = _params(1, 6, 2)
    together = kl_bench.kl_lowrank(mu_p, w_p, d_p, mu_q[0], w_q[0], d_q[0])
    one_by_one = [kl_bench.kl_lowrank(mu_p[i], w_p[i], d_p[i], mu_q[0], w_q[0], d_q[0]) for i in range(3)]
    np.testing.assert_array_equal(together, one_by_one)


def test_gradients_are_finite_from_a_zero_factor():
    """A factor initialised to zero (rank deficient) still trains: finite gradients, equal to
    those of the diagonal family for the means and diagonals."""
    torch = pytest.importorskip("torch")
    mu_p, _, d_p = _params(2, 7, 2)
    mu_q, w_q, d_q = _params(2, 7, 2)
    args = [torch.tensor(a, requires_grad=True) for a in (mu_p, np.zeros((2, 7, 2)), d_p, mu_q, w_q, d_q)]
    kl_bench.kl_lowrank(*args).sum().backward()
    assert all(torch.isfinite(a.grad).all() for a in args)


@pytest.mark.parametrize("args, message", [
    (lambda mu, w, d: (mu, w[:, :5], d, mu, w, d), "mismatched dimension k"),
    (lambda mu, w, d: (mu, w[0, :, 0], d, mu, w, d), r"cov_factor_p must be a k x r matrix"),
    (lambda mu, w, d: (mu, w, -d, mu, w, d), "cov_diag_p must be positive"),
    (lambda mu, w, d: (mu, w, d, mu[:, :3], w, d), "mismatched dimension k: loc_q"),
])
def test_bad_input_names_the_argument(args, message):
    with pytest.raises(ValueError, match=message):
        kl_bench.kl_lowrank(*args(*_params(2, 6, 2)))


@pytest.mark.parametrize("backend", ["numpy", "torch", "jax"])
def test_a_diagonal_change_where_q_factor_dominates(backend):
    """p differs from q only in the diagonal, on a coordinate whose variance q's factor makes (a
    column of size 50 on that row alone), beside a larger column shared by 30 rows (each of
    leverage about 1/30, yet the largest rows by norm): the change is found by its leverage, not
    its row's norm, and comes out within 16 + cond(S_q) ulps. Seen through the factor it would
    cancel to about 1/50^4 of its parts."""
    from kl_bench import backends

    be = backends.get(backend)
    if not be.installed():
        pytest.skip(f"{backend} is not installed")
    n, k = 4, 40
    mu, _, d_q = _params(n, k, 2)
    w = np.zeros((n, k, 2))
    w[:, 5, 0], w[:, 10:, 1] = 50.0, 100.0
    d_p = d_q.copy()
    d_p[:, 5] *= 1 + 1e-3 * RNG.uniform(-1, 1, n)
    args = (mu, w, d_p, mu, w, d_q)
    with be.computing("float64"):
        computed = be.to_numpy(kl_bench.kl_lowrank(*[be.asarray(a, dtype="float64") for a in args]))
    exact = reference.kl_lowrank(*args, cache=False)
    for c, e, cond in zip(computed, exact, np.linalg.cond(cases.low_rank_covariance(w, d_q))):
        assert metrics.ulps(float(c), e, "float64") <= 16 + cond, (c, e, cond)


@pytest.mark.parametrize("backend", ["numpy", "torch", "jax"])
def test_largest_selects_exactly_n_entries(backend):
    """Backend.largest, which picks the dominated coordinates: the n largest, and exactly n even
    where entries tie (a zero factor gives every coordinate leverage 0)."""
    from kl_bench import backends

    be = backends.get(backend)
    if not be.installed():
        pytest.skip(f"{backend} is not installed")
    x = RNG.permutation(np.arange(24.0)).reshape(2, 12)
    for values, n in ((x, 5), (np.zeros((2, 12)), 4)):
        with be.computing("float64"):
            rows, mask = be.largest(be.asarray(values, dtype="float64"), n)
        rows, mask = np.asarray(be.to_numpy(rows)).astype(int), np.asarray(be.to_numpy(mask)).astype(bool)
        assert rows.shape == (2, n) and np.all(mask.sum(axis=-1) == n)
        assert np.array_equal(np.sort(rows, axis=-1), np.sort(np.nonzero(mask)[1].reshape(2, n), axis=-1))
        kth = np.sort(values, axis=-1)[:, -n][:, None]
        assert np.all(np.take_along_axis(values, rows, axis=-1) >= kth)


@pytest.mark.parametrize("method", ["stable", "naive"])
@pytest.mark.parametrize("k, r", [(9, 2), (4, 3)])  # the O(k r^2) and dense routes
def test_infinite_inputs_give_the_limit(method, k, r):
    """An infinite variance on one side, or an infinite distance of the means, makes the KL +inf;
    infinite variances on both sides of one coordinate are inf / inf, NaN; the other batch
    elements are untouched. Tiny variances (1e-300) do not raise."""
    mu_p, w_p, d_p = _params(6, k, r)
    mu_q, w_q, d_q = _params(6, k, r)
    clean = kl_bench.kl_lowrank(mu_p, w_p, d_p, mu_q, w_q, d_q, method=method)
    d_p[0, 1], d_q[1, 0], mu_p[2, 2] = np.inf, np.inf, np.inf
    d_p[3, 0] = d_q[3, 0] = np.inf
    d_q[4, 1] = 1e-300
    computed = kl_bench.kl_lowrank(mu_p, w_p, d_p, mu_q, w_q, d_q, method=method)
    assert np.all(computed[:3] == np.inf) and np.isnan(computed[3]) and computed[5] == clean[5]
