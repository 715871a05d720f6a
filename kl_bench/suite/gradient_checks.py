"""``kl-bench check --gradients``: judge the gradients a model trains with, not only the values.

The gradient of the sum of the function's KLs with respect to every argument (torch autograd; on
JAX ``jax.grad``, eagerly and under ``jax.jit``) is compared with the exact gradient
(``gradients.exact``: certified like the references) on the regimes where gradients break, the
first cases of each quick case set of ``REGIMES``. A case fails for an argument when its gradient
holds a NaN or an infinity where the exact one is finite, is not exactly 0 where the exact one is
(p == q), or is further than the promised gradient bound (``bounds.gradient_ulp_bound``) in
normwise ulps. The comparison is the one ``kl-bench accuracy --gradients`` makes
(``gradients.argument_errors``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .. import backends, families
from . import bounds, gradients, tables
from .isolation import GRADIENT, GRADIENT_JIT

REGIMES = ("generic", "equal", "near-equal", "collapse", "extreme-scale", "extreme-scale-near", "extreme-logvar")
CASES_PER_SET = 8
MODES = {"torch": {GRADIENT: "autograd"}, "jax": {GRADIENT: "jax.grad", GRADIENT_JIT: "jax.jit(jax.grad)"}}


def unsupported(backend: str) -> str | None:
    """Why gradients cannot be judged on ``backend``, or None."""
    if backends.get(backend).differentiable:
        return None
    return f"gradients need a framework with autodiff: --backend {' or '.join(MODES)} ({backend} has none)"


def case_sets(family: str, dtype: str, seed: int = 0) -> list:
    return gradients.gradient_cases(family, dtype, REGIMES, CASES_PER_SET, seed)


def judged(isolated, case, backend: str) -> list[dict]:
    """One row per case, argument and way of differentiating."""
    exact = gradients.exact_for(case)
    conds = case.cond if case.cond is not None else [None] * case.n
    allowed = [bounds.gradient_ulp_bound(case.family, case.dtype, c) or np.inf for c in conds]
    names = families.get(case.family).names
    rows = []
    for what, mode in MODES[backend].items():
        computed, problem = isolated.call(case.family, case.arrays, case.dtype, what)
        if not problem and [np.shape(g) for g in computed] != [a.shape for a in case.arrays]:
            problem = f"returned gradients of shapes {[np.shape(g) for g in computed]} for arguments of {[a.shape for a in case.arrays]}"
        if not problem:
            ulps, nonfinite = gradients.argument_errors(computed, case, exact)
        for i in range(case.n):
            for j, name in enumerate(names):
                why = problem or _reason(computed[j][i], exact[i][j], ulps[i, j], nonfinite[i, j], allowed[i])
                rows.append({"case_set": case.name, "regime": case.regime, "param": case.param, "case": i, "argument": name,
                             "mode": mode, "ulps": np.inf if problem else float(ulps[i, j]), "allowed": allowed[i],
                             "nans": 0 if problem else int(np.isnan(computed[j][i]).sum()), "exact": exact[i][j].ravel(),
                             "passed": not why, "reason": why})
    return rows


def _reason(computed, exact, ulps: float, nonfinite: bool, allowed: float) -> str:
    if nonfinite:
        kind = "NaN" if np.isnan(computed).any() else "inf"
        return f"{kind} gradient where the exact one is finite"
    if all(v == 0 for v in exact.ravel()) and np.any(computed != 0):
        return "nonzero gradient where the exact one is 0 (p == q)"
    if not ulps <= allowed:
        return f"{ulps:.3g} ulps > {allowed:.3g} allowed" if np.isfinite(ulps) else "infinitely many ulps"
    return ""


def table(df: pd.DataFrame) -> pd.DataFrame:
    """Per way of differentiating, argument and regime, worst first: failures, NaN entries, worst ulps and its reason."""
    keys = ["mode", "argument", "regime"]
    worst = tables.worst_first(df).drop_duplicates(keys)
    counts = df.groupby(keys, sort=False).agg(n=("passed", "size"), failures=("passed", lambda p: int((~p).sum())),
                                              nans=("nans", "sum")).reset_index()
    out = counts.merge(worst[keys + ["ulps", "allowed", "reason"]], on=keys).rename(columns={"ulps": "worst_ulps"})
    return out.sort_values(["failures", "worst_ulps"], ascending=False).reset_index(drop=True)


def report(df: pd.DataFrame) -> str:
    failures = int((~df.passed).sum())
    lines = [f"Gradients: {failures} of {len(df)} (case, argument, way) fail "
             f"(allowed: kl-bench's promised gradient bound, {bounds.GRADIENT_ULPS:g} normwise ulps; x cond(S_q) for cov)", ""]
    with pd.option_context("display.width", 250, "display.max_colwidth", 60):
        lines.append(table(df).to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    w = tables.worst_first(df).iloc[0]
    lines += ["", f"Worst gradient: {w.case_set} #{w.case}, d/d{w.argument} ({w['mode']}): {w.ulps:.3g} normwise ulps"
              f"{'; ' + w.reason if w.reason else ''}"]
    return "\n".join(lines)
