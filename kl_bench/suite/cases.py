"""Named, seeded regimes -> float64 parameter sets for each family.

A case set is reproducible from its name: family, regime, parameter, dtype, k, seed. Its values
are rounded to the dtype under test before anything else sees them, so the reference is the exact
KL of exactly the inputs the kernel receives.

Regimes (docs/design.md, "Measuring accuracy"):
- ``generic``: unrelated p and q of moderate size.
- ``equal``: q == p bit for bit (the exact KL is 0).
- ``near-equal`` (param: relative perturbation 1e-1 .. 1e-12): q is p perturbed by that much.
- ``collapse`` (diag, vae; param: size): p has mean and log-variance of that size, q = N(0, I).
- ``extreme-scale`` (normal): scales from 1e-100 to 1e100 (float64), 1e-15 to 1e15 (float32);
  ``extreme-scale-near``: the same magnitudes with q within 1e-3 of p. For tril, cov and lowrank,
  ``extreme-scale`` is a generic half and a near-equal (1e-3) half whose both sides are scaled by
  such a scale (means and factors; covariances and diagonals by its square).
- ``extreme-logvar`` (diag, vae): |log-variance| up to 700 (float64), 80 (float32).
- ``high-dim`` (every family but normal): k = 1000 in the quick set, any k in the dimension sweep.
  Full covariances there are block diagonal (blocks of ``BLOCK``, rows and columns shuffled for
  ``cov``), so that the reference is the exact sum of small blocks' references.
- ``ill-conditioned`` (tril, cov, lowrank; param: condition number of S_q, 1 .. 1e16).
- ``stiff-diagonal`` (lowrank; param: relative perturbation): diagonals spread over six orders of
  magnitude (three in half precision) under a factor of size 1, q near p.
- ``full-rank`` (lowrank): r = k, q within 1e-6 of p (the dense route of ``kernels.kl_lowrank``).
- ``aligned-diagonal`` (lowrank; param: condition number of S_q): q's factor large on r of the
  coordinates and p differing from q only in the diagonal there, a change the factor hides
  (docs/design.md, "Low-rank plus diagonal": why ``kl_lowrank`` treats those coordinates apart).

``case_sets(family, dtype, sweep)`` names the case sets of each sweep: ``quick`` (the correctness
suite and ``kl-bench run``), ``closeness`` (error versus the relative perturbation),
``conditioning`` (versus cond(S_q)), ``dimension`` (versus k) and ``full`` (all of them).
"""

from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass, field

import numpy as np

from .. import families
from ..families import COV, FACTOR, VARIANCE

NEAR_EQUAL = (1e-1, 1e-3, 1e-6, 1e-9, 1e-12)
CLOSENESS = tuple(10.0**-e for e in range(1, 13))
CONDITIONING = tuple(10.0**e for e in range(0, 17, 2))
DIMENSION = {
    "normal": (),
    "diag": (1, 10, 100, 1_000, 10_000, 100_000, 1_000_000),
    "vae": (1, 10, 100, 1_000, 10_000, 100_000, 1_000_000),
    "tril": (2, 8, 32, 128, 512, 1_000),
    "cov": (2, 8, 32, 128, 512, 1_000),
    "lowrank": (2, 8, 32, 128, 512, 1_000),
}
SWEEPS = ("quick", "closeness", "conditioning", "dimension", "full")
BLOCK = 4

# Per dtype: machine epsilon, largest |log10 scale| and |log-variance| for the extreme regimes,
# the condition numbers of the quick set, and the largest condition number of S_q that a rounded
# covariance matrix (max_cond) or Cholesky factor (max_cond_tril) can carry in that dtype.
LIMITS = {
    "float64": dict(eps=2.0**-52, log10_scale=100.0, logvar=700.0, cond=(1e2, 1e4, 1e8), max_cond=1e12, max_cond_tril=1e16),
    "float32": dict(eps=2.0**-23, log10_scale=15.0, logvar=80.0, cond=(1e2, 1e4), max_cond=1e4, max_cond_tril=1e8),
    "float16": dict(eps=2.0**-10, log10_scale=1.5, logvar=8.0, cond=(1e1,), max_cond=1e1, max_cond_tril=1e2),
    "bfloat16": dict(eps=2.0**-7, log10_scale=15.0, logvar=80.0, cond=(1e1,), max_cond=1e1, max_cond_tril=1e2),
}

