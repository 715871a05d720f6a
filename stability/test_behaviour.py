"""What every backend must do besides being accurate: NaN propagation, empty batches, dtype and
device preservation, broadcasting, compiled and differentiated use; and the suite must catch a
misprinted formula."""

import numpy as np
import pytest

import kl_bench
from kl_bench import accel, families, kl
from kl_bench.backends import FLOAT_DTYPES
from kl_bench.suite import accuracy, bounds, cases, metrics, reference
from kl_bench.suite.subjects import Subject

from .conftest import case_set

FAMILIES = kl.FAMILIES


def _call(subject, family, arrays, dtype="float64", **kwargs):
    """``kl_bench.kl_<family>`` called directly, with the subject's kernel where it names one."""
    args = [subject.asarray(np.asarray(a), dtype) for a in arrays]
    kernel = subject.mode if subject.mode in accel.CHOICES else "auto"
    with accel.use(kernel):
        return getattr(kl_bench, f"kl_{family}")(*args, method=subject.method, **kwargs)


@pytest.mark.parametrize("family", FAMILIES)
def test_nan_in_one_element_gives_nan_there_only(kl_subject, family):
    case = case_set(family, "generic", "float64", None)
    clean = kl_subject.run(family, case.arrays, "float64")
    for position in range(len(case.arrays)):
        arrays = [a.copy() for a in case.arrays]
        a = arrays[position]
        a[(1,) + (0,) * (a.ndim - 1)] = np.nan  # batch element 1 of one argument (a diagonal entry)
        result = kl_subject.be.to_numpy(_call(kl_subject, family, arrays))
        assert np.isnan(result[1])
        others = np.arange(case.n) != 1
        np.testing.assert_array_equal(result[others], clean[others])


@pytest.mark.parametrize("family", FAMILIES)
def test_empty_batch_gives_empty_result(kl_subject, family):
    k = 3
    arrays = [np.ones((0,) + (k,) * core_ndim) for core_ndim in families.get(family).core_ndims]
    result = _call(kl_subject, family, arrays)
    assert tuple(result.shape) == (0,)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_result_keeps_framework_device_and_dtype(kl_subject, kl_dtype_skip, family, dtype):
    kl_dtype_skip(kl_subject, dtype)
    case = case_set(family, "generic", dtype, None)
    inputs = [kl_subject.asarray(a, dtype) for a in case.arrays]
    result = getattr(kl_bench, f"kl_{family}")(*inputs, method=kl_subject.method)
    be = kl_subject.be
    assert be.owns(result)
    assert be.dtype_name(result.dtype) == dtype
    assert be.device_kind(result) == kl_subject.device
    assert tuple(result.shape) == (case.n,)


def test_broadcasting_follows_numpy(kl_target):
    s = kl_target
    loc = s.asarray(np.linspace(-1, 1, 3)[:, None], "float64")  # (3, 1)
    scale = s.asarray(np.linspace(0.5, 2, 4), "float64")  # (4,)
    out = kl_bench.kl_normal(loc, scale, 0.0, 1.0)
    assert tuple(out.shape) == (3, 4)
    expected = kl_bench.kl_normal(np.linspace(-1, 1, 3)[:, None], np.linspace(0.5, 2, 4), 0.0, 1.0)
    np.testing.assert_allclose(s.be.to_numpy(out), expected, rtol=1e-15)
    # diag: q given once for a batch of p
    loc_p = s.asarray(np.ones((5, 2, 3)), "float64")
    out = kl_bench.kl_diag(loc_p, loc_p, s.asarray(np.zeros(3), "float64"), 0.0)
    assert tuple(out.shape) == (5, 2)
    # tril: one q for a batch of p, loc broadcast along the batch
    eye = np.eye(3)
    out = kl_bench.kl_tril(s.asarray(np.zeros(3), "float64"), s.asarray(np.stack([eye, 2 * eye]), "float64"),
                           s.asarray(np.zeros(3), "float64"), s.asarray(eye, "float64"))
    assert tuple(out.shape) == (2,)
    np.testing.assert_allclose(s.be.to_numpy(out), [0.0, 1.5 * (4 - 1 - np.log(4))], rtol=1e-14)


@pytest.mark.parametrize("family", FAMILIES)
def test_jax_jit_matches_eager(family):
    jax = pytest.importorskip("jax")
    subject = Subject("jax")
    case = case_set(family, "near-equal", "float64", 1e-6)
    fn = getattr(kl_bench, f"kl_{family}")
    with subject.be.computing("float64"):
        inputs = [subject.asarray(a, "float64") for a in case.arrays]
        assert inputs[0].dtype == "float64"
        np.testing.assert_array_equal(np.asarray(jax.jit(fn)(*inputs)), np.asarray(fn(*inputs)))


