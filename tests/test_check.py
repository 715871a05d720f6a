"""kl-bench check: a fault corpus it must catch, correct implementations it must pass."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import kl_bench
from kl_bench import check  # the function, kl_bench.checker.check
from tests import fault_corpus as corpus

ROOT = Path(__file__).resolve().parent.parent

FAULTS = [
    ("cov", corpus.seed_misprint_cov, "float64"),
    ("vae", corpus.missing_half_vae, "float64"),
    ("diag", corpus.swapped_diag, "float64"),
    ("normal", corpus.std_for_variance_normal, "float64"),
    ("diag", corpus.mean_dropped_diag, "float64"),
    ("vae", corpus.clamped_vae, "float64"),
    ("tril", corpus.transposed_solve_tril, "float64"),
    ("vae", corpus.keepdims_vae, "float64"),
    ("normal", corpus.textbook_normal, "float64"),
    ("vae", corpus.textbook_vae, "float32"),
    ("tril", corpus.textbook_tril, "float64"),
    ("lowrank", corpus.textbook_lowrank, "float64"),
]
CORRECT = [(f, getattr(corpus, f"correct_{f}")) for f in kl_bench.FAMILIES] + [
    (f, getattr(kl_bench, f"kl_{f}")) for f in kl_bench.FAMILIES
]


@pytest.mark.parametrize("family, fn, dtype", FAULTS, ids=[f.__name__ for _, f, _ in FAULTS])
def test_check_catches_each_fault(family, fn, dtype):
    result = check(fn, family=family, dtype=dtype)
    assert not result.passed
    assert not result.cases.passed.all() and (result.cases.reason != "").any()
    assert result.worst().passed == False  # noqa: E712 (the worst case shown is a failing one)


@pytest.mark.parametrize("family, fn", CORRECT, ids=[f"{f.__module__.split('.')[0]}-{n}" for n, f in CORRECT])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_check_passes_correct_implementations(family, fn, dtype):
    result = check(fn, family=family, dtype=dtype)
    assert result.passed, result.report()


def test_the_textbook_formula_passes_away_from_equality_and_fails_near_it():
    table = check(corpus.textbook_vae, family="vae").table().set_index(["regime", "param"])
    assert table.loc[("generic", np.nan), "failures"].item() == 0
    assert table.loc[("collapse", 1e-12), "failures"].item() == 64


def test_wrong_shape_is_named():
    result = check(corpus.keepdims_vae, family="vae")
    assert result.cases.reason.str.contains(r"returned shape \(64, 1\)").any()


def test_check_on_torch_arrays():
    pytest.importorskip("torch")
    assert check(kl_bench.kl_vae, family="vae", dtype="float32", backend="torch").passed


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "kl_bench.cli", "check", *args, "--quiet"], capture_output=True, text=True, cwd=ROOT)


def test_cli_exit_codes_and_report():
    passed = _cli("tests.fault_corpus:correct_vae", "--family", "vae")
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert passed.stdout.startswith("PASS")
    failed = _cli("tests.fault_corpus:seed_misprint_cov", "--family", "cov")
    assert failed.returncode == 1
    lines = failed.stdout.splitlines()
    assert lines[0].startswith("FAIL") and "regime" in lines[2]
    assert "Worst case: cov/" in failed.stdout and "cov_q = np.asarray(np.vectorize(float.fromhex)([[['" in failed.stdout


@pytest.mark.parametrize("args", [
    ("no_such_module_xyz:f", "--family", "vae"),
    ("tests.fault_corpus:no_such_function", "--family", "vae"),
    ("tests.fault_corpus", "--family", "vae"),
    ("tests.fault_corpus:correct_vae", "--family", "gamma"),
    ("tests.fault_corpus:correct_vae", "--family", "vae", "--dtype", "bfloat16"),  # NumPy has none
])
def test_cli_usage_errors_exit_2(args):
    result = _cli(*args)
    assert result.returncode == 2 and "error" in result.stderr, result.stderr


def test_check_imports_only_the_named_module():
    code = ("import sys; from kl_bench import cli; rc = cli.main(['check', 'tests.fault_corpus:correct_vae', "
            "'--family', 'vae', '--quiet']); assert rc == 0; print(sorted(m for m in ('torch', 'jax', 'numpyro') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("[]")


# --- the guard knows its dtype, and says what to do --------------------------------------------


def _scaled(fn, factor):
    def off(*args):
        return (np.asarray(fn(*args), dtype=np.float64) * factor).astype(np.result_type(args[0]))

    return off


def test_the_result_unpacks_as_cases_and_passed():
    cases, passed = kl_bench.check(corpus.correct_vae, family="vae", dtype="float32")
    assert passed and len(cases) > 100


def test_the_default_allowance_is_the_promised_bound_of_the_dtype():
    """3 % off in float16 is about 30 ulps: the old fixed 64 ulps passed it, the promised 1 ulp does not;
    a float64 computation rounded once to float16 passes."""
    assert not check(_scaled(corpus.correct_vae, 1.03), family="vae", dtype="float16").passed
    assert check(corpus.correct_vae, family="vae", dtype="float16").passed
    assert check(_scaled(corpus.correct_vae, 1.03), family="vae", dtype="float16", max_ulps=64).passed


def test_bfloat16_twenty_percent_off_fails():
    torch = pytest.importorskip("torch")

    def correct(loc, logvar):  # float64 inside, rounded once to the input's dtype
        return torch.as_tensor(corpus.correct_vae(loc.double().numpy(), logvar.double().numpy())).to(loc.dtype)

    def off(loc, logvar):
        return (correct(loc, logvar).double() * 1.2).to(loc.dtype)

    assert check(correct, family="vae", dtype="bfloat16", backend="torch").passed
    result = check(off, family="vae", dtype="bfloat16", backend="torch")
    assert not result.passed and "promised bound for vae in bfloat16" in result.report()


def test_the_report_gives_the_worst_failure_per_regime_the_cause_and_a_reproduction(capsys):
    result = check(corpus.textbook_vae, family="vae")
    table = result.table().set_index(["regime", "param"])
    collapse = result.cases[(result.cases.regime == "collapse") & (result.cases.param == 1e-12)]
    assert table.loc[("collapse", 1e-12), "worst_ulps"] == collapse.ulps.max()
    report = result.report()
    assert "- collapse: posterior collapse" in report and "- generic:" not in report
    snippet = result.reproduction()
    assert snippet.startswith("import numpy as np\nfrom tests.fault_corpus import textbook_vae")
    exec(compile(snippet, "<reproduction>", "exec"), {})
    printed = capsys.readouterr().out
    assert float(printed.strip().strip("[]")) == result.worst().computed  # the same value, to the last bit


def test_every_case_raising_is_said_up_front():
    torch = pytest.importorskip("torch")

    def torch_only(loc, logvar):
        return 0.5 * torch.sum(torch.special.expm1(logvar) - logvar + loc**2, dim=-1)

    report = check(torch_only, family="vae").report()
    lines = report.splitlines()
    assert lines[0].startswith("FAIL") and lines[1].startswith("Every case raised; the first: TypeError")
    assert "--backend numpy|torch|jax" in lines[1]


def test_nan_where_the_exact_kl_overflows_the_dtype_is_named():
    def nan_for_inf(*args):
        out = corpus.correct_diag(*args)
        return np.where(np.isinf(out), np.nan, out)

    result = check(nan_for_inf, family="diag", dtype="float32")
    assert (result.cases.reason == "NaN where the exact KL is +inf (beyond float32's range)").any()


@pytest.mark.parametrize("value", ["nan", "-1"])
def test_bad_max_ulps_is_a_usage_error_before_any_work(value):
    result = _cli("no_such_module_xyz:f", "--family", "vae", "--max-ulps", value)
    assert result.returncode == 2 and "--max-ulps must be a number >= 0" in result.stderr
    with pytest.raises(ValueError, match="max_ulps must be a number >= 0"):
        check(corpus.correct_vae, family="vae", max_ulps=float(value))


# --- verdicts nobody can subvert ------------------------------------------------------------


def test_a_function_that_overwrites_its_inputs_is_judged_like_its_twin():
    """It gets copies: the references and this project's errors come from the checker's own arrays."""
    sly = check(corpus.overwrites_inputs_vae, family="vae")
    honest = check(corpus.textbook_expm1_vae, family="vae")
    assert not sly.passed and int((~sly.cases.passed).sum()) == int((~honest.cases.passed).sum()) > 0
    pd.testing.assert_frame_equal(sly.cases.drop(columns="case_set"), honest.cases.drop(columns="case_set"))


@pytest.mark.parametrize("target, reason", [
    ("exits_vae", "ended the process (exit code 0)"),
    ("raises_system_exit_0_vae", "raised SystemExit: 0"),
    ("raises_system_exit_3_vae", "raised SystemExit: 3"),
    ("segfaults_vae", "crashed the process (SIGSEGV)"),
])
def test_exiting_or_crashing_is_that_case_sets_failure_and_the_verdict_stays_the_checkers(target, reason):
    result = _cli(f"tests.fault_corpus:{target}", "--family", "vae")
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.startswith("FAIL: 516 of 516 cases fail") and reason in result.stdout


def test_a_hang_is_stopped_after_the_timeout_and_the_rest_is_judged():
    result = _cli("tests.fault_corpus:hangs_on_collapse_vae", "--family", "vae", "--timeout", "2")
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.startswith("FAIL: 64 of 516 cases fail") and "gave no result within 2 s" in result.stdout


def test_bad_timeout_is_a_usage_error():
    assert _cli("tests.fault_corpus:correct_vae", "--family", "vae", "--timeout", "0").returncode == 2


def test_the_tool_failing_is_exit_3_not_a_verdict(monkeypatch, capsys):
    from kl_bench import cli
    from kl_bench.suite import checker

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checker, "references", broken)
    assert cli.main(["check", "tests.fault_corpus:correct_vae", "--family", "vae", "--quiet"]) == 3
    assert "the check could not run: OSError" in capsys.readouterr().err


# --- gradients ------------------------------------------------------------------------------


def test_gradients_catch_a_nan_gradient_that_values_hide():
    """0.5 (sqrt(mu^2)^2 + expm1(logvar) - logvar): its gradient in mu is NaN wherever mu == 0."""
    pytest.importorskip("torch")
    result = _cli("tests.fault_corpus:sqrt_square_vae_torch", "--family", "vae", "--backend", "torch", "--gradients")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "NaN gradient where the exact one is finite" in result.stdout
    assert "Worst gradient: vae/equal/float64/k16/seed0 #0, d/dloc (autograd)" in result.stdout


def test_gradients_on_jax_eager_and_compiled():
    pytest.importorskip("jax")
    result = check(corpus.sqrt_square_vae_jax, family="vae", backend="jax", gradients=True)
    failing = result.gradients[~result.gradients.passed]
    assert set(failing["mode"]) == {"jax.grad", "jax.jit(jax.grad)"}
    assert (failing[failing.argument == "loc"].reason == "NaN gradient where the exact one is finite").all()
    assert not result.passed


@pytest.mark.parametrize("family, backend, dtype", [("vae", "torch", "float64"), ("diag", "torch", "float32"),
                                                    ("vae", "jax", "float32"), ("cov", "torch", "float64")])
def test_this_projects_kernels_pass_with_gradients(family, backend, dtype):
    pytest.importorskip(backend)
    result = check(getattr(kl_bench, f"kl_{family}"), family=family, dtype=dtype, backend=backend, gradients=True)
    assert result.passed, result.report()
    assert set(result.gradients.regime) >= {"equal", "generic"} and set(result.gradients.regime) & {"near-equal", "collapse"}
    equal = result.gradients[result.gradients.regime == "equal"]
    assert (equal.ulps == 0).all()  # a finite, exact 0 at p == q


def test_gradients_need_autodiff():
    result = _cli("tests.fault_corpus:correct_vae", "--family", "vae", "--gradients")
    assert result.returncode == 2 and "gradients need a framework with autodiff: --backend torch or jax" in result.stderr
    with pytest.raises(ValueError, match="gradients need a framework with autodiff"):
        check(corpus.correct_vae, family="vae", gradients=True)


def test_the_worst_gradient_reproduces(capsys):
    torch = pytest.importorskip("torch")
    result = check(corpus.sqrt_square_vae_torch, family="vae", backend="torch", gradients=True)
    snippet = result.gradient_reproduction()
    assert "sqrt_square_vae_torch(loc, logvar).sum().backward()" in snippet
    exec(compile(snippet, "<gradient reproduction>", "exec"), {})
    printed = capsys.readouterr().out
    assert "nan" in printed and torch is not None
