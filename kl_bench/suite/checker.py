"""``kl_bench.check``: judge anyone's KL implementation on the quick case sets.

The function under test is called like ``kl_bench.kl_<family>`` (same argument order, batched
arrays of the chosen backend and dtype) and must return one KL per batch element. A case fails when
the result has the wrong shape, is negative, NaN or inf where the exact KL is finite, the call raises,
exits, crashes the process or hangs (``isolation``: the function runs in a worker process), or is further
from the certified reference than its allowance: by default the accuracy this project promises for
the family and dtype (``bounds.ulp_bound``: what ``kl_bench`` itself guarantees), or ``max_ulps``
when given; plus cond(S_q) ulps for the full-covariance families; where nothing is promised (a
Cholesky factor with cond(S_q) beyond 1e4), 4 x
this project's own error, at least 16 ulps. Mixtures have their own check (``mixtures.check``).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .. import families
from . import bounds, cases, gradient_checks, metrics, tables
from .accuracy import errors, references
from .isolation import DEFAULT_TIMEOUT, Isolated, UserFunction, target_name
from .subjects import Subject

OURS_FACTOR = 4.0  # where nothing is promised: this many times this project's own error
UNPROMISED_FLOOR = 16.0

# What each regime is, and the usual cause and cure of a failure there.
ADVICE = {
    "generic": "unrelated p and q: a plain error in the formula (a missing 1/2, p and q swapped, standard deviations "
               "used as variances) shows here first",
    "equal": "p == q, where the exact KL is 0: a nonzero result is rounding noise left by cancellation; forms whose "
             "terms vanish at p == q (expm1(x) - x, u - log1p(u), L_q^-1 (L_p - L_q)) give exactly 0",
    "near-equal": "p and q nearly equal: the textbook formula subtracts terms of size k to leave a tiny KL "
                  "(catastrophic cancellation); write each term as expm1(x) - x or u - log1p(u), with a series near 0, "
                  "and work with differences (L_p - L_q, S_p - S_q)",
    "collapse": "posterior collapse (loc and logvar near 0): exp(logvar) - 1 - logvar cancels; use expm1(logvar) - "
                "logvar, with a series for small |logvar|",
    "extreme-scale": "extreme scales: an intermediate (a variance, a squared mean difference, e^logvar) overflows or "
                     "underflows although the KL does not; scale before squaring and work with log-variances (full "
                     "covariances: divide both covariances by one power of 4, means and factors by its square root)",
    "extreme-scale-near": "extreme scales with p near q: intermediate overflow and cancellation together; scale before "
                          "squaring and use log1p((s_p - s_q) / s_q)",
    "extreme-logvar": "extreme log-variances: e^logvar or e^-logvar overflows although the KL does not; combine "
                      "exponents (e^(l_p - l_q)) and split large ones",
    "high-dim": "large k: sums of many terms and determinants that under- or overflow; sum logs of Cholesky "
                "diagonals, never form det",
    "ill-conditioned": "ill-conditioned S_q: an explicit inverse or determinant loses about cond(S_q) ulps; use a "
                       "Cholesky factor and triangular solves",
}


@dataclass(frozen=True)
class CheckResult:
    """``cases``: one row per case; ``passed``: the verdict; ``inputs``: case-set name -> the float64
    arrays given (rounded to the dtype). Unpacks as ``cases, passed``."""

    cases: pd.DataFrame
    passed: bool
    inputs: dict
    target: str = "your_kl"  # MODULE:FUNCTION of the function judged
    family: str = ""
    dtype: str = "float64"
    backend: str = "numpy"
    allowance: str = ""  # how the allowance was set, in words
    gradients: pd.DataFrame | None = None  # one row per case, argument and way of differentiating (gradients=True)

    def __iter__(self):
        return iter((self.cases, self.passed))

    def __repr__(self) -> str:
        return f"CheckResult(passed={self.passed}, {len(self.cases)} cases, target={self.target!r})"

    def table(self) -> pd.DataFrame:
        """Per regime and parameter, worst first: the failures and the worst case's error, allowance and reason."""
        keys = ["regime", "param"]
        worst = tables.worst_first(self.cases).drop_duplicates(keys)  # NaN params group together
        counts = self.cases.groupby(keys, dropna=False).agg(n=("ulps", "size"), failures=("passed", lambda p: int((~p).sum())),
                                                   ours_max_ulps=("ours_ulps", "max")).reset_index()
        table = counts.merge(worst[keys + ["ulps", "allowed", "over", "reason"]], on=keys)
        table = table.rename(columns={"ulps": "worst_ulps", "over": "worst_over_allowed"})
        return table.sort_values(["failures", "worst_over_allowed"], ascending=False).reset_index(drop=True)

    def worst(self) -> pd.Series:
        """The worst case: a failing one first, then the largest error over its allowance."""
        return tables.worst_first(self.cases).iloc[0]

    def worst_inputs(self) -> tuple:
        """The arguments of the worst case, as float64 NumPy arrays with a batch of one."""
        return self._inputs_of(self.worst())

    def _inputs_of(self, row: pd.Series) -> tuple:
        return tuple(a[row.case : row.case + 1] for a in self.inputs[row.case_set])

    def report(self) -> str:
        failures = int((~self.cases.passed).sum())
        lines = [f"{'PASS' if self.passed else 'FAIL'}: {failures} of {len(self.cases)} cases fail ({self.allowance})"]
        raised = self.cases.reason.str.startswith("raised ")
        if raised.all():
            lines.append(f"Every case raised; the first: {self.cases.reason.iloc[0][len('raised '):]}. Is the function written for "
                         f"another framework? It was given {self.backend} arrays; choose with --backend numpy|torch|jax.")
        lines.append("")
        with pd.option_context("display.width", 250, "display.max_colwidth", 70):
            lines.append(self.table().to_string(index=False, float_format=lambda v: f"{v:.3g}"))
        failing = [r for r in dict.fromkeys(self.cases.regime[~self.cases.passed]) if r in ADVICE]
        if failing:
            lines += ["", "Where it fails and the usual cause:"] + [f"- {r}: {ADVICE[r]}" for r in failing]
        w = self.worst()
        lines += ["", f"Worst case: {w.case_set} #{w.case}: computed {float(w.computed)!r}, exact {float(w.exact)!r}, "
                  f"{w.ulps:.3g} ulps (allowed {w.allowed:.3g}){'; ' + w.reason if w.reason else ''}",
                  "To reproduce it:", "", self.reproduction()]
        if self.gradients is not None:
            lines += ["", gradient_checks.report(self.gradients), "To reproduce the worst gradient:", "",
                      self.gradient_reproduction()]
        return "\n".join(lines)

    def reproduction(self) -> str:
        """A few lines of Python that call the function on the worst case's inputs and print the exact value."""
        w = self.worst()
        lines, names, call = self._setup(self.worst_inputs(), requires_grad=False)
        lines.append(f"print([float(v) for v in {call}])  # exact KL: {float(w.exact)!r}")
        return "\n".join(lines)

    def gradient_reproduction(self) -> str:
        """The same for the worst gradient: the gradient of the sum with respect to the worst argument."""
        w = tables.worst_first(self.gradients).iloc[0]
        lines, names, call = self._setup(self._inputs_of(w), requires_grad=True)
        exact = [float(v) for v in w.exact]
        if self.backend == "torch":
            lines += [f"{call}.sum().backward()", f"print({w.argument}.grad.flatten().tolist())  # exact: {exact!r}"]
        else:
            grad = f"jax.grad(lambda *args: {self._qualname()}(*args).sum(), argnums={names.index(w.argument)})"
            grad = f"jax.jit({grad})" if w["mode"] == "jax.jit(jax.grad)" else grad
            lines.append(f"print({grad}({', '.join(names)}).flatten().tolist())  # exact: {exact!r}")
        return "\n".join(lines)

    def _qualname(self) -> str:
        return self.target.partition(":")[2] or "your_kl"

    def _setup(self, inputs, requires_grad: bool):
        """Import lines, one line per argument (exact float64 values as hex), and the call."""
        module, _, qualname = self.target.partition(":")
        lines = ["import numpy as np"]
        lines += [f"from {module} import {qualname.split('.')[0]}"] if module not in ("", "?", "__main__") else [
            "# your function, called like kl_bench.kl_" + self.family]
        grad = ", requires_grad=True" if requires_grad else ""
        convert = {"numpy": f"np.asarray({{}}, dtype=np.{self.dtype})",
                   "torch": f"torch.tensor({{}}, dtype=torch.{self.dtype}{grad})",
                   "jax": f"jnp.asarray({{}}, dtype=jnp.{self.dtype})"}[self.backend]
        lines += {"numpy": [], "torch": ["import torch"], "jax": ["import jax, jax.numpy as jnp"] + (
            ['jax.config.update("jax_enable_x64", True)'] if self.dtype == "float64" else [])}[self.backend]
        names = list(families.get(self.family).names) if self.family else [f"arg{i}" for i in range(len(inputs))]
        for name, a in zip(names, inputs):
            hexes = np.vectorize(float.hex, otypes=[object])(a).tolist()
            lines.append(f"{name} = {convert.format(f'np.vectorize(float.fromhex)({hexes!r})')}")
        return lines, names, f"{self._qualname()}({', '.join(names)})"


