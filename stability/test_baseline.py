"""The accuracy baseline (reports/accuracy-baseline.csv) guards regressions: every stable subject,
recomputed on the quick sweep, must stay within max(baseline + 1, 2 x baseline) ulps per case set.
Refresh it on purpose with ``kl-bench baseline``."""

import numpy as np
import pandas as pd
import pytest

from kl_bench.suite import accuracy, baseline, subjects

BASELINE = baseline.read()


@pytest.mark.parametrize("name", sorted(set(BASELINE.subject)))
def test_stable_subject_is_no_worse_than_its_baseline(name):
    subject = subjects.by_name(name)
    reason = subject.unavailable()
    if reason:
        pytest.skip(reason)
    mine = BASELINE[BASELINE.subject == name]
    current = accuracy.accuracy_sweep(sorted(set(mine.family)), [subject], sorted(set(mine.dtype)), progress=False)
    compared = baseline.build(current).merge(mine, on=baseline.KEY)
    assert len(compared) == len(mine), "case sets of the baseline are missing from the sweep"
    worse = baseline.regressions(current, mine)
    assert worse.empty, "worse than the baseline:\n" + worse.to_string()


def test_regressions_flags_only_what_is_beyond_both_allowances():
    base = BASELINE.head(4).assign(max_ulps=[0.0, 0.5, 3.0, 10.0])
    current = base.assign(implementation="kl_bench", method="stable", error="")
    assert baseline.regressions(current, base).empty
    current["max_ulps"] = [1.0, 1.5, 6.0, 20.0]  # exactly at max(b + 1, 2 b): allowed
    assert baseline.regressions(current, base).empty
    current["max_ulps"] = [1.01, 1.0, 6.5, np.inf]
    assert list(baseline.regressions(current, base).max_ulps) == [1.01, 6.5, np.inf]


def test_a_kernel_that_loses_digits_is_caught(monkeypatch):
    from kl_bench import kernels

    naive_vae = kernels.KERNELS["vae"]
    monkeypatch.setitem(kernels.KERNELS, "vae", lambda be, *a, method, check: naive_vae(be, *a, method="naive", check=check))
    kernels.compiled.cache_clear()
    try:
        numpy = subjects.Subject("numpy")
        current = accuracy.accuracy_sweep(["vae"], [numpy], ["float64"], progress=False)
        worse = baseline.regressions(current, BASELINE)
    finally:
        kernels.compiled.cache_clear()
    assert set(worse.regime) >= {"collapse"}


def test_merge_keeps_the_worse_of_each_case_set_and_every_row(tmp_path):
    path = tmp_path / "baseline.csv"
    sweep = BASELINE.head(3).assign(implementation="kl_bench", method="stable", error="")
    baseline.write(sweep.assign(max_ulps=[1.0, 5.0, 2.0]), path)
    other = sweep.iloc[1:].assign(max_ulps=[3.0, 4.0])  # another machine: one case set better, one worse
    merged = baseline.write(other, path, merge=True)
    assert len(merged) == 3 and len(baseline.read(path)) == 3
    by_key = baseline.read(path).set_index(["family", "regime", "dtype"]).max_ulps
    expected = sweep.assign(max_ulps=[1.0, 5.0, 4.0]).set_index(["family", "regime", "dtype"]).max_ulps
    pd.testing.assert_series_equal(by_key.sort_index(), expected.sort_index(), check_dtype=False)
