"""Accelerated kernels, one module per kind, chosen by the small registry below.

The array path (``kl_bench.kernels``) runs one array operation per pass over memory; an accelerated
kernel fuses a family's stable form into one pass. ``triton`` (``triton_gpu.py``): CUDA tensors,
float64, float32 and half precision, forward and backward. ``xla`` (``xla_ffi.py``): JAX arrays on
the CPU, eager or under ``jax.jit``. ``numba`` (``numba_cpu.py``): float32 and half-precision NumPy
arrays and Torch CPU tensors. Under ``torch.compile`` the Torch ones run as one custom op
(``torch_op.py``). A kernel module has ``takes(be, arrays, named) -> bool`` (``named``: chosen by
name, not by ``auto``) and ``kl(be, family, arrays, check) -> (kl, problems)``; which families have
which kernels is in ``kl_bench.families`` (tried in that order).

``KL_BENCH_KERNEL`` (environment, read at import) or ``use(...)`` (a context manager) chooses:
``auto`` (the default: an accelerated kernel wherever one is installed, exists for the family and
takes the arrays, else the array path), ``array`` (always the array path) or a kernel's name (that
kernel where it takes the arrays, else the array path; ``triton`` on CPU tensors runs Triton's
interpreter where ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass

from .. import families


@dataclass(frozen=True)
class Accelerated:
    name: str
    impl: Callable  # imports and returns the kernel module (an import statement: torch.compile traces it)
    requires: str  # the top-level package it compiles with
    frameworks: tuple[str, ...]  # the backends whose arrays it can take
    devices: tuple[str, ...]  # where those arrays live (Triton on CPU tensors: its interpreter)

    def available(self) -> bool:
        """Is its compiler installed? Never imports it (looked up once, at import)."""
        return _INSTALLED[self.requires]


def _triton():
    from . import triton_gpu

    return triton_gpu


def _xla():
    from . import xla_ffi

    return xla_ffi


def _numba():
    from . import numba_cpu

    return numba_cpu


REGISTRY: dict[str, Accelerated] = {k.name: k for k in (
    Accelerated("triton", _triton, "triton", ("torch",), ("cuda", "cpu")),
    Accelerated("xla", _xla, "numba", ("jax",), ("cpu",)),
    Accelerated("numba", _numba, "numba", ("numpy", "torch"), ("cpu",)),
)}
ARRAY = "array"
CHOICES = ("auto", ARRAY, *REGISTRY)
# find_spec, once: it imports nothing, and torch.compile cannot trace it
_INSTALLED = {k.requires: importlib.util.find_spec(k.requires) is not None for k in REGISTRY.values()}


def _checked(choice: str, what: str) -> str:
    if choice not in CHOICES:
        raise ValueError(f"{what} must be one of {', '.join(CHOICES)}, got {choice!r}")
    return choice


_FROM_ENVIRONMENT = _checked(os.environ.get("KL_BENCH_KERNEL", "auto"), "KL_BENCH_KERNEL")
_choice = contextvars.ContextVar("kl_bench_kernel", default=_FROM_ENVIRONMENT)


@contextlib.contextmanager
def use(kernel: str):
    """Within the block, choose ``kernel``: one of ``CHOICES``."""
    token = _choice.set(_checked(kernel, "kernel"))
    try:
        yield
    finally:
        _choice.reset(token)


def select(be, family: str, method: str, arrays, traced: bool = False):
    """The kernel module to run ``family`` on ``arrays``, or None for the array path. ``traced``:
    inside a compiler's trace, where a kernel runs as one opaque operation if the backend's tracer
    allows it (``jax.jit``, ``torch.compile``; not ``torch.func`` transforms).
    ``torch.compile`` cannot trace a ContextVar: there the environment's choice applies."""
    if method != "stable" or (traced and not be.calls_opaque_kernels_when_traced(arrays[0])):
        return None
    names = [n for n in families.TABLE[family].accelerated if be.name in REGISTRY[n].frameworks]
    if not names:
        return None
    choice = _FROM_ENVIRONMENT if traced and be.name == "torch" else _choice.get()
    for name in names:
        if choice in ("auto", name) and REGISTRY[name].available():
            kernel = REGISTRY[name].impl()
            if kernel.takes(be, arrays, named=choice == name):
                return kernel
    return None


def run(kernel, be, family: str, arrays, check: bool):
    """``kernel.kl(...)``: (KL, problems); inside torch.compile through the custom op of
    ``torch_op.py``, which the compiler calls as one opaque node."""
    if be.name == "torch" and be.torch.compiler.is_compiling():
        from . import torch_op  # (imports Torch, present here)

        return torch_op.kl(kernel, be, family, arrays, check)
    return kernel.kl(be, family, arrays, check)