def check(fn, family: str, dtype: str = "float64", backend: str = "numpy", *, max_ulps: float | None = None,
          seed: int = 0, progress: bool = False, timeout: float = DEFAULT_TIMEOUT, gradients: bool = False) -> CheckResult:
    """Judge ``fn`` on every quick case set of ``family`` in ``dtype`` (see the module docstring);
    ``max_ulps`` replaces the promised bound as the allowance. ``fn`` runs in a worker process
    (``isolation``): one call (a case set) that exits, crashes or takes over ``timeout`` seconds
    fails that case set. ``gradients`` (Torch, JAX) also judges the gradient of the sum with
    respect to every argument (``gradient_checks``)."""
    if max_ulps is not None and not max_ulps >= 0:
        raise ValueError(f"max_ulps must be a number >= 0, got {max_ulps!r}")
    if not timeout > 0:
        raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
    reason = UserFunction(backend=backend, fn=fn).unavailable(family, dtype)
    if reason or (gradients and (reason := gradient_checks.unsupported(backend))):
        raise ValueError(reason)
    rows, grads, inputs = [], [], {}
    with Isolated(fn, backend, timeout) as isolated:
        for case in cases.quick(family, dtype, seed=seed):
            if progress:
                print(f"  {case.name}", file=sys.stderr, flush=True)
            inputs[case.name] = case.arrays  # the function gets copies: these stay as generated
            rows += _judged(isolated, Subject(backend), case, max_ulps)
        for case in gradient_checks.case_sets(family, dtype, seed) if gradients else []:
            if progress:
                print(f"  gradients {case.name}", file=sys.stderr, flush=True)
            inputs[case.name] = case.arrays
            grads += gradient_checks.judged(isolated, case, backend)
    df, gf = pd.DataFrame(rows), pd.DataFrame(grads) if gradients else None
    how = (f"allowed: {max_ulps:g} ulps" if max_ulps is not None else
           f"allowed: kl-bench's promised bound for {family} in {dtype}")
    how += ", + cond(S_q) ulps" if families.get(family).full else ""
    passed = bool(df.passed.all()) and (gf is None or bool(gf.passed.all()))
    return CheckResult(df, passed, inputs, target_name(fn), family, dtype, backend, how, gf)


