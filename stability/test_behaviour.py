"""What every backend must do besides being accurate: NaN propagation, empty batches, dtype and
device preservation, broadcasting, compiled and differentiated use; and the suite must catch a
misprinted formula."""

import numpy as np
import pytest

import kl_bench
from kl_bench import families, kl
from kl_bench.backends import FLOAT_DTYPES
from kl_bench.suite import accuracy, cases
from kl_bench.suite.subjects import Subject

from .conftest import case_set

FAMILIES = kl.FAMILIES


def _call(subject, family, arrays, dtype="float64", **kwargs):
    args = [subject.asarray(np.asarray(a), dtype) for a in arrays]
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
