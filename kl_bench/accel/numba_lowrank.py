"""The fused CPU kernel (numba) of the low-rank family in float32: one pass over the factors per
batch element, the r x r stage after it in loops over small arrays, every batch element on one of
numba's threads (docs/design.md, "Low-rank plus diagonal" and "numba, low rank").

It computes in float64 the split that ``kernels._lowrank_stable`` computes in the input precision,
but with D = D_p on every coordinate and the part of X that T's metric leaves from the blocks of
the Gram matrices. The first cancels where q's factor dominates a coordinate whose diagonal changes,
the second where X lies nearly in q's factor's span, by amounts that float64 absorbs unless they
are extreme. Each is measured: past 2^20 the first sends the batch element to the array path, the
second to a row-by-row pass that forms that part of X.

For finite float32 inputs with positive diagonals every float64 intermediate is finite, so a batch
element whose result is not finite held a NaN, an infinity or a diagonal entry <= 0: such elements
are recomputed by the array path, and special values behave as there (but a KL beyond float32's
range comes out +inf, where the array path's float32 arithmetic may give inf - inf). Where k <= 2r,
and where Torch needs gradients, the array path runs (the kernel has no backward pass).
"""

from __future__ import annotations

import math

import numba
import numpy as np

from .. import backends, kernels

# g(K) = sum_{n>=2} (-1)^n tr(K^n) / n where tr(K^4) < 1/16: the terms a float32 result needs
_SERIES = tuple((-1.0) ** n / n for n in range(2, kernels._LOG_SERIES_TERMS["float32"] + 1))
_SERIES_BLOCK = kernels._LOG_SERIES_BLOCK["float32"]
_PSI_SERIES = tuple((-1.0) ** n / n for n in range(2, 10))  # psi(x) for |x| < 1/100, to 1e-16 relative


def kl(be, arrays, check):
    """(KL as float64 of the framework of ``arrays``, problems), as ``kernels.kl_lowrank``'s."""
    if be.name == "torch" and be.torch.is_grad_enabled() and any(a.requires_grad for a in arrays):
        return kernels.compiled(be, "lowrank", "stable", check)(*arrays)  # autograd through the array path
    host = [a if be.name == "numpy" else a.detach().numpy() for a in arrays]
    loc_p, w_p, d_p, loc_q, w_q, d_q = host
    w_p, w_q = kernels._same_rank(np, w_p, w_q)
    batch, (k, r) = loc_p.shape[:-1], w_q.shape[-2:]
    if k <= 2 * r or 0 in w_q.shape:
        return kernels.compiled(be, "lowrank", "stable", check)(*arrays)
    rows = [np.ascontiguousarray(a.reshape(-1, *a.shape[len(batch):])) for a in (loc_p, w_p, d_p, loc_q, w_q, d_q)]
    out = np.empty(rows[0].shape[0])
    _rows(*rows, out)
    special = ~np.isfinite(out)
    if special.any():  # NaN, infinities, diagonals <= 0: the array path decides
        array_path = kernels.compiled(backends.get("numpy"), "lowrank", "stable", False)
        out[special] = array_path(*(a[special] for a in rows))[0]
    out = out.reshape(batch)
    problems = {}
    if check:
        problems = {(name, "must be positive"): np.any(d <= 0, axis=-1) for name, d in (("cov_diag_p", d_p), ("cov_diag_q", d_q))}
    if be.name == "torch":
        out, problems = be.torch.from_numpy(out), {key: be.torch.from_numpy(m) for key, m in problems.items()}
    return out, problems


# every helper compiled once and cached on disk; multiply-adds may fuse, nothing is reassociated;
# a division by 0 gives inf or NaN (which send the element to the array path), not an exception
_jit = numba.njit(fastmath={"contract"}, error_model="numpy", cache=True)


@_jit
def _psi(x, ratio):
    """x - ln(1 + x) for x = ratio - 1 > -1: a series near 0, ln(ratio) far below 1."""
    if abs(x) < 0.01:
        s = 0.0
        for c in _PSI_SERIES[::-1]:
            s = s * x + c
        return x * x * s
    return x - (math.log(ratio) if x < -0.5 else math.log1p(x))


_CANCELLATION = 2.0**20  # parts cancelling to 2^-20 of themselves lose 2^-33 to float64's rounding: far below float32's
_CHUNK = 64  # rows gathered (in float64, transposed) before their products are summed


