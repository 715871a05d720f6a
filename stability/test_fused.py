"""The fused numba kernels (kl_bench.accel) over their whole input range: against mpmath, and
as the array path wherever the inputs are special (NaN, infinities, overflow). The low-rank
kernel: across its chunks of rows and ranks, where it hands a batch element to the array path,
and with Torch's autograd."""

import mpmath
import numpy as np
import pytest

import kl_bench
from kl_bench import accel, families
from kl_bench.suite import cases, gradients, metrics
from kl_bench.suite.cases import round_to
from kl_bench.suite.subjects import Subject

pytestmark = pytest.mark.skipif(not accel.REGISTRY["numba"].available(), reason="numba is not installed")
ROW_SUM = ("vae", "diag")  # the fused row sums, forward and backward (the low-rank kernel is below)

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


@pytest.mark.parametrize("family", ROW_SUM)
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


GRADIENT_CASES = [(f, r, p) for f in ROW_SUM for r, p in cases.regimes(f, "float32")
                  if r in ("generic", "near-equal", "collapse")]


@pytest.mark.parametrize("family, regime, param", GRADIENT_CASES, ids=[f"{f}-{r}-{p}" for f, r, p in GRADIENT_CASES])
def test_torch_gradient_through_the_fused_kernel_within_64_ulps(family, regime, param):
    subject = Subject("torch", mode="numba")
    if subject.unavailable(family, "float32"):
        pytest.skip(subject.unavailable(family, "float32"))
    case = cases.generate(family, regime, "float32", param, n=8)
    ulps, nonfinite = gradients.case_ulps(subject, case, gradients.exact_for(case))
    assert not nonfinite.any() and ulps.max() <= 64.0, f"worst {ulps.max():.3g} ulps"


@pytest.mark.parametrize("family", ROW_SUM)
def test_torch_gradient_through_the_fused_kernel_is_zero_at_p_equal_q(family):
    torch = pytest.importorskip("torch")
    args = [torch.randn(3, 5, requires_grad=True) for _ in range(2)]
    args = [torch.zeros(3, 5, requires_grad=True)] * 2 if family == "vae" else [args[0], args[1], args[0], args[1]]
    with accel.use("numba"):
        kl_bench.kl_vae(*args).sum().backward() if family == "vae" else kl_bench.kl_diag(*args).sum().backward()
    assert all(torch.equal(a.grad, torch.zeros_like(a)) for a in args)


def test_every_numba_kernel_is_tested_here():
    assert set(families.with_kernel("numba")) == {*ROW_SUM, "lowrank"}


def _lowrank_pair(rng, n, k, r, delta, spread=1.0):
    """float32 means, factors and diagonals of q, and of p within ``delta`` of them (relative)."""
    mu, w, d = rng.normal(size=(n, k)), rng.normal(size=(n, k, r)), 10.0 ** rng.uniform(-spread, spread, (n, k))
    near = [mu + delta * rng.uniform(-1, 1, (n, k)) * np.sqrt(d), w * (1 + delta * rng.uniform(-1, 1, (n, k, r))),
            d * (1 + delta * rng.uniform(-1, 1, (n, k)))]
    return [round_to(a, "float32").astype(np.float32) for a in (*near, mu, w, d)]


def _fused_rows(args):
    """What the fused kernel itself computes for each batch element (NaN: handed to the array path)."""
    from kl_bench.accel import numba_lowrank

    out = np.empty(args[0].shape[0])
    numba_lowrank._rows(*args, out)
    return out


@pytest.mark.parametrize("k, r", [(70, 1), (130, 5), (300, 16)])  # one to five chunks of rows, odd and even ranks
@pytest.mark.parametrize("delta", [1.0, 1e-2, 1e-5])
def test_lowrank_within_the_bound_across_chunks(k, r, delta):
    """Against the float64 array path on the same (float32) inputs, whose own error, at most
    (16 + cond(S_q)) * 2^-52 relative (asserted against mpmath in test_accuracy.py), is far below
    float32's: the fused kernel within 16 + cond(S_q) float32 ulps, and no element handed over."""
    args = _lowrank_pair(np.random.default_rng(k + r), 4, k, r, delta, spread=3.0 if delta < 1 else 1.0)
    assert np.isfinite(_fused_rows(args)).all()
    with accel.use("numba"):
        computed = kl_bench.kl_lowrank(*args)
    with accel.use("array"):
        exact = kl_bench.kl_lowrank(*(a.astype(np.float64) for a in args))
    assert computed.dtype == np.float32
    conds = np.linalg.cond(cases.low_rank_covariance(args[4].astype(np.float64), args[5].astype(np.float64)))
    for c, e, cond in zip(computed, exact, conds):
        assert metrics.ulps(float(c), float(e), "float32") <= 16 + cond, (c, e, cond)


