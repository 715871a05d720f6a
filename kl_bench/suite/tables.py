"""Tables of a sweep's rows: the headline pivots (worst ulps per regime and implementation), the
speed table, Markdown for them, and the parquet/CSV files of a run."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..backends import FLOAT_DTYPES
from .subjects import ARRAY, FUSED

KINDS = ("accuracy", "timing", "mixture", "mixture_timing")  # the tables of a run


def worst_table(df: pd.DataFrame) -> pd.DataFrame:
    """Worst ulps per (family, regime) and (method, dtype) of this project's kernels, over
    backends and parameters."""
    df = df[df.implementation == "kl_bench"]
    table = df.pivot_table(index=["family", "regime"], columns=["method", "dtype"], values="max_ulps", aggfunc="max")
    order = [c for c in FLOAT_DTYPES if c in table.columns.get_level_values(1)]
    return table.reindex(columns=pd.MultiIndex.from_product([["stable", "naive"], order]))


def headline(df: pd.DataFrame, dtype: str = "float64") -> pd.DataFrame:
    """Worst ulps per (family, regime) (rows) and implementation (columns: the subject's name
    without its backend, this project's first) in one dtype, over backends, devices and
    parameters. A subject that raised on every case set of a cell shows NaN."""
    df = df[df.dtype == dtype].assign(label=lambda d: d.subject.str.split("[", regex=False).str[0])
    table = df.pivot_table(index=["family", "regime"], columns="label", values="max_ulps", aggfunc="max")
    order = sorted(table.columns, key=lambda name: (not name.startswith("kl_bench.stable"), not name.startswith("kl_bench"), name))
    return table[order]


def speed_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per (family, dtype, B, k) and backend/mode of this project's stable kernel: its seconds,
    stable / naive on the same backend and mode, torch.distributions / stable on the same device,
    the fraction of the measured ceiling, and the memory one call holds beyond its inputs as a
    multiple of its largest input."""
    df = df[df.error == ""]
    keys = ["family", "dtype", "B", "k"]
    ours = df[df.implementation == "kl_bench"]
    stable = ours[ours.method == "stable"].set_index(keys + ["backend", "device", "mode"])
    naive = ours[ours.method == "naive"].set_index(keys + ["backend", "device", "mode"]).seconds
    # The textbook on a backend is this project's naive kernel there; the fused kernels (numba,
    # Triton) exist for the stable one only, so their textbook is the array path's.
    naive_same = naive.reindex(stable.index)
    for fused in FUSED:
        naive_same = naive_same.fillna(naive.rename(index={ARRAY: fused}, level="mode").reindex(stable.index))
    torch_d = df[df.implementation == "torch.distributions"].groupby(keys + ["device"]).seconds.min()
    out = pd.DataFrame({
        "stable_ms": stable.seconds * 1e3,
        "stable_over_textbook": stable.seconds / naive_same,
        "torch_distributions_over_stable": torch_d.reindex(stable.index.droplevel(["backend", "mode"])).to_numpy() / stable.seconds,
        "gbps": stable.gbps,
        "roofline_fraction": stable.roofline_fraction,
        "peak_over_input": stable.peak_over_input if "peak_over_input" in stable else float("nan"),
    })
    return out.sort_index()


def worst_first(df: pd.DataFrame) -> pd.DataFrame:
    """Rows of a check (``ulps``, ``allowed``, ``passed``): failing ones first, then by error over
    allowance, largest first; with that ratio as ``over``."""
    return df.assign(over=df.ulps / df.allowed).sort_values(["passed", "over"], ascending=[True, False])


def markdown(table: pd.DataFrame) -> str:
    """A Markdown table of a pivot (no extra dependency)."""

    def label(value):
        return " / ".join(map(str, value)) if isinstance(value, tuple) else str(value)

    headers = [" / ".join(map(str, table.index.names))] + [label(c).replace(" / ", " ") for c in table.columns]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for index, row in table.iterrows():
        lines.append("| " + label(index) + " | " + " | ".join(fmt(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def fmt(v: float) -> str:
    """A number as the tables show it: 3 significant digits, "inf", "-" for missing."""
    if pd.isna(v):
        return "-"
    if v == float("inf"):
        return "inf"
    return f"{v:.3g}" if v < 1e4 else f"{v:.1e}"


def write(out: Path, frames: dict[str, pd.DataFrame]) -> None:
    """Each table as ``out/<name>.parquet`` and ``out/<name>.csv``."""
    for name, df in frames.items():
        df.to_parquet(out / f"{name}.parquet", index=False)
        df.to_csv(out / f"{name}.csv", index=False)


def read(out: Path) -> dict[str, pd.DataFrame]:
    """The tables of a run that ``out`` holds."""
    return {name: pd.read_parquet(out / f"{name}.parquet") for name in KINDS if (out / f"{name}.parquet").exists()}
