"""Implementations for ``kl-bench check`` to judge: faults it must catch, and correct ones it must
pass. All take NumPy arrays exactly like ``kl_bench.kl_<family>``. The correct ones are written
here independently of the package (a series for phi, the TwoSum-corrected difference, the E form
for factors, the eigenvalue form for covariances)."""

import math

import numpy as np
from scipy.linalg import solve_triangular


# --- correct --------------------------------------------------------------------------------
def in_dtype_of(like):
    """Compute in float64, return in the inputs' dtype (so a float32 KL beyond its range is inf)."""

    def wrap(fn):
        def wrapped(*args):
            with np.errstate(over="ignore"):
                return np.asarray(fn(*args)).astype(np.result_type(args[like]))

        wrapped.__name__ = wrapped.__qualname__ = fn.__name__
        return wrapped

    return wrap


def phi(x):
    """e^x - 1 - x without cancellation: a Taylor series for |x| < 1/2."""
    x = np.asarray(x, dtype=np.float64)
    small = np.abs(x) < 0.5
    xs = np.where(small, x, 0.0)
    series = np.full_like(xs, 1 / math.factorial(20))
    for n in range(19, 1, -1):
        series = series * xs + 1 / math.factorial(n)
    with np.errstate(over="ignore"):
        return np.where(small, xs * xs * series, np.expm1(x) - x)


@in_dtype_of(0)
def correct_normal(mu_p, s_p, mu_q, s_q):
    mu_p, s_p, mu_q, s_q = (np.asarray(a, dtype=np.float64) for a in (mu_p, s_p, mu_q, s_q))
    r = s_p / s_q
    close = (r <= 2) & (r >= 0.5)
    with np.errstate(over="ignore"):
        # far apart, r^2 - 1 - 2 ln r does not cancel (and e^(2t) would magnify t's error)
        phi_2t = np.where(close, phi(2 * np.log1p((s_p - s_q) / s_q)), r * r - 1 - 2 * np.log(r))
    return 0.5 * (phi_2t + ((mu_p - mu_q) / s_q) ** 2)


@in_dtype_of(0)
def correct_diag(mu_p, l_p, mu_q, l_q):
    mu_p, l_p, mu_q, l_q = (np.asarray(a, dtype=np.float64) for a in (mu_p, l_p, mu_q, l_q))
    x = l_p - l_q
    z = x - l_p
    err = (l_p - (x - z)) + (-l_q - z)  # the exact rounding error of x (TwoSum)
    with np.errstate(over="ignore", invalid="ignore"):
        expm1 = np.minimum(np.expm1(x), np.finfo(np.float64).max)  # inf - inf would be NaN
        correction = np.where(err == 0, 0.0, err * expm1)
        terms = phi(x) + correction + (mu_p - mu_q) ** 2 * np.exp(-l_q)
    return 0.5 * np.sum(terms, axis=-1)


@in_dtype_of(0)
def correct_vae(mu, logvar):
    mu, logvar = np.asarray(mu, dtype=np.float64), np.asarray(logvar, dtype=np.float64)
    return 0.5 * np.sum(phi(logvar) + mu**2, axis=-1)


def _per_element(fn, *arrays):
    return np.array([fn(*parts) for parts in zip(*(np.asarray(a, dtype=np.float64) for a in arrays))])


def _tril_one(mu_p, l_p, mu_q, l_q, trans=0):
    l_p, l_q = np.tril(l_p), np.tril(l_q)
    solved = solve_triangular(l_q, np.column_stack([l_p - l_q, mu_p - mu_q]), lower=True, trans=trans)
    k = len(mu_p)
    t = np.log1p(np.diag(l_p - l_q) / np.diag(l_q))
    return 0.5 * (np.sum(phi(2 * t)) + np.sum(np.tril(solved[:, :k], -1) ** 2) + np.sum(solved[:, k] ** 2))


@in_dtype_of(0)
def correct_tril(mu_p, l_p, mu_q, l_q):
    return _per_element(_tril_one, mu_p, l_p, mu_q, l_q)


def _cov_one(mu_p, s_p, mu_q, s_q):
    l_q = np.linalg.cholesky(s_q)
    half = solve_triangular(l_q, s_p - s_q, lower=True)
    m = solve_triangular(l_q, half.T, lower=True)
    lam = np.linalg.eigvalsh(0.5 * (m + m.T))
    z = solve_triangular(l_q, mu_p - mu_q, lower=True)
    return 0.5 * (np.sum(phi(np.log1p(lam))) + np.sum(z**2))


@in_dtype_of(0)
def correct_cov(mu_p, s_p, mu_q, s_q):
    return _per_element(_cov_one, mu_p, s_p, mu_q, s_q)


def _lowrank_one(mu_p, w_p, d_p, mu_q, w_q, d_q):
    """The eigenvalue form on S_p - S_q = diag(d_p - d_q) + W_q X^T + X W_q^T + X X^T, X = W_p - W_q."""
    x = w_p - w_q
    s_q = w_q @ w_q.T + np.diag(d_q)
    l_q = np.linalg.cholesky(s_q)
    half = solve_triangular(l_q, np.diag(d_p - d_q) + w_q @ x.T + x @ w_q.T + x @ x.T, lower=True)
    m = solve_triangular(l_q, half.T, lower=True)
    lam = np.linalg.eigvalsh(0.5 * (m + m.T))
    z = solve_triangular(l_q, mu_p - mu_q, lower=True)
    return 0.5 * (np.sum(phi(np.log1p(lam))) + np.sum(z**2))


