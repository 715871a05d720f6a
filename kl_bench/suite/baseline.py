"""The accuracy baseline: the worst error of every stable subject per case set, committed under
``reports/`` so that a change that loses digits fails ``stability/test_baseline.py``.

Refresh it on purpose, after a change that is meant to alter accuracy, with
``kl-bench baseline`` (it rewrites ``reports/accuracy-baseline.csv`` from the quick sweep: the
checkout's when the package runs from one, else under the current directory).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

KEY = ["family", "subject", "dtype", "regime", "param", "k"]
COLUMNS = KEY + ["max_ulps"]
NAME = Path("reports") / "accuracy-baseline.csv"


def default_path() -> Path:
    """The baseline of the checkout this package runs from (an editable install or a source tree);
    for an installed package, ``reports/accuracy-baseline.csv`` under the current directory."""
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "pyproject.toml").is_file() and (checkout / "reports").is_dir():
        return checkout / NAME
    return NAME


def build(df: pd.DataFrame) -> pd.DataFrame:
    """The baseline rows of a sweep: this project's stable subjects only."""
    stable = df[(df.implementation == "kl_bench") & (df.method == "stable") & (df.error == "")]
    return stable[COLUMNS].sort_values(KEY, na_position="first").reset_index(drop=True)


def allowed(baseline_ulps):
    """Worse than the baseline means beyond both 1 ulp more and twice as many ulps."""
    return np.maximum(baseline_ulps + 1.0, 2.0 * baseline_ulps)


def read(path: Path | str | None = None) -> pd.DataFrame:
    return pd.read_csv(path or default_path(), keep_default_na=True)


def write(df: pd.DataFrame, path: Path | str | None = None, merge: bool = False) -> pd.DataFrame:
    """Write the baseline rows of a sweep; ``merge`` keeps, per case set, the worse of this sweep
    and the baseline already at ``path`` (linear algebra rounds differently on other CPUs, so a
    baseline that CI machines of several kinds share holds the worst each has shown)."""
    path = path or default_path()
    table = build(df)
    if merge and Path(path).exists():
        both = pd.concat([read(path)[COLUMNS], table], ignore_index=True)
        worst = both.groupby(KEY, dropna=False, sort=False).max_ulps.max().reset_index()
        table = worst.sort_values(KEY, na_position="first").reset_index(drop=True)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(path, index=False, float_format="%.6g")
    return table


def regressions(current: pd.DataFrame, baseline: pd.DataFrame) -> pd.DataFrame:
    """Rows of ``current`` (a sweep or a baseline) worse than their baseline row, with both
    numbers; rows present in only one of the two are not compared."""
    merged = build(current).merge(baseline, on=KEY, suffixes=("", "_baseline"))
    return merged[~(merged.max_ulps <= allowed(merged.max_ulps_baseline))]
