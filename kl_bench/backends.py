"""One small adapter per array framework.

The KL mathematics (``kl_bench.kernels``) is written once against the array-API namespace ``xp``
that ``array_api_compat`` gives for each framework. What the standard lacks, or what differs
between frameworks, lives here: detection without importing, dtype names, devices, a Cholesky that
reports failure instead of raising, a batched lower-triangular solve, synchronisation and
compilation. A framework is imported only when its arrays were passed in or it was asked for.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import sys

import numpy as np

FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16")
HALF_DTYPES = ("float16", "bfloat16")


def common_shape(shapes) -> tuple[int, ...]:
    """The shape that ``shapes`` broadcast to (``ValueError`` where they do not); cheap when they agree."""
    shapes = [tuple(s) for s in shapes]
    first = shapes[0]
    return first if all(s == first for s in shapes) else tuple(np.broadcast_shapes(*shapes))


@functools.lru_cache(maxsize=64)
def _dtype_name(dtype) -> str:
    return str(dtype).rsplit(".", 1)[-1]  # cached: str() of a dtype costs microseconds a call


class lazy:
    """A value computed on first access and stored on the instance, which then shadows this
    descriptor: ``functools.cached_property`` without its lock (Python 3.11's lock stops
    ``torch.compile(fullgraph=True)`` from tracing a KL call)."""

    def __init__(self, compute):
        self.compute = compute
        self.__doc__ = compute.__doc__

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        value = self.compute(obj)
        obj.__dict__[self.name] = value
        return value


class Backend:
    """Interface of an adapter; subclasses fill it in for one framework."""

    name = ""
    module = ""  # the top-level module whose presence in sys.modules marks its arrays as possible

    # -- detection ------------------------------------------------------------------------
    def installed(self) -> bool:
        return importlib.util.find_spec(self.module) is not None

    def owns(self, x) -> bool:
        """Is ``x`` an array of this framework?  Never imports the framework."""
        raise NotImplementedError

    # -- namespace and dtypes ---------------------------------------------------------------
    namespace = ""  # module of the framework's array-API namespace

    @lazy
    def xp(self):
        return importlib.import_module(self.namespace)

    def dtypes(self) -> tuple[str, ...]:
        """Floating dtype names this framework has."""
        return FLOAT_DTYPES

    def dtype(self, name: str):
        return getattr(self.xp, name)

    def dtype_name(self, dtype) -> str:
        return _dtype_name(dtype)

    def computing(self, dtype: str):
        """A context in which arrays of ``dtype`` can be made and computed with (JAX needs
        float64 switched on within it; the others need nothing)."""
        return contextlib.nullcontext()

    def is_floating(self, dtype) -> bool:
        return self.dtype_name(dtype) in FLOAT_DTYPES

    def result_dtype(self, arrays):
        """NumPy's promotion, except that integers and booleans promote to float64."""
        dtype = self.xp.result_type(*arrays)
        return dtype if self.is_floating(dtype) else self.dtype("float64")

    # -- arrays and devices -----------------------------------------------------------------
    def asarray(self, x, dtype=None, device=None):
        raise NotImplementedError

    def to_numpy(self, x) -> np.ndarray:
        """float64 NumPy copy (exact for every floating dtype)."""
        return np.asarray(x, dtype=np.float64)

    def devices(self) -> tuple[str, ...]:
        """Device kinds available on this machine ("cpu", "cuda")."""
        return ("cpu",)

    def device_of(self, x):
        return "cpu"

    def device_kind(self, x) -> str:
        return "cpu"

    def eye_like(self, a):
        """Identity matrix of ``a``'s trailing size, dtype and device."""
        return self.xp.eye(a.shape[-1], dtype=a.dtype)

    def constant_like(self, values, a):
        """``values`` (nested lists of numbers) as an array of ``a``'s dtype and device."""
        return self.xp.asarray(values, dtype=a.dtype)

    # -- linear algebra the standard lacks or does differently ------------------------------
    def cholesky_ex(self, a):
        """Lower factor of each matrix, and a boolean array marking those that are not positive
        definite (their factor is garbage and must not be used)."""
        raise NotImplementedError

    def solve_triangular(self, a, b, upper: bool = False):
        """Solve ``a @ x = b`` for lower-triangular ``a`` (..., k, k) (upper-triangular with
        ``upper``) and ``b`` (..., k, m); batch dimensions must already agree."""
        raise NotImplementedError

    def largest(self, x, n: int):
        """Indices (..., n) of the n largest entries of ``x`` (..., k) along its last axis (in no
        particular order), and a boolean mask (..., k) of them: a selection in O(k), where sorting
        would cost O(k log k)."""
        raise NotImplementedError

    # -- execution ----------------------------------------------------------------------------
    def is_traced(self, x) -> bool:
        """True while a compiler is tracing ``x`` (no concrete values to validate)."""
        return False

    def looks_at_traced_values(self, x) -> bool:
        """While tracing ``x``, can a Python branch still read its values (at a graph break)?"""
        return False

    def calls_opaque_kernels_when_traced(self, x) -> bool:
        """While tracing ``x``, can the trace call a fused kernel as one opaque operation (a custom
        call or custom op)?"""
        return False

    differentiable = False  # has grad_of_sum
    in_blocks = False  # eager arrays whose array path runs in blocks (kl_bench.blocks)

    def grad_of_sum(self, fn, args, jit: bool = False) -> list:
        """d sum(fn(*args)) / d each argument, through the framework's autodiff (``jit``: the
        gradient function compiled, where the framework compiles)."""
        raise NotImplementedError(f"{self.name} has no autodiff")

    def compile(self, fn):
        """The framework's compiled form of a pure array function (identity where there is none)."""
        return fn

    def sync(self, x=None):
        """Block until the work that produced ``x`` is done (for timing)."""

    def any(self, mask) -> bool:
        return bool(self.xp.any(mask))


