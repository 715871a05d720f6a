"""The accuracy sweep: subjects x case sets -> tidy pandas DataFrame (one row per subject and case set).

Every subject sees the same case arrays and is judged against the same cached mpmath references,
so a second sweep over the same cases costs only the subjects' own time.
"""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd

from .. import backends, families
from . import bounds, cases, metrics, reference
from .subjects import Subject, available, describe, labels

COLUMNS = [
    "family", "subject", "implementation", "backend", "device", "dtype", "method", "mode", "regime", "param",
    "k", "cond", "n_cases", "max_ulps", "median_ulps", "max_rel_err", "bits_lost", "negatives", "nans", "infs",
    "bound", "ok", "error",
]


def references(case: cases.CaseSet) -> np.ndarray:
    """mpmath references of a case set (cached on disk)."""
    return np.asarray(reference.evaluate(case.family, *case.arrays), dtype=object).reshape(case.n)


def case_bounds(case: cases.CaseSet) -> np.ndarray:
    """The stable bound of each case (NaN where nothing is promised)."""
    conds = case.cond if case.cond is not None else [None] * case.n
    limits = [bounds.ulp_bound(case.family, case.dtype, case.k, c) for c in conds]
    return np.array([np.nan if b is None else b for b in limits], dtype=float)


def errors(subject: Subject, case: cases.CaseSet, exact=None) -> dict[str, np.ndarray]:
    """Per-case errors of one subject on one case set, plus the computed values."""
    exact = references(case) if exact is None else exact
    with np.errstate(all="ignore"):  # overflow to inf is judged by the metrics, not warned about
        computed = subject.run(case.family, case.arrays, case.dtype).reshape(case.n)
    out = metrics.case_errors(computed, exact, case.dtype)
    out["computed"] = computed
    return out


def row(subject: Subject, case: cases.CaseSet) -> dict:
    """The columns that name a subject and a case set in a table row."""
    return labels(subject) | {
        "family": case.family, "dtype": case.dtype, "regime": case.regime, "param": case.param, "k": case.k,
        "cond": float(np.median(case.cond)) if case.cond is not None else np.nan, "n_cases": case.n, "error": "",
    }


def summarise(subject: Subject, case: cases.CaseSet, err: dict) -> dict:
    u = err["ulps"]
    limit = case_bounds(case)
    promised = ~np.isnan(limit)
    ok = bool(np.all(u[promised] <= limit[promised])) and not err["negative"].any() and not err["nan"].any()
    return row(subject, case) | {
        "max_ulps": float(u.max()),
        "median_ulps": float(np.median(u)),
        "max_rel_err": float(err["rel_err"].max()),
        "bits_lost": float(err["bits"].max()),
        "negatives": int(err["negative"].sum()),
        "nans": int(err["nan"].sum()),
        "infs": int(err["inf"].sum()),
        "bound": float(np.nanmax(limit)) if promised.any() else np.nan,
        "ok": ok if subject.method == "stable" else np.nan,
    }


def failed(subject: Subject, case: cases.CaseSet, exc: Exception) -> dict:
    """The row of a subject that raised on a case set: no numbers, the exception kept."""
    return row(subject, case) | {"ok": False if subject.method == "stable" else np.nan, "error": describe(exc)}


def accuracy_sweep(family_names=None, subjects=None, dtypes=None, sweep="quick", seed=0, progress=True) -> pd.DataFrame:
    """Every subject on every case set of ``sweep`` (``cases.SWEEPS``): a tidy DataFrame with the
    columns ``COLUMNS``. ``subjects`` defaults to everything that can run here."""
    family_names = family_names or families.NAMES
    subjects = available() if subjects is None else subjects
    dtypes = dtypes or list(backends.FLOAT_DTYPES)
    rows = []
    for family in family_names:
        for dtype in dtypes:
            runnable = [s for s in subjects if s.unavailable(family, dtype) is None]
            if not runnable:
                continue
            for case in cases.case_sets(family, dtype, sweep, seed=seed):
                if progress:
                    print(f"  {case.name}", file=sys.stderr, flush=True)
                exact = references(case)
                for subject in runnable:
                    try:
                        rows.append(summarise(subject, case, errors(subject, case, exact)))
                    except Exception as exc:  # a third party that cannot take these inputs
                        rows.append(failed(subject, case, exc))
    return pd.DataFrame(rows, columns=COLUMNS)
