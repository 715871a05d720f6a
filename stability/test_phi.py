"""The building blocks phi(x) = e^x - 1 - x and psi(x) = x - log1p(x), alone, against mpmath."""

import mpmath
import numpy as np
import pytest

import kl_bench
from kl_bench import accel, kernels
from kl_bench.backends import FLOAT_DTYPES
from kl_bench.suite import metrics
from kl_bench.suite.cases import round_to
from kl_bench.suite.subjects import FUSED

# From 1e-30 to the overflow threshold, both signs, densely around the series switches and where
# e^x overflows float32 and float64 but e^x / 2 does not.
MAGNITUDES = np.concatenate([
    np.logspace(-30, np.log10(700), 400), np.linspace(0.3, 3.0, 400),
    np.linspace(88.0, 89.5, 40), np.linspace(709.0, 710.6, 40),
])
PHI_BOUND_ULPS = 2.0
# float32 exp and expm1 of NumPy and XLA are off by up to 2.4 and 3.8 ulp for x in [60, 88.7]
# (measured against mpmath); half_phi inherits that where e^x dominates.
PHI_BOUND_ULPS_LARGE_FLOAT32 = 4.0
# psi's series has the rounding of s = x / (2 + x) in its leading term; below -1/2 (only kl_cov
# goes there) x - log1p(x) magnifies the error of log1p up to 3.6 times.
PSI_BOUND_ULPS = 2.5
PSI_BOUND_ULPS_BELOW_HALF = 6.0


def _inputs(dtype, lower=-np.inf):
    x = np.concatenate([MAGNITUDES, -MAGNITUDES, [0.0]])
    x = round_to(x, dtype)
    # Results below the smallest normal number are left out: XLA and some CPUs flush them to 0.
    tiny = float(np.finfo(np.float32 if dtype != "float64" else np.float64).tiny)
    return x[(x > lower) & np.isfinite(x) & ((x == 0) | (np.abs(x) > 4 * np.sqrt(tiny)))]


def _fused_half_phi(mode):
    """A fused kernel's own phi/2, reached as the VAE term of one coordinate with a zero mean."""
    def half_phi(be, x):
        with accel.use(mode):
            return kl_bench.kl_vae(be.xp.zeros_like(x)[..., None], x[..., None])
    return half_phi


def _evaluate(kl_target, fn, x, dtype):
    compute = "float32" if dtype in ("float16", "bfloat16") else dtype
    be = kl_target.be
    if kl_target.mode in FUSED:
        fn = _fused_half_phi(kl_target.mode)
    out = be.to_numpy(fn(be, kl_target.asarray(x, compute)))
    return round_to(out, dtype)  # half precision: computed in float32 and rounded once


def _check(kl_target, fn, exact_fn, x, dtype, bound, looser=None):
    computed = _evaluate(kl_target, fn, x, dtype)
    with mpmath.workprec(200):
        exact = [exact_fn(mpmath.mpf(float(v))) for v in x]
    errors = np.array([metrics.ulps(float(c), e, dtype) for c, e in zip(computed, exact)])
    limit = np.full(len(x), 1.0 if dtype in ("float16", "bfloat16") else bound)
    if looser is not None and dtype not in ("float16", "bfloat16"):
        region, value = looser
        limit[region(x)] = np.maximum(limit[region(x)], value)
    worst = int(np.argmax(errors - limit))
    assert errors[worst] <= limit[worst], f"x={x[worst]!r}: {computed[worst]!r} is {errors[worst]:.3g} ulps off"


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_half_phi_against_mpmath(kl_target, kl_dtype_skip, dtype):
    """The array path's half_phi, or a fused kernel's own."""
    kl_dtype_skip(kl_target, "float32" if dtype == "bfloat16" else dtype)
    x = _inputs(dtype)
    large = (lambda v: v > 60.0) if dtype == "float32" else None
    _check(kl_target, kernels.half_phi, lambda v: (mpmath.expm1(v) - v) / 2, x, dtype, PHI_BOUND_ULPS,
           looser=large and (large, PHI_BOUND_ULPS_LARGE_FLOAT32))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_psi_against_mpmath(kl_target, kl_dtype_skip, dtype):
    if kl_target.mode in FUSED:
        pytest.skip("a fused kernel's psi is reached only inside kl_normal, tested whole in test_accuracy.py")
    kl_dtype_skip(kl_target, "float32" if dtype == "bfloat16" else dtype)
    x = _inputs(dtype, lower=-1.0)
    _check(kl_target, kernels.psi, lambda v: v - mpmath.log1p(v), x, dtype, PSI_BOUND_ULPS,
           looser=(lambda v: v <= -0.5, PSI_BOUND_ULPS_BELOW_HALF))
