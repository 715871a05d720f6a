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
# The five families
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
        c, failed = be.cholesky_ex(eye + m)
        c = xp.where(failed[..., None, None], eye, c)
        n0 = c - eye
        r = m - (n0 + xp.matrix_transpose(n0)) - n0 @ xp.matrix_transpose(n0)
        y = be.solve_triangular(c, xp.matrix_transpose(be.solve_triangular(c, r)))
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


def kl_cov(be, loc_p, cov_p, loc_q, cov_q, *, method, check):
    xp = be.xp
    k = cov_p.shape[-1]
    nan_rows = _any_nan(xp, (loc_p, 1), (cov_p, 2), (loc_q, 1), (cov_q, 2))
    loc_p, cov_p, loc_q, cov_q = _sanitised(be, nan_rows, loc_p, cov_p, loc_q, cov_q)
    factor_q, bad_q = be.cholesky_ex(cov_q)
    factor_q = xp.where(bad_q[..., None, None], be.eye_like(factor_q), factor_q)
    dmu = (loc_p - loc_q)[..., None]
    if method == "naive":
        # The textbook formula: explicit inverse and log-determinants.
        inv_q = xp.linalg.inv(cov_q)
        quad = xp.sum(dmu[..., 0] * (inv_q @ dmu)[..., 0], axis=-1)
        trace = _sum_last2(xp, inv_q * xp.matrix_transpose(cov_p))
        logdet = xp.linalg.slogdet(cov_q)[1] - xp.linalg.slogdet(cov_p)[1]
        kl = 0.5 * (trace + quad - k + logdet)
        bad_p = be.cholesky_ex(cov_p)[1] if check else None
    else:
        # M = L_q^-1 (S_p - S_q) L_q^-T, and I + M = (I + N)(I + N)^T factored in small quantities:
        # tr(M) - ln det(I + M) = sum_j psi(u_j) + sum_{i>j} N_ij^2, every term >= 0, and
        # KL = 1/2 [that + ||z||^2], z = L_q^-1 dmu.
        solved = be.solve_triangular(factor_q, cov_p - cov_q)
        m = be.solve_triangular(factor_q, xp.matrix_transpose(solved))  # only its lower triangle is read
        z = be.solve_triangular(factor_q, dmu)[..., 0]
        u, squares, _ = _shifted_cholesky(be, m)
        # Positive-definiteness is decided by each matrix's own factorisation.
        factor_p, bad_p = be.cholesky_ex(cov_p)
        factor_p = xp.where(bad_p[..., None, None], be.eye_like(factor_p), factor_p)
        # A pivot 1 + u_j < 1/2 (S_p much narrower than S_q in some direction) has lost digits to
        # the absolute error of M, and so has the rest of N after it. There the KL is at least
        # psi(-1/2)/2 (a pivot bounds the smallest eigenvalue of I + M from above), and it is
        # taken as tr(M) - ln det S_p + ln det S_q, the log-determinants from the factors,
        # which carry relative errors.
        narrow = xp.any(u < -0.5, axis=-1)
        wide_sum = xp.sum(psi(be, xp.where(narrow[..., None], 0.0, u)), axis=-1) + squares
        logdet_ratio = 2.0 * xp.sum(xp.log(xp.linalg.diagonal(factor_p)) - xp.log(xp.linalg.diagonal(factor_q)), axis=-1)
        narrow_sum = xp.sum(xp.linalg.diagonal(m), axis=-1) - logdet_ratio
        kl = 0.5 * xp.where(narrow, narrow_sum, wide_sum) + 0.5 * xp.sum(z * z, axis=-1)
    bad = nan_rows | bad_q
    if bad_p is not None:
        bad = bad | bad_p
    problems = {}
    if check:
        problems = {("cov_q", NOT_POSITIVE_DEFINITE): bad_q, ("cov_p", NOT_POSITIVE_DEFINITE): bad_p}
    return _nan_where(be, bad, kl), problems


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


KERNELS = {"normal": kl_normal, "diag": kl_diag, "vae": kl_vae, "tril": kl_tril, "cov": kl_cov}


@functools.cache
def compiled(be, family, method, check):
    """The kernel of ``family`` in ``be``'s compiled form (``jax.jit`` on JAX), made once and cached."""
    return be.compile(functools.partial(KERNELS[family], be, method=method, check=check))
