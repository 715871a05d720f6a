"""Gradients of the KL with respect to every parameter: exact ones in mpmath, a subject's through
its framework's autodiff (torch autograd, jax.grad), compared normwise, and the gradient sweep.

Exact gradients, for d = mu_p - mu_q and symmetric matrix arguments:
- normal: dmu_p = d / s_q^2, ds_p = s_p / s_q^2 - 1 / s_p, ds_q = 1 / s_q - (s_p^2 + d^2) / s_q^3
- diag:   dmu_p = d e^(-l_q), dl_p = (e^(l_p - l_q) - 1) / 2, dl_q = -dl_p - d^2 e^(-l_q) / 2
- vae:    dmu = mu, dl = (e^l - 1) / 2
- cov:    dS_p = (S_q^-1 - S_p^-1) / 2, dS_q = (S_q^-1 - S_q^-1 (S_p + d d^T) S_q^-1) / 2, dmu_p = S_q^-1 d
- tril:   dL = tril(2 dS L) for each factor, with dS the covariance gradient above.
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
from .reference import is_exactly_zero, lower, to_mp
from .subjects import available, describe

PREC = 256  # bits; every value is recomputed at twice this and must agree to AGREE_BITS
AGREE_BITS = 100


def _exact_normal(mu_p, s_p, mu_q, s_q):
    d = mu_p - mu_q
    g = d / s_q**2
    return [g, s_p / s_q**2 - 1 / s_p, -g, 1 / s_q - (s_p**2 + d**2) / s_q**3]


def _exact_diag(mu_p, l_p, mu_q, l_q):
    out = [[], [], [], []]
    for a, la, b, lb in zip(mu_p, l_p, mu_q, l_q):
        d, w = a - b, mpmath.exp(-lb)
        dl_p = (mpmath.exp(la - lb) - 1) / 2
        for column, value in zip(out, (d * w, dl_p, -d * w, -dl_p - d * d * w / 2)):
            column.append(value)
    return out


def _exact_vae(mu, logvar):
    return [list(mu), [(mpmath.exp(v) - 1) / 2 for v in logvar]]


def _covariance_gradients(mu_p, s_p, mu_q, s_q):
    inv_q, inv_p = mpmath.inverse(s_q), mpmath.inverse(s_p)
    d = mpmath.matrix(mu_p) - mpmath.matrix(mu_q)
    g_mu = inv_q * d
    g_p = (inv_q - inv_p) / 2
    g_q = (inv_q - inv_q * (s_p + d * d.T) * inv_q) / 2
    return g_mu, g_p, g_q


def _exact_cov(mu_p, cov_p, mu_q, cov_q):
    g_mu, g_p, g_q = _covariance_gradients(mu_p, mpmath.matrix(cov_p), mu_q, mpmath.matrix(cov_q))
    return [g_mu, g_p, -g_mu, g_q]


def _exact_tril(mu_p, tril_p, mu_q, tril_q):
    l_p, l_q = mpmath.matrix(lower(tril_p)), mpmath.matrix(lower(tril_q))
    g_mu, g_p, g_q = _covariance_gradients(mu_p, l_p * l_p.T, mu_q, l_q * l_q.T)
    return [g_mu, lower((2 * g_p * l_p).tolist()), -g_mu, lower((2 * g_q * l_q).tolist())]


EXACT = {"normal": _exact_normal, "diag": _exact_diag, "vae": _exact_vae, "tril": _exact_tril, "cov": _exact_cov}


def _as_array(value, shape) -> np.ndarray:
    if isinstance(value, mpmath.matrix):
        value = value.tolist()
    return np.array(value, dtype=object).reshape(shape)


def exact(family: str, parts) -> list[np.ndarray]:
    """The exact gradient of KL for one parameter set (float64 arrays): one object array of mpf
    per argument, shaped like it; computed at PREC and 2 PREC bits, which must agree. At p == q,
    bit for bit, it is exactly 0 (which the formulas would leave as rounding noise)."""
    if is_exactly_zero(family, parts):
        return [np.full(p.shape, mpmath.mpf(0), dtype=object) for p in parts]
    results = []
    for prec in (PREC, 2 * PREC):
        with mpmath.workprec(prec):
            results.append([_as_array(g, p.shape) for g, p in zip(EXACT[family](*[to_mp(p) for p in parts]), parts)])
    for low, high in zip(*results):
        scale = max((abs(v) for v in high.ravel()), default=0)
        worst = max((abs(a - b) for a, b in zip(low.ravel(), high.ravel())), default=0)
        if worst > mpmath.ldexp(scale, -AGREE_BITS):
            raise ArithmeticError(f"{family} gradient did not settle at {2 * PREC} bits")
    return results[1]


def normwise_ulps(computed: np.ndarray, exact_values: np.ndarray, dtype: str, symmetric: bool = False) -> float:
    """max |g - e| / ulp(max |e|) for one argument of one case (see the module docstring)."""
    computed = np.asarray(computed, dtype=np.float64)
    if symmetric:
        computed = 0.5 * (computed + computed.T)
    if not np.all(np.isfinite(computed)):
        return math.inf
    scale = max((abs(v) for v in exact_values.ravel()), default=mpmath.mpf(0))
    worst = max(abs(mpmath.mpf(float(c)) - e) for c, e in zip(computed.ravel(), exact_values.ravel()))
    if scale == 0:
        return 0.0 if worst == 0 else math.inf
    return float(worst / metrics.ulp(scale, dtype))


def case_ulps(subject, case, exact_gradients: list) -> tuple[np.ndarray, np.ndarray]:
    """Per case of a case set: the worst normwise ulps over the arguments of ``subject``'s
    autodiff gradient, and whether any of its entries is NaN or inf."""
    computed = subject.gradient(case.family, case.arrays, case.dtype)
    symmetric = [arg.kind == families.COV for arg in families.TABLE[case.family].args]
    ulps = np.array([
        max(normwise_ulps(g[i], e, case.dtype, sym) for g, e, sym in zip(computed, exact_i, symmetric))
        for i, exact_i in enumerate(exact_gradients)
    ])
    nonfinite = np.array([not all(np.all(np.isfinite(g[i])) for g in computed) for i in range(case.n)])
    return ulps, nonfinite


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
        for regime, param in [rp for rp in cases.regimes(family, dtype) if rp[0] in regimes]:
            case = cases.generate(family, regime, dtype, param, n=n, seed=seed)
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
