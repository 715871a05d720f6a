"""Accuracy sweeps: subjects x case sets -> tidy pandas DataFrame (one row per subject and case set).

Every subject sees the same case arrays and is judged against the same cached mpmath references,
so a second sweep over the same cases costs only the subjects' own time.
"""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd

from . import backends, bounds, cases, metrics, reference
from . import gradients as exact_gradients
from .subjects import Subject, registry

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


def _row(subject: Subject, case: cases.CaseSet) -> dict:
    return {
        "family": case.family,
        "subject": subject.name,
        "implementation": subject.implementation,
        "backend": subject.backend,
        "device": subject.device,
        "dtype": case.dtype,
        "method": subject.method,
        "mode": subject.mode,
        "regime": case.regime,
        "param": case.param,
        "k": case.k,
        "cond": float(np.median(case.cond)) if case.cond is not None else np.nan,
        "n_cases": case.n,
        "error": "",
    }


def summarise(subject: Subject, case: cases.CaseSet, err: dict) -> dict:
    u = err["ulps"]
    limit = case_bounds(case)
    promised = ~np.isnan(limit)
    ok = bool(np.all(u[promised] <= limit[promised])) and not err["negative"].any() and not err["nan"].any()
    return _row(subject, case) | {
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


def describe(exc: Exception) -> str:
    """One line naming an exception a subject raised."""
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:200]


def failed(subject: Subject, case: cases.CaseSet, exc: Exception) -> dict:
    """The row of a subject that raised on a case set: no numbers, the exception kept."""
    return _row(subject, case) | {"ok": False if subject.method == "stable" else np.nan, "error": describe(exc)}


def available_subjects(backend_names=None, methods=("stable", "naive"), names=None, compiled=False) -> list[Subject]:
    """Subjects that can run here: this project's ``methods`` and every third party, on the given
    backends; ``names`` keeps those whose name contains one of the given strings."""
    backend_names = backend_names or backends.installed()
    chosen = []
    for s in registry(compiled=compiled):
        if s.backend not in backend_names or s.unavailable() is not None:
            continue
        if s.ours and s.method not in methods:
            continue
        if names and not any(n in s.name for n in names):
            continue
        chosen.append(s)
    return chosen


def accuracy(families=None, subjects=None, dtypes=None, sweep="quick", seed=0, progress=True) -> pd.DataFrame:
    """Every subject on every case set of ``sweep`` (``cases.SWEEPS``): a tidy DataFrame with the
    columns ``COLUMNS``. ``subjects`` defaults to everything that can run here."""
    families = families or list(cases.DEFAULT_N)
    subjects = available_subjects() if subjects is None else subjects
    dtypes = dtypes or list(backends.FLOAT_DTYPES)
    rows = []
    for family in families:
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


def worst_table(df: pd.DataFrame) -> pd.DataFrame:
    """Worst ulps per (family, regime) and (method, dtype) of this project's kernels, over
    backends and parameters."""
    df = df[df.implementation == "kl_bench"]
    table = df.pivot_table(index=["family", "regime"], columns=["method", "dtype"], values="max_ulps", aggfunc="max")
    order = [c for c in backends.FLOAT_DTYPES if c in table.columns.get_level_values(1)]
    return table.reindex(columns=pd.MultiIndex.from_product([["stable", "naive"], order]))


def headline(df: pd.DataFrame, dtype: str = "float64") -> pd.DataFrame:
    """Worst ulps per (family, regime) (rows) and implementation (columns: the subject's name
    without its backend, this project's first) in one dtype, over backends, devices and
    parameters. A subject that raised on every case set of a cell shows NaN."""
    df = df[df.dtype == dtype].assign(label=lambda d: d.subject.str.split("[", regex=False).str[0])
    table = df.pivot_table(index=["family", "regime"], columns="label", values="max_ulps", aggfunc="max")
    order = sorted(table.columns, key=lambda name: (not name.startswith("kl_bench.stable"), not name.startswith("kl_bench"), name))
    return table[order]


GRADIENT_COLUMNS = ["family", "subject", "implementation", "backend", "device", "dtype", "method", "mode", "regime",
                    "param", "k", "n_cases", "max_ulps", "median_ulps", "nonfinite", "error"]
GRADIENT_REGIMES = ("equal", "near-equal", "collapse")


def gradients(families=None, subjects=None, dtype="float64", regimes=GRADIENT_REGIMES, n=8, seed=0, progress=True):
    """Autodiff gradients of every differentiable subject against exact mpmath gradients, on the
    first ``n`` cases of each quick case set of ``regimes``: normwise ulps, the worst argument per
    case (``kl_bench.gradients``); ``nonfinite`` counts cases whose gradient has a NaN or inf."""
    families = families or list(cases.DEFAULT_N)
    subjects = [s for s in (available_subjects() if subjects is None else subjects) if s.be.differentiable]
    rows = []
    for family in families:
        for regime, param in [rp for rp in cases.regimes(family, dtype) if rp[0] in regimes]:
            case = cases.generate(family, regime, dtype, param, n=n, seed=seed)
            if progress:
                print(f"  gradients {case.name}", file=sys.stderr, flush=True)
            exact = exact_gradients.exact_for(case)
            for subject in [s for s in subjects if s.unavailable(family, dtype) is None]:
                try:
                    with np.errstate(all="ignore"):
                        u, nonfinite = exact_gradients.case_ulps(subject, case, exact)
                except Exception as exc:  # a subject without a gradient for these inputs
                    rows.append(_row(subject, case) | {"error": describe(exc)})
                    continue
                rows.append(_row(subject, case) | {"max_ulps": u.max(), "median_ulps": float(np.median(u)),
                                                   "nonfinite": int(nonfinite.sum())})
    return pd.DataFrame(rows, columns=GRADIENT_COLUMNS)


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------

