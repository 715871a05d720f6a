"""The KL mathematics, written once against an array namespace.

Every function takes a backend adapter ``be`` (``kl_bench.backends``) and arrays of that framework
already converted, broadcast and cast to the compute dtype (float32 or float64); it returns
``(kl, problems)``, where ``problems`` maps ``(argument, message)`` to a boolean mask of the batch
elements with that invalid input (only when ``check`` is true; a dict of arrays, so it passes
through ``jax.jit``). Elements with invalid inputs come out NaN, so a compiled
caller that cannot raise still never returns a wrong number.

``method="stable"`` is the cancellation-free form of docs/design.md ("The cancellation-free
forms"): every term is >= 0, so nothing cancels and the relative error of the result is that of
its terms.
``method="naive"`` is the textbook formula as users write it, kept for comparison.

Branches are selected with ``where``; the input of each branch is first replaced by a harmless
value where the branch is not selected ("double where"), so that no unselected branch produces
inf or NaN that autodiff would turn into a NaN gradient.
"""

from __future__ import annotations

import functools
import math

# phi(x) = e^x - 1 - x enters every KL halved, and half_phi(x) = phi(x)/2 is what is computed
# (e^x itself overflows before e^x / 2 does). Three ways, each free of cancellation:
#   x <= -1:          (e^x + (-1 - x)) / 2, a sum of two positive terms (-1 - x is exact near -1);
#   -1 < x < 2:       the Taylor series x^2 (1/2! + x/3! + ...) / 2, terms all positive for x > 0
#                     and quickly decreasing for x < 0;
#   x >= 2:           (expm1(x) - x) / 2, which magnifies the error of expm1 by at most 1.5, and
#                     near overflow (e^(x/2) / 2) e^(x/2) - x/2.
# (expm1(x) - x near |x| = 1 magnifies it 2.4 times, which a 1.5-ulp expm1 such as XLA's turns
# into 4 ulp.) Coefficients 1/n!, n = 2..N: the first neglected term is below half an ulp at x = 2.
PHI_SERIES = (-1.0, 2.0)
_PHI_TERMS = {"float64": 25, "float32": 15}
HALF_PHI_COEFFS = {k: [0.5 / math.factorial(n) for n in range(2, n_max + 1)] for k, n_max in _PHI_TERMS.items()}

# psi(x) = x - log1p(x) = phi(log1p(x)). With s = x / (2 + x), log1p(x) = 2 atanh(s), so
# psi(x) = s x - 2 s^3 (1/3 + s^2/5 + s^4/7 + ...): on PSI_SERIES (s from -1/3 to 1/2) the two
# terms never cancel by more than 10 percent. Outside it x - log1p(x) magnifies the error of
# log1p by at most 1.2 for x >= 2 (and 3.6 at x = -1/2, a range only kl_cov reaches).
# Coefficients 1/(2n+3), n = 0..N-1.
PSI_SERIES = (-0.5, 2.0)
_PSI_TERMS = {"float64": 26, "float32": 12}
PSI_COEFFS = {k: [1 / (2 * n + 3) for n in range(n_max)] for k, n_max in _PSI_TERMS.items()}


def _dtype_key(be, x) -> str:
    return be.dtype_name(x.dtype)


def _horner(x, coeffs):
    acc = coeffs[-1]
    for c in reversed(coeffs[:-1]):
        acc = acc * x + c
    return acc


def half_phi(be, x):
    """(e^x - 1 - x) / 2, accurate to about an ulp everywhere (>= 0, 0 only at 0), finite
    wherever the result is representable."""
    xp = be.xp
    finfo = xp.finfo(x.dtype)
    low, high = PHI_SERIES
    below, above = x <= low, x >= high
    xs = xp.where(below | above, 0.0, x)
    series = xs * xs * _horner(xs, HALF_PHI_COEFFS[_dtype_key(be, x)])
    xb = xp.where(below, x, low)
    negative = 0.5 * xp.exp(xb) + (-0.5 - 0.5 * xb)
    xa = xp.where(above, x, high)
    near_overflow = xa > math.log(finfo.max)
    # expm1 only where it does not overflow: an infinite branch would make the gradient NaN (0 * inf)
    xe = xp.where(near_overflow, high, xa)
    positive = 0.5 * xp.expm1(xe) - 0.5 * xe
    half_exp = xp.exp(0.5 * xp.where(near_overflow, xa, high))
    # clip(): at x = inf the result is inf, not inf - inf
    positive = xp.where(near_overflow, (0.5 * half_exp) * half_exp - 0.5 * xp.clip(xa, max=finfo.max), positive)
    return xp.where(below, negative, xp.where(above, positive, series))


def psi(be, x):
    """x - log1p(x) for x > -1 (>= 0, 0 only at 0)."""
    xp = be.xp
    low, high = PSI_SERIES
    inside = (x > low) & (x < high)
    xs = xp.where(inside, x, 0.0)
    xd = xp.where(inside, high, x)
    s = xs / (2.0 + xs)
    s2 = s * s
    series = s * xs - 2.0 * (s2 * s) * _horner(s2, PSI_COEFFS[_dtype_key(be, x)])
    direct = xd - xp.log1p(xp.clip(xd, max=xp.finfo(x.dtype).max))
    return xp.where(inside, series, direct)


def half_log_ratio_term(be, scale_p, scale_q):
    """(1/2) phi(2 ln(scale_p/scale_q)) = (r^2 - 1)/2 - ln r, r = scale_p/scale_q: the scale part
    of the univariate KL, and of the full-covariance KL for each diagonal entry of the factors.

    Near equality it is written in d = r - 1 = (scale_p - scale_q)/scale_q, whose subtraction is
    exact within a factor of 2:  d^2/2 + psi(d).  For r < 1/2, where d is near -1 and log1p(d)
    loses ln r, it is phi(2t)/2 with t = ln r (or ln scale_p - ln scale_q if r underflows).
    """
    xp = be.xp
    tiny = xp.finfo(scale_p.dtype).smallest_normal
    ratio = scale_p / scale_q
    far_below = ratio < 0.5
    d = xp.where(far_below, 0.0, (scale_p - scale_q) / scale_q)
    near = (0.5 * d) * d + psi(be, d)
    safe_ratio = xp.where(far_below, ratio, 0.25)
    underflow = safe_ratio < tiny
    t = xp.where(
        underflow,
        xp.log(xp.where(underflow, scale_p, 1.0)) - xp.log(xp.where(underflow, scale_q, 1.0)),
        xp.log(xp.where(underflow, 0.25, safe_ratio)),
    )
    far = half_phi(be, 2.0 * t)
    return xp.where(far_below, far, near)


