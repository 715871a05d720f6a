"""The Triton kernels of ``triton_gpu.py``, in float64 whatever the input dtype: the forms of
``kernels.py`` (docs/design.md, "The cancellation-free forms"), with only ``exp`` and ``log``.
Imported on first use: ``triton.jit`` reads ``TRITON_INTERPRET`` then."""

import math

import triton
import triton.language as tl

from .. import kernels

# Globals a kernel reads must be constexpr.
F64_MAX = tl.constexpr(1.7976931348623157e308)
F64_TINY = tl.constexpr(2.2250738585072014e-308)
LOG_MAX = tl.constexpr(math.log(1.7976931348623157e308))
PHI_LOW = tl.constexpr(kernels.PHI_SERIES[0])
PHI_HIGH = tl.constexpr(kernels.PHI_SERIES[1])
PHI_TERMS = tl.constexpr(len(kernels.HALF_PHI_COEFFS["float64"]) + 1)  # the series' last power
PSI_LOW = tl.constexpr(kernels.PSI_SERIES[0])
PSI_HIGH = tl.constexpr(kernels.PSI_SERIES[1])
PSI_TERMS = tl.constexpr(len(kernels.PSI_COEFFS["float64"]))


@triton.jit
def half_phi(x):
    """(e^x - 1 - x) / 2: kernels.half_phi's three forms. The series, sum_{n>=2} x^n / n!, is
    nested as x^2/2 (1 + x/3 (1 + x/4 (... (1 + x/N)))): no table of coefficients."""
    below = x <= PHI_LOW
    above = x >= PHI_HIGH
    xs = tl.where(below | above, 0.0, x)
    nested = tl.full(xs.shape, 1.0, tl.float64)
    for n in tl.static_range(PHI_TERMS, 2, -1):
        nested = 1.0 + nested * xs / n
    series = (0.25 * xs) * xs * nested
    xb = tl.where(below, x, PHI_LOW)
    negative = 0.5 * tl.exp(xb) + (-0.5 - 0.5 * xb)
    xa = tl.where(above, x, PHI_HIGH)
    near_overflow = xa > LOG_MAX
    xe = tl.where(near_overflow, PHI_HIGH, xa)
    positive = 0.5 * (tl.exp(xe) - 1.0) - 0.5 * xe  # e^x - 1 for x >= 2 loses nothing
    half_exp = tl.exp(0.5 * tl.where(near_overflow, xa, PHI_HIGH))
    positive = tl.where(near_overflow, (0.5 * half_exp) * half_exp - 0.5 * tl.minimum(xa, F64_MAX), positive)
    return tl.where(below, negative, tl.where(above, positive, series))


@triton.jit
def half_expm1(x):
    """(e^x - 1) / 2: half_phi(x) + x/2 on (-1, 1), where that does not cancel; e^x - 1 outside."""
    inside = (x > -1.0) & (x < 1.0)
    return tl.where(inside, half_phi(tl.where(inside, x, 0.0)) + 0.5 * x, 0.5 * (tl.exp(tl.where(inside, 0.0, x)) - 1.0))


@triton.jit
def psi(x):
    """x - log1p(x) for x >= -1/2: kernels.psi's atanh series, and x - log(1 + x) for x >= 2."""
    inside = (x > PSI_LOW) & (x < PSI_HIGH)
    xs = tl.where(inside, x, 0.0)
    xd = tl.where(inside, PSI_HIGH, x)
    s = xs / (2.0 + xs)
    s2 = s * s
    acc = tl.full(xs.shape, 1.0 / (2 * PSI_TERMS + 1), tl.float64)
    for n in tl.static_range(PSI_TERMS - 2, -1, -1):
        acc = acc * s2 + 1.0 / (2 * n + 3)
    series = s * xs - 2.0 * (s2 * s) * acc
    direct = xd - tl.log(1.0 + tl.minimum(xd, F64_MAX))
    return tl.where(inside, series, direct)


@triton.jit
def half_scaled_square(dmu, logvar):
    """dmu^2 e^-logvar / 2 without overflow or underflow where it is representable."""
    direct = (0.5 * dmu) * dmu * tl.exp(-logvar)
    half = tl.exp(-0.5 * logvar)
    half_ok = (half <= F64_MAX) & (half >= F64_TINY)
    quarter = tl.exp(-0.25 * tl.where(half_ok, 0.0, logvar))
    scaled = tl.where(half_ok, dmu * half, (dmu * quarter) * quarter)
    ok = (direct <= F64_MAX) & (direct >= F64_TINY)
    return tl.where(dmu == 0.0, 0.0, tl.where(ok, direct, (0.5 * scaled) * scaled))


