"""Timing: the work, not the launch or the compiler. One implementation, used by the timing sweep
below (``kl-bench timing``, the timing cells of ``kl-bench run``) and by the pytest-benchmark
suites in ``benchmarks/`` (docs/design.md, "Measuring speed").

A ``Workload`` is one subject computing one family at one shape and dtype on inputs made once. Its
call synchronises the backend (CUDA, JAX's asynchronous dispatch) before returning, so a clock read
around it times the work; its first call (compilation, caches) is timed separately. Speeds are
reported against ceilings measured on the same machine in the same run: the copy bandwidth of a
buffer as large as the inputs, and the rate of a batched matrix product.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .. import backends, families
from ..families import COV, FACTOR, LOC, LOGVAR, LOW_RANK, SCALE, VARIANCE
from . import cases
from .subjects import Subject, available, describe, labels


def median_seconds(fn, be=None, repeats: int = 5, min_seconds: float = 0.0) -> float:
    """Median wall time of ``fn()`` after one untimed call; each call is synchronised with ``be``
    (if given) before the clock is read. Repeats at least ``repeats`` times and until
    ``min_seconds`` have passed (at most 1000 calls)."""
    sync = be.sync if be is not None else (lambda x: None)
    sync(fn())
    times: list[float] = []
    while len(times) < repeats or (sum(times) < min_seconds and len(times) < 1000):
        start = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def inputs(family: str, batch: int, k: int, seed: int = 0) -> list[np.ndarray]:
    """float64 arguments of ``family``: ``batch`` elements of dimension ``k`` (elementwise
    families: ``batch * k`` scalars), well conditioned, moderately apart."""
    fam, rng = families.get(family), np.random.default_rng(seed)
    if fam.full:
        spd = (cases.random_spd(rng, np.exp(rng.uniform(-1, 1, size=(batch, k)))) for _ in fam.of_kind(FACTOR, COV))
        make = {LOC: lambda: rng.normal(size=(batch, k)), FACTOR: lambda: np.linalg.cholesky(next(spd)), COV: lambda: next(spd),
                LOW_RANK: lambda: rng.normal(size=(batch, k, TIMING_RANK)) / np.sqrt(TIMING_RANK),
                VARIANCE: lambda: np.exp(rng.uniform(-1, 1, size=(batch, k)))}
    else:
        shape = (batch * k,) if fam.elementwise else (batch, k)
        make = {LOC: lambda: rng.normal(size=shape), SCALE: lambda: np.exp(rng.normal(size=shape) / 2),
                LOGVAR: lambda: rng.normal(size=shape)}
    return [make[arg.kind]() for arg in fam.args]


def input_bytes(family: str, batch: int, k: int, dtype: str, largest_only: bool = False) -> int:
    """Bytes of the inputs, read once by a kernel at the memory-bandwidth limit (``largest_only``:
    of the largest argument)."""
    fam = families.get(family)
    count = batch * k if fam.elementwise else batch
    sizes = [k * TIMING_RANK if a.kind == LOW_RANK else k**a.core_ndim for a in fam.args]
    per_element = max(sizes) if largest_only else sum(sizes)
    return count * per_element * (8 if dtype == "float64" else 4 if dtype == "float32" else 2)


def nominal_flops(family: str, batch: int, k: int) -> float | None:
    """Floating-point operations of the full-covariance kernels (k^3 for a triangular solve with
    k right-hand sides; cov has two of them, two Cholesky factorisations and the shifted
    Cholesky recurrence, k^3 / 3 each: 3 k^3 in all; lowrank nine products of an r x k by a k x r
    matrix, 18 k r^2); None for the elementwise families."""
    if family == "lowrank":
        return 18.0 * batch * k * TIMING_RANK**2
    return {"tril": 1.0, "cov": 3.0}.get(family, 0.0) * batch * float(k) ** 3 or None


@functools.cache
def copy_bandwidth(nbytes: int) -> float:
    """Bytes per second that NumPy copies a buffer of ``nbytes`` into another on every core (read
    and write counted, as STREAM does): the memory ceiling for a kernel whose inputs are ``nbytes``."""
    n = max(nbytes // 8, 1)
    src, dst = np.ones(n), np.empty(n)
    # One slice per core, as the multi-threaded kernels measured against it use every core
    # (NumPy's copy releases the GIL).
    workers = (os.cpu_count() or 1) if nbytes >= 1 << 20 else 1  # below 1 MiB threads cost more than they give
    bounds = np.linspace(0, n, workers + 1).astype(int)
    with ThreadPoolExecutor(workers) as pool:

        def copy():
            list(pool.map(lambda i: np.copyto(dst[bounds[i]:bounds[i + 1]], src[bounds[i]:bounds[i + 1]]), range(workers)))

        seconds = median_seconds(copy, repeats=5, min_seconds=0.05)
    return 2 * 8 * n / seconds


@functools.cache
def matmul_flops(dtype: str = "float64") -> float:
    """Floating-point operations per second of a NumPy matrix product (1024 x 1024)."""
    a = np.ones((1024, 1024), dtype=dtype)
    seconds = median_seconds(lambda: a @ a, repeats=3, min_seconds=0.1)
    return 2 * 1024**3 / seconds


@dataclass
class Workload:
    """``subject`` computing ``family`` for ``batch`` elements of dimension ``k`` in ``dtype``;
    calling it runs the kernel once, synchronised."""

    subject: Subject
    family: str
    batch: int
    k: int
    dtype: str
    args: list = field(init=False, repr=False)

    def __post_init__(self):
        with self.subject.be.computing(self.dtype):
            self.args = [self.subject.asarray(a, self.dtype) for a in inputs(self.family, self.batch, self.k)]
        self._fn = self.subject.function(self.family)

    def __call__(self):
        with self.subject.be.computing(self.dtype):
            result = self._fn(*self.args)
            self.subject.be.sync(result)
        return result

    def first_call_seconds(self) -> float:
        """Time of the first call: compilation and caches included."""
        start = time.perf_counter()
        self()
        return time.perf_counter() - start

    @property
    def nbytes(self) -> int:
        return input_bytes(self.family, self.batch, self.k, self.dtype)

    @property
    def largest_input_bytes(self) -> int:
        return input_bytes(self.family, self.batch, self.k, self.dtype, largest_only=True)

    @property
    def flops(self) -> float | None:
        return nominal_flops(self.family, self.batch, self.k)

    def throughput(self, seconds: float) -> dict:
        """GB/s of the inputs and the fraction of the ceiling reached (copy bandwidth for the
        elementwise families, matrix-product rate for the full-covariance ones)."""
        gbps = self.nbytes / seconds / 1e9
        if self.flops is None:
            fraction = gbps * 1e9 / copy_bandwidth(self.nbytes)
        else:
            fraction = self.flops / seconds / matmul_flops("float64" if self.dtype == "float64" else "float32")
        return {"bytes": self.nbytes, "gbps": gbps, "flops": self.flops, "roofline_fraction": fraction}


def measure(workload: Workload, repeats: int = 5, min_seconds: float = 0.05) -> dict:
    """seconds (median, synchronised), compile_seconds (first call beyond that), throughput, and
    the memory one call holds beyond its inputs, as a multiple of its largest input."""
    first = workload.first_call_seconds()
    seconds = median_seconds(workload, repeats=repeats, min_seconds=min_seconds)
    peak = peak_bytes(workload) if workload.subject.device == "cpu" else None
    return {"seconds": seconds, "compile_seconds": max(first - seconds, 0.0), **workload.throughput(seconds),
            "peak_over_input": np.nan if peak is None else peak / workload.largest_input_bytes}


def peak_bytes(fn) -> int | None:
    """Memory that one call of ``fn`` holds at its peak beyond what was resident before it: the
    resident-set high-water mark (Linux), reset just before the call, after freed memory went back
    to the system. None where that cannot be read. (XLA's own allocator may keep memory between
    calls, so on JAX it can read low.)"""
    import ctypes
    import gc

    try:
        gc.collect()
        ctypes.CDLL(None).malloc_trim(0)  # glibc: freed heap memory back to the system
        before = _status_bytes("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident set
    except (OSError, AttributeError):
        return None
    fn()
    return max(0, _status_bytes("VmHWM") - before)


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def machine() -> dict:
    """What the timings ran on: CPU model, cores, memory, GPUs and the versions that matter."""
    import importlib.metadata
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "system": platform.platform()}
    try:
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    for package in ("numpy", "torch", "jax", "jaxlib", "numba", "numpyro", "triton"):
        try:
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass

    gpus = []
    if backends.get("torch").installed():
        import torch

        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    info["gpus"] = gpus
    return info


COLUMNS = ["family", "subject", "implementation", "backend", "device", "dtype", "method", "mode", "compiled",
           "B", "k", "seconds", "compile_seconds", "bytes", "gbps", "flops", "roofline_fraction", "peak_over_input", "error"]
_FULL_KS = (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# (B, k) from tiny (per-call overhead) to memory-bound; the full-covariance families at batch 16.
SHAPES = {
    "quick": {"diagonal": ((1, 64), (4096, 64), (2048, 4096)), "full": ((16, 2), (16, 32), (16, 256)),
              "lowrank": ((8, 256), (8, 4096))},
    "full": {"diagonal": ((1, 64), (64, 64), (4096, 64), (256, 4096), (2048, 4096), (4096, 4096)),
             "full": tuple((16, k) for k in _FULL_KS), "lowrank": tuple((8, k) for k in (64, 256, 1024, 4096, 16384))},
}
TIMING_RANK = 16  # r of the lowrank family's timed factors


def shapes(family: str, sweep: str = "quick") -> tuple[tuple[int, int], ...]:
    """The (B, k) that ``sweep`` times ``family`` at."""
    if family in SHAPES[sweep]:
        return SHAPES[sweep][family]
    return SHAPES[sweep]["full" if families.get(family).full else "diagonal"]


def default_dtypes(family: str) -> tuple[str, ...]:
    """float32 for the diagonal and low-rank families (where models use them), float64 for full covariances."""
    return ("float64",) if families.get(family).full and family != "lowrank" else ("float32",)


def timed(subject: Subject) -> bool:
    """Whether timing compares this subject: all but torch.distributions' LowRank form of the
    diagonal families (the same KL as Independent Normal, by a k x k route) and the Triton kernels
    on CPU tensors (Triton's interpreter, a correctness tool)."""
    lowrank = subject.implementation == "torch.distributions" and subject.method == "LowRank"
    return not lowrank and not (subject.mode == "triton" and subject.device == "cpu")


def default_subjects(backend_names=None, compiled=True) -> list[Subject]:
    """What ``timing_sweep`` compares by default: this project's stable and naive kernels in every mode
    that runs here (``compiled``: also under jax.jit and torch.compile), torch.distributions
    (Normal, Independent Normal, MultivariateNormal), numpyro and the textbook formula in NumPy."""
    subjects = available(backend_names, compiled=compiled)
    return [s for s in subjects if timed(s)]


def timing_sweep(family_names=None, subjects=None, dtypes=None, sweep="quick", repeats=5, progress=True,
                 at=None, keep_partial=True) -> pd.DataFrame:
    """Seconds per call of every subject on every (family, shape, dtype) of ``sweep`` (``SHAPES``;
    or at ``at``, a list of (B, k) for every family), with compile time, GB/s and the fraction of
    the measured ceiling: a tidy DataFrame with the columns ``COLUMNS``. ``dtypes`` defaults to
    ``default_dtypes``. Interrupted (Ctrl-C), it returns the rows finished so far
    (``keep_partial``) or lets the interrupt through."""
    subjects = default_subjects() if subjects is None else subjects
    rows = []
    try:
        for family in family_names or families.NAMES:
            for dtype in dtypes or default_dtypes(family):
                for batch, k in at or shapes(family, sweep):
                    for subject in [s for s in subjects if s.unavailable(family, dtype) is None]:
                        if progress:
                            print(f"  timing {family} {dtype} B={batch} k={k} {subject.name}", file=sys.stderr, flush=True)
                        rows.append(_timed_row(subject, family, dtype, batch, k, repeats))
    except KeyboardInterrupt:
        if not keep_partial:
            raise
        print("  timing interrupted: keeping the rows finished", file=sys.stderr)
    return pd.DataFrame(rows, columns=COLUMNS)


DENSE_LOW_RANK_LIMIT = 1024  # the textbook forms the k x k covariances of the low-rank family: O(k^3), minutes beyond this


def _timed_row(subject, family, dtype, batch, k, repeats) -> dict:
    row = labels(subject) | {"family": family, "dtype": dtype, "compiled": runs_compiled(subject), "B": batch, "k": k,
                             "error": ""}
    if family == "lowrank" and subject.implementation == "textbook" and k > DENSE_LOW_RANK_LIMIT:
        return row | {"error": f"not timed: the textbook forms k x k covariances (O(k^3)) beyond k = {DENSE_LOW_RANK_LIMIT}"}
    try:
        return row | measure(Workload(subject, family, batch, k, dtype), repeats=repeats)
    except Exception as exc:  # a third party that cannot take these inputs
        return row | {"error": describe(exc)}


def runs_compiled(subject: Subject) -> bool:
    """Does the measured call run compiled code (JAX always; the fused kernels, jit and compile modes)?"""
    return subject.backend == "jax" or subject.mode in ("numba", "triton", "jax.jit", "torch.compile")