def _two_diff(a, b):
    """a - b as an unevaluated sum hi + lo, exactly (Knuth's TwoSum)."""
    hi = a - b
    b_virtual = a - hi
    lo = (a - (hi + b_virtual)) + (b_virtual - b)
    return hi, lo


def _scaled_difference(be, a, b, scale):
    """(a - b) / scale, also where a - b overflows but the quotient does not."""
    xp = be.xp
    d = a - b
    overflowed = xp.isinf(d) & xp.isfinite(a) & xp.isfinite(b)
    halves = 2.0 * ((0.5 * xp.where(overflowed, a, 0.0) - 0.5 * xp.where(overflowed, b, 0.0)) / scale)
    return xp.where(overflowed, halves, d / scale)


def _half_scaled_square(be, dmu, logvar):
    """dmu^2 exp(-logvar) / 2, without overflow or underflow wherever the result is representable."""
    xp = be.xp
    finfo = xp.finfo(dmu.dtype)
    direct = (0.5 * dmu) * dmu * xp.exp(-logvar)
    half = xp.exp(-0.5 * logvar)
    # e^(-logvar/2) itself out of range (|logvar| > 2 ln max): two factors of e^(-logvar/4)
    half_ok = (half <= finfo.max) & (half >= finfo.smallest_normal)
    quarter = xp.exp(-0.25 * xp.where(half_ok, 0.0, logvar))
    scaled = xp.where(half_ok, dmu * half, (dmu * quarter) * quarter)
    ok = (direct <= finfo.max) & (direct >= finfo.smallest_normal)
    # dmu = 0 contributes 0 even where e^-logvar overflows (0 * inf would be NaN).
    return xp.where(dmu == 0.0, 0.0, xp.where(ok, direct, (0.5 * scaled) * scaled))


NOT_POSITIVE_DEFINITE = "is not positive definite"  # kl.py explains it further when it raises


def _nan_where(be, bad, kl):
    return be.xp.where(bad, float("nan"), kl)


def _positive_problems(check, **named):
    return {(name, "must be positive"): x <= 0 for name, x in named.items()} if check else {}


# ---------------------------------------------------------------------------------------------
# The families
# ---------------------------------------------------------------------------------------------


def kl_normal(be, loc_p, scale_p, loc_q, scale_q, *, method, check):
    xp = be.xp
    if method == "naive":
        dmu = loc_p - loc_q
        kl = xp.log(scale_q / scale_p) + (scale_p**2 + dmu**2) / (2.0 * scale_q**2) - 0.5
    else:
        z = _scaled_difference(be, loc_p, loc_q, scale_q)
        kl = half_log_ratio_term(be, scale_p, scale_q) + (0.5 * z) * z
    problems = _positive_problems(check, scale_p=scale_p, scale_q=scale_q)
    return _mask_problems(be, kl, problems), problems


def kl_diag(be, loc_p, logvar_p, loc_q, logvar_q, *, method, check):
    xp = be.xp
    if method == "naive":
        dmu = loc_p - loc_q
        terms = logvar_q - logvar_p + (xp.exp(logvar_p) + dmu**2) / xp.exp(logvar_q) - 1.0
        return 0.5 * xp.sum(terms, axis=-1), {}
    # phi(x + e) = phi(x) + e expm1(x), e the rounding error of x = logvar_p - logvar_q;
    # e^x would otherwise magnify that error by |x|. Every term is halved before the sum, so
    # that the sum overflows only when the KL does.
    x, err = _two_diff(logvar_p, logvar_q)
    err = xp.where(xp.isfinite(err), err, 0.0)  # no error to correct where x is infinite
    half_phi_x = half_phi(be, x)
    half_expm1 = xp.clip(half_phi_x + 0.5 * x, max=xp.finfo(x.dtype).max)
    correction = xp.where((err == 0.0) | xp.isinf(half_phi_x), 0.0, err * half_expm1)
    terms = half_phi_x + correction + _half_scaled_square(be, loc_p - loc_q, logvar_q)
    return xp.sum(terms, axis=-1), {}


def kl_vae(be, loc, logvar, *, method, check):
    xp = be.xp
    if method == "naive":
        return -0.5 * xp.sum(1.0 + logvar - loc**2 - xp.exp(logvar), axis=-1), {}
    return xp.sum(half_phi(be, logvar) + (0.5 * loc) * loc, axis=-1), {}


def _any_nan(xp, *arrays_and_core_ndims):
    """Per batch element: does any of the arrays hold a NaN?"""
    found = None
    for x, core_ndim in arrays_and_core_ndims:
        here = xp.isnan(x)
        if core_ndim:
            here = xp.any(here, axis=tuple(range(-core_ndim, 0)))
        found = here if found is None else (found | here)
    return found


def _sanitised(be, invalid, loc_p, mat_p, loc_q, mat_q):
    """Replace invalid batch elements (NaN, or a factor that cannot be solved with) by N(0, I) so
    linear algebra cannot fail on them; their result is set to NaN afterwards."""
    xp = be.xp
    eye = be.eye_like(mat_p)
    rows = invalid[..., None]
    mats = invalid[..., None, None]
    return (
        xp.where(rows, 0.0, loc_p),
        xp.where(mats, eye, mat_p),
        xp.where(rows, 0.0, loc_q),
        xp.where(mats, eye, mat_q),
    )


