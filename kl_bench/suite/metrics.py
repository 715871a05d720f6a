"""Errors of computed values against mpmath references, read in the output dtype.

- ulps: |computed - exact| in units in the last place of the exact value in that dtype (the ulp of
  the binade the exact value lies in, never smaller than the subnormal spacing).
- relative error: |computed - exact| / |exact|.
- bits of error: log2(1 + ulps), as Herbie and FPBench report it (0 for a correctly rounded
  result, 53 for a float64 result with no correct digit).
A reference of exactly 0 demands exactly 0; a reference beyond the dtype's largest finite value
demands +inf; otherwise inf, NaN or the wrong sign count as infinitely many ulps.
"""

from __future__ import annotations

import math

import mpmath
import numpy as np

# precision p (bits, with the hidden one), smallest normal exponent, largest finite value
FORMATS = {
    "float64": (53, -1022, float(np.finfo(np.float64).max)),
    "float32": (24, -126, float(np.finfo(np.float32).max)),
    "float16": (11, -14, 65504.0),
    "bfloat16": (8, -126, 3.3895313892515355e38),
}


def ulp(exact, dtype: str) -> mpmath.mpf:
    """The spacing of ``dtype`` values around the exact (mpmath) value."""
    p, emin, _ = FORMATS[dtype]
    # frexp: exact = m 2^e with 1/2 <= |m| < 1, so the binade's exponent is e - 1
    exponent = emin if exact == 0 else max(mpmath.frexp(exact)[1] - 1, emin)
    return mpmath.ldexp(1, exponent - (p - 1))


def overflows(exact, dtype: str) -> bool:
    """Does the exact value round to infinity in ``dtype`` (round to nearest)?"""
    _, _, largest = FORMATS[dtype]
    return abs(exact) >= mpmath.mpf(largest) + ulp(mpmath.mpf(largest), dtype) / 2


def ulps(computed: float, exact, dtype: str) -> float:
    if math.isnan(computed):
        return math.inf
    if exact == 0:
        return 0.0 if computed == 0 else math.inf
    if overflows(exact, dtype):
        return 0.0 if computed == math.copysign(math.inf, exact) else math.inf
    if math.isinf(computed):
        return math.inf
    return float(abs(mpmath.mpf(computed) - exact) / ulp(exact, dtype))


def relative_error(computed: float, exact) -> float:
    if exact == 0:
        return 0.0 if computed == 0 else math.inf
    if math.isnan(computed) or math.isinf(computed):
        return math.inf
    return float(abs(mpmath.mpf(computed) - exact) / abs(exact))


def bits_of_error(ulps_value: float) -> float:
    return math.log2(1.0 + ulps_value)


def case_errors(computed: np.ndarray, exact: np.ndarray, dtype: str) -> dict[str, np.ndarray]:
    """Per-element errors of float64 ``computed`` (exact copies of dtype values) against an object
    array of mpmath references of the same shape."""
    computed = np.asarray(computed, dtype=np.float64).ravel()
    exact = np.asarray(exact, dtype=object).ravel()
    u = np.array([ulps(float(c), e, dtype) for c, e in zip(computed, exact)])
    return {
        "ulps": u,
        "rel_err": np.array([relative_error(float(c), e) for c, e in zip(computed, exact)]),
        "bits": np.array([bits_of_error(v) for v in u]),
        "negative": computed < 0,
        "nan": np.isnan(computed),
        "inf": np.array([math.isinf(c) and not overflows(e, dtype) for c, e in zip(computed, exact)], dtype=bool),
    }
