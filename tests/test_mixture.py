"""kl_mixture: bounds that bracket, a Monte-Carlo estimate within its error bars, the variational
approximation, against quadrature references; identities, backends, errors."""

import numpy as np
import pytest

import kl_bench
from kl_bench.suite import mixtures

RNG = np.random.default_rng(11)


def _mixture(m, k, spread=2.0):
    return RNG.normal(size=m), spread * RNG.normal(size=(m, k)), RNG.uniform(-0.5, 0.5, (m, k))


@pytest.fixture(scope="module")
def quick_sweep():
    return mixtures.mixture_sweep("quick", progress=False)


def test_the_bounds_bracket_the_quadrature_and_monte_carlo_references(quick_sweep):
    assert quick_sweep.brackets.all(), quick_sweep[~quick_sweep.brackets]
    assert (quick_sweep.lower >= 0).all() and (quick_sweep.lower <= quick_sweep.upper).all()
    assert set(quick_sweep.reference_method) == {"quadrature", "monte-carlo"}
    assert quick_sweep.approximate.all()


def test_monte_carlo_within_four_standard_errors_of_the_reference(quick_sweep):
    assert (quick_sweep.mc_z.abs() < 4).all(), quick_sweep[["k", "m", "separation", "mc_z"]]


@pytest.mark.parametrize("k, m_p, m_q", [(1, 3, 2), (1, 1, 4), (2, 2, 3)])
def test_bounds_bracket_random_mixtures(k, m_p, m_q):
    """Unrelated mixtures of different counts, against quadrature."""
    for _ in range(3):
        arrays = _mixture(m_p, k) + _mixture(m_q, k)
        exact, error = mixtures.quadrature(mixtures.MixtureCase(k, m_p, 0.0, 0, arrays))
        result = kl_bench.kl_mixture(*arrays, method="variational")
        assert float(result.lower) - error <= exact <= float(result.upper) + error


def test_identical_mixtures_give_exactly_zero():
    p = _mixture(3, 4)
    for method in ("mc", "variational"):
        result = kl_bench.kl_mixture(*p, *p, method=method, seed=5)
        assert float(result.estimate) == 0.0 and float(result.stderr) == 0.0 and float(result.lower) == 0.0


def test_single_components_are_the_diagonal_family():
    """With one component each the variational approximation is the exact KL (kl_diag), and the
    Monte-Carlo estimate is within four standard errors of it."""
    (_, loc_p, lv_p), (_, loc_q, lv_q) = _mixture(1, 5), _mixture(1, 5)
    exact = float(kl_bench.kl_diag(loc_p[0], lv_p[0], loc_q[0], lv_q[0]))
    result = kl_bench.kl_mixture(np.zeros(1), loc_p, lv_p, np.zeros(1), loc_q, lv_q, method="variational")
    assert float(result.estimate) == pytest.approx(exact, rel=1e-14)
    mc = kl_bench.kl_mixture(np.zeros(1), loc_p, lv_p, np.zeros(1), loc_q, lv_q, seed=2, num_samples=20000)
    assert abs(float(mc.estimate) - exact) < 4 * float(mc.stderr)


def test_a_seed_reproduces_the_estimate_and_frameworks_agree():
    arrays = _mixture(2, 3) + _mixture(3, 3)
    first = kl_bench.kl_mixture(*arrays, seed=9)
    assert first == kl_bench.kl_mixture(*arrays, seed=9)
    for framework in ("torch", "jax.numpy"):
        module = pytest.importorskip(framework)
        if framework == "jax.numpy":
            import jax

            jax.config.update("jax_enable_x64", True)
        result = kl_bench.kl_mixture(*[module.asarray(a, dtype=module.float64) for a in arrays], seed=9)
        if framework == "jax.numpy":
            jax.config.update("jax_enable_x64", False)
        for ours, theirs in zip(first, result):
            np.testing.assert_allclose(float(theirs), float(ours), rtol=1e-12)


def test_batches_broadcast_and_nan_gives_nan_there_only():
    logits, loc, logvar = (np.stack([a] * 3) for a in _mixture(2, 2))
    q = _mixture(2, 2)
    loc[1, 0, 0] = np.nan
    result = kl_bench.kl_mixture(logits, loc, logvar, *q, seed=1)
    assert result.estimate.shape == (3,) and np.isnan(result.estimate[1]) and np.isnan(result.upper[1])
    assert np.isfinite(result.estimate[[0, 2]]).all()  # each batch element has its own draws
    assert result.lower[0] == result.lower[2] and result.upper[0] == result.upper[2]  # the bounds are deterministic


@pytest.mark.parametrize("change, message", [
    (lambda a: (a[0][:1],) + a[1:], "mismatched component count m: logits_p"),
    (lambda a: a[:4] + (a[4][:, :1],) + a[5:], "mismatched dimension k"),
    (lambda a: (a[0], a[1][0]) + a[2:], "loc_p, logvar_p"),
])
def test_bad_shapes_name_the_argument(change, message):
    with pytest.raises(ValueError, match=message):
        kl_bench.kl_mixture(*change(_mixture(2, 3) + _mixture(2, 3)))