def _factor(be, m):
    """The lower Cholesky factor of each matrix, the identity where one does not factor, so that no
    later solve fails on it (its result is set to NaN), and the mask of those that did not."""
    factor, bad = be.cholesky_ex(m)
    return be.xp.where(bad[..., None, None], be.eye_like(m), factor), bad


def _congruent(be, factor, m):
    """L^-1 M L^-T for a lower factor L."""
    return be.solve_triangular(factor, be.xp.matrix_transpose(be.solve_triangular(factor, m)))


def _mask_problems(be, kl, problems, extra_bad=None):
    bad = extra_bad
    for mask in problems.values():
        bad = mask if bad is None else (bad | mask)
    return kl if bad is None else _nan_where(be, bad, kl)


def _sum_last2(xp, x):
    return xp.sum(x, axis=(-2, -1))


def kl_tril(be, loc_p, tril_p, loc_q, tril_q, *, method, check):
    xp = be.xp
    k = tril_p.shape[-1]
    non_positive = {name: xp.any(xp.linalg.diagonal(f) <= 0, axis=-1) for name, f in (("tril_p", tril_p), ("tril_q", tril_q))}
    # rows that linear algebra must not see (a zero on the diagonal makes the solve fail): NaN out
    invalid = _any_nan(xp, (loc_p, 1), (tril_p, 2), (loc_q, 1), (tril_q, 2)) | non_positive["tril_p"] | non_positive["tril_q"]
    problems = {}
    if check:
        for name, factor in (("tril_p", tril_p), ("tril_q", tril_q)):
            problems[name, "has a non-positive diagonal"] = non_positive[name]
            upper = xp.abs(xp.triu(factor, k=1)) > 0  # False for NaN: NaN input gives NaN, not an error
            problems[name, "is not lower triangular"] = xp.any(upper, axis=(-2, -1))
    loc_p, tril_p, loc_q, tril_q = _sanitised(be, invalid, loc_p, tril_p, loc_q, tril_q)
    tril_p, tril_q = xp.tril(tril_p), xp.tril(tril_q)
    diag_p, diag_q = xp.linalg.diagonal(tril_p), xp.linalg.diagonal(tril_q)
    dmu = (loc_p - loc_q)[..., None]
    if method == "naive":
        # As torch.distributions: ||L_q^-1 L_p||_F^2 - k + ||L_q^-1 dmu||^2 + log-det ratio.
        solved = be.solve_triangular(tril_q, xp.concat([tril_p, dmu], axis=-1))
        kl = 0.5 * (_sum_last2(xp, solved**2) - k) + xp.sum(xp.log(diag_q) - xp.log(diag_p), axis=-1)
    else:
        # E = L_q^-1 (L_p - L_q): its diagonal is d_i = (L_p,ii - L_q,ii) / L_q,ii, taken
        # from the diagonals directly; its strict lower part and z = L_q^-1 dmu are squared.
        solved = be.solve_triangular(tril_q, xp.concat([tril_p - tril_q, dmu], axis=-1))
        off_diagonal = xp.tril(solved[..., :k], k=-1)
        squares = _sum_last2(xp, off_diagonal * off_diagonal) + xp.sum(solved[..., k] ** 2, axis=-1)
        kl = xp.sum(half_log_ratio_term(be, diag_p, diag_q), axis=-1) + 0.5 * squares
    return _mask_problems(be, kl, problems, invalid), problems


SHIFTED_CHOLESKY_LEAF = 32  # blocks up to this size are factored by LAPACK and one Newton step


def _shifted_cholesky(be, m, factor_needed=False):
    """The factorisation I + M = (I + N)(I + N)^T (N lower triangular, M symmetric, only its lower
    triangle read) to the relative accuracy of N's entries: docs/design.md, "kl_cov without an
    eigendecomposition". Returns u_j = (1 + N_jj)^2 - 1 = N_jj (2 + N_jj), the sum of squares of
    N's strict lower triangle and, if ``factor_needed``, N itself.

    Blocked recursively: the leading half by recursion, the panel below it by a triangular solve
    with I + N_11 (N_21 (I + N_11)^T = M_21), the trailing half, less N_21 N_21^T, by recursion.
    A leaf takes C = cholesky(I + M), whose N_0 = C - I is exact only to an absolute eps, and
    corrects it with one Newton step computed in small quantities, so that 1 is never added to a
    small number for good: the residual R = M - N_0 - N_0^T - N_0 N_0^T and
    Delta = C Phi(C^-1 R C^-T) (Phi: the lower triangle, diagonal halved) leave an error of
    eps |N| + O(eps^2); where M is below eps, C = I and N = Phi(M) to first order.
    A leaf whose I + M does not factor gets u = -1."""
    xp = be.xp
    k = m.shape[-1]
    if k <= SHIFTED_CHOLESKY_LEAF:
        eye = be.eye_like(m)
        m = xp.tril(m) + xp.matrix_transpose(xp.tril(m, k=-1))  # symmetric from the lower triangle
        c, failed = _factor(be, eye + m)
        n0 = c - eye
        r = m - (n0 + xp.matrix_transpose(n0)) - n0 @ xp.matrix_transpose(n0)
        y = _congruent(be, c, r)
        n = n0 + c @ (y * (xp.tril(xp.ones_like(y)) - 0.5 * eye))
        diagonal = xp.linalg.diagonal(n)
        strict = xp.tril(n, k=-1)
        u = xp.where(failed[..., None], -1.0, diagonal * (2.0 + diagonal))
        return u, _sum_last2(xp, strict * strict), (n if factor_needed else None)
    h = k // 2
    u1, squares1, n11 = _shifted_cholesky(be, m[..., :h, :h], factor_needed=True)
    n21 = xp.matrix_transpose(be.solve_triangular(n11 + be.eye_like(n11), xp.matrix_transpose(m[..., h:, :h])))
    u2, squares2, n22 = _shifted_cholesky(be, m[..., h:, h:] - n21 @ xp.matrix_transpose(n21), factor_needed)
    u = xp.concat([u1, u2], axis=-1)
    squares = squares1 + squares2 + _sum_last2(xp, n21 * n21)
    if not factor_needed:
        return u, squares, None
    zeros = xp.zeros_like(m[..., :h, h:])
    return u, squares, xp.concat([xp.concat([n11, zeros], axis=-1), xp.concat([n21, n22], axis=-1)], axis=-2)


