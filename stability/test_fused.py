"""The fused numba kernels (kl_bench.fused) over their whole input range: against mpmath, and
as the array path wherever the inputs are special (NaN, infinities, overflow)."""

import mpmath
import numpy as np
import pytest

import kl_bench
from kl_bench import accel, families
from kl_bench.suite import cases, gradients, metrics
from kl_bench.suite.cases import round_to
from kl_bench.suite.subjects import Subject

pytestmark = pytest.mark.skipif(not accel.REGISTRY["numba"].available(), reason="numba is not installed")

# logvar from 1e-30 to beyond the float32 overflow of e^x / 2, both signs, dense where the
# forms of e^x - 1 - x change (|x| = ln(2) / 2) and where the result overflows.
MAGNITUDES = np.concatenate([np.logspace(-30, np.log10(3e38), 300), np.linspace(0.2, 3.0, 300), np.linspace(88.0, 89.5, 60)])
LOGVARS = round_to(np.concatenate([MAGNITUDES, -MAGNITUDES, [0.0]]), "float32")


def _ulps(computed, exact_values):
    return np.array([metrics.ulps(float(c), e, "float32") for c, e in zip(computed, exact_values)])


def _half_phi(x):
    return (mpmath.expm1(x) - x) / 2


def test_vae_within_an_ulp_everywhere():
    rng = np.random.default_rng(1)
    loc = round_to(rng.choice([0.0, 1e-20, 0.3, 7.0, 1e18], size=LOGVARS.size), "float32")
    with mpmath.workprec(300):
        exact = [_half_phi(mpmath.mpf(float(x))) + mpmath.mpf(float(m)) ** 2 / 2 for m, x in zip(loc, LOGVARS)]
    with accel.use("numba"):
        computed = kl_bench.kl_vae(loc[:, None].astype(np.float32), LOGVARS[:, None].astype(np.float32))
    assert computed.dtype == np.float32
    errors = _ulps(computed, exact)
    worst = int(np.argmax(errors))
    assert errors[worst] <= 1.0, f"logvar {LOGVARS[worst]!r}, loc {loc[worst]!r}: {errors[worst]:.3g} ulps"


def test_diag_within_an_ulp_on_extreme_inputs():
    rng = np.random.default_rng(2)
    n, k = 200, 3
    lq = round_to(rng.choice([-1.0, 1.0], size=(n, k)) * 10.0 ** rng.uniform(-8, 1.9, size=(n, k)), "float32")
    lp = round_to(lq + rng.choice([-1.0, 1.0], size=(n, k)) * 10.0 ** rng.uniform(-9, 1.5, size=(n, k)), "float32")
    mq = round_to(rng.normal(size=(n, k)), "float32")
    mp = round_to(mq + 10.0 ** rng.uniform(-9, 2, size=(n, k)), "float32")
    with mpmath.workprec(300):
        exact = []
        for row in range(n):
            total = mpmath.mpf(0)
            for a, b, c, d in zip(mp[row], lp[row], mq[row], lq[row]):
                a, b, c, d = (mpmath.mpf(float(v)) for v in (a, b, c, d))
                total += _half_phi(b - d) + (a - c) ** 2 * mpmath.exp(-d) / 2
            exact.append(total)
    with accel.use("numba"):
        computed = kl_bench.kl_diag(*(a.astype(np.float32) for a in (mp, lp, mq, lq)))
    errors = _ulps(computed, exact)
    assert errors.max() <= 1.0, f"row {int(np.argmax(errors))}: {errors.max():.3g} ulps"


