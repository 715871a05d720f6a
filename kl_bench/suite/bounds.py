"""The accuracy promised for ``method="stable"``, in ulps of the output dtype (the Core issue).

One place, read by the correctness suite and by ``kl-bench run``.
"""

from __future__ import annotations

import math

from ..backends import HALF_DTYPES

TRIL_MAX_COND = 1e4  # kl_tril's bound is promised for cond(S_q) up to this


def ulp_bound(family: str, dtype: str, k: int, cond: float | None = None) -> float | None:
    """Largest error allowed for one result; None where nothing is promised.
    ``cond`` is cond(S_q) for the full-covariance families."""
    if family == "tril" and cond is not None and cond > TRIL_MAX_COND * 1.01:
        return None
    if dtype in HALF_DTYPES:
        return 1.0  # computed in float32 and rounded once
    if family == "normal":
        return 4.0
    if family in ("diag", "vae"):
        return 4.0 + math.log2(k)
    if family == "tril":
        return 16.0
    return 16.0 + (cond or 1.0)  # cov, lowrank: degrade with the conditioning of S_q


GRADIENT_ULPS = 64.0


def gradient_ulp_bound(family: str, dtype: str, cond: float | None = None) -> float | None:
    """Largest normwise error of the stable kernels' autodiff gradients, in ulps of the dtype (each
    argument, against its largest exact entry); None where nothing is promised. kl_cov's and
    kl_lowrank's gradients carry S_q^-1 and so cond(S_q), like their values."""
    if family == "tril" and cond is not None and cond > TRIL_MAX_COND * 1.01:
        return None
    return GRADIENT_ULPS * (cond or 1.0) if family in ("cov", "lowrank") else GRADIENT_ULPS
