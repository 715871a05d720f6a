"""Certified references: the exact KL of the distributions that float64 inputs define.

The public functions mirror ``kl_bench.kl_*`` (same arguments, NumPy-style broadcasting) for float64
inputs and return mpmath numbers (an object array of them for a batch). Each value is certified
(docs/design.md, "References"): every float input is read as the exact binary number it is; the
rational part of the KL (squares, quadratic forms, traces, exact triangular solves and LDL^T
pivots) is computed exactly in rationals (python-flint's fmpq), and only the transcendental part,
sums of

    phi(x) = e^x - 1 - x,   psi(u) = u - log1p(u),   c e^y     (x, u, c, y exact rationals)

in ball arithmetic (python-flint's arb), at 128 bits, then twice that, and so on, until the ball
is exactly a number, or its relative radius is below 2^-``CERTIFIED_BITS`` and both of its ends
round to the same float64 (possibly +inf). Past ``MAX_PREC`` bits: ``ArithmeticError``, never an
uncertified number. The exact LDL^T also certifies that a covariance is positive definite. A KL
that is exactly zero (p == q, bit for bit) is 0 without evaluation; a NaN input gives NaN.

The textbook formulas in mpmath (``mp_*``) are kept as an independent cross-check at a fixed, very
high precision (the tests), and for the gradient tests' numerical derivatives.

Values are cached on disk (``KL_BENCH_CACHE``, default ``~/.cache/kl-bench/reference``), one file
per value with its certificate (precision, radius), keyed by the family, the input bytes and
``REFERENCE_VERSION``; each file carries a checksum, and a corrupt or truncated file is recomputed
and rewritten, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import mpmath
import numpy as np

from .. import families

REFERENCE_VERSION = 3  # bump whenever a formula below changes: old cache entries stop matching
START_PREC = 128
CERTIFIED_BITS = 70
MAX_PREC = 1 << 16


# ---------------------------------------------------------------------------------------------
# The textbook formulas in mpmath, at the current working precision (a cross-check). Inputs are mpf values,
# lists of them (vectors) and lists of lists (matrices).
# ---------------------------------------------------------------------------------------------


def mp_normal(mu_p, s_p, mu_q, s_q):
    return mpmath.log(s_q / s_p) + (s_p**2 + (mu_p - mu_q) ** 2) / (2 * s_q**2) - mpmath.mpf(0.5)


def mp_diag(mu_p, l_p, mu_q, l_q):
    total = mpmath.mpf(0)
    for a, la, b, lb in zip(mu_p, l_p, mu_q, l_q):
        total += lb - la + (mpmath.exp(la) + (a - b) ** 2) / mpmath.exp(lb) - 1
    return total / 2


def mp_vae(mu, logvar):
    return sum((mpmath.exp(lv) + m * m - 1 - lv for m, lv in zip(mu, logvar)), mpmath.mpf(0)) / 2


def _forward_solve(lower, columns):
    """lower^-1 @ columns for a lower-triangular matrix; columns as a list of vectors."""
    k = len(lower)
    out = []
    for b in columns:
        x = []
        for i in range(k):
            acc = b[i] - mpmath.fsum(lower[i][j] * x[j] for j in range(i))
            x.append(acc / lower[i][i])
        out.append(x)
    return out


def _columns(matrix):
    return [list(col) for col in zip(*matrix)]


def lower(matrix):
    return [[v if j <= i else mpmath.mpf(0) for j, v in enumerate(row)] for i, row in enumerate(matrix)]


def _mp_full(mu_p, mu_q, factor_q, trace, logdet_p):
    """1/2 [tr(S_q^-1 S_p) + dmu^T S_q^-1 dmu - k + ln det S_q - ln det S_p]."""
    k = len(mu_p)
    z = _forward_solve(factor_q, [[a - b for a, b in zip(mu_p, mu_q)]])[0]
    logdet_q = 2 * mpmath.fsum(mpmath.log(factor_q[i][i]) for i in range(k))
    return (trace + mpmath.fsum(v * v for v in z) - k + logdet_q - logdet_p) / 2


def mp_tril(mu_p, tril_p, mu_q, tril_q):
    tril_p, tril_q = lower(tril_p), lower(tril_q)
    # tr(S_q^-1 S_p) = ||L_q^-1 L_p||_F^2
    a = _forward_solve(tril_q, _columns(tril_p))
    trace = mpmath.fsum(v * v for col in a for v in col)
    logdet_p = 2 * mpmath.fsum(mpmath.log(tril_p[i][i]) for i in range(len(mu_p)))
    return _mp_full(mu_p, mu_q, tril_q, trace, logdet_p)


def mp_cholesky(matrix):
    factor = mpmath.cholesky(mpmath.matrix(matrix))
    return [[factor[i, j] for j in range(factor.cols)] for i in range(factor.rows)]


def mp_cov(mu_p, cov_p, mu_q, cov_q):
    factor_q = mp_cholesky(cov_q)
    # tr(S_q^-1 S_p) = tr(L_q^-1 S_p L_q^-T)
    x = _forward_solve(factor_q, _columns(cov_p))  # columns of L_q^-1 S_p
    y = _forward_solve(factor_q, _columns(x))  # columns of L_q^-1 (L_q^-1 S_p)^T
    trace = mpmath.fsum(y[i][i] for i in range(len(mu_p)))
    factor_p = mp_cholesky(cov_p)
    logdet_p = 2 * mpmath.fsum(mpmath.log(factor_p[i][i]) for i in range(len(mu_p)))
    return _mp_full(mu_p, mu_q, factor_q, trace, logdet_p)


def mp_lowrank(mu_p, w_p, d_p, mu_q, w_q, d_q):
    """The covariances W W^T + diag(d) formed at the working precision, then mp_cov."""
    def covariance(w, d):
        return [[mpmath.fsum(a * b for a, b in zip(w[i], w[j])) + (d[i] if i == j else 0) for j in range(len(d))]
                for i in range(len(d))]

    return mp_cov(mu_p, covariance(w_p, d_p), mu_q, covariance(w_q, d_q))


MP_FUNCTIONS = {"normal": mp_normal, "diag": mp_diag, "vae": mp_vae, "tril": mp_tril, "cov": mp_cov, "lowrank": mp_lowrank}


def to_mp(x: np.ndarray):
    if x.ndim == 0:
        return mpmath.mpf(float(x))
    return [to_mp(v) for v in x]


# ---------------------------------------------------------------------------------------------
# Certified values: exact rationals, and balls for the transcendental terms
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Certified:
    """A reference value: ``value`` (the ball's midpoint, exactly) is within 2^``radius_log2`` of
    the exact KL (``radius_log2`` None: it is the exact KL); ``prec`` is the working precision that
    certified it (0: no ball was needed)."""

    value: mpmath.mpf
    radius_log2: int | None
    prec: int

    @property
    def relative_radius(self) -> float:
        """An upper bound on |value - exact| / |value| (0 for an exact value)."""
        if self.radius_log2 is None or self.value == 0 or mpmath.isnan(self.value):
            return 0.0
        return float(mpmath.ldexp(1, self.radius_log2) / abs(self.value))


@dataclass
class Terms:
    """KL = 1/2 [rational + sum psi(u) + sum phi(x) + sum c e^y]: every term >= 0."""

    rational: object  # an fmpq
    psi: list = field(default_factory=list)  # u > -1
    phi: list = field(default_factory=list)  # x
    exp: list = field(default_factory=list)  # (c, y), c >= 0

    def __iadd__(self, other: Terms) -> Terms:
        self.rational += other.rational
        self.psi += other.psi
        self.phi += other.phi
        self.exp += other.exp
        return self

    def ball(self, prec: int):
        """The KL as an arb ball at ``prec`` bits."""
        from flint import arb, ctx

        with ctx.workprec(prec):
            total = arb(self.rational)
            for u in self.psi:
                if u:
                    a = arb(u)
                    total += a - a.log1p()
            for x in self.phi:
                if x:
                    total += arb(x).expm1() - arb(x)
            for c, y in self.exp:
                if c:
                    total += arb(c) * arb(y).exp()
            return total / 2


def rational(x) -> object:
    """A float as the exact rational it is."""
    from flint import fmpq

    return fmpq(*float(x).as_integer_ratio())


def rationals(a: np.ndarray) -> list:
    return [rational(v) for v in np.ravel(a)]


def differences(a: np.ndarray, b: np.ndarray) -> list:
    """a - b elementwise, exactly (flattened)."""
    return [x - y for x, y in zip(rationals(a), rationals(b))]


def _terms_normal(mu_p, s_p, mu_q, s_q) -> Terms:
    s_p, s_q = _positive(s_p, "scale_p"), _positive(s_q, "scale_q")
    z = (rational(mu_p) - rational(mu_q)) / s_q
    return Terms(rational=z * z, psi=[(s_p / s_q) ** 2 - 1])


def _terms_diag(mu_p, l_p, mu_q, l_q) -> Terms:
    l_p, l_q = rationals(l_p), rationals(l_q)
    dmu = differences(mu_p, mu_q)
    return Terms(rational=rational(0), phi=[a - b for a, b in zip(l_p, l_q)], exp=[(d * d, -b) for d, b in zip(dmu, l_q)])


def _terms_vae(mu, logvar) -> Terms:
    return Terms(rational=sum((m * m for m in rationals(mu)), rational(0)), phi=rationals(logvar))


def _positive(x, name):
    value = rational(x)
    if value <= 0:
        raise ValueError(f"{name} must be positive")
    return value


def rational_matrix(a: np.ndarray):
    """A float matrix as the exact rational matrix it is (fmpq_mat)."""
    from flint import fmpq_mat

    return fmpq_mat(*a.shape, rationals(a))


def _solve(a, columns: list[np.ndarray | object]):
    """a^-1 [columns], exactly (``a`` an invertible fmpq_mat; columns fmpq_mat or vectors)."""
    from flint import fmpq_mat

    k = a.nrows()
    rhs = fmpq_mat(k, len(columns), [c[i] for i in range(k) for c in columns])
    return a.solve(rhs)


def _terms_tril(mu_p, tril_p, mu_q, tril_q) -> Terms:
    k = tril_p.shape[-1]
    l_p, l_q = rational_matrix(np.tril(tril_p)), rational_matrix(np.tril(tril_q))
    for name, factor in (("tril_p", l_p), ("tril_q", l_q)):
        if any(factor[i, i] <= 0 for i in range(k)):
            raise ValueError(f"{name} has a non-positive diagonal")
    dmu = differences(mu_p, mu_q)
    # E = L_q^-1 (L_p - L_q) and z = L_q^-1 dmu, exactly; A = I + E has diagonal r_i = L_p,ii / L_q,ii.
    difference = l_p - l_q
    solved = _solve(l_q, [[difference[i, j] for i in range(k)] for j in range(k)] + [dmu])
    squares = sum((solved[i, j] ** 2 for j in range(k) for i in range(j + 1, k)), rational(0))
    squares += sum((solved[i, k] ** 2 for i in range(k)), rational(0))
    return Terms(rational=squares, psi=[(l_p[i, i] / l_q[i, i]) ** 2 - 1 for i in range(k)])


def ldl_pivots(matrix, name: str = "matrix") -> list:
    """The pivots D of the exact LDL^T of a symmetric fmpq_mat: all > 0 exactly when it is
    positive definite; ``ValueError`` naming it otherwise."""
    k = matrix.nrows()
    a = [[matrix[i, j] for j in range(k)] for i in range(k)]
    pivots = []
    for j in range(k):
        d = a[j][j]
        if d <= 0:
            raise ValueError(f"{name} is not positive definite (exact LDL^T pivot {j} is {float(d):.3g})")
        pivots.append(d)
        for i in range(j + 1, k):  # the trailing lower triangle, minus column j's outer product / d
            factor = a[i][j] / d
            for t in range(j + 1, i + 1):
                a[i][t] -= factor * a[t][j]
    return pivots


def symmetric_matrix(m: np.ndarray):
    """A covariance matrix as an exact rational matrix, read as symmetric: (S + S^T) / 2."""
    from flint import fmpq_mat

    k = m.shape[-1]
    return fmpq_mat(k, k, [(rational(m[i, j]) + rational(m[j, i])) / 2 for i in range(k) for j in range(k)])


def _terms_cov(mu_p, cov_p, mu_q, cov_q) -> Terms:
    return _terms_of_covariances(mu_p, symmetric_matrix(cov_p), mu_q, symmetric_matrix(cov_q))


def _terms_of_covariances(mu_p, s_p, mu_q, s_q) -> Terms:
    """The KL's terms from exact rational covariance matrices (fmpq_mat)."""
    k = s_p.nrows()
    pivots_p, pivots_q = ldl_pivots(s_p, "cov_p"), ldl_pivots(s_q, "cov_q")
    dmu = differences(mu_p, mu_q)
    solved = _solve(s_q, [[s_p[i, j] for i in range(k)] for j in range(k)] + [dmu])  # S_q^-1 [S_p | dmu]
    ratios = [p / q for p, q in zip(pivots_p, pivots_q)]  # det S_p / det S_q = prod ratios
    # tr(S_q^-1 S_p) - k - ln(det S_p / det S_q) = sum psi(ratio - 1) + (trace - sum ratios)
    rest = sum((solved[i, i] for i in range(k)), rational(0)) - sum(ratios, rational(0))
    quad = sum((d * solved[i, k] for i, d in enumerate(dmu)), rational(0))
    return Terms(rational=rest + quad, psi=[r - 1 for r in ratios])


def low_rank_covariance(w: np.ndarray, d: np.ndarray, name: str):
    """W W^T + diag(d) as an exact rational matrix (fmpq_mat)."""
    from flint import fmpq_mat

    k = len(d)
    diagonal = rationals(d)
    if any(v <= 0 for v in diagonal):
        raise ValueError(f"{name} must be positive")
    factor = rational_matrix(w)
    return factor * factor.transpose() + fmpq_mat(k, k, [diagonal[i] if i == j else 0 for i in range(k) for j in range(k)])


def _terms_lowrank(mu_p, w_p, d_p, mu_q, w_q, d_q) -> Terms:
    s_p, s_q = low_rank_covariance(w_p, d_p, "cov_diag_p"), low_rank_covariance(w_q, d_q, "cov_diag_q")
    return _terms_of_covariances(mu_p, s_p, mu_q, s_q)


TERMS = {"normal": _terms_normal, "diag": _terms_diag, "vae": _terms_vae, "tril": _terms_tril, "cov": _terms_cov,
         "lowrank": _terms_lowrank}


def _nearest(man: int, exp: int) -> float:
    """man * 2^exp rounded to the nearest float64 (ties to even: Python's int arithmetic is exact
    and its true division correctly rounded; +-inf beyond the range)."""
    try:
        return float(man << exp) if exp >= 0 else man / (1 << -exp)
    except OverflowError:
        return math.copysign(math.inf, man)


def _round(point) -> float:
    """An exact arb as the nearest float64."""
    return _nearest(*(int(v) for v in point.man_exp()))


def mantissa_exponent(value: mpmath.mpf) -> tuple[int, int]:
    """A finite mpf as integers (man, exp) with value = man * 2^exp, exactly."""
    sign, man, exp, _ = value._mpf_
    return (-int(man) if sign else int(man)), int(exp)


def nearest_float64(value: mpmath.mpf) -> float:
    """A reference value rounded to the nearest float64."""
    return math.nan if mpmath.isnan(value) else _nearest(*mantissa_exponent(value))


def _settled(ball) -> bool:
    if ball.is_exact():
        return True
    if ball.rel_accuracy_bits() < CERTIFIED_BITS:
        return False
    return _round(ball.lower()) == _round(ball.upper())


def _log2_above(radius) -> int:
    """The least e with radius <= 2^e."""
    man, exp = (int(v) for v in radius.upper().man_exp())
    return exp + man.bit_length()


def as_mp(point) -> mpmath.mpf:
    man, exp = (int(v) for v in point.man_exp())
    with mpmath.workprec(max(53, man.bit_length())):  # exactly, not rounded to the context's precision
        return mpmath.mpf((man, exp))


def terms(family: str, parts) -> Terms:
    """The exact rational preparation of one parameter set; full covariances whose nonzero pattern
    splits into independent blocks are prepared block by block (the KL is the sum)."""
    fam = families.TABLE[family]
    if fam.full and len(blocks := coupled_blocks(family, parts)) > 1:
        total = Terms(rational=rational(0))
        square = [a.kind in (families.FACTOR, families.COV) for a in fam.args]
        for b in blocks:  # a k x r factor keeps its r columns (those of other blocks are 0 in it)
            total += TERMS[family](*[p[np.ix_(b, b)] if sq else p[b] for p, sq in zip(parts, square)])
        return total
    return TERMS[family](*parts)


def certified(family: str, parts) -> Certified:
    """The certified reference for one parameter set (float64 NumPy arrays)."""
    if any(np.isnan(p).any() for p in parts):
        return Certified(mpmath.mpf("nan"), None, 0)
    if not all(np.isfinite(p).all() for p in parts):
        return Certified(_infinite_limit(family, parts), None, 0)
    if is_exactly_zero(family, parts):
        return Certified(mpmath.mpf(0), None, 0)
    from flint import ctx

    prepared = terms(family, parts)
    prec = START_PREC
    while prec <= MAX_PREC:
        with ctx.workprec(prec):  # the ends of the ball, exactly (below the precision they would be rounded)
            ball = prepared.ball(prec)
            if _settled(ball):
                return Certified(as_mp(ball.mid()), None if ball.is_exact() else _log2_above(ball.rad()), prec)
        prec *= 2
    raise ArithmeticError(f"{family} reference not certified at {MAX_PREC} bits")


def _infinite_limit(family: str, parts) -> mpmath.mpf:
    """The KL where an input is infinite: every term of the KL is >= 0, so it is +inf as soon as one
    term is (a variance of 0 or infinity, an infinite mean), and NaN where a term is undefined
    (inf - inf, inf / inf) and none is +inf; an infinite entry of a matrix is no covariance: NaN."""
    fam = families.TABLE[family]
    with np.errstate(all="ignore"):
        if fam.full:
            if any(not np.isfinite(p).all() for p, a in zip(parts, fam.args) if a.kind != families.LOC):
                return mpmath.mpf("nan")
            half = len(parts) // 2
            terms = [parts[0] - parts[half]]
        elif family == "vae":
            terms = [np.inf]
        elif family == "normal":
            mu_p, s_p, mu_q, s_q = parts
            u = (s_p / s_q) ** 2 - 1  # psi(u) is +inf at u = inf and at u = -1 (a variance of 0 or inf)
            terms = [np.where(u == -1, np.inf, u), (mu_p - mu_q) / s_q]
        else:  # diag: phi(l_p - l_q) and dmu^2 e^-l_q, 0 where dmu = 0
            mu_p, l_p, mu_q, l_q = parts
            dmu = mu_p - mu_q
            terms = [l_p - l_q, np.where(dmu == 0, 0.0, dmu * dmu * np.exp(-l_q))]
    terms = np.concatenate([np.ravel(np.abs(t)) for t in terms])
    return mpmath.mpf("inf") if np.isinf(terms).any() else mpmath.mpf("nan")


def is_exactly_zero(family: str, parts) -> bool:
    """KL is exactly 0 when p and q are the same distribution, bit for bit."""
    if family == "vae":
        return not np.any(parts[0]) and not np.any(parts[1])
    half = len(parts) // 2
    if families.TABLE[family].of_kind(families.FACTOR):  # only the lower triangle counts
        parts = [np.tril(p) if p.ndim == 2 else p for p in parts]
    return all(np.array_equal(a, b) for a, b in zip(parts[:half], parts[half:]))


def coupled_blocks(family: str, parts) -> list[np.ndarray]:
    """Coordinates coupled by the matrices of a full-covariance parameter set: the connected
    components of their nonzero pattern, each sorted. p and q factor over these blocks (for
    ``tril`` a sorted block of a lower-triangular factor is itself one), so the KL is exactly the
    sum of the blocks' KLs."""
    from scipy.sparse.csgraph import connected_components

    if family == "lowrank":  # W W^T + diag(d): coordinates coupled through a shared column of W
        pattern = np.eye(len(parts[0]), dtype=bool)
        for w in (parts[1], parts[4]):
            used = (w != 0).astype(int)
            pattern |= (used @ used.T) > 0
    else:
        pattern = (parts[1] != 0) | (parts[3] != 0)
    if families.TABLE[family].of_kind(families.FACTOR):
        pattern = np.tril(pattern)
    count, labels = connected_components(pattern, directed=False)
    return [np.flatnonzero(labels == c) for c in range(count)]


# ---------------------------------------------------------------------------------------------
# The on-disk cache
# ---------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    if "KL_BENCH_CACHE" in os.environ:
        return Path(os.environ["KL_BENCH_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kl-bench" / "reference"


class Cache:
    """One small file per reference value; corrupt files are detected by checksum and replaced. A
    directory that cannot be used (a file in its place, no permission, a full disk) is given up with
    one line on stderr: the references are then computed and not stored."""

    def __init__(self, directory: Path | str | None = None):
        self.directory = Path(directory) if directory is not None else default_cache_dir()
        self.hits = self.misses = self.corrupt = 0
        self.unusable = ""  # why the directory was given up

    def usable(self) -> bool:
        """Can values be stored? Tried once, before any work, by the commands that use the cache."""
        if not self.unusable:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryFile(dir=self.directory):
                    pass
            except OSError as exc:
                self._give_up(exc)
        return not self.unusable

    def _give_up(self, exc: OSError) -> None:
        if not self.unusable:
            self.unusable = f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
            print(f"kl-bench: the reference cache {self.directory} cannot be used ({self.unusable}); "
                  "continuing without it (set KL_BENCH_CACHE to a writable directory)", file=sys.stderr)

    @staticmethod
    def key(family: str, parts) -> str:
        h = hashlib.sha256(f"kl-bench reference v{REFERENCE_VERSION} {family}".encode())
        for p in parts:
            h.update(repr(p.shape).encode())
            h.update(np.ascontiguousarray(p, dtype="<f8").tobytes())
        return h.hexdigest()

    def path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.json"

    @staticmethod
    def _checksum(key, sign, man, exp, radius_log2, prec) -> str:
        return hashlib.sha256(f"{key}:{sign}:{man}:{exp}:{radius_log2}:{prec}".encode()).hexdigest()[:32]

    def get(self, key: str) -> Certified | None:
        try:
            record = json.loads(self.path(key).read_text())
            sign, man, exp = int(record["sign"]), int(record["man"]), int(record["exp"])
            radius_log2, prec = record["radius_log2"], int(record["prec"])
            if radius_log2 is not None:
                radius_log2 = int(radius_log2)
            if record["key"] != key or record["check"] != self._checksum(key, sign, man, exp, radius_log2, prec):
                raise ValueError("checksum mismatch")
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError, OSError):
            self.corrupt += 1
            return None
        with mpmath.workprec(max(53, man.bit_length())):  # exactly, not rounded to the context's precision
            return Certified(mpmath.mpf((-man if sign else man, exp)), radius_log2, prec)

    def put(self, key: str, reference: Certified) -> None:
        sign, man, exp, _ = reference.value._mpf_
        man = int(man)
        record = {"key": key, "sign": sign, "man": str(man), "exp": exp, "radius_log2": reference.radius_log2,
                  "prec": reference.prec, "check": self._checksum(key, sign, man, exp, reference.radius_log2, reference.prec)}
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        os.replace(tmp, path)  # atomic: a reader sees the old file or the whole new one

    def certified(self, family: str, parts) -> Certified:
        if self.unusable:
            return certified(family, parts)
        key = self.key(family, parts)
        cached = self.get(key)
        if cached is not None:
            self.hits += 1
            return cached
        self.misses += 1
        reference = certified(family, parts)
        if not mpmath.isnan(reference.value):  # NaN is immediate (and has no mantissa to store)
            try:
                self.put(key, reference)
            except OSError as exc:
                self._give_up(exc)
        return reference

    def value(self, family: str, parts) -> mpmath.mpf:
        return self.certified(family, parts).value


_default_cache: Cache | None = None


def default_cache() -> Cache:
    global _default_cache
    if _default_cache is None or _default_cache.directory != default_cache_dir():
        _default_cache = Cache()
    return _default_cache


# ---------------------------------------------------------------------------------------------
# Public functions, shaped like kl_bench.kl_*
# ---------------------------------------------------------------------------------------------


def certificates(family: str, *args, cache: Cache | None | bool = True):
    """Certified references for a batch: an object array of ``Certified`` over the broadcast batch
    shape (one ``Certified`` for a single parameter set). ``cache=False`` skips the disk cache."""
    core = families.TABLE[family].core_ndims
    arrays = [np.asarray(a, dtype=np.float64) for a in args]
    if not families.TABLE[family].full:
        arrays = list(np.broadcast_arrays(*arrays))
        batch = arrays[0].shape[: arrays[0].ndim - core[0]]
    else:
        k = arrays[1].shape[-2]
        batch = np.broadcast_shapes(*(a.shape[: a.ndim - c] if c else a.shape for a, c in zip(arrays, core)))
        arrays = [np.broadcast_to(a, batch + ((k,) if c == 1 else (k, a.shape[-1]))) for a, c in zip(arrays, core)]
    store = default_cache() if cache is True else (cache or None)
    out = np.empty(batch, dtype=object)
    for index in np.ndindex(*batch):
        parts = [a[index] for a in arrays]
        out[index] = store.certified(family, parts) if store else certified(family, parts)
    return out[()] if out.ndim == 0 else out


def evaluate(family: str, *args, cache: Cache | None | bool = True):
    """References for a batch: an object array of mpf over the broadcast batch shape (an mpf for
    a single parameter set). ``cache=False`` skips the disk cache."""
    found = certificates(family, *args, cache=cache)
    if isinstance(found, Certified):
        return found.value
    return np.vectorize(lambda c: c.value, otypes=[object])(found)


def kl_normal(loc_p, scale_p, loc_q, scale_q, *, cache=True):
    return evaluate("normal", loc_p, scale_p, loc_q, scale_q, cache=cache)


def kl_diag(loc_p, logvar_p, loc_q, logvar_q, *, cache=True):
    return evaluate("diag", loc_p, logvar_p, loc_q, logvar_q, cache=cache)


def kl_vae(loc, logvar, *, cache=True):
    return evaluate("vae", loc, logvar, cache=cache)


def kl_tril(loc_p, tril_p, loc_q, tril_q, *, cache=True):
    return evaluate("tril", loc_p, tril_p, loc_q, tril_q, cache=cache)


def kl_cov(loc_p, cov_p, loc_q, cov_q, *, cache=True):
    return evaluate("cov", loc_p, cov_p, loc_q, cov_q, cache=cache)


def kl_lowrank(loc_p, cov_factor_p, cov_diag_p, loc_q, cov_factor_q, cov_diag_q, *, cache=True):
    return evaluate("lowrank", loc_p, cov_factor_p, cov_diag_p, loc_q, cov_factor_q, cov_diag_q, cache=cache)