@pytest.mark.parametrize("family", families.with_kernel("numba"))
def test_special_values_as_on_the_array_path(family):
    special = np.array([np.nan, np.inf, -np.inf, 1e38, -1e38, 89.4, 0.0], dtype=np.float32)
    grid = np.stack(np.meshgrid(*[special] * (2 if family == "vae" else 4), indexing="ij"), axis=-1).reshape(-1, 1, 2 if family == "vae" else 4)
    args = [np.ascontiguousarray(grid[..., i]) for i in range(grid.shape[-1])]
    fn = getattr(kl_bench, f"kl_{family}")
    with accel.use("numba"):
        fast = fn(*args, validate=False)
    with accel.use("array"):
        plain = fn(*args, validate=False)
    np.testing.assert_array_equal(np.isnan(fast), np.isnan(plain))
    np.testing.assert_allclose(fast, plain, rtol=1e-6)  # the array path rounds more than once


def test_broadcast_and_strided_inputs_as_on_the_array_path():
    rng = np.random.default_rng(3)
    loc = rng.normal(size=(5, 8)).astype(np.float32)
    logvar = rng.normal(size=(8, 5)).astype(np.float32).T  # not contiguous
    for args in [(loc, logvar, 0.0, 0.0), (loc[:, ::2], logvar[:, ::2], loc[0, ::2], np.float32(0.5))]:
        with accel.use("numba"):
            fast = kl_bench.kl_diag(*args)
        with accel.use("array"):
            plain = kl_bench.kl_diag(*args)
        np.testing.assert_allclose(fast, plain, rtol=1e-6)


def test_torch_result_keeps_autograd_and_dtype():
    torch = pytest.importorskip("torch")
    loc = torch.zeros(2, 3, requires_grad=True)
    with accel.use("numba"):
        assert kl_bench.kl_vae(loc, torch.ones(2, 3)).grad_fn is not None
        with torch.no_grad():
            result = kl_bench.kl_vae(loc, torch.ones(2, 3))
        half = kl_bench.kl_vae(loc.to(torch.bfloat16), torch.ones(2, 3, dtype=torch.bfloat16))
    assert result.grad_fn is None and result.dtype == torch.float32 and half.dtype == torch.bfloat16


def test_torch_gradient_reduces_over_broadcast_arguments():
    torch = pytest.importorskip("torch")
    args = [torch.randn(4, 6, requires_grad=True), torch.randn(6, requires_grad=True), torch.zeros((), requires_grad=True),
            torch.randn(1, 6, requires_grad=True)]
    grads = {}
    for on in (True, False):
        with accel.use("numba" if on else "array"):
            kl_bench.kl_diag(*args).sum().backward()
        grads[on] = [a.grad.clone() for a in args]
        for a in args:
            a.grad = None
    for fast, plain in zip(grads[True], grads[False]):
        assert fast.shape == plain.shape
        torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-6)


GRADIENT_CASES = [(f, r, p) for f in families.with_kernel("numba") for r, p in cases.regimes(f, "float32")
                  if r in ("generic", "near-equal", "collapse")]


@pytest.mark.parametrize("family, regime, param", GRADIENT_CASES, ids=[f"{f}-{r}-{p}" for f, r, p in GRADIENT_CASES])
def test_torch_gradient_through_the_fused_kernel_within_64_ulps(family, regime, param):
    subject = Subject("torch", mode="numba")
    if subject.unavailable(family, "float32"):
        pytest.skip(subject.unavailable(family, "float32"))
    case = cases.generate(family, regime, "float32", param, n=8)
    ulps, nonfinite = gradients.case_ulps(subject, case, gradients.exact_for(case))
    assert not nonfinite.any() and ulps.max() <= 64.0, f"worst {ulps.max():.3g} ulps"


@pytest.mark.parametrize("family", families.with_kernel("numba"))
def test_torch_gradient_through_the_fused_kernel_is_zero_at_p_equal_q(family):
    torch = pytest.importorskip("torch")
    args = [torch.randn(3, 5, requires_grad=True) for _ in range(2)]
    args = [torch.zeros(3, 5, requires_grad=True)] * 2 if family == "vae" else [args[0], args[1], args[0], args[1]]
    with accel.use("numba"):
        kl_bench.kl_vae(*args).sum().backward() if family == "vae" else kl_bench.kl_diag(*args).sum().backward()
    assert all(torch.equal(a.grad, torch.zeros_like(a)) for a in args)