class NumpyBackend(Backend):
    name = "numpy"
    module = "numpy"
    namespace = "array_api_compat.numpy"
    in_blocks = True

    def installed(self):
        return True

    def owns(self, x):
        return isinstance(x, (np.ndarray, np.generic))

    def dtypes(self):
        return ("float64", "float32", "float16")

    def asarray(self, x, dtype=None, device=None):
        return np.asarray(x, dtype=dtype)

    def compile(self, fn):
        # Branches that where() discards may overflow: NumPy would warn about values never used.
        @functools.wraps(fn)
        def quiet(*args, **kwargs):
            with np.errstate(over="ignore", invalid="ignore", divide="ignore", under="ignore"):
                return fn(*args, **kwargs)

        return quiet

    def cholesky_ex(self, a):
        bad = np.zeros(a.shape[:-2], dtype=bool)
        try:
            return np.linalg.cholesky(a), bad
        except np.linalg.LinAlgError:
            pass
        # Rare path: find which matrices failed, one at a time.
        out = np.zeros_like(a)
        for index in np.ndindex(*a.shape[:-2]):
            try:
                out[index] = np.linalg.cholesky(a[index])
            except np.linalg.LinAlgError:
                bad[index] = True
        return out, bad

    def solve_triangular(self, a, b, upper=False):
        if a.size == 0 or b.size == 0:  # SciPy refuses empty batches
            return np.zeros(b.shape, dtype=np.result_type(a, b))
        from scipy.linalg import solve_triangular

        return solve_triangular(a, b, lower=not upper, check_finite=False)

    def largest(self, x, n):
        rows = np.argpartition(-x, n - 1, axis=-1)[..., :n]
        mask = np.zeros(x.shape, dtype=bool)
        np.put_along_axis(mask, rows, True, axis=-1)
        return rows, mask


class TorchBackend(Backend):
    name = "torch"
    module = "torch"
    namespace = "array_api_compat.torch"
    in_blocks = True

    def owns(self, x):
        torch = sys.modules.get("torch")
        return torch is not None and isinstance(x, torch.Tensor)

    @lazy
    def torch(self):
        import torch

        return torch

    @lazy
    def xp(self):
        import array_api_compat.torch as xp  # an import statement, which torch.compile traces

        return xp

    def result_dtype(self, arrays):
        dtype = functools.reduce(self.torch.promote_types, [a.dtype for a in arrays])
        return dtype if dtype.is_floating_point else self.torch.float64

    def asarray(self, x, dtype=None, device=None):
        if isinstance(dtype, str):
            dtype = self.dtype(dtype)
        if isinstance(x, np.ndarray) and x.dtype == np.float64 and dtype is not None:
            x = self.torch.from_numpy(np.ascontiguousarray(x))  # exact, then one rounding below
        return self.torch.as_tensor(x, dtype=dtype, device=device)

    def dtype(self, name):
        return getattr(self.torch, name)

    def to_numpy(self, x):
        return x.detach().to(device="cpu", dtype=self.torch.float64).numpy()

    def devices(self):
        return ("cpu", "cuda") if self.torch.cuda.is_available() else ("cpu",)

    def device_of(self, x):
        return x.device

    def device_kind(self, x):
        return x.device.type

    def eye_like(self, a):
        return self.torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)

    def constant_like(self, values, a):
        return self.torch.tensor(values, dtype=a.dtype, device=a.device)

    def cholesky_ex(self, a):
        factor, info = self.torch.linalg.cholesky_ex(a)
        return factor, info != 0

    def solve_triangular(self, a, b, upper=False):
        return self.torch.linalg.solve_triangular(a, b, upper=upper)

    def largest(self, x, n):
        rows = self.torch.topk(x, n, dim=-1).indices
        return rows, self.torch.zeros(x.shape, dtype=self.torch.bool, device=x.device).scatter(-1, rows, True)

    differentiable = True

    def grad_of_sum(self, fn, args, jit=False):
        args = [a.detach().clone().requires_grad_(True) for a in args]
        fn(*args).sum().backward()
        return [self.torch.zeros_like(a) if a.grad is None else a.grad for a in args]

    def is_traced(self, x):
        # inside the caller's torch.compile, or a torch.func transform (vmap, grad, jvp, ...):
        # the kernel is traced through, without the fused path or data-dependent raising
        torch = self.torch
        return torch.compiler.is_compiling() or torch._C._functorch.is_functorch_wrapped_tensor(x)

    def looks_at_traced_values(self, x):
        # torch.compile breaks the graph there and runs the check eagerly (an error under
        # fullgraph=True, hence validate=False there); a torch.func transform cannot
        return self.torch.compiler.is_compiling()

    def calls_opaque_kernels_when_traced(self, x):
        # torch.compile, through the custom op of accel/torch_op.py; a torch.func transform would
        # need batching rules for it
        return self.torch.compiler.is_compiling()

    @lazy
    def _dtype_names(self):
        return {getattr(self.torch, name): name for name in FLOAT_DTYPES}

    def dtype_name(self, dtype):
        # a dict lookup, which torch.compile traces (it warns on the lru_cache of the general one)
        return self._dtype_names.get(dtype) or super().dtype_name(dtype)

    def sync(self, x=None):
        if self.torch.cuda.is_available() and self.torch.cuda.is_initialized():
            self.torch.cuda.synchronize()