DEFAULT_N = {"normal": 256, "diag": 64, "vae": 64, "tril": 32, "cov": 32, "lowrank": 32}
DEFAULT_K = {"normal": 1, "diag": 16, "vae": 16, "tril": 6, "cov": 6, "lowrank": 8}
LOW_RANK = 3  # r of the lowrank cases (k > 2 r: the O(k r^2) route), but for ``full-rank``
HIGH_DIM_K = 1000


@dataclass(frozen=True)
class CaseSet:
    family: str
    regime: str
    param: float | None
    dtype: str
    k: int
    seed: int
    arrays: tuple = field(repr=False, compare=False)
    cond: np.ndarray | None = field(default=None, repr=False, compare=False)  # cond(S_q) per case

    @property
    def name(self) -> str:
        regime = self.regime if self.param is None else f"{self.regime}@{self.param:g}"
        return f"{self.family}/{regime}/{self.dtype}/k{self.k}/seed{self.seed}"

    @property
    def n(self) -> int:
        return self.arrays[0].shape[0]


def round_to(x, dtype: str) -> np.ndarray:
    """float64 copy of ``x`` rounded to ``dtype`` (values exactly representable in it)."""
    x = np.asarray(x, dtype=np.float64)
    if dtype == "bfloat16":  # round to nearest even on the upper 16 bits of the float32 pattern
        bits = x.astype(np.float32).view(np.uint32)
        bits = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) & np.uint32(0xFFFF0000)
        return bits.view(np.float32).astype(np.float64)
    return x.astype(dtype).astype(np.float64)


def regimes(family: str, dtype: str) -> list[tuple[str, float | None]]:
    """The (regime, param) pairs of a family that are meaningful in ``dtype``."""
    eps = LIMITS[dtype]["eps"]
    near = [("near-equal", d) for d in NEAR_EQUAL if d >= 4 * eps]
    base = [("generic", None), ("equal", None)] + near
    if family == "normal":
        return base + [("extreme-scale", None), ("extreme-scale-near", None)]
    if family == "diag":
        return base + [("collapse", d) for d in (1e-3, 1e-8) if d >= 4 * eps] + [
            ("extreme-logvar", None),
            ("high-dim", None),
        ]
    if family == "vae":
        return [("generic", None), ("equal", None)] + [("collapse", d) for d in NEAR_EQUAL if d >= 4 * eps] + [
            ("extreme-logvar", None),
            ("high-dim", None),
        ]
    if family == "lowrank":
        return base + [("stiff-diagonal", d) for d in (1e-3, 1e-9) if d >= 4 * eps] + [
            ("full-rank", None), ("high-dim", None), ("ill-conditioned", LIMITS[dtype]["cond"][0]),
            ("aligned-diagonal", LIMITS[dtype]["cond"][0]), ("extreme-scale", None)]
    return base + [("ill-conditioned", c) for c in LIMITS[dtype]["cond"]] + [("extreme-scale", None)]


def quick(family: str, dtype: str, seed: int = 0) -> list[CaseSet]:
    """The quick case sets of one family in one dtype (the correctness suite and ``kl-bench run``)."""
    return [generate(family, regime, dtype, param, seed=seed) for regime, param in regimes(family, dtype)]


def sweep_specs(family: str, dtype: str, sweep: str = "quick") -> list[tuple[str, float | None, int | None]]:
    """The (regime, param, k) of each case set of a sweep; k None means the family's default."""
    if sweep not in SWEEPS:
        raise ValueError(f"unknown sweep {sweep!r}; known: {', '.join(SWEEPS)}")
    if sweep == "full":
        specs = [s for part in SWEEPS[:-1] for s in sweep_specs(family, dtype, part)]
        return list(dict.fromkeys(specs))  # the quick set overlaps the others
    if sweep == "quick":
        return [(regime, param, None) for regime, param in regimes(family, dtype)]
    eps = LIMITS[dtype]["eps"]
    if sweep == "closeness":
        regime = "collapse" if family == "vae" else "near-equal"
        return [(regime, d, None) for d in CLOSENESS if d >= 4 * eps]
    if sweep == "conditioning":
        if not families.get(family).full:
            return []
        cap = LIMITS[dtype]["max_cond" if family == "cov" else "max_cond_tril"]  # factors carry cond(S_q) exactly
        conditioned = [("ill-conditioned", c, None) for c in CONDITIONING if c <= cap]
        return conditioned + [("aligned-diagonal", c, None) for c in CONDITIONING if 1 < c <= cap and family == "lowrank"]
    return [("high-dim", None, k) for k in DIMENSION[family]]


def case_sets(family: str, dtype: str, sweep: str = "quick", seed: int = 0) -> list[CaseSet]:
    """The case sets of one family in one dtype for a sweep (see ``SWEEPS``)."""
    return [generate(family, regime, dtype, param, k=k, seed=seed) for regime, param, k in sweep_specs(family, dtype, sweep)]


