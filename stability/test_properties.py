"""Properties that hold for any inputs (hypothesis): non-negativity, zero exactly when p == q,
invariance of the full-covariance KL under a common affine map, additivity over independent
coordinates, and agreement between families where they describe the same distributions. Run on
every available backend (stable kernels, float64)."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import kl_bench
from kl_bench.suite import cases

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)
# magnitudes 0 or 1e-3 .. 8: any two distinct parameter sets then have a KL far above the
# smallest float64 (below it, 0 is the correctly rounded KL)
moderate = st.one_of(st.just(0.0), st.floats(1e-3, 8.0), st.floats(-8.0, -1e-3))


def vectors(k):
    return hnp.arrays(np.float64, (3, k), elements=moderate)


@st.composite
def diag_pairs(draw):
    k = draw(st.integers(1, 6))
    return tuple(draw(vectors(k)) for _ in range(4))


@st.composite
def spd_pairs(draw, max_cond=100.0):
    """Two SPD matrices (and means) of moderate condition, from a seed: hypothesis shrinks the seed."""
    k, seed = draw(st.integers(1, 5)), draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    s_p, s_q = (cases.random_spd(rng, 10.0 ** -rng.uniform(0, np.log10(max_cond), (3, k))) for _ in range(2))
    return rng.normal(size=(3, k)), s_p, rng.normal(size=(3, k)), s_q


def _np(subject, x):
    return subject.be.to_numpy(x)


def _kl(subject, family, *arrays):
    return _np(subject, getattr(kl_bench, f"kl_{family}")(*(subject.asarray(np.asarray(a), "float64") for a in arrays)))


@SETTINGS
@given(pair=diag_pairs())
def test_non_negative_and_zero_exactly_when_equal(kl_target, pair):
    mu_p, l_p, mu_q, l_q = pair
    kl = _kl(kl_target, "diag", mu_p, l_p, mu_q, l_q)
    assert np.all(kl >= 0)
    same = np.all((mu_p == mu_q) & (l_p == l_q), axis=-1)
    assert np.all((kl == 0) == same)
    assert np.all(_kl(kl_target, "diag", mu_p, l_p, mu_p, l_p) == 0)


@SETTINGS
@given(pair=spd_pairs())
def test_full_covariance_non_negative_and_zero_when_equal(kl_target, pair):
    mu_p, s_p, mu_q, s_q = pair
    assert np.all(_kl(kl_target, "cov", mu_p, s_p, mu_q, s_q) > 0)
    assert np.all(_kl(kl_target, "cov", mu_p, s_p, mu_p, s_p) == 0)
    l_p = np.linalg.cholesky(s_p)
    assert np.all(_kl(kl_target, "tril", mu_p, l_p, mu_p, l_p) == 0)


@SETTINGS
@given(pair=spd_pairs(), seed=st.integers(0, 2**32 - 1))
def test_invariant_under_a_common_affine_map(kl_target, pair, seed):
    mu_p, s_p, mu_q, s_q = pair
    k = s_p.shape[-1]
    rng = np.random.default_rng(seed)
    a = np.eye(k) + 0.3 * rng.uniform(-1, 1, (k, k))  # cond(A) stays moderate
    b = rng.normal(size=k)
    moved = (mu_p @ a.T + b, a @ s_p @ a.T, mu_q @ a.T + b, a @ s_q @ a.T)
    moved = tuple(0.5 * (m + np.swapaxes(m, -1, -2)) if m.ndim == 3 else m for m in moved)
    np.testing.assert_allclose(_kl(kl_target, "cov", *moved), _kl(kl_target, "cov", mu_p, s_p, mu_q, s_q), rtol=1e-9)


@SETTINGS
@given(pair=diag_pairs())
def test_additive_over_independent_coordinates(kl_target, pair):
    whole = _kl(kl_target, "diag", *pair)
    parts = sum(_kl(kl_target, "diag", *(a[:, i : i + 1] for a in pair)) for i in range(pair[0].shape[-1]))
    np.testing.assert_allclose(whole, parts, rtol=8 * 2.0**-52 * pair[0].shape[-1], atol=0)


@SETTINGS
@given(pair=diag_pairs())
def test_families_agree_where_they_coincide(kl_target, pair):
    mu_p, l_p, mu_q, l_q = pair
    diag = _kl(kl_target, "diag", *pair)
    # univariate, per coordinate: scales exp(l/2) round once, so compare to a few ulps of the terms
    normal = _kl(kl_target, "normal", mu_p, np.exp(l_p / 2), mu_q, np.exp(l_q / 2)).sum(axis=-1)
    eye = np.eye(mu_p.shape[-1])
    tril = _kl(kl_target, "tril", mu_p, eye * np.exp(l_p / 2)[..., None], mu_q, eye * np.exp(l_q / 2)[..., None])
    cov = _kl(kl_target, "cov", mu_p, eye * np.exp(l_p)[..., None], mu_q, eye * np.exp(l_q)[..., None])
    tolerance = 1e-12 * (1 + diag)
    for other in (normal, tril, cov):
        assert np.all(np.abs(other - diag) <= tolerance)
    # the VAE term is the diagonal family against N(0, I), on identical inputs
    zeros = np.zeros_like(mu_p)
    np.testing.assert_allclose(_kl(kl_target, "vae", mu_p, l_p), _kl(kl_target, "diag", mu_p, l_p, zeros, zeros), rtol=1e-15)
