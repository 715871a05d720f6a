"""Subjects and accuracy sweeps: everyone on identical inputs, one tidy DataFrame."""

import importlib.metadata
import re

import mpmath
import numpy as np
import pandas as pd
import pytest

from kl_bench.families import NAMES as FAMILIES
from kl_bench.suite import accuracy, cases, reference, subjects, tables


def test_registry_names_are_unique_and_declare_families():
    everything = subjects.registry(compiled=True)
    names = [s.name for s in everything]
    assert len(names) == len(set(names))
    assert {s.implementation for s in everything} == {"kl_bench", "torch.distributions", "numpyro", "tfp", "distrax", "pyro", "gpytorch",
                                                      "textbook"}
    low_rank = subjects.TorchDistributions(method="LowRank")
    assert low_rank.family_names == ("diag", "vae") and "no tril family" in low_rank.unavailable("tril")
    assert subjects.by_name("textbook[numpy-cpu]") == subjects.Textbook()


def test_every_available_subject_agrees_on_a_generic_case():
    case = cases.generate("diag", "generic", "float64", n=4)
    exact = np.array([float(v) for v in accuracy.references(case)])
    for s in subjects.available(compiled=False):
        np.testing.assert_allclose(s.run("diag", case.arrays, "float64"), exact, rtol=1e-12, err_msg=s.name)


THIRD_PARTIES = [(subjects.Numpyro, "numpyro"), (subjects.TFP, "tensorflow_probability"), (subjects.Distrax, "distrax"),
                 (subjects.Pyro, "pyro"), (subjects.GPyTorch, "gpytorch")]


@pytest.mark.parametrize("make, module", THIRD_PARTIES)
def test_absent_packages_skip_with_a_reason(monkeypatch, make, module):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))
    assert make().unavailable() == f"{module} is not installed"
    assert make() not in subjects.available()


@pytest.mark.parametrize("make, module", THIRD_PARTIES)
def test_each_third_party_runs_every_family_it_declares(make, module):
    """On a generic case of each family it has, each library's KL agrees with the certified reference."""
    subject = make()
    if subject.unavailable():
        pytest.skip(subject.unavailable())
    for family in subject.family_names:
        case = cases.generate(family, "generic", "float64", n=3)
        exact = np.array([float(v) for v in accuracy.references(case)])
        np.testing.assert_allclose(subject.run(family, case.arrays, "float64"), exact, rtol=1e-9, err_msg=f"{subject.name} {family}")
    missing = next((f for f in FAMILIES if f not in subject.family_names), None)
    if missing:
        assert f"no {missing} family" in subject.unavailable(missing)


def test_accuracy_sweep_columns_and_third_parties():
    df = accuracy.accuracy_sweep(["vae"], None, ["float64"], progress=False)
    required = ["family", "subject", "backend", "device", "dtype", "method", "regime", "param", "k", "n_cases",
                "max_ulps", "median_ulps", "max_rel_err", "bits_lost", "negatives", "nans"]
    assert set(required) <= set(df.columns)
    assert "textbook[numpy-cpu]" in set(df.subject)
    textbook = df[(df.subject == "textbook[numpy-cpu]") & (df.regime == "collapse")]
    assert textbook.max_ulps.max() > 1e6 and textbook.negatives.sum() > 0  # the textbook cancels
    assert df[df.method == "stable"].ok.all()


def test_a_subject_that_raises_gives_a_row_with_the_error():
    class Broken(subjects.Textbook):
        def function(self, family):
            def fail(*args):
                raise RuntimeError("no half precision here")

            return fail

    df = accuracy.accuracy_sweep(["normal"], [Broken()], ["float64"], progress=False)
    assert (df.error == "RuntimeError: no half precision here").all() and df.max_ulps.isna().all()


@pytest.mark.parametrize("family", FAMILIES)
def test_sweeps_are_named_and_reproducible(family):
    full = cases.sweep_specs(family, "float64", "full")
    for part in ("quick", "closeness", "conditioning", "dimension"):
        assert set(cases.sweep_specs(family, "float64", part)) <= set(full)
    closeness = [p for r, p, _ in cases.sweep_specs(family, "float64", "closeness")]
    assert min(closeness) == 1e-12 and max(closeness) == 1e-1
    if family in ("tril", "cov", "lowrank"):
        conds = [p for r, p, _ in cases.sweep_specs(family, "float64", "conditioning") if r == "ill-conditioned"]
        assert conds[0] == 1 and conds[-1] == (1e12 if family == "cov" else 1e16)
        assert max(k for _, _, k in cases.sweep_specs(family, "float64", "dimension")) == 1000
    elif family != "normal":
        assert max(k for _, _, k in cases.sweep_specs(family, "float64", "dimension")) == 1_000_000
    with pytest.raises(ValueError, match="unknown sweep"):
        cases.sweep_specs(family, "float64", "everything")