class JaxBackend(Backend):
    name = "jax"
    module = "jax"
    namespace = "jax.numpy"

    def owns(self, x):
        jax = sys.modules.get("jax")
        return jax is not None and isinstance(x, jax.Array)

    @lazy
    def jax(self):
        import jax

        return jax

    def computing(self, dtype):
        # JAX computes in float32 unless told otherwise: switch float64 on for this block only.
        return self.jax.enable_x64(True) if dtype == "float64" else contextlib.nullcontext()

    def dtype(self, name):
        return getattr(self.jax.numpy, name)

    def asarray(self, x, dtype=None, device=None):
        if isinstance(dtype, str):
            dtype = self.dtype(dtype)
        if device is not None and not isinstance(device, str):
            return self.jax.device_put(self.jax.numpy.asarray(x, dtype=dtype), device)
        return self.jax.numpy.asarray(x, dtype=dtype)

    def to_numpy(self, x):
        return np.asarray(x).astype(np.float64)

    def devices(self):
        kinds = {d.platform for d in self.jax.devices()}
        return ("cpu", "cuda") if kinds & {"gpu", "cuda"} else ("cpu",)

    def device_of(self, x):
        if self.is_traced(x):
            return None
        return frozenset(x.devices())

    def device_kind(self, x):
        if self.is_traced(x):
            return "traced"
        platform = next(iter(x.devices())).platform
        return "cuda" if platform in ("gpu", "cuda") else platform

    def cholesky_ex(self, a):
        jnp = self.jax.numpy
        factor = jnp.linalg.cholesky(a)
        return factor, jnp.any(jnp.isnan(factor), axis=(-2, -1))

    def solve_triangular(self, a, b, upper=False):
        from jax.scipy.linalg import solve_triangular

        return solve_triangular(a, b, lower=not upper)

    def largest(self, x, n):
        rows = self.jax.lax.top_k(x, n)[1]
        jnp = self.jax.numpy
        return rows, jnp.put_along_axis(jnp.zeros(x.shape, dtype=bool), rows, True, axis=-1, inplace=False)

    def is_traced(self, x):
        return isinstance(x, self.jax.core.Tracer)

    def calls_opaque_kernels_when_traced(self, x):
        return True  # the XLA custom call, with its own jvp and batching

    differentiable = True

    def grad_of_sum(self, fn, args, jit=False):
        grad = self.jax.grad(lambda *xs: fn(*xs).sum(), argnums=tuple(range(len(args))))
        return list((self.jax.jit(grad) if jit else grad)(*args))

    def compile(self, fn):
        return self.jax.jit(fn)

    def sync(self, x=None):
        if x is not None:
            self.jax.block_until_ready(x)


# XLA's concurrency-optimised CPU scheduler intermittently hangs programs that hold both an inverse
# and a Cholesky factorisation at k >= 256 (jax 0.10.2: the naive and stable kl_cov). This
# project's own processes (kl-bench, pytest) turn it off before JAX is imported; a library call
# leaves the user's XLA flags alone.
XLA_CPU_WORKAROUND = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def avoid_xla_cpu_hang():
    flags = os.environ.get("XLA_FLAGS", "")
    if "jax" not in sys.modules and "concurrency_optimized_scheduler" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {XLA_CPU_WORKAROUND}".strip()


BACKENDS: dict[str, Backend] = {b.name: b for b in (NumpyBackend(), TorchBackend(), JaxBackend())}


def get(name: str) -> Backend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}") from None


def installed() -> list[str]:
    """Names of the backends whose framework can be imported here."""
    return [name for name, b in BACKENDS.items() if b.installed()]


def of(x) -> Backend | None:
    """The backend whose array ``x`` is, or None for Python scalars and lists."""
    for b in BACKENDS.values():
        if b.owns(x):
            return b
    return None