def generate(family, regime, dtype="float64", param=None, *, n=None, k=None, seed=0) -> CaseSet:
    fam = families.get(family)
    n = n or DEFAULT_N[family]
    k = k or (HIGH_DIM_K if regime == "high-dim" else DEFAULT_K[family])
    if regime == "high-dim":
        n = min(n, 4 if k <= 10_000 else 2)
    tag = f"{family}/{regime}/{param}/{dtype}/{k}"
    rng = np.random.default_rng([seed, zlib.crc32(tag.encode())])
    make = functools.partial(_extreme_scale, family=family) if regime == "extreme-scale" and fam.full else _GENERATORS[family]
    arrays = tuple(round_to(a, dtype) for a in make(rng, regime, param, dtype, n, k))
    cond = None
    if fam.args[-1].kind == COV:
        cond = np.linalg.cond(arrays[-1])
    elif fam.args[-1].kind == VARIANCE:  # S_q = W W^T + diag(d), formed in float64
        cond = np.linalg.cond(low_rank_covariance(arrays[-2], arrays[-1]))
    elif fam.args[-1].kind == FACTOR:  # cond(L L^T) = cond(L)^2, without forming L L^T
        cond = np.linalg.cond(np.tril(arrays[-1])) ** 2
    return CaseSet(family, regime, param, dtype, k, seed, arrays, cond)


def low_rank_covariance(w: np.ndarray, d: np.ndarray) -> np.ndarray:
    """W W^T + diag(d) in float64, for factors (..., k, r) and diagonals (..., k)."""
    return w @ np.swapaxes(w, -1, -2) + d[..., None] * np.eye(d.shape[-1])