TIMING_COLUMNS = ["family", "subject", "implementation", "backend", "device", "dtype", "method", "mode", "compiled",
                  "B", "k", "seconds", "compile_seconds", "bytes", "gbps", "flops", "roofline_fraction", "error"]
_FULL_KS = (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# (B, k) from tiny (per-call overhead) to memory-bound; the full-covariance families at batch 16.
TIMING_SHAPES = {
    "quick": {"elementwise": ((1, 64), (4096, 64), (2048, 4096)), "full": ((16, 2), (16, 32), (16, 256))},
    "full": {"elementwise": ((1, 64), (64, 64), (4096, 64), (256, 4096), (2048, 4096), (4096, 4096)),
             "full": tuple((16, k) for k in _FULL_KS)},
}
TIMING_DTYPES = {"normal": ("float32",), "diag": ("float32",), "vae": ("float32",), "tril": ("float64",), "cov": ("float64",)}


def timed(subject: Subject) -> bool:
    """Whether timing compares this subject: all but torch.distributions' LowRank form of the
    diagonal families (the same KL as Independent Normal, by a k x k route)."""
    return not (subject.implementation == "torch.distributions" and subject.method == "LowRank")


def timing_subjects(backend_names=None, compiled=True) -> list[Subject]:
    """What ``timing`` compares by default: this project's stable and naive kernels in every mode
    that runs here (``compiled``: also under jax.jit and torch.compile), torch.distributions
    (Normal, Independent Normal, MultivariateNormal), numpyro and the textbook formula in NumPy."""
    subjects = available_subjects(backend_names, compiled=compiled)
    return [s for s in subjects if timed(s)]


def timing(families=None, subjects=None, dtypes=None, sweep="quick", repeats=5, progress=True, shapes=None,
           keep_partial=True) -> pd.DataFrame:
    """Seconds per call of every subject on every (family, shape, dtype) of ``TIMING_SHAPES[sweep]``
    (or of ``shapes``, a list of (B, k) for every family), with compile time, GB/s and the fraction of the measured ceiling (``kl_bench.timing``): a tidy
    DataFrame with the columns ``TIMING_COLUMNS``. ``dtypes`` defaults to float32 for the
    elementwise families and float64 for the full-covariance ones. Interrupted (Ctrl-C), it returns
    the rows finished so far (``keep_partial``) or lets the interrupt through."""
    from . import timing as clock

    families = families or list(cases.DEFAULT_N)
    subjects = timing_subjects() if subjects is None else subjects
    rows = []
    try:
        for family in families:
            kind = "elementwise" if family in clock.ELEMENTWISE else "full"
            for dtype in dtypes or TIMING_DTYPES[family]:
                for batch, k in shapes or TIMING_SHAPES[sweep][kind]:
                    for subject in [s for s in subjects if s.unavailable(family, dtype) is None]:
                        if progress:
                            print(f"  timing {family} {dtype} B={batch} k={k} {subject.name}", file=sys.stderr, flush=True)
                        base = {"family": family, "subject": subject.name, "implementation": subject.implementation,
                                "backend": subject.backend, "device": subject.device, "dtype": dtype,
                                "method": subject.method, "mode": subject.mode, "compiled": _compiled(subject),
                                "B": batch, "k": k, "error": ""}
                        try:
                            workload = clock.Workload(subject, family, batch, k, dtype)
                            rows.append(base | clock.measure(workload, repeats=repeats))
                        except Exception as exc:  # a third party that cannot take these inputs
                            rows.append(base | {"error": describe(exc)})
    except KeyboardInterrupt:
        if not keep_partial:
            raise
        print("  timing interrupted: keeping the rows finished", file=sys.stderr)
    return pd.DataFrame(rows, columns=TIMING_COLUMNS)


def _compiled(subject: Subject) -> bool:
    """Does the measured call run compiled code (JAX always; numba, jit and compile modes)?"""
    return subject.backend == "jax" or subject.mode in ("numba", "jax.jit", "torch.compile")


def speed_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per (family, dtype, B, k) and backend/mode of this project's stable kernel: its seconds,
    stable / naive on the same backend and mode, torch.distributions / stable on the same device,
    and the fraction of the measured ceiling."""
    df = df[df.error == ""]
    keys = ["family", "dtype", "B", "k"]
    ours = df[df.implementation == "kl_bench"]
    stable = ours[ours.method == "stable"].set_index(keys + ["backend", "device", "mode"])
    naive = ours[ours.method == "naive"].set_index(keys + ["backend", "device", "mode"]).seconds
    # The textbook on a backend is this project's naive kernel there; numba fuses only the stable
    # one, so its textbook is the array path's.
    naive_same = naive.reindex(stable.index)
    array_naive = naive.rename(index={"": "numba"}, level="mode").reindex(stable.index)
    naive_same = naive_same.fillna(array_naive)
    torch_d = df[df.implementation == "torch.distributions"].groupby(keys + ["device"]).seconds.min()
    out = pd.DataFrame({
        "stable_ms": stable.seconds * 1e3,
        "stable_over_textbook": stable.seconds / naive_same,
        "torch_distributions_over_stable": torch_d.reindex(stable.index.droplevel(["backend", "mode"])).to_numpy() / stable.seconds,
        "gbps": stable.gbps,
        "roofline_fraction": stable.roofline_fraction,
    })
    return out.sort_index()