def _logdet(xp, factor):
    """ln det of L L^T from its lower factor L."""
    return 2.0 * xp.sum(xp.log(xp.linalg.diagonal(factor)), axis=-1)


def _trace_minus_logdet(be, m, logdet):
    """tr(M) - ln det(I + M) >= 0 for symmetric M (its lower triangle read) with I + M positive
    definite, given ``logdet`` = ln det(I + M) from factors: sum_j psi(u_j) + sum_{i>j} N_ij^2
    from the shifted Cholesky factor I + N of I + M, every term >= 0.

    A pivot 1 + u_j < 1/2 (I + M much narrower than I in some direction) has lost digits to the
    absolute error of M, and so has the rest of N after it. There the result is at least
    psi(-1/2) (a pivot bounds the smallest eigenvalue of I + M from above), and it is taken as
    tr(M) - ``logdet``, whose log-determinants carry relative errors."""
    xp = be.xp
    u, squares, _ = _shifted_cholesky(be, m)
    narrow = xp.any(u < -0.5, axis=-1)
    wide = xp.sum(psi(be, xp.where(narrow[..., None], 0.0, u)), axis=-1) + squares
    return xp.where(narrow, xp.sum(xp.linalg.diagonal(m), axis=-1) - logdet, wide)


def _twice_kl_of_difference(be, factor_q, factor_p, difference, dmu):
    """2 KL from S_p - S_q, dmu (..., k, 1) and the Cholesky factors of S_q and S_p:
    M = L_q^-1 (S_p - S_q) L_q^-T and I + M = (I + N)(I + N)^T factored in small quantities,
    tr(M) - ln det(I + M) = sum_j psi(u_j) + sum_{i>j} N_ij^2, every term >= 0, plus ||z||^2,
    z = L_q^-1 dmu."""
    xp = be.xp
    m = _congruent(be, factor_q, difference)  # only its lower triangle is read
    z = be.solve_triangular(factor_q, dmu)[..., 0]
    return _trace_minus_logdet(be, m, _logdet(xp, factor_p) - _logdet(xp, factor_q)) + xp.sum(z * z, axis=-1)


def kl_cov(be, loc_p, cov_p, loc_q, cov_q, *, method, check):
    xp = be.xp
    k = cov_p.shape[-1]
    nan_rows = _any_nan(xp, (loc_p, 1), (cov_p, 2), (loc_q, 1), (cov_q, 2))
    loc_p, cov_p, loc_q, cov_q = _sanitised(be, nan_rows, loc_p, cov_p, loc_q, cov_q)
    dmu = (loc_p - loc_q)[..., None]
    if method != "naive":
        scale, squared = (a[..., None, None] for a in _unit_scale(be, xp.linalg.diagonal(cov_q)))
        dmu, cov_p, cov_q = dmu * scale, cov_p * squared, cov_q * squared
    factor_q, bad_q = _factor(be, cov_q)
    if method == "naive":
        # The textbook formula: explicit inverse and log-determinants.
        inv_q = xp.linalg.inv(cov_q)
        quad = xp.sum(dmu[..., 0] * (inv_q @ dmu)[..., 0], axis=-1)
        trace = _sum_last2(xp, inv_q * xp.matrix_transpose(cov_p))
        logdet = xp.linalg.slogdet(cov_q)[1] - xp.linalg.slogdet(cov_p)[1]
        kl = 0.5 * (trace + quad - k + logdet)
        bad_p = be.cholesky_ex(cov_p)[1] if check else None
    else:
        # Positive-definiteness is decided by each matrix's own factorisation.
        factor_p, bad_p = _factor(be, cov_p)
        kl = 0.5 * _twice_kl_of_difference(be, factor_q, factor_p, cov_p - cov_q, dmu)
    bad = nan_rows | bad_q
    if bad_p is not None:
        bad = bad | bad_p
    problems = {}
    if check:
        problems = {("cov_q", NOT_POSITIVE_DEFINITE): bad_q, ("cov_p", NOT_POSITIVE_DEFINITE): bad_p}
    return _nan_where(be, bad, kl), problems


def _half_psi_of_ratio(be, a, b):
    """psi(a/b - 1) / 2 = (a/b - 1 - ln(a/b)) / 2 for positive a, b: near a == b from a - b (exact
    within a factor of 2); for a/b < 1/2, where log1p(a/b - 1) would lose ln(a/b), from the log of
    the ratio (or ln a - ln b where the ratio underflows)."""
    xp = be.xp
    ratio = a / b
    far_below = ratio < 0.5
    near = psi(be, xp.where(far_below, 0.0, (a - b) / b))
    safe = xp.where(far_below, ratio, 0.25)
    underflow = safe < xp.finfo(a.dtype).smallest_normal
    log_ratio = xp.where(underflow, xp.log(xp.where(underflow, a, 1.0)) - xp.log(xp.where(underflow, b, 1.0)),
                         xp.log(xp.where(underflow, 0.25, safe)))
    return 0.5 * xp.where(far_below, (ratio - 1.0) - log_ratio, near)


def _gram_factor(be, a, weights=None):
    """The lower Cholesky factor of I + A^T diag(weights) A (r x r) for A (..., k, r)."""
    xp = be.xp
    at = xp.matrix_transpose(a)
    gram = (at if weights is None else at * weights[..., None, :]) @ a
    return _factor(be, be.eye_like(gram) + gram)[0]