@numba.njit(fastmath={"contract", "reassoc", "nsz"}, cache=True)
def _add_lower_products(acc, z, y):
    """acc[a, j] += sum_t z[a, t] y[j, t] for j <= a (and some j = a + 1, above the diagonal, which
    ``_symmetric`` overwrites): a chunk of rows' part of a weighted Gram matrix's lower triangle.
    Two rows by two columns at a time (one load per multiply-add), each sum over t reassociated
    (which lets it run in vector registers)."""
    n = acc.shape[0]
    for a in range(0, n - 1, 2):
        for j in range(0, a + 1, 2):
            s00 = s01 = s10 = s11 = 0.0
            for t in range(z.shape[1]):
                z0, z1, y0, y1 = z[a, t], z[a + 1, t], y[j, t], y[j + 1, t]
                s00 += z0 * y0
                s01 += z0 * y1
                s10 += z1 * y0
                s11 += z1 * y1
            acc[a, j] += s00
            acc[a, j + 1] += s01
            acc[a + 1, j] += s10
            acc[a + 1, j + 1] += s11
    if n % 2:  # the last row of an odd size
        for j in range(n):
            s = 0.0
            for t in range(z.shape[1]):
                s += z[n - 1, t] * y[j, t]
            acc[n - 1, j] += s


@_jit
def _first_pass(loc_p, w_p, d_p, loc_q, w_q, d_q):
    """The weighted Gram matrices of Y = [W_q, X] (X = W_p - W_q): G_t = Y^T D_p^-1 Y,
    G_e = Y^T D_p^-1 E D_q^-1 Y (E = D_p - D_q) and W_q^T D_q^-2 E^2 D_p^-1 W_q; sum psi(e_i),
    dmu^T D_q^-1 dmu, W_q^T D_q^-1 dmu, and a number that is finite only if every input is and
    every diagonal entry is positive."""
    k, r = w_q.shape
    g_t, g_e, g_ee = np.zeros((2 * r, 2 * r)), np.zeros((2 * r, 2 * r)), np.zeros((r, r))
    y, z_t, z_e, z_ee = np.zeros((2 * r, _CHUNK)), np.zeros((2 * r, _CHUNK)), np.zeros((2 * r, _CHUNK)), np.zeros((r, _CHUNK))
    w_dmu = np.zeros(r)
    psi_sum = mean = 0.0
    positive = True
    for start in range(0, k, _CHUNK):
        for t in range(min(_CHUNK, k - start)):  # (the last chunk's other columns stay 0)
            i = start + t
            dp, dq = np.float64(d_p[i]), np.float64(d_q[i])
            positive &= dp > 0.0 and dq > 0.0
            dmu = np.float64(loc_p[i]) - np.float64(loc_q[i])  # exact in float64
            inv_p, inv_q = 1.0 / dp, 1.0 / dq
            e = dp - dq  # exact unless the ratio is below 2^-29, where psi takes ln(ratio)
            psi_sum += _psi(e * inv_q, dp * inv_q)
            mean += dmu * dmu * inv_q
            c_e, c_mu = e * inv_p * inv_q, dmu * inv_q
            c_ee = c_e * e * inv_q
            for j in range(r):
                w = np.float64(w_q[i, j])
                x = np.float64(w_p[i, j]) - w
                y[j, t], y[r + j, t] = w, x
                z_t[j, t], z_t[r + j, t] = w * inv_p, x * inv_p
                z_e[j, t], z_e[r + j, t] = w * c_e, x * c_e
                z_ee[j, t] = w * c_ee
                w_dmu[j] += w * c_mu
        if start + _CHUNK > k:
            for m in (y, z_t, z_e, z_ee):
                m[:, k - start:] = 0.0
        _add_lower_products(g_t, z_t, y)
        _add_lower_products(g_e, z_e, y)
        _add_lower_products(g_ee, z_ee, y)
    # a NaN or an infinity among the inputs reaches psi's sum, the mean's or G_t's diagonal
    finite = (psi_sum + mean + np.trace(g_t)) if positive else math.nan
    return _symmetric(g_t), _symmetric(g_e), _symmetric(g_ee), w_dmu, psi_sum, mean, finite