def allowances(case: cases.CaseSet, ours_ulps: np.ndarray, max_ulps: float | None) -> np.ndarray:
    """Each case's allowance in ulps (see the module docstring)."""
    conds = case.cond if case.cond is not None else np.zeros(case.n)
    full = families.get(case.family).full
    if max_ulps is not None:
        return np.full(case.n, float(max_ulps)) + (conds if full else 0.0)
    promised = [bounds.ulp_bound(case.family, case.dtype, case.k, c if full else None) for c in conds]
    unpromised = np.maximum(OURS_FACTOR * ours_ulps, UNPROMISED_FLOOR) + conds
    return np.array([u if b is None else b for b, u in zip(promised, unpromised)], dtype=float)


def _judged(isolated: Isolated, ours: Subject, case: cases.CaseSet, max_ulps: float | None) -> list[dict]:
    exact = references(case)
    theirs, problem = _call(isolated, case)
    ours_ulps = errors(ours, case, exact)["ulps"]
    err = metrics.case_errors(theirs, exact, case.dtype)
    allowed = allowances(case, ours_ulps, max_ulps)
    rows = []
    for i in range(case.n):
        why = problem or _reason(err, i, allowed[i], exact[i], case.dtype)
        rows.append({
            "case_set": case.name, "regime": case.regime, "param": case.param, "k": case.k, "case": i,
            "computed": float(theirs[i]), "exact": float(exact[i]), "ulps": float(err["ulps"][i]),
            "ours_ulps": float(ours_ulps[i]), "allowed": float(allowed[i]), "passed": not why, "reason": why,
        })
    return rows


def _call(isolated: Isolated, case: cases.CaseSet):
    """The function's results as float64 (NaN where it gave none) and a problem with the call."""
    nan = np.full(case.n, np.nan)
    values, problem = isolated.call(case.family, case.arrays, case.dtype)
    if problem:
        return nan, problem
    if values.shape != (case.n,):
        return nan, f"returned shape {values.shape} for a batch of {case.n} (expected ({case.n},))"
    return values, ""


def _reason(err: dict, i: int, allowed: float, exact, dtype: str) -> str:
    beyond = metrics.overflows(exact, dtype)
    if err["nan"][i]:
        return f"NaN where the exact KL is +inf (beyond {dtype}'s range)" if beyond else "NaN where the exact KL is finite"
    if err["inf"][i]:
        return "inf where the exact KL is finite"
    if err["negative"][i]:
        return "negative"
    if not err["ulps"][i] <= allowed:
        if beyond:
            return f"finite where the exact KL is +inf (beyond {dtype}'s range)"
        return f"{err['ulps'][i]:.3g} ulps > {allowed:.3g} allowed" if math.isfinite(err["ulps"][i]) else "infinitely many ulps"
    return ""