def kl_lowrank(be, loc_p, cov_factor_p, cov_diag_p, loc_q, cov_factor_q, cov_diag_q, *, method, check):
    """Covariances W W^T + diag(d), W (..., k, r), in O(k r^2) (docs/design.md, "Low-rank plus
    diagonal")."""
    xp = be.xp
    # NaN anywhere in a factor makes its sum NaN: one pass over each factor, not two
    factor_sums = xp.sum(cov_factor_p, axis=(-2, -1)) + xp.sum(cov_factor_q, axis=(-2, -1))
    nan_rows = _any_nan(xp, (loc_p, 1), (cov_diag_p, 1), (loc_q, 1), (cov_diag_q, 1), (factor_sums, 0))
    not_positive = {name: xp.any(d <= 0, axis=-1) for name, d in (("cov_diag_p", cov_diag_p), ("cov_diag_q", cov_diag_q))}
    problems = {(name, "must be positive"): bad for name, bad in not_positive.items()} if check else {}
    # an infinite variance on one side, or means infinitely apart, make the KL +inf; infinite
    # variances on both sides of one coordinate are inf / inf, NaN
    inf_p, inf_q = xp.isinf(cov_diag_p), xp.isinf(cov_diag_q)
    bad = nan_rows | not_positive["cov_diag_p"] | not_positive["cov_diag_q"] | xp.any(inf_p & inf_q, axis=-1)
    unbounded = ~bad & (xp.any(inf_p | inf_q, axis=-1) | xp.any(xp.isinf(loc_p - loc_q), axis=-1))
    invalid = bad | unbounded  # left out of the arithmetic
    rows = invalid[..., None]
    loc_p, loc_q = xp.where(rows, 0.0, loc_p), xp.where(rows, 0.0, loc_q)
    d_p, d_q = xp.where(rows, 1.0, cov_diag_p), xp.where(rows, 1.0, cov_diag_q)
    # the factors are cleaned only where NaN would reach a factorisation (kl_lowrank's small matrices)
    w_p, w_q = _same_rank(xp, cov_factor_p, cov_factor_q)
    dmu = loc_p - loc_q
    if method == "naive":
        kernel = _lowrank_naive
    else:  # with k <= 2r, forming the k x k covariances costs no more than O(k r^2)
        kernel = _lowrank_dense if d_p.shape[-1] <= 2 * w_p.shape[-1] else _lowrank_stable
        scale, squared = (a[..., None] for a in _unit_scale(be, d_q))
        dmu, w_p, d_p, w_q, d_q = dmu * scale, w_p * scale[..., None], d_p * squared, w_q * scale[..., None], d_q * squared
    kl = _nan_where(be, bad, kernel(be, dmu, w_p, d_p, w_q, d_q))
    return xp.where(unbounded, float("inf"), kl), problems


def _unit_scale(be, variances):
    """For each batch element, a power of 2 (its square a power of 4) that brings the largest of
    ``variances`` (..., k), q's diagonal, into [1, 4): with means and factors multiplied by it and
    variances and covariances by its square, the KL does not change, the scaling is exact, and no
    product of variances in the kernels (nor in their gradients) leaves the range where variances
    are far from 1 (beyond 1e+-19 in float32). The exponent is an integer, through which no gradient
    flows; powers below the smallest normal number are not used (XLA on CPU flushes them to 0)."""
    xp = be.xp
    _, exponent = xp.frexp(xp.max(variances, axis=-1))  # largest = m 2^exponent, 1/2 <= m < 1
    floor_log2 = exponent - 1
    smallest = math.frexp(float(xp.finfo(variances.dtype).smallest_normal))[1] - 1  # even in every float format
    half = xp.clip(floor_log2 - floor_log2 % 2, min=smallest) // 2
    one = xp.ones_like(variances[..., 0])
    return xp.ldexp(one, -half), xp.ldexp(one, -2 * half)


def _same_rank(xp, w_p, w_q):
    """Both factors with r = max(r_p, r_q) columns (zero columns leave W W^T as it is)."""
    r_p, r_q = w_p.shape[-1], w_q.shape[-1]
    if r_p < r_q:
        w_p = xp.concat([w_p, xp.zeros_like(w_q[..., : r_q - r_p])], axis=-1)
    elif r_q < r_p:
        w_q = xp.concat([w_q, xp.zeros_like(w_p[..., : r_p - r_q])], axis=-1)
    return w_p, w_q


def _lowrank_naive(be, dmu, w_p, d_p, w_q, d_q):
    """torch.distributions' formula: Woodbury and the determinant lemma, term by term."""
    xp = be.xp
    k = d_p.shape[-1]
    c_p, c_q = _gram_factor(be, w_p / d_p[..., None] ** 0.5), _gram_factor(be, w_q / d_q[..., None] ** 0.5)
    logdet = lambda c, d: _logdet(xp, c) + xp.sum(xp.log(d), axis=-1)  # noqa: E731
    wt_dinv = xp.matrix_transpose(w_q / d_q[..., None])  # (r, k)
    a = be.solve_triangular(c_q, wt_dinv)  # C_q^-1/2 W_q^T D_q^-1
    quad = xp.sum(dmu * dmu / d_q, axis=-1) - xp.sum((a @ dmu[..., None])[..., 0] ** 2, axis=-1)
    trace = (xp.sum(d_p / d_q, axis=-1) + xp.sum(w_p * w_p / d_q[..., None], axis=(-2, -1))
             - xp.sum((a * d_p[..., None, :] ** 0.5) ** 2, axis=(-2, -1)) - xp.sum((a @ w_p) ** 2, axis=(-2, -1)))
    return 0.5 * (trace + quad - k + logdet(c_q, d_q) - logdet(c_p, d_p))


def _lowrank_dense(be, dmu, w_p, d_p, w_q, d_q):
    """kl_cov's form on the D_q-scaled covariances I + V V^T and R + U U^T, whose difference
    E + V X^T + X V^T + X X^T (E = D_q^-1 (D_p - D_q), X = U - V) comes from the changes."""
    xp = be.xp
    t = xp.matrix_transpose
    scale = 1.0 / xp.sqrt(d_q)
    v, x = w_q * scale[..., None], (w_p - w_q) * scale[..., None]
    u = v + x
    eye = be.eye_like(v @ t(v))
    difference = (eye * ((d_p - d_q) / d_q)[..., None, :]) + v @ t(x) + x @ t(v) + x @ t(x)
    factor_q = _factor(be, eye + v @ t(v))[0]
    factor_p = _factor(be, eye * (d_p / d_q)[..., None, :] + u @ t(u))[0]
    return 0.5 * _twice_kl_of_difference(be, factor_q, factor_p, difference, (dmu * scale)[..., None])


