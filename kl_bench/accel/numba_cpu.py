"""Fused CPU kernels (numba) for the VAE and diagonal families in float32 and half precision:
one pass over memory where the array path makes one per operation (docs/design.md, "Accelerated
kernels"). The low-rank family's kernel is ``numba_lowrank.py``, reached through ``kl`` here.

Each element is computed in float64, where the form of e^x - 1 - x below is accurate to 1e-11
relative, so the float32 result is rounded once from a value far more accurate than float32: the
careful forms that ``kernels.py`` needs in the input precision are not needed here. Sums run in
float64. e^x is an inlined polynomial that LLVM vectorises; libm's would be one call per element.

For finite float32 inputs every float64 row sum is finite (e^x is clamped to |x| <= 300, far
beyond float32's range for the result), so a row whose sum is not finite held a NaN or an
infinity: such rows are recomputed by the array path, and special values behave exactly as there.

Takes NumPy arrays and Torch CPU tensors (with a backward pass for autograd); chosen by
``kl_bench.accel``.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from .. import backends, kernels
from .torch_autograd import autograd_function, gradients_from_derivatives

DTYPE = "float32"  # the compute dtype; half precision arrives as float32
_PARALLEL_MIN = 1 << 15  # elements below which one thread beats starting the pool


def takes(be, arrays, named=False) -> bool:
    if be.name == "torch":
        return all(a.device.type == "cpu" for a in arrays) and be.dtype_name(arrays[0].dtype) == DTYPE
    return be.name == "numpy" and arrays[0].dtype == np.float32


def kl(be, family, arrays, check):
    """(KL, {}): the KL of ``family`` as float64 of the framework of ``arrays`` (rounded once by
    the caller; these families have no invalid values); Torch tensors that need a gradient get it
    from ``gradients``. The low-rank family: ``numba_lowrank.kl``."""
    if family == "lowrank":
        from . import numba_lowrank

        return numba_lowrank.kl(be, arrays, check)
    if be.name == "torch" and be.torch.is_grad_enabled() and any(a.requires_grad for a in arrays):
        return _function().apply(family, *arrays), {}
    return _values(be, family, arrays), {}


def _values(be, family, arrays):
    host = arrays if be.name == "numpy" else [a.detach().numpy() for a in arrays]
    shape = backends.common_shape(a.shape for a in host)
    host = [a if a.shape == shape else np.broadcast_to(a, shape) for a in host]  # read-only views
    if 0 in shape:
        out = np.zeros(shape[:-1])
    else:
        rows = host if len(shape) == 2 else [a.reshape(-1, shape[-1]) for a in host]
        out = np.empty(rows[0].shape[0])
        kernel = _kernels()[family, rows[0].size >= _PARALLEL_MIN]
        if not math.isfinite(kernel(*rows, out)):  # NaN or infinity in some rows: the array path decides
            special = ~np.isfinite(out)
            array_path = kernels.compiled(backends.get("numpy"), family, "stable", False)
            out[special] = array_path(*(r[special] for r in rows))[0]
        if len(shape) != 2:
            out = out.reshape(shape[:-1])
    return out if be.name == "numpy" else be.torch.from_numpy(out)


@functools.cache
def _function():
    return autograd_function(lambda family, arrays: _values(backends.get("torch"), family, arrays), gradients_from_derivatives)


# e^x = 2^n e^r with n = round(x / ln 2), |r| <= ln(2) / 2, and e^r = 1 + r + r^2 q(r), where
# q(r) = sum r^(k-2) / k!, k = 2..10 (the first neglected term is 2e-13 of e^r). Then
#   e^x - 1 - x = (2^n - 1) + (2^n r - x) + 2^n r^2 q(r),
# which for n = 0 is exactly r^2 q(r), free of cancellation near 0 (r = x), and for |x| > ln(2)/2
# cancels by at most a factor of 40: 1e-14 relative in float64, far below float32's 6e-8.
_Q_COEFFS = tuple(1.0 / math.factorial(k) for k in range(2, 11))
_LOG2E = 1.0 / math.log(2.0)
_LN2_HI = 0.6931471803691238  # ln 2 with its last 32 bits zero: n * _LN2_HI is exact
_LN2_LO = 1.9082149292705877e-10
_CLAMP = 300.0  # e^300 is finite in float64, and far beyond float32 in every use below
# The row sums may be reassociated (that is what lets LLVM vectorise them); the elementwise
# functions may only fuse multiply-adds, which the forms above tolerate.
_SUM_FASTMATH = {"reassoc", "contract", "nsz"}
_ELEMENT_FASTMATH = {"contract"}


@functools.cache
def float_from_bits():
    """A numba intrinsic: the float64 whose bits are the given int64 (2^n as (n + 1023) << 52)."""
    from llvmlite import ir
    from numba.core import types
    from numba.extending import intrinsic

    @intrinsic
    def from_bits(typingctx, bits):
        return types.float64(types.int64), lambda context, builder, sig, args: builder.bitcast(args[0], ir.DoubleType())

    return from_bits


@functools.cache
def _elements():
    """The jitted element functions (prefer_wide_vectors, exp, half_phi), made on first use."""
    import numba
    from numba.core import types
    from numba.extending import intrinsic

    _float_from_bits = float_from_bits()

    def _widen(context, builder, sig, args):
        # LLVM tunes recent Intel CPUs to 256-bit vectors by default; this compute-bound loop runs
        # much faster on 512. Set on the enclosing loop's function only (harmless without AVX-512).
        set.add(builder.function.attributes, '"prefer-vector-width"="512"')
        return context.get_dummy_value()

    @intrinsic
    def _prefer_wide_vectors(typingctx):
        return types.none(), _widen

    element = numba.njit(fastmath=_ELEMENT_FASTMATH)

    @element
    def _reduce(x):
        """(2^n, r, r^2 q(r)) for x clamped to |x| <= _CLAMP."""
        x = min(max(x, -_CLAMP), _CLAMP)
        n = math.floor(x * _LOG2E + 0.5)
        r = (x - n * _LN2_HI) - n * _LN2_LO
        q = 0.0
        for c in _Q_COEFFS[::-1]:
            q = q * r + c
        return _float_from_bits((n + 1023) << 52), r, r * r * q

    @element
    def _exp(x):
        two_n, r, tail = _reduce(x)
        return two_n * ((1.0 + r) + tail)

    @element
    def _half_phi(x):
        two_n, r, tail = _reduce(x)  # x beyond the clamp: e^x is huge either way, or negligible
        return 0.5 * ((two_n - 1.0) + (two_n * r - x) + two_n * tail)

    return _prefer_wide_vectors, _exp, _half_phi


@functools.cache
def _kernels():
    """Compile on first use: {(family, parallel): kernel(*rows, out) -> sum of out}."""
    import numba

    _prefer_wide_vectors, _exp, _half_phi = _elements()

    def vae_rows(loc, logvar, out):
        grand = 0.0  # finite exactly when every input is (see the module's docstring)
        for i in numba.prange(loc.shape[0]):
            _prefer_wide_vectors()
            total = 0.0
            for j in range(loc.shape[1]):
                m = np.float64(loc[i, j])
                total += _half_phi(np.float64(logvar[i, j])) + 0.5 * m * m
            out[i] = total
            grand += total
        return grand

    def diag_rows(loc_p, logvar_p, loc_q, logvar_q, out):
        grand = 0.0
        for i in numba.prange(loc_p.shape[0]):
            _prefer_wide_vectors()
            total = 0.0
            for j in range(loc_p.shape[1]):
                dmu = np.float64(loc_p[i, j]) - np.float64(loc_q[i, j])  # exact in float64
                lq = np.float64(logvar_q[i, j])
                total += _half_phi(np.float64(logvar_p[i, j]) - lq) + 0.5 * dmu * dmu * _exp(-lq)
            out[i] = total
            grand += total
        return grand

    return {
        (family, parallel): numba.njit(parallel=parallel, fastmath=_SUM_FASTMATH, cache=True)(rows)
        for family, rows in (("vae", vae_rows), ("diag", diag_rows))
        for parallel in (False, True)
    }
