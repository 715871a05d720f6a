"""kl_cov's factorisation I + M = (I + N)(I + N)^T, alone: N must come out with the relative
accuracy of its entries however small they are (docs/design.md, "kl_cov without an
eigendecomposition"), across the recursive blocks."""

import numpy as np
import pytest

from kl_bench import backends, kernels
from kl_bench.suite import reference


def _exact_m(n):
    """M = N + N^T + N N^T in exact rationals, rounded once to float64."""
    q = reference.rational_matrix(n)
    exact = q + q.transpose() + q * q.transpose()
    k = n.shape[0]
    return np.array([[float(exact[i, j]) for j in range(k)] for i in range(k)])


@pytest.mark.parametrize("backend", ["numpy", "torch", "jax"])
@pytest.mark.parametrize("scale", [1e-1, 1e-8, 1e-14, 1e-30])
def test_factor_entries_to_their_relative_accuracy(backend, scale):
    be = backends.get(backend)
    if not be.installed():
        pytest.skip(f"{backend} is not installed")
    k = kernels.SHIFTED_CHOLESKY_LEAF + 13  # one recursive split, uneven halves
    rng = np.random.default_rng(7)
    n = np.tril(rng.uniform(0.5, 1.0, size=(k, k)) * rng.choice([-1.0, 1.0], size=(k, k))) * scale
    np.fill_diagonal(n, np.abs(np.diag(n)))  # 1 + N_jj > 0: the Cholesky factor
    m = _exact_m(n)
    with be.computing("float64"):
        u, squares, factor = kernels._shifted_cholesky(be, be.asarray(m, dtype=be.dtype("float64")), factor_needed=True)
        u, squares, factor = (be.to_numpy(x) for x in (u, squares, factor))
    # M is N's image rounded once: its relative error eps moves N by about as much, times k
    bound = 8 * k * np.finfo(np.float64).eps
    assert np.all(np.abs(factor - n) <= bound * np.abs(n) + bound * scale * scale), np.max(np.abs(factor - n) / np.abs(n))
    diagonal = np.diag(n)
    assert np.allclose(u, diagonal * (2 + diagonal), rtol=bound, atol=0)
    strict = np.tril(n, -1)
    assert squares == pytest.approx(np.sum(strict * strict), rel=bound)