def _lowrank_stable(be, dmu, w_p, d_p, w_q, d_q):
    """2 KL = ||z||^2 + f(S_q^-1 T) + f(T^-1 S_p) + tr((S_q^-1 - T^-1)(S_p - T)), f(A) = tr(A) - k -
    ln det A, through T = D + W_q W_q^T: the diagonal's change seen through q's factor, the rest of
    the change (S_p - T = Y S Y^T, low rank) in T's metric, and their coupling, a product of the two
    changes (docs/design.md, "Low-rank plus diagonal"). D is D_p but for the 2r coordinates where
    q's factor dominates S_q (the largest leverages), where it keeps D_q: the diagonal's change there
    joins the low-rank part as 2r unit columns (Y = [W_q, X, U], X = W_p - W_q), since seen through
    the factor it would cancel to a cond(S_q)^2 part of itself. A pass over the factors makes the
    weighted Gram matrices of [W_q, X]; a second makes the part of X that T's metric leaves; the
    unit columns' part comes from their rows. No QR or eigendecomposition: the gradients stay
    finite where a factor or its change is rank deficient (a zero factor, p == q)."""
    xp = be.xp
    t = xp.matrix_transpose
    r = w_q.shape[-1]
    rows, dominated = _dominated_rows(be, w_q, d_q)
    d = xp.where(dominated, d_q, d_p)
    change = d - d_q
    x = w_p - w_q
    w_e = change / d / d_q  # not / (d * d_q), which underflows where both are below 1e-19 of q's largest (float32)
    # the weighted Gram matrices [W_q, X]^T D^-1 [W_q, X] (the other rows' part, then the dominated
    # rows' added: the Schur complement needs the first alone), [W_q, X]^T D_q^-1 E D^-1 [W_q, X] and
    # W_q^T D_q^-2 E^2 D^-1 W_q (E = D - D_q); D_q^-1 = D^-1 + D_q^-1 E D^-1 gives W_q^T D_q^-1 [W_q, X]
    g_outside, g_e = _blocked_grams(xp, w_q, x, xp.where(dominated, 0.0, 1.0 / d)), _blocked_grams(xp, w_q, x, w_e)
    unit = _unit_columns(be, rows, w_q, x, d, d_p, d_q, g_outside)
    g_t = g_outside + unit["gram"]
    g_q = g_t[..., :r, :] + g_e[..., :r, :]
    g_ee = t(w_q) @ (w_q * (change * w_e / d_q)[..., None])
    eye = be.eye_like(g_ee)
    c_q = _factor(be, eye + g_q[..., :r, :r])[0]  # I + W_q^T D_q^-1 W_q
    b = g_t[..., :r, :r]  # V'^T V', V' = D^-1/2 W_q
    c_t = _factor(be, eye + b)[0]  # T = D^1/2 (I + V' V'^T) D^1/2
    # f(S_q^-1 T) = sum psi(e_i) + g(-C_q^-1/2 W_q^T D_q^-1 E D^-1 W_q C_q^-1/2) - tr(...E^2...), g(M) = tr M - ln det(I + M)
    f_diag = (2.0 * xp.sum(_half_psi_of_ratio(be, d, d_q), axis=-1)
              + _trace_minus_logdet(be, -_congruent(be, c_q, g_e[..., :r, :r]), _logdet(xp, c_t) - _logdet(xp, c_q))
              - xp.sum(xp.linalg.diagonal(_congruent(be, c_q, g_ee)), axis=-1))
    gram = _metric_gram(be, x, w_q, d, b, c_t, g_t, unit)  # Y^T T^-1 Y
    k_matrix = xp.concat([gram[..., r:2 * r, :], gram[..., :r, :] + gram[..., r:2 * r, :],
                          unit["change"][..., None] * gram[..., 2 * r:, :]], axis=-2)  # S Y^T T^-1 Y
    f_factor = _trace_minus_logdet_of_product(be, k_matrix, _logdet_of_p(be, g_t, unit) - _logdet(xp, c_t))
    # tr(S_q^-1 E T^-1 Y S Y^T) = tr(S (Y - W_q beta)^T D_q^-1 E D^-1 (Y - W_q alpha)), alpha and beta
    # the coefficients of Y's projections that S_q^-1 and T^-1 remove (E vanishes on U's rows)
    g_e = _with_zero_unit_blocks(xp, g_e)
    alpha = _solve_gram(be, c_q, xp.concat([g_q, t(unit["over_d"])], axis=-1))
    beta = _solve_gram(be, c_t, xp.concat([g_t[..., :r, :], t(unit["over_d"])], axis=-1))
    projected = g_e - g_e[..., :, :r] @ alpha - t(beta) @ g_e[..., :r, :] + t(beta) @ g_e[..., :r, :r] @ alpha
    diagonal = xp.linalg.diagonal(projected)
    coupling = (xp.sum(xp.linalg.diagonal(projected[..., r:2 * r, :r] + projected[..., :r, r:2 * r]), axis=-1)
                + xp.sum(diagonal[..., r:2 * r], axis=-1) + xp.sum(unit["change"] * diagonal[..., 2 * r:], axis=-1))
    # ||z||^2 = dmu^T S_q^-1 dmu by Woodbury; (1, k) @ (k, r): BLAS's transposed matrix-vector product is slower
    inside = be.solve_triangular(c_q, t((dmu / d_q)[..., None, :] @ w_q))[..., 0]
    mean = xp.sum(dmu * dmu / d_q, axis=-1) - xp.sum(inside * inside, axis=-1)
    # every part but the coupling is >= 0; a sum that rounds below 0 is 0
    return 0.5 * xp.clip(f_diag + f_factor + coupling + mean, min=0.0)