@pytest.mark.parametrize("delta", [1e-3, 1e-6])
def test_lowrank_where_p_rescales_a_dominant_factor(delta):
    """W_p = (1 + delta) W_q with W_q 100 times the diagonal's scale (cond(S_q) about 1e7): the part
    of X = W_p - W_q that T's metric leaves is about 1/cond of it; at delta = 1e-3 less than 2^-20
    of it, and the fused kernel forms it row by row instead of from the Gram matrices' blocks.
    Within 16 float32 ulps of the float64 array path on the same inputs, whose own error (at most
    (16 + cond(S_q)) * 2^-52 relative) is below 0.1 float32 ulp here (the float32 array path loses
    hundreds of ulps at delta = 1e-3)."""
    rng = np.random.default_rng(6)
    mu, w, d = rng.normal(size=(4, 300)), 100 * rng.normal(size=(4, 300, 16)), np.exp(rng.uniform(-1, 1, (4, 300)))
    args = [round_to(a, "float32").astype(np.float32) for a in (mu, (1 + delta) * w, d, mu, w, d)]
    assert np.isfinite(_fused_rows(args)).all()
    with accel.use("numba"):
        computed = kl_bench.kl_lowrank(*args)
    with accel.use("array"):
        exact = kl_bench.kl_lowrank(*(a.astype(np.float64) for a in args))
    conds = np.linalg.cond(cases.low_rank_covariance(args[4].astype(np.float64), args[5].astype(np.float64)))
    assert np.all((16 + conds) * 2.0**-52 < 0.1 * 2.0**-24)
    for c, e in zip(computed, exact):
        assert metrics.ulps(float(c), float(e), "float32") <= 16, (c, e)


@pytest.mark.parametrize("cond, handed_over", [(1e2, False), (1e6, True), (1e8, True)])
def test_lowrank_hands_cancelling_diagonal_changes_to_the_array_path(cond, handed_over):
    """Where q's factor makes nearly all of a coordinate's variance and p changes its diagonal
    there (regime aligned-diagonal), the fused kernel's split (D = D_p everywhere) would cancel to
    about cond(S_q)^-2 of its parts: it hands such elements to the array path, and the result is
    within the bound of the certified reference either way."""
    case = cases.generate("lowrank", "aligned-diagonal", "float32", cond, n=8)
    rows = [np.ascontiguousarray(a, dtype=np.float32) for a in case.arrays]
    assert np.isnan(_fused_rows(rows)).all() == handed_over and (handed_over or np.isfinite(_fused_rows(rows)).all())
    subject = Subject("numpy", mode="numba")
    from kl_bench.suite import accuracy

    err, limit = accuracy.errors(subject, case), accuracy.case_bounds(case)
    assert np.all(err["ulps"] <= limit), (err["ulps"], limit)


def test_lowrank_special_values_as_on_the_array_path():
    """One special value at a time in each argument of one batch element: the other elements are
    the fused kernel's, the special ones the array path's (NaN, +inf), as if no kernel were fused;
    but where the KL itself is beyond float32's range (a mean or a factor entry of 1e38), the fused
    kernel's float64 arithmetic gives +inf, where the array path's float32 arithmetic overflows to
    inf - inf."""
    rng = np.random.default_rng(4)
    special = [np.nan, np.inf, -np.inf, 0.0, -1.0, 1e38, 1e-45]
    base = _lowrank_pair(rng, 1, 9, 2, 1e-2)
    batch = [np.repeat(a, 6 * len(special) + 1, axis=0) for a in base]
    for i, (arg, value) in enumerate((arg, v) for arg in range(6) for v in special):
        batch[arg][i].flat[1] = value
    with accel.use("numba"):
        fast = kl_bench.kl_lowrank(*batch, validate=False)
    with accel.use("array"):
        plain = kl_bench.kl_lowrank(*batch, validate=False)
        exact = kl_bench.kl_lowrank(*(a.astype(np.float64) for a in batch), validate=False)
    beyond = np.isfinite(exact) & (exact > np.finfo(np.float32).max)
    assert beyond.sum() == 3 and np.all(fast[beyond] == np.inf)
    np.testing.assert_array_equal(np.isnan(fast[~beyond]), np.isnan(plain[~beyond]))
    np.testing.assert_allclose(fast[~beyond], plain[~beyond], rtol=1e-5)
    with accel.use("numba"), pytest.raises(ValueError, match="cov_diag_q must be positive"):
        kl_bench.kl_lowrank(*base[:5], -base[5])


def test_lowrank_gradients_come_from_the_array_path():
    """The fused low-rank kernel has no backward pass: with a gradient needed, the array path runs
    (the same values and gradients as with the kernel switched off); without, the kernel, whose
    result carries no graph."""
    torch = pytest.importorskip("torch")
    args = [torch.tensor(a, requires_grad=True) for a in _lowrank_pair(np.random.default_rng(5), 3, 40, 3, 1e-2)]
    grads = {}
    for kernel in ("numba", "array"):
        with accel.use(kernel):
            value = kl_bench.kl_lowrank(*args)
            value.sum().backward()
        grads[kernel] = (value.detach(), [a.grad.clone() for a in args])
        for a in args:
            a.grad = None
    torch.testing.assert_close(grads["numba"], grads["array"], rtol=0, atol=0)
    with accel.use("numba"), torch.no_grad():
        fast = kl_bench.kl_lowrank(*args)
    assert fast.grad_fn is None and fast.dtype == torch.float32
    torch.testing.assert_close(fast, grads["array"][0], rtol=1e-5, atol=0)
