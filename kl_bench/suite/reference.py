"""High-precision references: the exact KL of the distributions that float64 inputs define.

The five functions mirror ``kl_bench.kl_*`` (same arguments, NumPy-style broadcasting) for float64
inputs and return mpmath numbers (an object array of them for a batch). Each value is the textbook
formula evaluated in mpmath, so it shares nothing with the stable kernels but the mathematics.

Precision rule (self-validation): evaluate at 128 bits, then at twice the precision, and so on;
accept the newer value as soon as two successive values agree to ``AGREE_BITS`` (100) bits
relative, i.e. well past the 53 bits of float64 being judged. The older value then has 100 correct
bits and the newer one far more, whatever cancellation the formula suffered. A KL that is exactly
zero (p == q, bit for bit) is returned as 0 without evaluation: it is the one value the rule
could not confirm. gmpy2, when installed, makes mpmath several times faster.

Values are cached on disk (``KL_BENCH_CACHE``, default ``~/.cache/kl-bench/reference``), one file
per value, keyed by the family, the input bytes and ``REFERENCE_VERSION``; each file carries a
checksum, and a corrupt or truncated file is recomputed and rewritten, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import mpmath
import numpy as np

from .. import families

REFERENCE_VERSION = 2  # bump whenever a formula below changes: old cache entries stop matching
START_PREC = 128
AGREE_BITS = 100
MAX_PREC = 1 << 16


# ---------------------------------------------------------------------------------------------
# The textbook formulas in mpmath, at the current working precision. Inputs are mpf values,
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


MP_FUNCTIONS = {"normal": mp_normal, "diag": mp_diag, "vae": mp_vae, "tril": mp_tril, "cov": mp_cov}


def to_mp(x: np.ndarray):
    if x.ndim == 0:
        return mpmath.mpf(float(x))
    return [to_mp(v) for v in x]


def is_exactly_zero(family: str, parts) -> bool:
    """KL is exactly 0 when p and q are the same distribution, bit for bit."""
    if family == "vae":
        return not np.any(parts[0]) and not np.any(parts[1])
    mu_p, a, mu_q, b = parts
    if families.TABLE[family].of_kind(families.FACTOR):  # only the lower triangle counts
        a, b = np.tril(a), np.tril(b)
    return np.array_equal(mu_p, mu_q) and np.array_equal(a, b)


def coupled_blocks(family: str, parts) -> list[np.ndarray]:
    """Coordinates coupled by the matrices of a full-covariance parameter set: the connected
    components of their nonzero pattern, each sorted. p and q factor over these blocks (for
    ``tril`` a sorted block of a lower-triangular factor is itself one), so the KL is exactly the
    sum of the blocks' KLs."""
    from scipy.sparse.csgraph import connected_components

    pattern = (parts[1] != 0) | (parts[3] != 0)
    if families.TABLE[family].of_kind(families.FACTOR):
        pattern = np.tril(pattern)
    count, labels = connected_components(pattern, directed=False)
    return [np.flatnonzero(labels == c) for c in range(count)]


def validated(family: str, parts) -> mpmath.mpf:
    """The self-validated reference for one parameter set (float64 NumPy arrays)."""
    if is_exactly_zero(family, parts):
        return mpmath.mpf(0)
    if families.TABLE[family].full and len(blocks := coupled_blocks(family, parts)) > 1:
        # every block's KL is >= 0: the sum of 100-bit values keeps 100 bits
        values = [validated(family, [p[b] if p.ndim == 1 else p[np.ix_(b, b)] for p in parts]) for b in blocks]
        with mpmath.workprec(4 * START_PREC):
            return mpmath.fsum(values)
    fn = MP_FUNCTIONS[family]
    prec = START_PREC
    with mpmath.workprec(prec):
        previous = fn(*[to_mp(p) for p in parts])
    while prec < MAX_PREC:
        prec *= 2
        with mpmath.workprec(prec):
            current = fn(*[to_mp(p) for p in parts])
            if abs(current - previous) <= mpmath.ldexp(abs(current), -AGREE_BITS):
                return +current
        previous = current
    raise ArithmeticError(f"{family} reference did not settle below {MAX_PREC} bits")


# ---------------------------------------------------------------------------------------------
# The on-disk cache
# ---------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    if "KL_BENCH_CACHE" in os.environ:
        return Path(os.environ["KL_BENCH_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kl-bench" / "reference"


class Cache:
    """One small file per reference value; corrupt files are detected by checksum and replaced."""

    def __init__(self, directory: Path | str | None = None):
        self.directory = Path(directory) if directory is not None else default_cache_dir()
        self.hits = self.misses = self.corrupt = 0

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
    def _checksum(key, sign, man, exp) -> str:
        return hashlib.sha256(f"{key}:{sign}:{man}:{exp}".encode()).hexdigest()[:32]

    def get(self, key: str):
        try:
            record = json.loads(self.path(key).read_text())
            sign, man, exp = int(record["sign"]), int(record["man"]), int(record["exp"])
            if record["key"] != key or record["check"] != self._checksum(key, sign, man, exp):
                raise ValueError("checksum mismatch")
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError, OSError):
            self.corrupt += 1
            return None
        with mpmath.workprec(max(53, man.bit_length())):  # exactly, not rounded to the context's precision
            return mpmath.mpf((-man if sign else man, exp))

    def put(self, key: str, value: mpmath.mpf) -> None:
        sign, man, exp, _ = value._mpf_
        man = int(man)
        record = {"key": key, "sign": sign, "man": str(man), "exp": exp, "check": self._checksum(key, sign, man, exp)}
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        os.replace(tmp, path)  # atomic: a reader sees the old file or the whole new one

    def value(self, family: str, parts) -> mpmath.mpf:
        key = self.key(family, parts)
        cached = self.get(key)
        if cached is not None:
            self.hits += 1
            return cached
        self.misses += 1
        value = validated(family, parts)
        self.put(key, value)
        return value


_default_cache: Cache | None = None


def default_cache() -> Cache:
    global _default_cache
    if _default_cache is None or _default_cache.directory != default_cache_dir():
        _default_cache = Cache()
    return _default_cache


# ---------------------------------------------------------------------------------------------
# Public functions, shaped like kl_bench.kl_*
# ---------------------------------------------------------------------------------------------


def evaluate(family: str, *args, cache: Cache | None | bool = True):
    """References for a batch: an object array of mpf over the broadcast batch shape (an mpf for
    a single parameter set). ``cache=False`` skips the disk cache."""
    core = families.TABLE[family].core_ndims
    arrays = [np.asarray(a, dtype=np.float64) for a in args]
    if not families.TABLE[family].full:
        arrays = list(np.broadcast_arrays(*arrays))
        batch = arrays[0].shape[: arrays[0].ndim - core[0]]
    else:
        k = arrays[1].shape[-1]
        batch = np.broadcast_shapes(*(a.shape[: a.ndim - c] if c else a.shape for a, c in zip(arrays, core)))
        arrays = [np.broadcast_to(a, batch + (k,) * c) for a, c in zip(arrays, core)]
    store = default_cache() if cache is True else (cache or None)
    out = np.empty(batch, dtype=object)
    for index in np.ndindex(*batch):
        parts = [a[index] for a in arrays]
        out[index] = store.value(family, parts) if store else validated(family, parts)
    return out[()] if out.ndim == 0 else out


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
