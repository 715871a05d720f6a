"""The KL families, one row each: every module that needs a family's facts reads them here.

Adding a family means adding its row below, its kernel in ``kernels.py`` and, for the suite, its
reference formula (``suite/reference.py``) and case generator (``suite/cases.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# What an argument holds, per batch element.
LOC = "loc"  # a mean
SCALE = "scale"  # a standard deviation (> 0)
LOGVAR = "logvar"  # a log-variance
FACTOR = "factor"  # a lower Cholesky factor of a covariance (positive diagonal; the upper part is ignored)
COV = "cov"  # a symmetric positive-definite covariance matrix
LOW_RANK = "low-rank factor"  # W of a covariance W W^T + diag(d): k x r, any r >= 1
VARIANCE = "variance"  # the diagonal d of a covariance W W^T + diag(d) (> 0)


@dataclass(frozen=True)
class Arg:
    name: str
    kind: str  # LOC, SCALE, LOGVAR, FACTOR, COV, LOW_RANK or VARIANCE
    core_ndim: int  # trailing axes per batch element: 0 a scalar, 1 a vector of length k, 2 a k x k (k x r) matrix


@dataclass(frozen=True)
class Family:
    name: str
    args: tuple[Arg, ...]
    accelerated: tuple[str, ...] = ()  # kernels of ``kl_bench.accel`` that exist for this family
    # whether the array path runs in blocks of batch elements on the CPU (``kl_bench.blocks``)
    in_blocks: bool = True

    # Derived once (every KL call reads them): plain attributes, which compilers trace through.
    names: tuple[str, ...] = field(init=False, repr=False, compare=False)
    core_ndims: tuple[int, ...] = field(init=False, repr=False, compare=False)
    elementwise: bool = field(init=False, repr=False, compare=False)  # one KL per element of the broadcast inputs
    full: bool = field(init=False, repr=False, compare=False)  # matrix arguments, linear algebra per batch element

    def __post_init__(self):
        core_ndims = tuple(a.core_ndim for a in self.args)
        for name, value in (("names", tuple(a.name for a in self.args)), ("core_ndims", core_ndims),
                            ("elementwise", max(core_ndims) == 0), ("full", max(core_ndims) == 2)):
            object.__setattr__(self, name, value)  # frozen

    def of_kind(self, *kinds: str) -> tuple[str, ...]:
        """Names of the arguments of these kinds."""
        return tuple(a.name for a in self.args if a.kind in kinds)


def _family(name, *args, accelerated=(), in_blocks=True):
    return Family(name, tuple(Arg(*a) for a in args), accelerated, in_blocks)


TABLE: dict[str, Family] = {f.name: f for f in (
    _family("normal", ("loc_p", LOC, 0), ("scale_p", SCALE, 0), ("loc_q", LOC, 0), ("scale_q", SCALE, 0),
            accelerated=("triton",)),
    _family("diag", ("loc_p", LOC, 1), ("logvar_p", LOGVAR, 1), ("loc_q", LOC, 1), ("logvar_q", LOGVAR, 1),
            accelerated=("triton", "xla", "numba")),
    _family("vae", ("loc", LOC, 1), ("logvar", LOGVAR, 1), accelerated=("triton", "xla", "numba")),
    _family("tril", ("loc_p", LOC, 1), ("tril_p", FACTOR, 2), ("loc_q", LOC, 1), ("tril_q", FACTOR, 2)),
    _family("cov", ("loc_p", LOC, 1), ("cov_p", COV, 2), ("loc_q", LOC, 1), ("cov_q", COV, 2)),
    # not in blocks: its temporaries are a few arrays of the factors' size, and each block would
    # repeat its dozens of small r x r operations (eight blocks of one element made Torch CPU at
    # B = 8, k = 4096, r = 16 take 19.2 ms instead of 9.1)
    _family("lowrank", ("loc_p", LOC, 1), ("cov_factor_p", LOW_RANK, 2), ("cov_diag_p", VARIANCE, 1),
            ("loc_q", LOC, 1), ("cov_factor_q", LOW_RANK, 2), ("cov_diag_q", VARIANCE, 1), accelerated=("numba",),
            in_blocks=False),
)}
NAMES = tuple(TABLE)


def get(name: str) -> Family:
    try:
        return TABLE[name]
    except KeyError:
        raise ValueError(f"unknown family {name!r}; known: {', '.join(NAMES)}") from None


def with_kernel(kernel: str) -> tuple[str, ...]:
    """The families that an accelerated kernel exists for."""
    return tuple(f.name for f in TABLE.values() if kernel in f.accelerated)