@_jit
def _remainder_gram(w_p, d_p, w_q, m_x):
    """Z^T D_p^-1 Z with Z = X - W_q m_x formed row by row (a second pass over the factors): its
    rounding is then about 2^-52 ||Z|| ||X||, not 2^-52 ||X||^2 as from the blocks of G_t."""
    k, r = w_q.shape
    gram, w, rest, scaled = np.zeros((r, r)), np.zeros((r, _CHUNK)), np.zeros((r, _CHUNK)), np.zeros((r, _CHUNK))
    c = np.zeros(_CHUNK)
    for start in range(0, k, _CHUNK):
        rows = min(_CHUNK, k - start)
        for t in range(rows):  # (the last chunk's other columns stay 0)
            i = start + t
            c[t] = 1.0 / np.float64(d_p[i])
            for j in range(r):
                w[j, t] = np.float64(w_q[i, j])
                rest[j, t] = np.float64(w_p[i, j]) - w[j, t]
        if rows < _CHUNK:
            w[:, rows:], rest[:, rows:] = 0.0, 0.0
        for j in range(r):
            for a in range(r):
                for t in range(_CHUNK):
                    rest[j, t] -= m_x[a, j] * w[a, t]
            for t in range(_CHUNK):
                scaled[j, t] = rest[j, t] * c[t]
        _add_lower_products(gram, scaled, rest)
    return _symmetric(gram)


@_jit
def _one(loc_p, w_p, d_p, loc_q, w_q, d_q):
    """KL of one batch element by the split of kernels._lowrank_stable with D = D_p."""
    g_t, g_e, g_ee, w_dmu, psi_sum, mean, finite = _first_pass(loc_p, w_p, d_p, loc_q, w_q, d_q)
    if not math.isfinite(finite):
        return math.nan
    r = w_q.shape[1]
    eye = np.eye(r)
    g_q = g_t[:r, :] + g_e[:r, :]  # W_q^T D_q^-1 [W_q, X]
    c_q, b = _cholesky(eye + g_q[:, :r]), g_t[:r, :r]
    c_t = _cholesky(eye + b)
    ld_q, ld_t = _logdet(c_q), _logdet(c_t)
    # f(S_q^-1 T): parts that cancel to (1 - h_i)^2 of themselves where a coordinate of leverage h_i
    # changes its diagonal; where they cancel by more than _CANCELLATION, the array path decides
    parts = (psi_sum, _trace_minus_logdet(-_congruent(c_q, g_e[:r, :r]), ld_t - ld_q), np.trace(_congruent(c_q, g_ee)))
    f_diag = parts[0] + parts[1] - parts[2]
    if abs(parts[0]) + abs(parts[1]) + abs(parts[2]) > _CANCELLATION * f_diag:
        return math.nan
    # Y^T T^-1 Y by blocks (kernels._metric_gram): A = L (I + L^T), L = c_t; the part of X that T's
    # metric leaves, Z = X - W_q m_x, has Z^T D_p^-1 Z from the blocks of G_t (rounded to about
    # 2^-52 X^T D_p^-1 X) unless that is nearly all of X, where Z is formed
    upper, shift = eye + c_t.T, eye + c_t
    g_wx = g_t[:r, r:]
    m_x = _solve(upper, _solve(c_t, g_wx, True), False)  # A^-1 V'^T X'
    zv = _solve(upper, _solve(c_t, shift, True), False)
    xx = g_t[r:, r:] - _mm(m_x.T, g_wx) - _mm(g_wx.T, m_x) + _mm(m_x.T, _mm(b, m_x))
    if np.trace(g_t[r:, r:]) > _CANCELLATION * np.trace(xx):
        xx = _remainder_gram(w_p, d_p, w_q, m_x)
    vv, vx = _mm(zv.T, _mm(b, zv)), _mm(zv.T, _mm(shift, m_x))
    k_matrix = np.empty((2 * r, 2 * r))  # S Y^T T^-1 Y, S = [[0, I], [I, I]]
    k_matrix[:r, :r], k_matrix[:r, r:] = vx.T, xx
    k_matrix[r:, :r], k_matrix[r:, r:] = vv + vx.T, vx + xx
    g_p = g_t[:r, :r] + g_t[:r, r:] + g_t[r:, :r] + g_t[r:, r:]  # W_p^T D_p^-1 W_p
    f_factor = _trace_minus_logdet(k_matrix, _logdet(_cholesky(eye + g_p)) - ld_t)
    # the coupling, from the projections of Y that S_q^-1 and T^-1 remove
    alpha = _solve(c_q.T, _solve(c_q, g_q, True), False)
    beta = _solve(c_t.T, _solve(c_t, g_t[:r, :], True), False)
    projected = g_e - _mm(g_e[:, :r], alpha) - _mm(beta.T, g_e[:r, :]) + _mm(beta.T, _mm(g_e[:r, :r], alpha))
    coupling = 0.0
    for j in range(r):
        coupling += projected[r + j, j] + projected[j, r + j] + projected[r + j, r + j]
    inside = _solve(c_q, w_dmu.reshape(r, 1), True)
    mean -= np.sum(inside * inside)
    twice_kl = f_diag + f_factor + coupling + mean
    if not math.isfinite(twice_kl):  # (finite inputs give a finite KL in float64)
        return math.nan
    return 0.5 * max(twice_kl, 0.0)


