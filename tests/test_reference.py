"""The mpmath references, validated independently of the formulas they use."""

import mpmath
import numpy as np
import pytest

from kl_bench.suite import reference

rng = np.random.default_rng(1234)


def _spd(k):
    a = rng.normal(size=(k, k))
    return a @ a.T + k * np.eye(k)


def test_univariate_against_numerical_integration():
    """KL = integral of p log(p/q), by mpmath.quad, on generic inputs."""
    for mu_p, s_p, mu_q, s_q in [(0.3, 0.7, -0.2, 1.3), (1.0, 2.0, 0.0, 1.0), (-0.5, 0.4, 0.1, 0.45)]:
        exact = reference.kl_normal(mu_p, s_p, mu_q, s_q, cache=False)
        with mpmath.workdps(30):
            p = lambda x: mpmath.npdf(x, mu_p, s_p)  # noqa: E731
            q = lambda x: mpmath.npdf(x, mu_q, s_q)  # noqa: E731
            integral = mpmath.quad(lambda x: p(x) * mpmath.log(p(x) / q(x)), [-mpmath.inf, mu_p, mpmath.inf])
            assert abs(integral - exact) <= mpmath.mpf(10) ** -25 * abs(exact)


def test_precision_rule_settles_far_past_float64():
    """The returned value agrees with a much higher precision evaluation far beyond 53 bits, even
    where the textbook formula cancels almost everything (p and q within 1e-12)."""
    mu, s = 0.3, 1.7
    args = (mu, s, mu + 1e-12, s * (1 + 1e-12))
    value = reference.kl_normal(*args, cache=False)
    with mpmath.workprec(2000):
        truth = reference.mp_normal(*(mpmath.mpf(a) for a in args))
    assert value > 0
    assert abs(value - truth) <= mpmath.ldexp(truth, -reference.CERTIFIED_BITS)


def test_equal_distributions_give_exactly_zero():
    assert reference.kl_normal(1.0, 2.0, 1.0, 2.0, cache=False) == 0
    assert reference.kl_vae([0.0, -0.0], [0.0, 0.0], cache=False) == 0
    s = _spd(3)
    assert reference.kl_cov(np.ones(3), s, np.ones(3), s, cache=False) == 0


def test_diagonal_is_the_sum_of_univariate():
    """Additivity over independent coordinates, at high precision: diag(l) == sum normal(e^(l/2))."""
    mu_p, l_p, mu_q, l_q = rng.normal(size=(4, 5))
    with mpmath.workprec(300):
        diag = reference.mp_diag(*[[mpmath.mpf(v) for v in a] for a in (mu_p, l_p, mu_q, l_q)])
        total = mpmath.fsum(
            reference.mp_normal(mpmath.mpf(a), mpmath.exp(mpmath.mpf(b) / 2), mpmath.mpf(c), mpmath.exp(mpmath.mpf(d) / 2))
            for a, b, c, d in zip(mu_p, l_p, mu_q, l_q)
        )
        assert abs(diag - total) <= mpmath.ldexp(abs(total), -250)
        vae = reference.mp_vae([mpmath.mpf(v) for v in mu_p], [mpmath.mpf(v) for v in l_p])
        as_diag = reference.mp_diag([mpmath.mpf(v) for v in mu_p], [mpmath.mpf(v) for v in l_p], [0] * 5, [0] * 5)
        assert abs(vae - as_diag) <= mpmath.ldexp(abs(vae), -250)


def _mp(a):
    return [[mpmath.mpf(v) for v in row] for row in a] if a.ndim == 2 else [mpmath.mpf(v) for v in a]


def _matmul(a, b):
    return [[mpmath.fsum(a[i][t] * b[t][j] for t in range(len(b))) for j in range(len(b[0]))] for i in range(len(a))]


def test_full_covariance_is_invariant_under_a_common_affine_map():
    """KL(A p + b || A q + b) == KL(p || q) for invertible A, evaluated at high precision."""
    k = 4
    s_p, s_q, a = _spd(k), _spd(k), rng.normal(size=(k, k)) + 3 * np.eye(k)
    mu_p, mu_q, shift = rng.normal(size=(3, k))
    with mpmath.workprec(300):
        A = _mp(a)
        At = [list(r) for r in zip(*A)]

        def mapped(mu, s):
            mu2 = [mpmath.fsum(A[i][j] * m for j, m in enumerate(_mp(mu))) + mpmath.mpf(shift[i]) for i in range(k)]
            return mu2, _matmul(_matmul(A, _mp(s)), At)

        before = reference.mp_cov(_mp(mu_p), _mp(s_p), _mp(mu_q), _mp(s_q))
        after = reference.mp_cov(*mapped(mu_p, s_p), *mapped(mu_q, s_q))
        assert abs(before - after) <= mpmath.ldexp(before, -250)
        # and the factor form agrees with the covariance form
        tril = reference.mp_tril(_mp(mu_p), reference.mp_cholesky(_mp(s_p)), _mp(mu_q), reference.mp_cholesky(_mp(s_q)))
        assert abs(before - tril) <= mpmath.ldexp(before, -250)


def test_full_covariance_with_diagonal_matrices_matches_diag():
    l_p, l_q = rng.uniform(-2, 2, size=(2, 3))
    mu_p, mu_q = rng.normal(size=(2, 3))
    with mpmath.workprec(300):
        var_p = [mpmath.exp(mpmath.mpf(v)) for v in l_p]
        var_q = [mpmath.exp(mpmath.mpf(v)) for v in l_q]
        diag_matrix = lambda v: [[v[i] if i == j else mpmath.mpf(0) for j in range(3)] for i in range(3)]  # noqa: E731
        cov = reference.mp_cov(_mp(mu_p), diag_matrix(var_p), _mp(mu_q), diag_matrix(var_q))
        diag = reference.mp_diag(_mp(mu_p), _mp(l_p), _mp(mu_q), _mp(l_q))
        assert abs(cov - diag) <= mpmath.ldexp(diag, -250)


def test_batches_broadcast_like_the_kernels():
    out = reference.kl_tril(np.zeros(2), np.stack([np.eye(2), 2 * np.eye(2)]), np.zeros(2), np.eye(2), cache=False)
    assert out.shape == (2,) and out[0] == 0
    with mpmath.workprec(200):
        assert abs(out[1] - (3 - mpmath.log(4))) < mpmath.mpf(10) ** -30


def test_invalid_covariance_raises():
    with pytest.raises(ValueError):
        reference.kl_cov(np.zeros(2), -np.eye(2), np.zeros(2), np.eye(2), cache=False)
