import math

import mpmath
import numpy as np
import pytest

from kl_bench.suite import bounds, cases, metrics


def test_case_sets_are_reproducible_from_their_name():
    a = cases.generate("tril", "near-equal", "float32", 1e-3, seed=7)
    b = cases.generate("tril", "near-equal", "float32", 1e-3, seed=7)
    c = cases.generate("tril", "near-equal", "float32", 1e-3, seed=8)
    assert a.name == "tril/near-equal@0.001/float32/k6/seed7"
    for x, y, z in zip(a.arrays, b.arrays, c.arrays):
        np.testing.assert_array_equal(x, y)
        assert not np.array_equal(x, z)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_case_values_are_representable_in_their_dtype(dtype):
    for case in cases.quick("diag", dtype):
        for a in case.arrays:
            np.testing.assert_array_equal(cases.round_to(a, dtype), a)


def test_bfloat16_rounding_matches_torch():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).normal(size=1000) * 10.0 ** np.random.default_rng(1).uniform(-30, 30, 1000)
    expected = torch.tensor(x.astype(np.float32)).to(torch.bfloat16).double().numpy()
    np.testing.assert_array_equal(cases.round_to(x.astype(np.float32), "bfloat16"), expected)


def test_unknown_family_or_regime():
    with pytest.raises(ValueError, match="unknown family"):
        cases.generate("gamma", "generic")
    with pytest.raises(ValueError, match="no regime"):
        cases.generate("normal", "collapse")


def test_ulps():
    one = mpmath.mpf(1)
    assert metrics.ulps(1.0, one, "float64") == 0
    assert metrics.ulps(1.0 + 2**-52, one, "float64") == 1
    assert metrics.ulps(1.0 - 2**-53, one, "float64") == 0.5
    assert metrics.ulps(float(np.float32(1) + np.float32(2**-23)), one, "float32") == 1
    assert metrics.ulps(0.0, mpmath.mpf(0), "float32") == 0
    assert metrics.ulps(1e-300, mpmath.mpf(0), "float64") == math.inf
    assert metrics.ulps(math.inf, mpmath.mpf(70000), "float16") == 0  # beyond float16's largest value
    assert metrics.ulps(65504.0, mpmath.mpf(70000), "float16") == math.inf
    assert metrics.ulps(math.nan, one, "float64") == math.inf
    assert metrics.bits_of_error(0) == 0 and metrics.bits_of_error(1) == 1


def test_bounds_follow_the_core_issue():
    assert bounds.ulp_bound("normal", "float64", 1) == 4
    assert bounds.ulp_bound("vae", "float32", 1024) == 14
    assert bounds.ulp_bound("tril", "float64", 6, cond=1e4) == 16
    assert bounds.ulp_bound("tril", "float64", 6, cond=1e8) is None
    assert bounds.ulp_bound("cov", "float64", 6, cond=100.0) == 116
    assert bounds.ulp_bound("cov", "bfloat16", 6, cond=100.0) == 1