def test_suite_catches_the_misprinted_seed_formula(monkeypatch):
    """Seed 001's formula (5) as printed: +k, and the 1/2 on the log-determinant term only.
    Put in place of the kernel, the same evaluation that guards the stable kernels flags it."""
    from kl_bench import kernels

    def misprinted(be, loc_p, cov_p, loc_q, cov_q, *, method, check):
        xp = be.xp
        k = cov_p.shape[-1]
        inv_q = xp.linalg.inv(cov_q)
        dmu = (loc_q - loc_p)[..., None]
        quad = xp.sum(dmu[..., 0] * (inv_q @ dmu)[..., 0], axis=-1)
        trace = xp.sum(inv_q * xp.matrix_transpose(cov_p), axis=(-2, -1))
        logdet = xp.linalg.slogdet(cov_q)[1] - xp.linalg.slogdet(cov_p)[1]
        return 0.5 * logdet + k + trace + quad, {}

    monkeypatch.setitem(kernels.KERNELS, "cov", misprinted)
    kernels.compiled.cache_clear()
    try:
        case = cases.generate("cov", "near-equal", "float64", 1e-3)
        subject = Subject("numpy")
        err = accuracy.errors(subject, case)
        row = accuracy.summarise(subject, case, err)
    finally:
        kernels.compiled.cache_clear()
    assert row["ok"] is False
    assert row["max_ulps"] > 1e10


# Inputs whose intermediate values leave the float64 range although the KL does not.
EXTREME_INPUTS = [
    ("normal", [1e308, 1e300, -1e308, 1e300]),  # loc_p - loc_q overflows; the KL is 2e16
    ("diag", [[5e-324], [-1488.0], [0.0], [-1488.0]]),  # e^(-logvar_q) overflows; the KL is 0.207
    ("diag", [[1e300], [1488.0], [0.0], [1488.0]]),  # e^(-logvar_q) underflows
]


@pytest.mark.parametrize("family, args", EXTREME_INPUTS)
def test_intermediate_overflow_does_not_reach_the_result(kl_target, kl_dtype_skip, family, args):
    kl_dtype_skip(kl_target, "float64", family)
    arrays = [np.asarray(a, dtype=np.float64) for a in args]
    subnormal = any(((a != 0) & (np.abs(a) < np.finfo(np.float64).smallest_normal)).any() for a in arrays)
    if subnormal and kl_target.backend == "jax":
        pytest.skip("XLA reads subnormal inputs as zero (denormals-are-zero)")
    computed = float(np.ravel(kl_target.run(family, arrays, "float64"))[0])
    exact = reference.evaluate(family, *arrays)
    assert metrics.ulps(computed, exact, "float64") <= bounds.ulp_bound(family, "float64", 1), (computed, exact)


@pytest.mark.parametrize("logvar, expected", [(np.inf, np.inf), (-np.inf, np.inf)])
def test_infinite_log_variances_give_the_limit(kl_target, logvar, expected):
    """phi(+-inf) = +inf: a variance of 0 or infinity makes the KL infinite; inf - inf is NaN."""
    vae = kl_target.be.to_numpy(_call(kl_target, "vae", [np.zeros(2), np.array([0.0, logvar])]))
    assert vae == expected
    diag = [np.zeros(1), np.array([logvar]), np.zeros(1), np.zeros(1)]
    assert kl_target.be.to_numpy(_call(kl_target, "diag", diag)) == expected
    assert kl_target.be.to_numpy(_call(kl_target, "diag", diag[2:] + diag[:2])) == np.inf  # logvar_q infinite
    both = [np.zeros(1), np.array([logvar]), np.zeros(1), np.array([logvar])]
    assert np.isnan(kl_target.be.to_numpy(_call(kl_target, "diag", both)))


def test_a_factor_with_a_zero_on_its_diagonal_spoils_only_its_own_row(kl_subject):
    """validate=False: the other rows are computed, that row is NaN (no LinAlgError for the batch)."""
    tril_q = np.stack([np.eye(3), np.diag([1.0, 0.0, 1.0]), 2 * np.eye(3)])
    out = kl_subject.be.to_numpy(_call(kl_subject, "tril", [np.zeros(3), np.eye(3), np.zeros(3), tril_q], validate=False))
    assert out[0] == 0 and np.isnan(out[1]) and abs(out[2] - (3 / 8 + 3 * np.log(2) - 1.5)) < 1e-12