def test_bad_options_are_refused():
    arrays = _mixture(2, 3) + _mixture(2, 3)
    with pytest.raises(ValueError, match="method must be one of"):
        kl_bench.kl_mixture(*arrays, method="exact")
    with pytest.raises(ValueError, match="num_samples must be an integer >= 2"):
        kl_bench.kl_mixture(*arrays, num_samples=1)


def variational_only(*arrays):
    return kl_bench.kl_mixture(*arrays, method="variational").estimate


def biased(*arrays):
    result = kl_bench.kl_mixture(*arrays, seed=0)
    return result.estimate + 0.05, result.stderr


def negated(*arrays):
    return -kl_bench.kl_mixture(*arrays, method="variational").estimate


@pytest.mark.parametrize("fn, passes, reason", [
    (kl_bench.kl_mixture, True, ""),
    (variational_only, True, ""),
    (biased, False, "standard errors from the reference"),
    (negated, False, "outside the bounds"),
])
def test_check_judges_mixture_functions(fn, passes, reason):
    from kl_bench.suite import mixtures

    result = mixtures.check(fn)
    assert result.passed == passes, result.report()
    assert len(result.cases) == len(mixtures.check_cases())
    if reason:
        assert result.cases.reason.str.contains(reason).any()


def test_check_command_takes_mixtures(capsys):
    from kl_bench.cli import main

    assert main(["check", "kl_bench:kl_mixture", "--family", "mixture", "--quiet"]) == 0
    assert "PASS: 0 of" in capsys.readouterr().out
    assert main(["check", "kl_bench:kl_mixture", "--family", "mixture", "--dtype", "float32"]) == 2
    assert "do not apply to --family mixture" in capsys.readouterr().err


# -- speed and recommend --------------------------------------------------------------------------

def test_monte_carlo_error_scales_as_the_recommendation_assumes(quick_sweep):
    """recommend judges a Monte-Carlo size by the sweep's standard error at NUM_SAMPLES draws scaled
    by 1/sqrt(draws): at 1024 draws, 40 seeds' estimates spread as predicted and stay within
    CONFIDENCE_SIGMAS predicted standard errors of the quadrature."""
    row = quick_sweep[(quick_sweep.k == 1) & (quick_sweep.m == 2) & (quick_sweep.separation == 4.0)].iloc[0]
    case = mixtures.generate(1, 2, 4.0)
    predicted = row.mc_stderr * np.sqrt(mixtures.NUM_SAMPLES / 1024)
    estimates = np.array([float(kl_bench.kl_mixture(*case.arrays, num_samples=1024, seed=s).estimate) for s in range(40)])
    assert 0.7 < estimates.std(ddof=1) / predicted < 1.4
    assert np.all(np.abs(estimates - row.reference) <= mixtures.CONFIDENCE_SIGMAS * predicted)
    errors = mixtures.approximation_errors(quick_sweep).set_index(["method", "num_samples"]).worst_error
    assert errors[("mc", 1024)] == pytest.approx(mixtures.CONFIDENCE_SIGMAS * quick_sweep.mc_stderr.max() * 2)
    assert errors[("variational", 0)] >= quick_sweep.variational_error.abs().max()


def test_timing_rows_for_every_backend_and_approximation():
    df = mixtures.timing_sweep(2, 3, ["numpy"], repeats=1)
    assert list(df.columns) == mixtures.TIMING_COLUMNS
    assert len(df) == len(mixtures.approximations()) and (df.seconds > 0).all() and (df.error == "").all()
    big = mixtures.timing_sweep(64, 512, ["numpy"], repeats=1)  # 65536 draws x 64 x 4 x 512 float64 would be 8 GiB
    refused = big[big.error != ""]
    assert set(refused.num_samples) >= {65536} and refused.seconds.isna().all()
    assert refused.error.str.contains("not timed").all()


def test_recommend_takes_mixtures(tmp_path, capsys):
    from kl_bench.cli import main

    argv = ["recommend", "--family", "mixture", "--shape", "2x2", "--backends", "numpy", "--from", str(tmp_path), "--quiet"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "APPROXIMATE" in out and "nats" in out and "kl_bench.kl_mixture(" in out
    worst = float(out.split("worst error ")[1].split()[0])
    assert worst <= 0.1
    assert (tmp_path / "cells" / "mixture_timing-mixture-float64-2x2.parquet").exists()
    assert main(argv + ["--max-error", "1e-9"]) == 1  # the cells are reused; nothing is that accurate
    assert "nothing measured meets" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--max-ulps", "4"], "--max-ulps does not apply to --family mixture"),
    (["--dtype", "float32"], "measured in float64 only"),
    (["--max-error", "-1"], "--max-error must be a number >= 0"),
])
def test_recommend_mixture_refuses_options_that_do_not_apply(tmp_path, capsys, extra, message):
    from kl_bench.cli import main

    assert main(["recommend", "--family", "mixture", "--shape", "2x2", "--from", str(tmp_path)] + extra) == 2
    assert message in capsys.readouterr().err
    assert main(["recommend", "--family", "vae", "--shape", "2x2", "--max-error", "0.1", "--from", str(tmp_path)]) == 2
