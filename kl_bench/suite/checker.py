"""``kl_bench.check``: judge anyone's KL implementation on the quick case sets.

The function under test is called like ``kl_bench.kl_<family>`` (same argument order, batched
arrays of the chosen backend and dtype) and must return one KL per batch element. A case fails when
the result has the wrong shape, is negative, NaN or inf where the exact KL is finite, or is further
from the mpmath reference than max(``max_ulps``, 4 x this project's stable error on the same case)
ulps, plus cond(S_q) ulps for the full-covariance families.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pandas as pd

from . import cases, metrics
from .accuracy import errors, references
from .subjects import Subject, describe

DEFAULT_MAX_ULPS = 64.0
OURS_FACTOR = 4.0


@dataclass(frozen=True)
class UserFunction(Subject):
    """Someone's function, called exactly like ``kl_bench.kl_<family>``."""

    fn: object = None
    method: str = ""

    implementation = "user"

    @property
    def name(self) -> str:
        label = f"{getattr(self.fn, '__module__', '?')}:{getattr(self.fn, '__qualname__', repr(self.fn))}"
        return f"{label}[{self.backend}-{self.device}]"

    def function(self, family):
        return self.fn


class CheckResult(NamedTuple):
    """``cases``: one row per case; ``passed``: the verdict. Unpacks as ``cases, passed``."""

    cases: pd.DataFrame
    passed: bool
    inputs: dict  # case-set name -> the float64 arrays given (rounded to the dtype)

    def table(self) -> pd.DataFrame:
        """Per regime and parameter, worst first: failures, then the worst error over its allowance."""
        g = self.cases.assign(over=self.cases.ulps / self.cases.allowed).groupby(["regime", "param"], dropna=False)
        table = g.agg(
            n=("ulps", "size"),
            failures=("passed", lambda p: int((~p).sum())),
            max_ulps=("ulps", "max"),
            ours_max_ulps=("ours_ulps", "max"),
            worst_over_allowed=("over", "max"),
            reason=("reason", lambda r: next((x for x in r if x), "")),
        )
        return table.sort_values(["failures", "worst_over_allowed"], ascending=False).reset_index()

    def worst(self) -> pd.Series:
        """The worst case: a failing one first, then the largest error over its allowance."""
        c = self.cases.assign(over=self.cases.ulps / self.cases.allowed)
        return c.sort_values(["passed", "over"], ascending=[True, False]).iloc[0]

    def worst_inputs(self) -> tuple:
        """The arguments of the worst case, as float64 NumPy arrays with a batch of one."""
        w = self.worst()
        return tuple(a[w.case : w.case + 1] for a in self.inputs[w.case_set])

    def report(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        failures = int((~self.cases.passed).sum())
        lines = [f"{verdict}: {failures} of {len(self.cases)} cases fail", ""]
        with pd.option_context("display.width", 200, "display.max_colwidth", 80):
            lines.append(self.table().to_string(index=False, float_format=lambda v: f"{v:.3g}"))
        w = self.worst()
        lines += ["", f"Worst case: {w.case_set} #{w.case}: computed {float(w.computed)!r}, exact {float(w.exact)!r}, "
                  f"{w.ulps:.3g} ulps (allowed {w.allowed:.3g}){'; ' + w.reason if w.reason else ''}",
                  "Its inputs (float64, batch of one; rounded to the dtype under test):"]
        with np.printoptions(precision=17, floatmode="unique", threshold=10_000, linewidth=120):
            lines += [f"  arg{i} = np.array({a.tolist()!r})" for i, a in enumerate(self.worst_inputs())]
        return "\n".join(lines)


def check(fn, family: str, dtype: str = "float64", backend: str = "numpy", *, max_ulps: float = DEFAULT_MAX_ULPS,
          seed: int = 0, progress: bool = False) -> CheckResult:
    """Judge ``fn`` on every quick case set of ``family`` in ``dtype`` (see the module docstring)."""
    subject = UserFunction(backend=backend, fn=fn)
    ours = Subject(backend)
    reason = subject.unavailable(family, dtype)
    if reason:
        raise ValueError(reason)
    rows, inputs = [], {}
    for case in cases.quick(family, dtype, seed=seed):
        if progress:
            print(f"  {case.name}", file=sys.stderr, flush=True)
        exact = references(case)
        inputs[case.name] = case.arrays
        theirs, problem = _call(subject, case)
        ours_ulps = errors(ours, case, exact)["ulps"]
        err = metrics.case_errors(theirs, exact, dtype)
        conds = case.cond if case.cond is not None else np.zeros(case.n)
        allowed = np.maximum(max_ulps, OURS_FACTOR * ours_ulps) + conds
        for i in range(case.n):
            why = problem or _reason(err, i, allowed[i])
            rows.append({
                "case_set": case.name, "regime": case.regime, "param": case.param, "k": case.k, "case": i,
                "computed": float(theirs[i]), "exact": float(exact[i]), "ulps": float(err["ulps"][i]),
                "ours_ulps": float(ours_ulps[i]), "allowed": float(allowed[i]), "passed": not why, "reason": why,
            })
    df = pd.DataFrame(rows)
    return CheckResult(df, bool(df.passed.all()), inputs)


def _call(subject: UserFunction, case: cases.CaseSet):
    """The function's results as float64 (NaN where it gave none) and a problem with the call."""
    nan = np.full(case.n, np.nan)
    try:
        with np.errstate(all="ignore"):
            values = subject.run(case.family, case.arrays, case.dtype)
    except Exception as exc:
        return nan, f"raised {describe(exc)}"
    if values.shape != (case.n,):
        return nan, f"returned shape {values.shape} for a batch of {case.n} (expected ({case.n},))"
    return values, ""


def _reason(err: dict, i: int, allowed: float) -> str:
    if err["nan"][i]:
        return "NaN where the exact KL is finite"
    if err["inf"][i]:
        return "inf where the exact KL is finite"
    if err["negative"][i]:
        return "negative"
    if not err["ulps"][i] <= allowed:
        return f"{err['ulps'][i]:.3g} ulps > {allowed:.3g} allowed" if math.isfinite(err["ulps"][i]) else "infinitely many ulps"
    return ""
