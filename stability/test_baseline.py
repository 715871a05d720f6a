"""The accuracy baseline (reports/accuracy-baseline.csv) guards regressions: every stable subject,
recomputed on the quick sweep, must stay within max(baseline + 1, 2 x baseline) ulps per case set.
Refresh it on purpose with ``kl-bench baseline``."""

import numpy as np
import pytest

from kl_bench import baseline, subjects, sweeps

BASELINE = baseline.read()


@pytest.mark.parametrize("name", sorted(set(BASELINE.subject)))
def test_stable_subject_is_no_worse_than_its_baseline(name):
    subject = subjects.by_name(name)
    reason = subject.unavailable()
    if reason:
        pytest.skip(reason)
    mine = BASELINE[BASELINE.subject == name]
    current = sweeps.accuracy(sorted(set(mine.family)), [subject], sorted(set(mine.dtype)), progress=False)
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
    from kl_bench import kernels, kl

    naive_vae = kernels.KERNELS["vae"]
    monkeypatch.setitem(kernels.KERNELS, "vae", lambda be, *a, method, check: naive_vae(be, *a, method="naive", check=check))
    kl._compiled.cache_clear()
    try:
        numpy = subjects.Subject("numpy")
        current = sweeps.accuracy(["vae"], [numpy], ["float64"], progress=False)
        worse = baseline.regressions(current, BASELINE)
    finally:
        kl._compiled.cache_clear()
    assert set(worse.regime) >= {"collapse"}
