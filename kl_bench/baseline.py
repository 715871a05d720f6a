"""The accuracy baseline: the worst error of every stable subject per case set, committed under
``reports/`` so that a change that loses digits fails ``stability/test_baseline.py``.

Refresh it on purpose, after a change that is meant to alter accuracy, with
``kl-bench baseline`` (it rewrites ``reports/accuracy-baseline.csv`` from the quick sweep).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

KEY = ["family", "subject", "dtype", "regime", "param", "k"]
COLUMNS = KEY + ["max_ulps"]
DEFAULT_PATH = Path(__file__).resolve().parent.parent / "reports" / "accuracy-baseline.csv"


def build(df: pd.DataFrame) -> pd.DataFrame:
    """The baseline rows of a sweep: this project's stable subjects only."""
    stable = df[(df.implementation == "kl_bench") & (df.method == "stable") & (df.error == "")]
    return stable[COLUMNS].sort_values(KEY, na_position="first").reset_index(drop=True)


def allowed(baseline_ulps):
    """Worse than the baseline means beyond both 1 ulp more and twice as many ulps."""
    return np.maximum(baseline_ulps + 1.0, 2.0 * baseline_ulps)


def read(path: Path | str = DEFAULT_PATH) -> pd.DataFrame:
    return pd.read_csv(path, keep_default_na=True)


def write(df: pd.DataFrame, path: Path | str = DEFAULT_PATH) -> pd.DataFrame:
    table = build(df)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(path, index=False, float_format="%.6g")
    return table


def regressions(current: pd.DataFrame, baseline: pd.DataFrame) -> pd.DataFrame:
    """Rows of ``current`` (a sweep or a baseline) worse than their baseline row, with both
    numbers; rows present in only one of the two are not compared."""
    merged = build(current).merge(baseline, on=KEY, suffixes=("", "_baseline"))
    return merged[~(merged.max_ulps <= allowed(merged.max_ulps_baseline))]
