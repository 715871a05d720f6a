"""Timing: the work, not the launch or the compiler. One implementation, used by ``kl-bench
timing`` (``kl_bench.sweeps.timing``) and by the pytest-benchmark suites in ``benchmarks/``.

A ``Workload`` is one subject computing one family at one shape and dtype on inputs made once. Its
call synchronises the backend (CUDA, JAX's asynchronous dispatch) before returning, so a clock read
around it times the work; its first call (compilation, caches) is timed separately. Speeds are
reported against ceilings measured on the same machine in the same run: the copy bandwidth of a
buffer as large as the inputs, and the rate of a batched matrix product.
"""

from __future__ import annotations

import functools
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from . import cases

ELEMENTWISE = ("normal", "diag", "vae")


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
    """float64 arguments of ``family``: ``batch`` elements of dimension ``k`` (``normal``:
    ``batch * k`` scalars), well conditioned, moderately apart."""
    rng = np.random.default_rng(seed)
    if family in ELEMENTWISE:
        shape = (batch * k,) if family == "normal" else (batch, k)
        loc_p, loc_q = rng.normal(size=shape), rng.normal(size=shape)
        if family == "normal":
            return [loc_p, np.exp(rng.normal(size=shape) / 2), loc_q, np.exp(rng.normal(size=shape) / 2)]
        if family == "vae":
            return [loc_p, rng.normal(size=shape)]
        return [loc_p, rng.normal(size=shape), loc_q, rng.normal(size=shape)]
    spectra = [np.exp(rng.uniform(-1, 1, size=(batch, k))) for _ in range(2)]
    s_p, s_q = (cases.random_spd(rng, s) for s in spectra)
    loc_p, loc_q = rng.normal(size=(batch, k)), rng.normal(size=(batch, k))
    if family == "tril":
        return [loc_p, np.linalg.cholesky(s_p), loc_q, np.linalg.cholesky(s_q)]
    return [loc_p, s_p, loc_q, s_q]


def input_bytes(family: str, batch: int, k: int, dtype: str) -> int:
    """Bytes of the inputs, read once by a kernel at the memory-bandwidth limit."""
    per_element = {"normal": 4, "diag": 4 * k, "vae": 2 * k}.get(family, 2 * k + 2 * k * k)
    count = batch * k if family == "normal" else batch
    return count * per_element * (8 if dtype == "float64" else 4 if dtype == "float32" else 2)


def nominal_flops(family: str, batch: int, k: int) -> float | None:
    """Floating-point operations of the full-covariance kernels (k^3 for a triangular solve with
    k right-hand sides; cov adds two Cholesky factorisations, a second solve and a symmetric
    eigenvalue decomposition, counted as 4 k^3 in all); None for the elementwise families."""
    return {"tril": 1.0, "cov": 4.0}.get(family, 0.0) * batch * float(k) ** 3 or None


@functools.lru_cache(maxsize=None)
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


@functools.lru_cache(maxsize=None)
def matmul_flops(dtype: str = "float64") -> float:
    """Floating-point operations per second of a NumPy matrix product (1024 x 1024)."""
    a = np.ones((1024, 1024), dtype=dtype)
    seconds = median_seconds(lambda: a @ a, repeats=3, min_seconds=0.1)
    return 2 * 1024**3 / seconds


@dataclass
class Workload:
    """``subject`` computing ``family`` for ``batch`` elements of dimension ``k`` in ``dtype``;
    calling it runs the kernel once, synchronised."""

    subject: object
    family: str
    batch: int
    k: int
    dtype: str
    args: list = field(init=False, repr=False)

    def __post_init__(self):
        self.args = [self.subject.asarray(a, self.dtype) for a in inputs(self.family, self.batch, self.k)]
        self._fn = self.subject.function(self.family)

    def __call__(self):
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
    """seconds (median, synchronised), compile_seconds (first call beyond that) and throughput."""
    first = workload.first_call_seconds()
    seconds = median_seconds(workload, repeats=repeats, min_seconds=min_seconds)
    return {"seconds": seconds, "compile_seconds": max(first - seconds, 0.0), **workload.throughput(seconds)}


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
    for package in ("numpy", "torch", "jax", "jaxlib", "numba", "numpyro"):
        try:
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    from . import backends

    gpus = []
    if backends.get("torch").installed():
        import torch

        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    info["gpus"] = gpus
    return info
