"""Gradients of the KL with respect to every parameter: exact ones (certified like the references:
exact rationals, and ball arithmetic for exponentials), a subject's through its framework's
autodiff (torch autograd, jax.grad), compared normwise, and the gradient sweep.

Exact gradients, for d = mu_p - mu_q and symmetric matrix arguments:
- normal: dmu_p = d / s_q^2, ds_p = s_p / s_q^2 - 1 / s_p, ds_q = 1 / s_q - (s_p^2 + d^2) / s_q^3
- diag:   dmu_p = d e^(-l_q), dl_p = (e^(l_p - l_q) - 1) / 2, dl_q = -dl_p - d^2 e^(-l_q) / 2
- vae:    dmu = mu, dl = (e^l - 1) / 2
- cov:    dS_p = (S_q^-1 - S_p^-1) / 2, dS_q = (S_q^-1 - S_q^-1 (S_p + d d^T) S_q^-1) / 2, dmu_p = S_q^-1 d
- tril:   dL = tril(2 dS L) for each factor, with dS the covariance gradient above.
- lowrank: dW = 2 dS W and dd = diag(dS) for S = W W^T + diag(d).
dmu_q = -dmu_p throughout. A covariance matrix is symmetric, so a framework's gradient with respect
to it is only defined up to its antisymmetric part: it is symmetrised before comparison.

Error of one argument of one case, in ulps of the dtype: max_i |g_i - e_i| / ulp(max_i |e_i|), a
normwise error (elementwise ulps would blame tiny entries of a gradient whose error is that of its
large ones). An exact gradient of 0 (p == q) demands exactly 0.
"""

from __future__ import annotations

import math
import sys

import mpmath
import numpy as np
import pandas as pd

from .. import families
from . import cases, metrics
from .accuracy import row
from .reference import (
    MAX_PREC,
    START_PREC,
    as_mp,
    differences,
    is_exactly_zero,
    low_rank_covariance,
    rational,
    rational_matrix,
    rationals,
    symmetric_matrix,
)
from .subjects import available, describe

CERTIFIED_BITS = 70  # each element of an exact gradient, relative


# Exact rationals (python-flint's fmpq) for the families whose gradients are rational in their
# inputs; ball arithmetic (arb) for the exponentials of the diagonal families. One list per
# argument, flat (row by row for matrices).


def _rational_normal(mu_p, s_p, mu_q, s_q):
    mu_p, s_p, mu_q, s_q = (rational(v) for v in (mu_p, s_p, mu_q, s_q))
    d = mu_p - mu_q
    g = d / s_q**2
    return [[g], [s_p / s_q**2 - 1 / s_p], [-g], [1 / s_q - (s_p**2 + d**2) / s_q**3]]


def _covariance_gradients(mu_p, s_p, mu_q, s_q):
    """dKL/dmu_p, dKL/dS_p and dKL/dS_q, exactly (fmpq_mat)."""
    from flint import fmpq_mat

    k = s_p.nrows()
    inv_q, inv_p = s_q.inv(), s_p.inv()
    d = fmpq_mat(k, 1, differences(mu_p, mu_q))
    half = rational(0.5)
    return inv_q * d, (inv_q - inv_p) * half, (inv_q - inv_q * (s_p + d * d.transpose()) * inv_q) * half


def _flat(m, lower_only=False):
    return [m[i, j] if (j <= i or not lower_only) else rational(0) for i in range(m.nrows()) for j in range(m.ncols())]


def _rational_cov(mu_p, cov_p, mu_q, cov_q):
    g_mu, g_p, g_q = _covariance_gradients(mu_p, symmetric_matrix(cov_p), mu_q, symmetric_matrix(cov_q))
    return [_flat(g_mu), _flat(g_p), [-v for v in _flat(g_mu)], _flat(g_q)]


def _rational_tril(mu_p, tril_p, mu_q, tril_q):
    l_p, l_q = rational_matrix(np.tril(tril_p)), rational_matrix(np.tril(tril_q))
    g_mu, g_p, g_q = _covariance_gradients(mu_p, l_p * l_p.transpose(), mu_q, l_q * l_q.transpose())
    two = rational(2.0)
    return [_flat(g_mu), _flat(g_p * l_p * two, True), [-v for v in _flat(g_mu)], _flat(g_q * l_q * two, True)]


