"""Accelerated kernels, one module per kind, chosen by the small registry below.

The array path (``kl_bench.kernels``) runs one array operation per pass over memory; an accelerated
kernel fuses a family's stable form into one pass. ``triton`` (``triton_gpu.py``): CUDA tensors,
float64, float32 and half precision, forward and backward. ``numba`` (``numba_cpu.py``): float32
and half-precision NumPy arrays and Torch CPU tensors. A kernel module has
``takes(be, arrays) -> bool`` and ``kl(be, family, arrays, check) -> (kl, problems)``; which
families have which kernels is in ``kl_bench.families`` (tried in that order).

``KL_BENCH_KERNEL`` (environment, read at import) or ``use(...)`` (a context manager) chooses:
``auto`` (the default: an accelerated kernel wherever one is installed, exists for the family and
takes the arrays, else the array path: Triton for CUDA tensors, numba for CPU ones), ``array``
(always the array path) or a kernel's name (that kernel where it takes the arrays, else the array
path; ``triton`` on CPU tensors runs Triton's interpreter where ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import importlib.util
import os
from dataclasses import dataclass

from .. import families


@dataclass(frozen=True)
class Accelerated:
    name: str
    module: str  # the kernel module, relative to this package
    requires: str  # the top-level package it compiles with
    frameworks: tuple[str, ...]  # the backends whose arrays it can take
    traceable: bool = False  # can run inside the caller's compiler trace (jax.jit)

    def available(self) -> bool:
        """Is its compiler installed? Never imports it."""
        return _installed(self.requires)

    def impl(self):
        return _module(self.module)


REGISTRY: dict[str, Accelerated] = {k.name: k for k in (
    Accelerated("triton", ".triton_gpu", "triton", ("torch",)),
    Accelerated("xla", ".xla_ffi", "numba", ("jax",), traceable=True),
    Accelerated("numba", ".numba_cpu", "numba", ("numpy", "torch")),
)}
ARRAY = "array"
CHOICES = ("auto", ARRAY, *REGISTRY)


@functools.cache
def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


@functools.cache
def _module(name: str):
    return importlib.import_module(name, __name__)


def _checked(choice: str, what: str) -> str:
    if choice not in CHOICES:
        raise ValueError(f"{what} must be one of {', '.join(CHOICES)}, got {choice!r}")
    return choice


_FROM_ENVIRONMENT = _checked(os.environ.get("KL_BENCH_KERNEL", "auto"), "KL_BENCH_KERNEL")
_choice = contextvars.ContextVar("kl_bench_kernel", default=_FROM_ENVIRONMENT)


def chosen() -> str:
    """The choice in force here (``use`` or ``KL_BENCH_KERNEL``)."""
    return _choice.get()


@contextlib.contextmanager
def use(kernel: str):
    """Within the block, choose ``kernel``: one of ``CHOICES``."""
    token = _choice.set(_checked(kernel, "kernel"))
    try:
        yield
    finally:
        _choice.reset(token)


def select(be, family: str, method: str, arrays, traced: bool = False):
    """The kernel module to run ``family`` on ``arrays``, or None for the array path; ``traced``:
    inside a compiler's trace, where only a ``traceable`` kernel can run (and where the choice is
    not read unless one could: torch.compile cannot trace a ContextVar)."""
    if method != "stable":
        return None
    names = [n for n in families.TABLE[family].accelerated
             if be.name in REGISTRY[n].frameworks and (REGISTRY[n].traceable or not traced)]
    if not names:
        return None
    choice = _choice.get()
    for name in names:
        if choice in ("auto", name) and REGISTRY[name].available():
            kernel = REGISTRY[name].impl()
            if kernel.takes(be, arrays):
                return kernel
    return None


def autograd_function(values, gradients):
    """A ``torch.autograd.Function`` around a fused kernel: ``values(family, arrays)`` forward,
    ``gradients(family, g, arrays)`` (d KL / d each argument times ``g``, in each argument's shape)
    backward."""
    import torch

    class FusedKL(torch.autograd.Function):
        @staticmethod
        def forward(family, *arrays):
            return values(family, arrays)

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.family = inputs[0]
            ctx.save_for_backward(*inputs[1:])

        @staticmethod
        def backward(ctx, g):
            arrays = ctx.saved_tensors
            grads = gradients(ctx.family, g, arrays)
            return (None, *(grad if needed else None for grad, needed in zip(grads, ctx.needs_input_grad[1:])))

    return FusedKL