def _extreme_scale(rng, regime, param, dtype, n, k, *, family):
    """A full family's generic and near-equal (1e-3) halves, each case's p and q scaled by one
    scale from 10^-e to 10^e (e = LIMITS' log10_scale): the KL is unchanged, the inputs' magnitudes are not."""
    make = _GENERATORS[family]
    halves = make(rng, "generic", None, dtype, n // 2, k), make(rng, "near-equal", 1e-3, dtype, n - n // 2, k)
    scale = 10.0 ** rng.uniform(-LIMITS[dtype]["log10_scale"], LIMITS[dtype]["log10_scale"], n)
    kinds = [a.kind for a in families.get(family).args]
    squared = (COV, VARIANCE)  # the others (means, Cholesky and low-rank factors) scale as a standard deviation
    return tuple(np.concatenate(parts) * scale.reshape(-1, *[1] * (parts[0].ndim - 1)) ** (2 if kind in squared else 1)
                 for parts, kind in zip(zip(*halves), kinds))


def _unknown(family, regime):
    return ValueError(f"no regime {regime!r} for family {family!r}")


def _normal(rng, regime, param, dtype, n, k):
    lim = LIMITS[dtype]
    mu_p, mu_q = rng.normal(size=n), rng.normal(size=n)
    s_p, s_q = np.exp(rng.uniform(-1.5, 1.5, n)), np.exp(rng.uniform(-1.5, 1.5, n))
    if regime == "generic":
        pass
    elif regime == "equal":
        mu_q, s_q = mu_p, s_p
    elif regime == "near-equal":
        s_q = s_p * (1 + param * rng.uniform(-1, 1, n))
        mu_q = mu_p + param * s_p * rng.uniform(-1, 1, n)
    elif regime in ("extreme-scale", "extreme-scale-near"):
        e = lim["log10_scale"]
        s_p = 10.0 ** rng.uniform(-e, e, n)
        s_q = 10.0 ** rng.uniform(-e, e, n)
        mu_p = mu_p * s_p
        mu_q = mu_q * s_q
        if regime == "extreme-scale-near":
            s_q = s_p * (1 + 1e-3 * rng.uniform(-1, 1, n))
            mu_q = mu_p + 1e-3 * s_p * rng.uniform(-1, 1, n)
    else:
        raise _unknown("normal", regime)
    return (mu_p, s_p, mu_q, s_q)


def _diag_like(rng, regime, param, dtype, n, k, family):
    lim = LIMITS[dtype]
    mu_p, mu_q = rng.normal(size=(n, k)), rng.normal(size=(n, k))
    l_p, l_q = rng.uniform(-3, 3, (n, k)), rng.uniform(-3, 3, (n, k))
    if regime in ("generic", "high-dim"):
        pass
    elif regime == "equal":
        mu_p, l_p = (np.zeros((n, k)), np.zeros((n, k))) if family == "vae" else (mu_q, l_q)
    elif regime == "near-equal":
        l_q = l_p * (1 + param * rng.uniform(-1, 1, (n, k)))
        mu_q = mu_p + param * np.exp(l_p / 2) * rng.uniform(-1, 1, (n, k))
    elif regime == "collapse":
        mu_p, l_p = param * rng.normal(size=(n, k)), param * rng.normal(size=(n, k))
        mu_q, l_q = np.zeros((n, k)), np.zeros((n, k))
    elif regime == "extreme-logvar":
        L = lim["logvar"]
        l_p = rng.uniform(-L, L, (n, k))
        # half the cases unrelated, half with l_q within 1 of l_p (large |l|, moderate difference)
        l_q = np.where(np.arange(n)[:, None] % 2 == 0, rng.uniform(-L, L, (n, k)), l_p + rng.uniform(-1, 1, (n, k)))
    else:
        raise _unknown(family, regime)
    if family == "vae":
        return (mu_p, l_p)
    return (mu_p, l_p, mu_q, l_q)


def _orthogonal(rng, n, k):
    return np.linalg.qr(rng.normal(size=(n, k, k)))[0]


def _spectrum(conds, k):
    """Eigenvalues from 1 down to 1/cond, log-spaced, one row per condition number."""
    return np.array([np.logspace(0, -np.log10(c), k) for c in conds])


def random_spd(rng, eigenvalues):
    """Q diag(eigenvalues) Q^T with a random orthogonal Q, one matrix per row of ``eigenvalues``."""
    n, k = eigenvalues.shape
    q = _orthogonal(rng, n, k)
    s = q @ (eigenvalues[..., None] * np.swapaxes(q, -1, -2))
    return 0.5 * (s + np.swapaxes(s, -1, -2))


def _spd(rng, n, k, conds):
    """Random SPD matrices with the given condition numbers."""
    return random_spd(rng, _spectrum(conds, k))


def _factor(rng, conds, k):
    """Lower Cholesky factors of random SPD matrices with the given condition numbers, from a QR
    factorisation (accurate where forming the matrix and factoring it would fail)."""
    q = _orthogonal(rng, len(conds), k)
    scaled = np.sqrt(_spectrum(conds, k))[..., None] * np.swapaxes(q, -1, -2)
    r = np.linalg.qr(scaled)[1]  # S = scaled^T scaled = r^T r
    r = r * np.sign(np.diagonal(r, axis1=-2, axis2=-1))[..., None]
    return np.swapaxes(r, -1, -2)


def _block_diagonal(rng, dtype, n, k, family):
    """Independent blocks of BLOCK coordinates (generic and near-equal pairs, mixed), shuffled
    symmetrically for ``cov`` (the KL is invariant under a common permutation)."""
    parts = []
    for start in range(0, k, BLOCK):
        size = min(BLOCK, k - start)
        regime, param = [("generic", None), ("near-equal", 1e-3)][(start // BLOCK) % 2]
        parts.append(_full(rng, regime, param, dtype, n, size, family))
    mu_p = np.concatenate([p[0] for p in parts], axis=-1)
    mu_q = np.concatenate([p[2] for p in parts], axis=-1)
    mats = []
    for i in (1, 3):
        m = np.zeros((n, k, k))
        for start, part in zip(range(0, k, BLOCK), parts):
            size = part[i].shape[-1]
            m[:, start : start + size, start : start + size] = part[i]
        mats.append(m)
    if family == "cov":
        order = rng.permutation(k)
        mu_p, mu_q = mu_p[:, order], mu_q[:, order]
        mats = [m[:, order][:, :, order] for m in mats]
    return (mu_p, mats[0], mu_q, mats[1])


def _full(rng, regime, param, dtype, n, k, family):
    if regime == "high-dim":
        return _block_diagonal(rng, dtype, n, k, family)
    mu_p, mu_q = rng.normal(size=(n, k)), rng.normal(size=(n, k))
    if regime == "generic":
        conds_p, conds_q = 10 ** rng.uniform(0, 2, n), 10 ** rng.uniform(0, 2, n)
        s_p, s_q = _spd(rng, n, k, conds_p), _spd(rng, n, k, conds_q)
    elif regime == "equal":
        s_p = s_q = _spd(rng, n, k, 10 ** rng.uniform(0, 2, n))
        mu_q = mu_p
    elif regime in ("near-equal", "ill-conditioned"):
        max_cond = 1e4 if regime == "near-equal" else param
        max_cond = min(max_cond, LIMITS[dtype]["max_cond_tril" if family == "tril" else "max_cond"])
        conds = 10 ** rng.uniform(0, np.log10(max_cond), n) if regime == "near-equal" else np.full(n, max_cond)
        delta = param if regime == "near-equal" else 1e-2
        if family == "tril":
            l_q = _factor(rng, conds, k)
            l_p = l_q * (1 + delta * np.tril(rng.uniform(-1, 1, (n, k, k))))
            mu_p = mu_q + delta * rng.uniform(-1, 1, (n, k))
            if regime == "ill-conditioned":  # second half: an unrelated, well-conditioned p
                l_p[n // 2 :] = np.linalg.cholesky(_spd(rng, n - n // 2, k, np.full(n - n // 2, 10.0)))
            return (mu_p, l_p, mu_q, l_q)
        s_q = _spd(rng, n, k, conds)
        a = np.eye(k) + delta * rng.uniform(-1, 1, (n, k, k))
        s_p = a @ s_q @ np.swapaxes(a, -1, -2)
        s_p = 0.5 * (s_p + np.swapaxes(s_p, -1, -2))
        mu_p = mu_q + delta * rng.uniform(-1, 1, (n, k))
        if regime == "ill-conditioned":
            s_p[n // 2 :] = _spd(rng, n - n // 2, k, np.full(n - n // 2, 10.0))
    else:
        raise _unknown(family, regime)
    if family == "tril":
        return (mu_p, np.linalg.cholesky(s_p), mu_q, np.linalg.cholesky(s_q))
    return (mu_p, s_p, mu_q, s_q)


def _lowrank(rng, regime, param, dtype, n, k):
    """Means, factors (n, k, r) and diagonals of p and q (see the module docstring)."""
    r = k if regime == "full-rank" else LOW_RANK
    mu_q, w_q, d_q = rng.normal(size=(n, k)), rng.normal(size=(n, k, r)), np.exp(rng.uniform(-1, 1, (n, k)))
    if regime == "high-dim":  # column j of W lives on coordinates 4j .. 4j+3: blocks of 4 and single coordinates
        w_q = w_q * (np.arange(k)[:, None] // BLOCK == np.arange(r)[None, :])
    elif regime == "stiff-diagonal":
        d_q = 10.0 ** rng.uniform(-6 if dtype in ("float64", "float32") else -3, 0, (n, k))
    elif regime == "ill-conditioned":  # D^1/2 (I + G G^T) D^1/2, D spread over 1 .. 1/cond
        d_q = np.array([rng.permutation(v) for v in _spectrum(np.full(n, param), k)])
        w_q = 0.5 * w_q * np.sqrt(d_q)[..., None]
    elif regime == "aligned-diagonal":  # a factor of size a on the first r coordinates: cond(S_q) about a^2 e
        w_q = np.sqrt(param / np.e) * np.eye(k, r) + 0.01 * w_q
    if regime == "equal":
        return (mu_q, w_q, d_q, mu_q, w_q, d_q)
    if regime == "generic":
        return (rng.normal(size=(n, k)), rng.normal(size=(n, k, r)), np.exp(rng.uniform(-1, 1, (n, k))), mu_q, w_q, d_q)
    if regime == "aligned-diagonal":
        d_p = d_q * np.where(np.arange(k) < r, 1 + 1e-3 * rng.uniform(-1, 1, (n, k)), 1.0)
        return (mu_q, w_q, d_p, mu_q, w_q, d_q)
    delta = {"near-equal": param, "stiff-diagonal": param, "full-rank": 1e-6}.get(regime, 1e-2)
    if regime == "high-dim":  # near-equal and far-apart blocks, mixed
        delta = np.where(np.arange(k) // BLOCK % 2 == 0, 1e-3, 0.9)
    delta = np.broadcast_to(delta, (k,))  # per coordinate
    mu_p = mu_q + delta * rng.uniform(-1, 1, (n, k)) * np.sqrt(d_q)
    w_p = w_q * (1 + delta[:, None] * rng.uniform(-1, 1, (n, k, r)))
    return (mu_p, w_p, d_q * (1 + delta * rng.uniform(-1, 1, (n, k))), mu_q, w_q, d_q)


_GENERATORS = {
    "normal": _normal,
    "diag": lambda *a: _diag_like(*a, family="diag"),
    "vae": lambda *a: _diag_like(*a, family="vae"),
    "tril": lambda *a: _full(*a, family="tril"),
    "cov": lambda *a: _full(*a, family="cov"),
    "lowrank": _lowrank,
}