def _rational_lowrank(mu_p, w_p, d_p, mu_q, w_q, d_q):
    s_p, s_q = low_rank_covariance(w_p, d_p, "cov_diag_p"), low_rank_covariance(w_q, d_q, "cov_diag_q")
    g_mu, g_p, g_q = _covariance_gradients(mu_p, s_p, mu_q, s_q)
    two = rational(2.0)

    def factor_and_diagonal(g, w):
        return _flat(g * rational_matrix(w) * two), [g[i, i] for i in range(g.nrows())]

    return [_flat(g_mu), *factor_and_diagonal(g_p, w_p), [-v for v in _flat(g_mu)], *factor_and_diagonal(g_q, w_q)]


def _balls_vae(mu, logvar):
    from flint import arb

    return [[arb(m) for m in rationals(mu)], [arb(v).expm1() / 2 for v in rationals(logvar)]]


def _balls_diag(mu_p, l_p, mu_q, l_q):
    from flint import arb

    out = [[], [], [], []]
    for a, la, b, lb in zip(rationals(mu_p), rationals(l_p), rationals(mu_q), rationals(l_q)):
        d, w = a - b, arb(-lb).exp()
        dl_p = arb(la - lb).expm1() / 2
        dmu = arb(d) * w
        for column, value in zip(out, (dmu, dl_p, -dmu, -(dl_p + arb(d * d) * w / 2))):
            column.append(value)
    return out


RATIONAL = {"normal": _rational_normal, "tril": _rational_tril, "cov": _rational_cov, "lowrank": _rational_lowrank}
BALLS = {"vae": _balls_vae, "diag": _balls_diag}


def _mp(value) -> mpmath.mpf:
    """An fmpq as an mpf, to 256 bits."""
    with mpmath.workprec(256):
        return mpmath.mpf(int(value.p)) / int(value.q)


def exact(family: str, parts) -> list[np.ndarray]:
    """The exact gradient of KL for one parameter set (float64 arrays): one object array of mpf
    per argument, shaped like it; exact rationals to 256 bits, and exponentials in ball arithmetic
    at doubling precision until every element is certified to 70 bits. At p == q, bit for bit, it
    is exactly 0."""
    from flint import ctx

    if is_exactly_zero(family, parts):
        return [np.full(p.shape, mpmath.mpf(0), dtype=object) for p in parts]
    if family in RATIONAL:
        values = [[_mp(v) for v in arg] for arg in RATIONAL[family](*parts)]
    else:
        prec = START_PREC
        while True:
            with ctx.workprec(prec):
                balls = BALLS[family](*parts)
                if all(b.is_exact() or b.rel_accuracy_bits() >= CERTIFIED_BITS for arg in balls for b in arg):
                    values = [[as_mp(b.mid()) for b in arg] for arg in balls]
                    break
            if prec >= MAX_PREC:
                raise ArithmeticError(f"{family} gradient not certified at {MAX_PREC} bits")
            prec *= 2
    return [np.array(v, dtype=object).reshape(p.shape) for v, p in zip(values, parts)]


def normwise_ulps(computed: np.ndarray, exact_values: np.ndarray, dtype: str, symmetric: bool = False) -> float:
    """max |g - e| / ulp(max |e|) for one argument of one case (see the module docstring). Where an
    exact element is beyond the dtype's range, the computed one must be that infinity."""
    computed = np.asarray(computed, dtype=np.float64)
    if symmetric:
        computed = 0.5 * (computed + computed.T)
    computed, exact_values = computed.ravel(), exact_values.ravel()
    beyond = np.array([metrics.overflows(e, dtype) for e in exact_values], dtype=bool)
    if beyond.any():
        if not all(c == math.copysign(math.inf, e) for c, e in zip(computed[beyond], exact_values[beyond])):
            return math.inf
        computed, exact_values = computed[~beyond], exact_values[~beyond]
    if not np.all(np.isfinite(computed)):
        return math.inf
    scale = max((abs(v) for v in exact_values), default=mpmath.mpf(0))
    worst = max((abs(mpmath.mpf(float(c)) - e) for c, e in zip(computed, exact_values)), default=mpmath.mpf(0))
    if scale == 0:
        return 0.0 if worst == 0 else math.inf
    return float(worst / metrics.ulp(scale, dtype))


