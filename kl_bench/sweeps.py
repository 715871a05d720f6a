"""Accuracy sweeps: subjects x case sets -> tidy pandas DataFrame (one row per subject and case set)."""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd

from . import backends, bounds, cases, metrics, reference
from .subjects import Subject, ours

COLUMNS = [
    "family", "subject", "backend", "device", "dtype", "method", "regime", "param", "k", "n_cases",
    "max_ulps", "median_ulps", "max_rel_err", "bits_lost", "negatives", "nans", "infs", "bound", "ok",
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
    computed = subject.run(case.family, case.arrays, case.dtype).reshape(case.n)
    out = metrics.case_errors(computed, exact, case.dtype)
    out["computed"] = computed
    return out


def summarise(subject: Subject, case: cases.CaseSet, err: dict) -> dict:
    u = err["ulps"]
    limit = case_bounds(case)
    promised = ~np.isnan(limit)
    ok = bool(np.all(u[promised] <= limit[promised])) and not err["negative"].any() and not err["nan"].any()
    return {
        "family": case.family,
        "subject": subject.name,
        "backend": subject.backend,
        "device": subject.device,
        "dtype": case.dtype,
        "method": subject.method,
        "regime": case.regime,
        "param": case.param,
        "k": case.k,
        "n_cases": case.n,
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


def accuracy(families=None, backend_names=None, dtypes=None, methods=("stable", "naive"), seed=0, progress=True):
    """Every available subject on every quick case set; a tidy DataFrame (columns ``COLUMNS``)."""
    families = families or list(cases.DEFAULT_N)
    subjects = [s for s in ours(methods, backend_names or backends.installed()) if s.unavailable() is None]
    dtypes = dtypes or list(backends.FLOAT_DTYPES)
    rows = []
    for family in families:
        for dtype in dtypes:
            runnable = [s for s in subjects if s.unavailable(dtype) is None]
            if not runnable:
                continue
            for case in cases.quick(family, dtype, seed=seed):
                if progress:
                    print(f"  {case.name}", file=sys.stderr, flush=True)
                exact = references(case)
                for subject in runnable:
                    rows.append(summarise(subject, case, errors(subject, case, exact)))
    return pd.DataFrame(rows, columns=COLUMNS)


def worst_table(df: pd.DataFrame) -> pd.DataFrame:
    """Worst ulps per (family, regime) and (method, dtype), over backends and parameters."""
    table = df.pivot_table(index=["family", "regime"], columns=["method", "dtype"], values="max_ulps", aggfunc="max")
    order = [c for c in backends.FLOAT_DTYPES if c in table.columns.get_level_values(1)]
    return table.reindex(columns=pd.MultiIndex.from_product([["stable", "naive"], order]))