@_jit
def _symmetric(lower):
    """The symmetric matrix whose lower triangle is given (in place)."""
    for a in range(lower.shape[0]):
        for j in range(a):
            lower[j, a] = lower[a, j]
    return lower


@_jit
def _mm(a, b):
    """a b for small matrices, by loops: numba's ``@`` calls OpenBLAS, which must not run inside
    the OpenMP threads of ``_rows``."""
    out = np.zeros((a.shape[0], b.shape[1]))
    for i in range(a.shape[0]):
        for m in range(a.shape[1]):
            a_im = a[i, m]
            for j in range(b.shape[1]):
                out[i, j] += a_im * b[m, j]
    return out


@_jit
def _cholesky(a):
    """The lower factor of a positive definite matrix (I + a Gram matrix here)."""
    n = a.shape[0]
    c = np.zeros((n, n))
    for j in range(n):
        s = a[j, j]
        for m in range(j):
            s -= c[j, m] * c[j, m]
        c[j, j] = math.sqrt(s)
        for i in range(j + 1, n):
            s = a[i, j]
            for m in range(j):
                s -= c[i, m] * c[j, m]
            c[i, j] = s / c[j, j]
    return c


@_jit
def _solve(c, b, lower):
    """c^-1 b for c triangular, lower or upper."""
    n, m = b.shape
    x = np.empty((n, m))
    for step in range(n):
        i = step if lower else n - 1 - step
        first, last = (0, i) if lower else (i + 1, n)
        for col in range(m):
            s = b[i, col]
            for j in range(first, last):
                s -= c[i, j] * x[j, col]
            x[i, col] = s / c[i, i]
    return x


@_jit
def _congruent(c, m):
    """c^-1 m c^-T for symmetric m."""
    return _solve(c, _solve(c, m, True).T, True)


@_jit
def _logdet(c):
    """ln det of c c^T."""
    s = 0.0
    for j in range(c.shape[0]):
        s += math.log(c[j, j])
    return 2.0 * s


@_jit
def _trace_minus_logdet(k_matrix, logdet):
    """tr(K) - ln det(I + K) for K with real eigenvalues, ``logdet`` = ln det(I + K) from
    factors: by its series where tr(K^4) < 1/16 (Paterson and Stockmeyer's scheme, as
    kernels._matrix_polynomial), else directly (g(K) > 0.02 there: no digits lost)."""
    n = k_matrix.shape[0]
    k2 = _mm(k_matrix, k_matrix)
    if np.sum(k2 * k2.T) >= 1.0 / 16.0:
        return np.trace(k_matrix) - logdet
    powers = [np.eye(n), k_matrix.copy(), k2]
    for _ in range(_SERIES_BLOCK - 2):
        powers.append(_mm(powers[-1], k_matrix))
    step = powers[_SERIES_BLOCK]
    blocks = -(-len(_SERIES) // _SERIES_BLOCK)
    acc = np.zeros((n, n))
    for i in range(blocks - 1, -1, -1):
        part = np.zeros((n, n))
        for j in range(_SERIES_BLOCK):
            if i * _SERIES_BLOCK + j < len(_SERIES):
                part += _SERIES[i * _SERIES_BLOCK + j] * powers[j]
        acc = part + _mm(step, acc)
    return np.sum(k2 * acc.T)


@numba.njit(parallel=True, error_model="numpy", cache=True)
def _rows(loc_p, w_p, d_p, loc_q, w_q, d_q, out):
    """The KL of each row n (loc (n, k), factors (n, k, r), diagonals (n, k)) into out[n], the rows
    shared among numba's threads (its OpenMP layer shares Torch's pool: no threads left spinning
    against each other)."""
    for n in numba.prange(out.shape[0]):
        out[n] = _one(loc_p[n], w_p[n], d_p[n], loc_q[n], w_q[n], d_q[n])
