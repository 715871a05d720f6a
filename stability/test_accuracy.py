"""Every backend x device x dtype x family x regime against the mpmath references.

The bounds (kl_bench.bounds) are asserted for method="stable"; method="naive" is measured by
`kl-bench run` and only required to agree with stable on well-conditioned generic inputs.
"""

import numpy as np
import pytest

from kl_bench.backends import FLOAT_DTYPES
from kl_bench.families import NAMES as FAMILIES
from kl_bench.suite import accuracy, cases

from .conftest import case_set

CASES = [
    pytest.param(family, dtype, regime, param, id=f"{family}-{dtype}-{regime}" + ("" if param is None else f"@{param:g}"))
    for family in FAMILIES
    for dtype in FLOAT_DTYPES
    for regime, param in cases.regimes(family, dtype)
]


def _describe(case, err, i):
    inputs = ", ".join(np.array2string(a[i], precision=17, threshold=20) for a in case.arrays)
    return f"{case.name} case {i}: computed {err['computed'][i]!r}, {err['ulps'][i]:.3g} ulps; inputs {inputs}"


@pytest.mark.parametrize("family,dtype,regime,param", CASES)
def test_stable_kernel_within_bound(kl_target, kl_dtype_skip, family, dtype, regime, param):
    kl_dtype_skip(kl_target, dtype, family)
    case = case_set(family, regime, dtype, param)
    err = accuracy.errors(kl_target, case)
    limit = accuracy.case_bounds(case)
    assert not err["nan"].any(), _describe(case, err, int(np.argmax(err["nan"])))
    assert not err["negative"].any(), _describe(case, err, int(np.argmax(err["negative"])))
    excess = np.where(np.isnan(limit), -np.inf, err["ulps"] - limit)
    worst = int(np.argmax(excess))
    assert excess[worst] <= 0, f"bound {limit[worst]:.3g} ulps exceeded: " + _describe(case, err, worst)


@pytest.mark.parametrize("family", FAMILIES)
def test_naive_agrees_with_stable_on_generic_inputs(kl_target, family):
    case = case_set(family, "generic", "float64", None)
    stable = kl_target.run(family, case.arrays, "float64")
    naive_subject = type(kl_target)(kl_target.backend, kl_target.device, "naive")
    naive = naive_subject.run(family, case.arrays, "float64")
    np.testing.assert_allclose(naive, stable, rtol=1e-6)


def test_cov_where_p_is_much_narrower_than_q(kl_target):
    """1 + lambda_min of S_q^-1 S_p down to 1e-4, where a pivot of I + M would carry M's absolute
    error magnified 1e4 times (the log-determinant route). Here S_p itself is ill-conditioned, and the KL is as
    sensitive to S_p (dKL/dS_p = (S_q^-1 - S_p^-1)/2) as to S_q: no backward-stable method beats
    about cond(S_p) ulp, so cond(S_p) is added to the bound 16 + cond(S_q)."""
    rng = np.random.default_rng(42)
    n, k = 64, 6
    s_p = cases.random_spd(rng, 10.0 ** -rng.uniform(0, 4, size=(n, k)))
    s_q = cases.random_spd(rng, np.tile(np.logspace(0, -np.log10(2.0), k), (n, 1)))
    arrays = (rng.normal(size=(n, k)), s_p, rng.normal(size=(n, k)), s_q)
    case = cases.CaseSet("cov", "p-narrow", None, "float64", k, 42, arrays, np.linalg.cond(s_q))
    err = accuracy.errors(kl_target, case)
    limit = accuracy.case_bounds(case) + np.linalg.cond(s_p)
    worst = int(np.argmax(err["ulps"] - limit))
    assert err["ulps"][worst] <= limit[worst], _describe(case, err, worst)