@triton.jit
def diag_terms(loc_p, logvar_p, loc_q, logvar_q):
    """kernels.kl_diag's terms: phi(x + e) = phi(x) + e expm1(x), e the rounding error of x (TwoSum)."""
    x = logvar_p - logvar_q
    virtual = logvar_p - x
    err = (logvar_p - (x + virtual)) + (virtual - logvar_q)
    err = tl.where(tl.abs(err) <= F64_MAX, err, 0.0)  # NaN or inf where x is infinite: nothing to correct
    hp = half_phi(x)
    correction = tl.where((err == 0.0) | (hp > F64_MAX), 0.0, err * tl.minimum(hp + 0.5 * x, F64_MAX))
    return hp + correction + half_scaled_square(loc_p - loc_q, logvar_q)


@triton.jit
def _tile(rows, k, r_block, c_block, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    r = r_block * BLOCK_R + tl.arange(0, BLOCK_R)
    c = c_block * BLOCK_K + tl.arange(0, BLOCK_K)
    return r, r[:, None] * k + c[None, :], (r[:, None] < rows) & (c[None, :] < k)


@triton.jit
def _load(ptr, index, mask):
    return tl.load(ptr + index, mask=mask, other=0.0).to(tl.float64)


@triton.jit
def vae_kernel(loc_ptr, logvar_ptr, out_ptr, rows, k, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    acc = tl.zeros((BLOCK_R,), tl.float64)
    for c_block in range(0, tl.cdiv(k, BLOCK_K)):
        r, index, mask = _tile(rows, k, tl.program_id(0), c_block, BLOCK_R, BLOCK_K)
        loc = _load(loc_ptr, index, mask)
        acc += tl.sum(half_phi(_load(logvar_ptr, index, mask)) + (0.5 * loc) * loc, axis=1)
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    tl.store(out_ptr + r, acc, mask=r < rows)


@triton.jit
def diag_kernel(loc_p_ptr, logvar_p_ptr, loc_q_ptr, logvar_q_ptr, out_ptr, rows, k, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    acc = tl.zeros((BLOCK_R,), tl.float64)
    for c_block in range(0, tl.cdiv(k, BLOCK_K)):
        r, index, mask = _tile(rows, k, tl.program_id(0), c_block, BLOCK_R, BLOCK_K)
        terms = diag_terms(_load(loc_p_ptr, index, mask), _load(logvar_p_ptr, index, mask),
                           _load(loc_q_ptr, index, mask), _load(logvar_q_ptr, index, mask))
        acc += tl.sum(terms, axis=1)
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    tl.store(out_ptr + r, acc, mask=r < rows)


@triton.jit
def normal_kernel(loc_p_ptr, scale_p_ptr, loc_q_ptr, scale_q_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """kernels.kl_normal: half_log_ratio_term + z^2 / 2, NaN where a scale is not positive."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    loc_p = tl.load(loc_p_ptr + i, mask=mask, other=0.0).to(tl.float64)
    scale_p = tl.load(scale_p_ptr + i, mask=mask, other=1.0).to(tl.float64)
    loc_q = tl.load(loc_q_ptr + i, mask=mask, other=0.0).to(tl.float64)
    scale_q = tl.load(scale_q_ptr + i, mask=mask, other=1.0).to(tl.float64)
    ratio = scale_p / scale_q
    far_below = ratio < 0.5
    d = tl.where(far_below, 0.0, (scale_p - scale_q) / scale_q)
    near = (0.5 * d) * d + psi(d)
    safe_ratio = tl.where(far_below, ratio, 0.25)
    underflow = safe_ratio < F64_TINY
    t = tl.where(underflow, tl.log(tl.where(underflow, scale_p, 1.0)) - tl.log(tl.where(underflow, scale_q, 1.0)),
                 tl.log(tl.where(underflow, 0.25, safe_ratio)))
    scale_term = tl.where(far_below, half_phi(2.0 * t), near)
    # (loc_p - loc_q) / scale_q, also where the difference overflows but the quotient does not
    dmu = loc_p - loc_q
    overflowed = (tl.abs(dmu) > F64_MAX) & (tl.abs(loc_p) <= F64_MAX) & (tl.abs(loc_q) <= F64_MAX)
    z = tl.where(overflowed, 2.0 * ((0.5 * loc_p - 0.5 * loc_q) / scale_q), dmu / scale_q)
    kl = scale_term + (0.5 * z) * z
    kl = tl.where((scale_p > 0.0) & (scale_q > 0.0), kl, float("nan"))
    tl.store(out_ptr + i, kl.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def vae_backward(loc_ptr, logvar_ptr, g_ptr, d_loc_ptr, d_logvar_ptr, rows, k, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """d/dloc = g loc, d/dlogvar = g expm1(logvar) / 2."""
    r, index, mask = _tile(rows, k, tl.program_id(0), tl.program_id(1), BLOCK_R, BLOCK_K)
    g = tl.load(g_ptr + r, mask=r < rows, other=0.0)[:, None]
    loc = _load(loc_ptr, index, mask)
    tl.store(d_loc_ptr + index, (g * loc).to(d_loc_ptr.dtype.element_ty), mask=mask)
    tl.store(d_logvar_ptr + index, (g * half_expm1(_load(logvar_ptr, index, mask))).to(d_logvar_ptr.dtype.element_ty), mask=mask)


@triton.jit
def diag_backward(loc_p_ptr, logvar_p_ptr, loc_q_ptr, logvar_q_ptr, g_ptr, d_loc_p_ptr, d_logvar_p_ptr, d_loc_q_ptr, d_logvar_q_ptr,
                  rows, k, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """With dmu = loc_p - loc_q, x = logvar_p - logvar_q: dmu e^-lq, expm1(x)/2, and the negatives
    (minus the mean term dmu^2 e^-lq / 2 for logvar_q); 0 exactly at p == q."""
    r, index, mask = _tile(rows, k, tl.program_id(0), tl.program_id(1), BLOCK_R, BLOCK_K)
    g = tl.load(g_ptr + r, mask=r < rows, other=0.0)[:, None]
    dmu = _load(loc_p_ptr, index, mask) - _load(loc_q_ptr, index, mask)
    logvar_q = _load(logvar_q_ptr, index, mask)
    mean = tl.where(dmu == 0.0, 0.0, dmu * tl.exp(-logvar_q))  # 0, not 0 * inf, where e^-lq overflows
    half = half_expm1(_load(logvar_p_ptr, index, mask) - logvar_q)
    tl.store(d_loc_p_ptr + index, (g * mean).to(d_loc_p_ptr.dtype.element_ty), mask=mask)
    tl.store(d_logvar_p_ptr + index, (g * half).to(d_logvar_p_ptr.dtype.element_ty), mask=mask)
    tl.store(d_loc_q_ptr + index, (-g * mean).to(d_loc_q_ptr.dtype.element_ty), mask=mask)
    tl.store(d_logvar_q_ptr + index, (-g * (half + (0.5 * dmu) * mean)).to(d_logvar_q_ptr.dtype.element_ty), mask=mask)


@triton.jit
def normal_backward(loc_p_ptr, scale_p_ptr, loc_q_ptr, scale_q_ptr, g_ptr, d_loc_p_ptr, d_scale_p_ptr, d_loc_q_ptr, d_scale_q_ptr,
                    n, BLOCK: tl.constexpr):
    """With d = (s_p - s_q) / s_q and z = dmu / s_q: z / s_q for loc_p, d (2 + d) / s_p for scale_p
    (r^2 - 1 without cancellation), -(d (2 + d) + z^2) / s_q for scale_q."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    g = tl.load(g_ptr + i, mask=mask, other=0.0)
    scale_p = tl.load(scale_p_ptr + i, mask=mask, other=1.0).to(tl.float64)
    scale_q = tl.load(scale_q_ptr + i, mask=mask, other=1.0).to(tl.float64)
    z = (tl.load(loc_p_ptr + i, mask=mask, other=0.0).to(tl.float64) - tl.load(loc_q_ptr + i, mask=mask, other=0.0).to(tl.float64)) / scale_q
    d = (scale_p - scale_q) / scale_q
    ratio_term = d * (2.0 + d)
    tl.store(d_loc_p_ptr + i, (g * (z / scale_q)).to(d_loc_p_ptr.dtype.element_ty), mask=mask)
    tl.store(d_loc_q_ptr + i, (-g * (z / scale_q)).to(d_loc_q_ptr.dtype.element_ty), mask=mask)
    tl.store(d_scale_p_ptr + i, (g * (ratio_term / scale_p)).to(d_scale_p_ptr.dtype.element_ty), mask=mask)
    tl.store(d_scale_q_ptr + i, (-g * ((ratio_term + z * z) / scale_q)).to(d_scale_q_ptr.dtype.element_ty), mask=mask)


KERNELS = {
    "vae": vae_kernel, "diag": diag_kernel, "normal": normal_kernel,
    "vae_backward": vae_backward, "diag_backward": diag_backward, "normal_backward": normal_backward,
}