def test_conditioning_sweep_reaches_its_condition_numbers():
    for family, regime, cond in (("tril", "ill-conditioned", 1e16), ("cov", "ill-conditioned", 1e12),
                                 ("lowrank", "ill-conditioned", 1e16), ("lowrank", "aligned-diagonal", 1e8)):
        case = cases.generate(family, regime, "float64", cond, n=4)
        assert np.all(case.cond > cond / 10) and np.all(case.cond < cond * 10), (family, regime, case.cond)


def test_lowrank_cases_have_the_ranks_and_structure_they_name():
    generic = cases.generate("lowrank", "generic", "float64", n=2)
    assert generic.arrays[1].shape == (2, 8, cases.LOW_RANK) and 8 > 2 * cases.LOW_RANK  # the O(k r^2) route
    assert cases.generate("lowrank", "full-rank", "float64", n=2).arrays[1].shape == (2, 8, 8)
    high = cases.generate("lowrank", "high-dim", "float64", k=40, n=2)
    assert len(reference.coupled_blocks("lowrank", [a[0] for a in high.arrays])) == 40 - 3 * (cases.BLOCK - 1)
    aligned = cases.generate("lowrank", "aligned-diagonal", "float64", 1e4, n=2)
    mu_p, w_p, d_p, mu_q, w_q, d_q = aligned.arrays
    assert np.array_equal(mu_p, mu_q) and np.array_equal(w_p, w_q) and np.array_equal(d_p[:, 3:], d_q[:, 3:])
    assert not np.array_equal(d_p[:, :3], d_q[:, :3])


def test_high_dim_full_covariance_references_are_sums_of_blocks():
    case = cases.generate("cov", "high-dim", "float64", k=10, n=2)
    assert len(reference.coupled_blocks("cov", [a[0] for a in case.arrays])) == 3  # 4 + 4 + 2, shuffled
    blocks = reference.evaluate("cov", *case.arrays, cache=False)
    with mpmath.workprec(256):  # the textbook formula on the whole matrix, no decomposition
        direct = [reference.mp_cov(*[reference.to_mp(a[i]) for a in case.arrays]) for i in range(2)]
    for b, d in zip(blocks, direct):
        assert abs(b - d) <= abs(d) * mpmath.mpf(2) ** -90
    low_rank = cases.generate("lowrank", "high-dim", "float64", k=20, n=2)  # factor columns on blocks of 4
    blocks = reference.evaluate("lowrank", *low_rank.arrays, cache=False)
    with mpmath.workprec(256):
        direct = [reference.mp_lowrank(*[reference.to_mp(a[i]) for a in low_rank.arrays]) for i in range(2)]
    for b, d in zip(blocks, direct):
        assert abs(b - d) <= abs(d) * mpmath.mpf(2) ** -90


def test_headline_puts_this_project_first():
    df = pd.DataFrame({"family": ["vae"] * 3, "regime": ["generic"] * 3, "dtype": ["float64"] * 3,
                       "subject": ["textbook[numpy-cpu]", "kl_bench.stable[numpy-cpu]", "kl_bench.naive[torch-cpu]"],
                       "max_ulps": [3.0, 1.0, 2.0]})
    assert list(tables.headline(df).columns) == ["kl_bench.stable", "kl_bench.naive", "textbook"]


@pytest.mark.parametrize("mode", ["jax.jit", "torch.compile"])
def test_compiled_modes_meet_the_bounds(mode):
    subject = subjects.Subject(mode.split(".")[0], mode=mode)
    if subject.unavailable():
        pytest.skip(subject.unavailable())
    df = accuracy.accuracy_sweep(["vae"], [subject], ["float32"], progress=False)
    assert df.ok.all() and (df.error == "").all() and len(df) > 3


def test_a_jax_subject_switches_float64_on_for_its_own_calls_only():
    jax = pytest.importorskip("jax")
    case = cases.generate("vae", "collapse", "float64", 1e-9, n=4)
    values = subjects.Subject("jax").run("vae", case.arrays, "float64")
    assert not jax.config.jax_enable_x64  # not left on for the rest of the process
    exact = np.array([float(v) for v in accuracy.references(case)])
    np.testing.assert_allclose(values, exact, rtol=1e-14)  # computed in float64, not float32


EXTRAS = importlib.metadata.metadata("kl-bench").get_all("Provides-Extra")


def test_recommend_has_a_line_of_code_for_every_subject_and_family():
    from kl_bench.suite import recommend

    for s in subjects.registry(compiled=True):
        for family in s.family_names:
            row = pd.Series(subjects.labels(s))
            line = recommend.code_line(row, family)
            assert line and "{" not in line, (s.name, family)
            if not s.ours and s.implementation != "textbook":
                assert recommend.DISTRIBUTIONS[s.implementation][family] in line, (s.name, family)
            for extra in re.findall(r'kl-bench\[(\w+)\]', line):  # an extra that pyproject.toml defines
                assert extra in EXTRAS, (s.name, line)