@in_dtype_of(0)
def correct_lowrank(mu_p, w_p, d_p, mu_q, w_q, d_q):
    return _per_element(_lowrank_one, mu_p, w_p, d_p, mu_q, w_q, d_q)


# --- faults ---------------------------------------------------------------------------------
def seed_misprint_cov(mu_p, s_p, mu_q, s_q):
    """Seed 001, formula (5): + k, and the 1/2 on the log-determinant term only."""
    k = s_p.shape[-1]
    inv_q = np.linalg.inv(s_q)
    d = (mu_p - mu_q)[..., None]
    quad = (np.swapaxes(d, -1, -2) @ inv_q @ d)[..., 0, 0]
    logdet = np.linalg.slogdet(s_q)[1] - np.linalg.slogdet(s_p)[1]
    return 0.5 * logdet + k + np.trace(s_p @ inv_q, axis1=-2, axis2=-1) + quad


def missing_half_vae(mu, logvar):
    return 2 * correct_vae(mu, logvar)


def swapped_diag(mu_p, l_p, mu_q, l_q):
    return correct_diag(mu_q, l_q, mu_p, l_p)


def std_for_variance_normal(mu_p, s_p, mu_q, s_q):
    """The variance formula fed standard deviations."""
    return 0.5 * (np.log(s_q / s_p) + (s_p + (mu_p - mu_q) ** 2) / s_q - 1)


def mean_dropped_diag(mu_p, l_p, mu_q, l_q):
    return correct_diag(np.zeros_like(mu_p), l_p, np.zeros_like(mu_q), l_q)


def clamped_vae(mu, logvar):
    return correct_vae(mu, np.clip(logvar, -30.0, 20.0))


def transposed_solve_tril(mu_p, l_p, mu_q, l_q):
    return _per_element(lambda *a: _tril_one(*a, trans=1), mu_p, l_p, mu_q, l_q)


def keepdims_vae(mu, logvar):
    return correct_vae(mu, logvar)[..., None]


def textbook_normal(mu_p, s_p, mu_q, s_q):
    return np.log(s_q / s_p) + (s_p**2 + (mu_p - mu_q) ** 2) / (2 * s_q**2) - 0.5


def textbook_lowrank(mu_p, w_p, d_p, mu_q, w_q, d_q):
    """The covariances formed, then the textbook formula: S_p - S_q is lost to rounding near p == q."""
    def cov(w, d):
        return w @ np.swapaxes(w, -1, -2) + d[..., None] * np.eye(d.shape[-1])

    return textbook_tril(mu_p, np.linalg.cholesky(cov(w_p, d_p)), mu_q, np.linalg.cholesky(cov(w_q, d_q)))


def textbook_vae(mu, logvar):
    return -0.5 * np.sum(1 + logvar - mu**2 - np.exp(logvar), axis=-1)


def textbook_tril(mu_p, l_p, mu_q, l_q):
    l_p, l_q = np.tril(l_p), np.tril(l_q)
    k = l_p.shape[-1]
    s_p, s_q = l_p @ np.swapaxes(l_p, -1, -2), l_q @ np.swapaxes(l_q, -1, -2)
    inv_q = np.linalg.inv(s_q)
    d = (mu_q - mu_p)[..., None]
    quad = (np.swapaxes(d, -1, -2) @ inv_q @ d)[..., 0, 0]
    return 0.5 * (np.trace(inv_q @ s_p, axis1=-2, axis2=-1) + quad - k + np.log(np.linalg.det(s_q) / np.linalg.det(s_p)))


# --- misbehaving: functions that try to subvert the checker ---------------------------------
def overwrites_inputs_vae(mu, logvar):
    """The textbook VAE term, then the inputs zeroed (in place)."""
    r = 0.5 * np.sum(mu**2 + np.expm1(logvar) - logvar, -1)
    mu[...] = 0
    logvar[...] = 0
    return r


def textbook_expm1_vae(mu, logvar):
    return 0.5 * np.sum(mu**2 + np.expm1(logvar) - logvar, -1)


def exits_vae(mu, logvar):
    import os

    os._exit(0)


def raises_system_exit_0_vae(mu, logvar):
    raise SystemExit(0)


def raises_system_exit_3_vae(mu, logvar):
    raise SystemExit(3)


def segfaults_vae(mu, logvar):
    import ctypes

    return ctypes.string_at(0)


def hangs_on_collapse_vae(mu, logvar):
    """Correct, except that it never returns on one case set."""
    if 0 < np.max(np.abs(logvar)) < 1e-10:
        import time

        time.sleep(3600)
    return correct_vae(mu, logvar)


# --- gradients: right values, wrong gradients -------------------------------------------------
def sqrt_square_vae_torch(mu, logvar):
    """Every value right to the last bit; d/dmu is NaN wherever mu == 0 (sqrt's derivative at 0)."""
    import torch

    return 0.5 * (torch.sqrt(mu * mu) ** 2 + torch.expm1(logvar) - logvar).sum(-1)


def sqrt_square_vae_jax(mu, logvar):
    import jax.numpy as jnp

    return 0.5 * (jnp.sqrt(mu * mu) ** 2 + jnp.expm1(logvar) - logvar).sum(-1)