def argument_errors(computed: list, case, exact_gradients: list) -> tuple[np.ndarray, np.ndarray]:
    """Per case (rows) and argument (columns) of a case set: the normwise ulps of ``computed``
    (one array per argument, batched like the case set), and whether it holds a NaN or inf where
    the exact gradient is within the dtype's range."""
    symmetric = [arg.kind == families.COV for arg in families.TABLE[case.family].args]
    ulps = np.array([[normwise_ulps(g[i], e, case.dtype, sym) for g, e, sym in zip(computed, exact_i, symmetric)]
                     for i, exact_i in enumerate(exact_gradients)])
    def nonfinite_where_finite(g, e):
        bad = ~np.isfinite(np.ravel(g))
        return bool(bad.any() and not all(metrics.overflows(v, case.dtype) for v in e.ravel()[bad]))

    nonfinite = np.array([[nonfinite_where_finite(g[i], e) for g, e in zip(computed, exact_i)]
                          for i, exact_i in enumerate(exact_gradients)])
    return ulps, nonfinite


def case_ulps(subject, case, exact_gradients: list) -> tuple[np.ndarray, np.ndarray]:
    """Per case of a case set: the worst normwise ulps over the arguments of ``subject``'s
    autodiff gradient, and whether any of its entries is NaN or inf."""
    computed = subject.gradient(case.family, case.arrays, case.dtype)
    ulps, _ = argument_errors(computed, case, exact_gradients)
    nonfinite = np.array([not all(np.all(np.isfinite(g[i])) for g in computed) for i in range(case.n)])
    return ulps.max(axis=1), nonfinite


def gradient_cases(family: str, dtype: str, regimes, n: int = 8, seed: int = 0) -> list:
    """The case sets that gradients are judged on: the first ``n`` cases of each quick case set of
    ``regimes`` (exact gradients cost more than values)."""
    return [cases.generate(family, regime, dtype, param, n=n, seed=seed)
            for regime, param in cases.regimes(family, dtype) if regime in regimes]


def exact_for(case) -> list:
    """Exact gradients of every case of a case set."""
    return [exact(case.family, [a[i] for a in case.arrays]) for i in range(case.n)]


GRADIENT_COLUMNS = ["family", "subject", "implementation", "backend", "device", "dtype", "method", "mode", "regime",
                    "param", "k", "n_cases", "max_ulps", "median_ulps", "nonfinite", "error"]
GRADIENT_REGIMES = ("equal", "near-equal", "collapse")


def gradient_sweep(family_names=None, subjects=None, dtype="float64", regimes=GRADIENT_REGIMES, n=8, seed=0,
                   progress=True) -> pd.DataFrame:
    """Autodiff gradients of every differentiable subject against exact mpmath gradients, on the
    first ``n`` cases of each quick case set of ``regimes``: normwise ulps, the worst argument per
    case; ``nonfinite`` counts cases whose gradient has a NaN or inf."""
    family_names = family_names or families.NAMES
    subjects = [s for s in (available() if subjects is None else subjects) if s.be.differentiable]
    rows = []
    for family in family_names:
        for case in gradient_cases(family, dtype, regimes, n, seed):
            if progress:
                print(f"  gradients {case.name}", file=sys.stderr, flush=True)
            exact = exact_for(case)
            for subject in [s for s in subjects if s.unavailable(family, dtype) is None]:
                try:
                    with np.errstate(all="ignore"):
                        u, nonfinite = case_ulps(subject, case, exact)
                except Exception as exc:  # a subject without a gradient for these inputs
                    rows.append(row(subject, case) | {"error": describe(exc)})
                    continue
                rows.append(row(subject, case) | {"max_ulps": u.max(), "median_ulps": float(np.median(u)),
                                                   "nonfinite": int(nonfinite.sum())})
    return pd.DataFrame(rows, columns=GRADIENT_COLUMNS)