def _dominated_rows(be, w_q, d_q):
    """Indices (..., 2r), and their mask (..., k), of the coordinates of largest leverage
    v_i^T (I + V^T V)^-1 v_i, V = D_q^-1/2 W_q (the share of S_q's i-th diagonal entry that its
    factor makes). The leverages sum to below r, so every coordinate left out has leverage below 1/2."""
    xp = be.xp
    t = xp.matrix_transpose
    v = w_q / xp.sqrt(d_q)[..., None]
    gram = t(v) @ v
    eye = be.eye_like(gram)
    inverse = be.solve_triangular(_factor(be, eye + gram)[0], xp.broadcast_to(eye, gram.shape))  # L^-1: a product below, not a k-column solve
    return be.largest(xp.linalg.vector_norm(v @ t(inverse), axis=-1), 2 * w_q.shape[-1])


def _unit_columns(be, rows, w_q, x, d, d_p, d_q, g_outside):
    """What the unit columns U of the dominated coordinates A need, from those rows and the Gram
    matrix of the others, ``g_outside`` = [W_q, X]^T D^-1 [W_q, X] over them: the rows of W_q and X,
    E_A = (D_p - D_q) there, W_A^T D_A^-1, their own Gram matrix, and the factor of the Schur
    complement S_A = D_A + W_A (I + G_B)^-1 W_A^T = [T^-1]_AA^-1 (G_B = W_q^T D^-1 W_q over the other
    rows): a sum, where the Woodbury form of [T^-1]_AA would subtract nearly equal terms."""
    xp = be.xp
    t = xp.matrix_transpose

    def take(a):  # the rows of a (..., k) or (..., k, c); kl._broadcast gave every argument one batch shape
        if a.ndim == d.ndim:
            return xp.take_along_axis(a, rows, axis=-1)
        return xp.take_along_axis(a, rows[..., None], axis=-2)

    w_a, x_a, d_a, d_pa, d_qa = take(w_q), take(x), take(d), take(d_p), take(d_q)
    over_d = w_a / d_a[..., None]  # (n, r)
    r = w_q.shape[-1]
    g_b = g_outside[..., :r, :r]
    c_b = _factor(be, be.eye_like(g_b) + g_b)[0]  # I + G_B
    q = _solve_gram(be, c_b, t(w_a))  # (I + G_B)^-1 W_A^T
    shared = w_a @ q  # W_A (I + G_B)^-1 W_A^T
    schur = _factor(be, be.eye_like(shared) * d_a[..., None, :] + shared)[0]
    w_pa = w_a + x_a
    return {"w": w_a, "x": x_a, "over_d": over_d, "change": d_pa - d_qa, "q": q, "schur": schur,
            "gram": _blocked_grams(xp, w_a, x_a, 1.0 / d_a), "outside": g_outside[..., :r, r:],
            # W_p^T (D_p^-1 - D^-1) W_p and ln det D_p - ln det D, both from these rows alone
            "gram_p": t(w_pa) @ (w_pa * (1.0 / d_pa - 1.0 / d_a)[..., None]),
            "log_ratio": xp.sum(xp.log(d_pa) - xp.log(d_qa), axis=-1)}


def _metric_gram(be, x, w_q, d, b, c_t, g_t, unit):
    """Y^T T^-1 Y for Y = [W_q, X, U] (T = D^1/2 F F^T D^1/2, F F^T = I + V' V'^T): by blocks.
    [W_q, X]'s from Z = F^-1 D^-1/2 [W_q, X] with F = I + V' (I + L)^-1 V'^T (L = c_t), F^-1 =
    I - V' A^-1 V'^T, A = L (I + L^T): F^-1 V' = V' A^-1 (I + L) and V'^T Z_X = (I + L) A^-1 V'^T X'
    need no subtraction, and Z_X is formed (the part of X that T's metric leaves). U's from the
    Schur complement: U^T T^-1 U = S_A^-1, U^T T^-1 W_q = D_A^-1 W_A (I + b)^-1 and U^T T^-1 X =
    S_A^-1 (X_A - W_A (I + G_B)^-1 W_q^T D^-1 X over the other rows)."""
    xp = be.xp
    t = xp.matrix_transpose
    r = w_q.shape[-1]
    eye = be.eye_like(b)
    upper = eye + t(c_t)

    def a_solve(m):  # A^-1 m by two triangular solves, A = L (I + L^T)
        return be.solve_triangular(upper, be.solve_triangular(c_t, m), upper=True)

    m_x = a_solve(g_t[..., :r, r:])  # A^-1 V'^T X'
    rest = x - w_q @ m_x  # D^1/2 Z_X
    gram_xx = t(rest) @ (rest / d[..., None])
    shift = eye + c_t
    zv = a_solve(shift)  # A^-1 (I + L): Z_V = V' zv
    gram_vv, gram_vx = t(zv) @ b @ zv, t(zv) @ shift @ m_x
    over_d, schur = unit["over_d"], unit["schur"]
    gram_uv = t(_solve_gram(be, c_t, t(over_d)))
    gram_ux = _solve_gram(be, schur, unit["x"] - t(unit["q"]) @ unit["outside"])
    gram_uu = _solve_gram(be, schur, xp.broadcast_to(be.eye_like(schur), schur.shape))
    return xp.concat([xp.concat([gram_vv, gram_vx, t(gram_uv)], axis=-1),
                      xp.concat([t(gram_vx), gram_xx, t(gram_ux)], axis=-1),
                      xp.concat([gram_uv, gram_ux, gram_uu], axis=-1)], axis=-2)


def _logdet_of_p(be, g_t, unit):
    """ln det S_p - ln det D, with W_p = W_q + X and D_p = D but on the dominated rows."""
    xp = be.xp
    r = unit["w"].shape[-1]
    gram_p = g_t[..., :r, :r] + g_t[..., :r, r:] + g_t[..., r:, :r] + g_t[..., r:, r:] + unit["gram_p"]  # W_p^T D_p^-1 W_p
    return _logdet(xp, _factor(be, be.eye_like(gram_p) + gram_p)[0]) + unit["log_ratio"]


