"""``kl-bench recommend``: the fastest subject that meets an accuracy requirement at one shape.

Accuracy comes from the run's accuracy table (every case set of the family and dtype: a subject
qualifies if its worst error on each case set is within the requirement: ``max_ulps`` if given,
else this project's promised bound for that case set), speed from its timing table at the shape.
Cells missing from the run are measured and stored in its ``cells/`` (so they are reused).
``recommend_mixture`` does the same for ``kl_mixture``'s approximations, judged in nats by the
run's mixture sweep and timed by its mixture_timing cell.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .. import accel, families
from . import mixtures, runner, tables
from .subjects import ARRAY, FUSED, MODES

# One line of code per implementation; {f} is the family, {args} its arguments, {dist} how p and q are built.
CODE = {
    "kl_bench": "kl_bench.kl_{f}({args}{extra})",
    "torch.distributions": "torch.distributions.kl_divergence(p, q)  # {dist}",
    "numpyro": "numpyro.distributions.kl_divergence(p, q)  # {dist}",
    "tfp": "tensorflow_probability.substrates.jax.distributions.kl_divergence(p, q)  # {dist}",
    "distrax": "p.kl_divergence(q)  # distrax.{dist}",
    "pyro": "torch.distributions.kl_divergence(p, q)  # after import pyro.distributions: {dist}",
    "gpytorch": "torch.distributions.kl_divergence(p, q)  # gpytorch.distributions.{dist}",
    "textbook": "the textbook formula in NumPy: kl_bench.suite.subjects.textbook_{f}({args})",
}
_PYRO_STYLE = {
    "normal": "Normal(loc, scale)",
    "diag": "Independent(Normal(loc, exp(logvar / 2)), 1)",
    "vae": "Independent(Normal(loc, exp(logvar / 2)), 1) against a standard normal",
    "tril": "MultivariateNormal(loc, scale_tril=L)",
    "cov": "MultivariateNormal(loc, covariance_matrix=S)",
    "lowrank": "LowRankMultivariateNormal(loc, cov_factor=W, cov_diag=d)",
}
DISTRIBUTIONS = {  # per implementation and family (as subjects.py builds them)
    "torch.distributions": _PYRO_STYLE,
    "numpyro": _PYRO_STYLE,
    "tfp": {"normal": "Normal(loc, scale)", "diag": "MultivariateNormalDiag(loc, exp(logvar / 2))",
            "vae": "MultivariateNormalDiag(loc, exp(logvar / 2)) against a standard normal",
            "tril": "MultivariateNormalTriL(loc, L)", "cov": "MultivariateNormalFullCovariance(loc, S)"},
    "distrax": {"normal": "Normal(loc, scale)", "diag": "MultivariateNormalDiag(loc, exp(logvar / 2))",
                "vae": "MultivariateNormalDiag(loc, exp(logvar / 2)) against a standard normal",
                "tril": "MultivariateNormalTri(loc, L, is_lower=True)"},
    "pyro": {"diag": "p = Independent(Normal(loc_p, exp(logvar_p / 2)), 1), q = MultivariateNormal(loc_q, scale_tril=diag)",
             "vae": "p = Independent(Normal(loc, exp(logvar / 2)), 1), q = MultivariateNormal(0, scale_tril=I)"},
    "gpytorch": {"diag": "MultivariateNormal(loc, DiagLinearOperator(exp(logvar)))",
                 "vae": "MultivariateNormal(loc, DiagLinearOperator(exp(logvar))) against a standard normal",
                 "tril": "MultivariateNormal(loc, CholLinearOperator(TriangularLinearOperator(L)))",
                 "cov": "MultivariateNormal(loc, S)",
                 "lowrank": "MultivariateNormal(loc, LowRankRootAddedDiagLinearOperator(LowRankRootLinearOperator(W), DiagLinearOperator(d)))"},
}


@dataclass
class Choice:
    subject: str
    seconds: float
    worst_error: float
    worst_share: float  # the largest error / requirement over the case sets
    code: str
    unit: str = "ulps"


def code_line(row: pd.Series, family: str) -> str:
    """How to call the subject of a timing row."""
    impl = row.implementation
    extra = ', method="naive"' if impl == "kl_bench" and row.method == "naive" else ""
    args = ", ".join(families.get(family).names)
    line = CODE[impl].format(f=family, args=args, extra=extra, dist=DISTRIBUTIONS.get(impl, {}).get(family, ""))
    if impl == "kl_bench":
        arrays = {"numpy": "NumPy arrays", "torch": "torch tensors", "jax": "JAX arrays"}[row.backend]
        if row["mode"] == "jax.jit":
            line = f"jax.jit({line.split('(')[0]})({args}{extra})"
        elif row["mode"] == "torch.compile":
            line = f"torch.compile({line.split('(')[0]})({args}{extra})"
        elif row["mode"] == ARRAY and row.method == "stable" and _accelerated_here(row.backend, row.device, family):
            line = f'with kl_bench.accel.use("{ARRAY}"): {line}'
        # the extra of the package a fused kernel compiles with (the XLA custom call's handler is numba's)
        extra = f'; pip install "kl-bench[{accel.REGISTRY[row["mode"]].requires}]"' if row["mode"] in FUSED else ""
        note = f"  # {arrays} on {row.device}{extra}"
        line += note
    return line


def _accelerated_here(backend: str, device: str, family: str) -> bool:
    """Would a plain call on this backend and device take an accelerated kernel (so that the array
    path needs asking for)?"""
    kernel = "triton" if device == "cuda" else "numba"
    return (accel.REGISTRY[kernel].available() and backend in MODES[kernel] and family in families.with_kernel(kernel))


def recommend(out: Path, family: str, batch: int, k: int, dtype: str, device: str = "cpu", max_ulps: float | None = None,
              backend_names=None, quiet: bool = False) -> tuple[list[Choice], int]:
    """Qualifying subjects, fastest first, and how many cells were measured for it (not counting
    cells an earlier call measured and stored)."""
    cells = [runner.Cell("accuracy", family, dtype, "quick"), runner.Cell("timing", family, dtype, f"{batch}x{k}")]
    found, measured = _tables(out, cells, backend_names, quiet)
    acc, tim = found["accuracy"], found["timing"]
    acc = acc[(acc.family == family) & (acc.dtype == dtype) & (acc.device == device)]
    tim = tim[(tim.family == family) & (tim.dtype == dtype) & (tim.device == device) & (tim.B == batch) & (tim.k == k)
              & (tim.error.fillna("") == "")]
    limit = acc.bound if max_ulps is None else pd.Series(max_ulps, index=acc.index)
    judged = acc[limit.notna()].assign(meets=lambda d: (d.max_ulps <= limit[d.index]) & (d.error.fillna("") == ""),
                                       share=lambda d: d.max_ulps / limit[d.index])
    verdict = judged.groupby("subject").agg(meets=("meets", "all"), worst=("max_ulps", "max"), share=("share", "max"))
    good = verdict[verdict.meets]
    tim = tim[tim.subject.isin(good.index)].sort_values("seconds")
    choices = [Choice(row.subject, row.seconds, float(good.worst[row.subject]), float(good.share[row.subject]), code_line(row, family))
               for _, row in tim.iterrows()]
    return choices, measured


DEFAULT_MAX_ERROR = 0.1  # nats: the requirement of recommend --family mixture unless --max-error


def recommend_mixture(out: Path, batch: int, k: int, device: str = "cpu", max_error: float | None = None,
                      backend_names=None, quiet: bool = False) -> tuple[list[Choice], int]:
    """kl_mixture's approximations (variational, Monte-Carlo at each size of ``mixtures.SAMPLE_COUNTS``)
    whose worst error over the run's mixture sweep (``mixtures.approximation_errors``) is within
    ``max_error`` nats, fastest first at B pairs of mixtures in k dimensions, and how many cells
    were measured for it."""
    max_error = DEFAULT_MAX_ERROR if max_error is None else max_error
    cells = [runner.Cell(mixtures.FAMILY, mixtures.FAMILY, "float64", "quick"),
             runner.Cell(runner.MIXTURE_TIMING, mixtures.FAMILY, "float64", f"{batch}x{k}")]
    found, measured = _tables(out, cells, backend_names, quiet)
    errors = mixtures.approximation_errors(found[mixtures.FAMILY])
    tim = found[runner.MIXTURE_TIMING]
    tim = tim[(tim.device == device) & (tim.B == batch) & (tim.k == k) & (tim.error.fillna("") == "")]
    tim = tim.merge(errors, on=["method", "num_samples"])
    tim = tim[tim.worst_error <= max_error].sort_values("seconds")
    choices = [Choice(f"{row.subject} {mixtures.approximation_label(row.method, row.num_samples)}", row.seconds, row.worst_error,
                      row.worst_error / max_error, _mixture_code(row), unit="nats")
               for _, row in tim.iterrows()]
    return choices, measured


def _mixture_code(row) -> str:
    options = 'method="variational"' if row.method == "variational" else f"num_samples={row.num_samples}, seed=seed"
    arrays = {"numpy": "NumPy arrays", "torch": "torch tensors", "jax": "JAX arrays"}[row.backend]
    return (f"kl_bench.kl_mixture(logits_p, loc_p, logvar_p, logits_q, loc_q, logvar_q, {options})"
            f"  # {arrays} on {row.device}, float64, {row.m} components each")


def _tables(out: Path, cells, backend_names, quiet: bool) -> tuple[dict[str, pd.DataFrame], int]:
    """The run's tables of the cells' kinds, with the cells whose rows they lack measured into the
    run (or read from its cells/ where an earlier recommend stored them), and how many were measured."""
    frames = tables.read(out) if out.exists() else {}
    missing = [c for c in cells if not _holds(frames.get(c.kind), c)]
    measured, reused = {}, 0
    if missing:
        results, reused = runner.execute(missing, out, backend_names, compiled=False, quiet=quiet)
        measured = runner.frames(results)
    merged = {c.kind: pd.concat([frames.get(c.kind, pd.DataFrame()), measured.get(c.kind, pd.DataFrame())], ignore_index=True)
              for c in cells}
    return merged, len(missing) - reused


def _holds(df: pd.DataFrame | None, cell) -> bool:
    """Does a run's table have rows of this cell (its family and dtype, and its shape for timing)?"""
    if df is None or not len(df):
        return False
    rows = (df.family == cell.family) & (df.dtype == cell.dtype)
    if cell.kind in ("timing", runner.MIXTURE_TIMING):
        batch, k = (int(v) for v in cell.part.split("x"))
        rows &= (df.B == batch) & (df.k == k)
    return bool(rows.any())