def _with_zero_unit_blocks(xp, g):
    """``g`` (..., 2r, 2r) bordered by 2r zero rows and columns (the unit columns' blocks)."""
    zeros = xp.zeros_like(g)
    return xp.concat([xp.concat([g, zeros], axis=-1), xp.concat([zeros, zeros], axis=-1)], axis=-2)


def _blocked_grams(xp, a, b, weights):
    """[A, B]^T diag(weights) [A, B] from its three distinct blocks."""
    t = xp.matrix_transpose
    wa, wb = a * weights[..., None], b * weights[..., None]
    ab = t(wa) @ b
    return xp.concat([xp.concat([t(wa) @ a, ab], axis=-1), xp.concat([t(ab), t(wb) @ b], axis=-1)], axis=-2)


def _solve_gram(be, factor, b):
    """(L L^T)^-1 B for a lower factor L."""
    return be.solve_triangular(be.xp.matrix_transpose(factor), be.solve_triangular(factor, b), upper=True)


# g(K) = sum_{n>=2} (-1)^n tr(K^n) / n where the spectral radius is below 1/2: terms to 2^-55 (2^-26),
# summed as tr(K^2 q(K)) with q's coefficients (-1)^n / n, n = 2..N, in blocks of _LOG_SERIES_BLOCK.
_LOG_SERIES_TERMS = {"float64": 55, "float32": 26}
_LOG_SERIES_BLOCK = {"float64": 7, "float32": 5}


def _trace_minus_logdet_of_product(be, k_matrix, logdet):
    """g(K) = tr(K) - ln det(I + K) for K = S G with S symmetric and G positive semidefinite (real
    eigenvalues, those of G^1/2 S G^1/2), given ``logdet`` = ln det(I + K) from factors. Where
    tr(K^4) < 1/16 (every eigenvalue within 1/2) by its series, whose first term tr(K^2) / 2 =
    ||G^1/2 S G^1/2||_F^2 / 2 dominates; elsewhere (some eigenvalue beyond about 1/2, so that
    tr(K) - ``logdet`` loses at most a few digits to cancellation) directly.
    Products only: no square root of G, which may be singular."""
    xp = be.xp
    k2 = k_matrix @ k_matrix
    small = _sum_last2(xp, k2 * xp.matrix_transpose(k2)) < 1.0 / 16.0  # tr(K^4)
    ks, ks2 = (xp.where(small[..., None, None], m, 0.0) for m in (k_matrix, k2))
    key = _dtype_key(be, k_matrix)
    coeffs = [(-1.0) ** n / n for n in range(2, _LOG_SERIES_TERMS[key] + 1)]
    series = _sum_last2(xp, ks2 * xp.matrix_transpose(_matrix_polynomial(be, ks, ks2, coeffs, _LOG_SERIES_BLOCK[key])))
    direct = xp.sum(xp.linalg.diagonal(k_matrix), axis=-1) - logdet
    return xp.where(small, series, direct)


def _matrix_polynomial(be, k_matrix, k2, coeffs, block):
    """sum_j coeffs[j] K^j by Paterson and Stockmeyer's scheme: the powers I .. K^(block-1), each
    block of coefficients applied to them in one product, the blocks combined by Horner's rule in
    K^block: about 2 sqrt(len(coeffs)) matrix products instead of len(coeffs) (small matrices, where
    each operation's overhead is the cost). ``k2`` is K^2."""
    xp = be.xp
    powers = [xp.broadcast_to(be.eye_like(k_matrix), k_matrix.shape), k_matrix, k2]
    while len(powers) <= block:
        powers.append(powers[-1] @ k_matrix)
    step = powers.pop()  # K^block
    n = k_matrix.shape[-1]
    blocks = -(-len(coeffs) // block)
    padded = coeffs + [0.0] * (blocks * block - len(coeffs))
    weights = be.constant_like([padded[i * block:(i + 1) * block] for i in range(blocks)], k_matrix)
    stacked = xp.reshape(xp.stack(powers[:block], axis=-3), (*k_matrix.shape[:-2], block, n * n))
    parts = xp.reshape(weights @ stacked, (*k_matrix.shape[:-2], blocks, n, n))
    acc = parts[..., blocks - 1, :, :]
    for i in range(blocks - 2, -1, -1):
        acc = parts[..., i, :, :] + step @ acc
    return acc


def derivatives(be, family, arrays):
    """d KL / d each argument of the VAE or diagonal family, elementwise (broadcast), for the fused
    kernels' backward passes: the derivatives of the stable forms, 0 exactly at p == q.
    vae: loc, expm1(logvar) / 2; diag: dmu e^-lq, expm1(x) / 2 and the negatives (minus the mean
    term dmu^2 e^-lq / 2 for logvar_q), x = logvar_p - logvar_q, dmu = loc_p - loc_q."""
    xp = be.xp
    if family == "vae":
        loc, logvar = arrays
        return [loc, 0.5 * xp.expm1(logvar)]
    loc_p, logvar_p, loc_q, logvar_q = arrays
    dmu = loc_p - loc_q
    # dmu = 0 contributes 0 even where e^-logvar_q overflows (0 * inf would be NaN)
    mean = xp.where(dmu == 0.0, 0.0, dmu * xp.exp(-xp.where(dmu == 0.0, 0.0, logvar_q)))
    half_expm1 = 0.5 * xp.expm1(logvar_p - logvar_q)
    return [mean, half_expm1, -mean, -(half_expm1 + (0.5 * dmu) * mean)]


KERNELS = {"normal": kl_normal, "diag": kl_diag, "vae": kl_vae, "tril": kl_tril, "cov": kl_cov, "lowrank": kl_lowrank}


@functools.cache
def compiled(be, family, method, check):
    """The kernel of ``family`` in ``be``'s compiled form (``jax.jit`` on JAX), made once and cached."""
    return be.compile(functools.partial(KERNELS[family], be, method=method, check=check))
