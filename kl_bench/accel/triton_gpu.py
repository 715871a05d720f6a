"""Fused Triton kernels (``triton_kernels.py``) for the VAE, diagonal and univariate families,
forward and backward: one pass over memory on a GPU, where the array path makes one per
operation (66 to 213 aten ops a call for these families, each a pass: ``benchmarks/aten_ops.py``).

Every element is computed in float64 whatever the input dtype (float32, and half precision
which arrives as float32, widen exactly on load), with the cancellation-free forms of
``kernels.py``, using only ``exp`` and ``log``: in float64 they lower to CUDA's accurate libdevice
functions (Triton's float32 ``exp`` is an approximation that loses about |x| ulps), and they are
what the interpreter has. Row sums accumulate in float64 and come back as float64, so the caller
rounds once to the result dtype; the univariate family stores its result in the input dtype,
rounded once from float64.

Chosen by ``kl_bench.accel`` for CUDA tensors, and for CPU tensors only where ``triton`` is chosen
explicitly and ``TRITON_INTERPRET=1``: Triton's interpreter runs the same kernels with NumPy,
slowly and exactly, which is how they are tested without a GPU.
"""

from __future__ import annotations

import functools
import math
import os

from .torch_autograd import autograd_function

DTYPES = ("float32", "float64")  # compute dtypes (half precision arrives as float32)
_TILE = 4096  # elements a program handles per loop step (rows x columns)


def takes(be, arrays, named=False) -> bool:
    """CUDA tensors; CPU tensors only under the interpreter and when Triton was ``named`` (chosen
    by name rather than by ``auto``)."""
    if be.name != "torch" or be.dtype_name(arrays[0].dtype) not in DTYPES:
        return False
    kinds = {a.device.type for a in arrays}
    interpreted = kinds == {"cpu"} and os.environ.get("TRITON_INTERPRET") == "1" and named
    return kinds == {"cuda"} or interpreted


def kl(be, family, arrays, check):
    """(KL, problems), as ``kernels.KERNELS`` return them; tensors that need a gradient get it
    from the backward kernels."""
    problems = {}
    if family == "normal" and check:  # invalid elements come out NaN from the kernel
        problems = {(name, "must be positive"): x <= 0 for name, x in (("scale_p", arrays[1]), ("scale_q", arrays[3]))}
    if be.torch.is_grad_enabled() and any(a.requires_grad for a in arrays):
        return _function().apply(family, *arrays), problems
    return _values(family, arrays), problems


def _prepared(family, arrays):
    """The arrays broadcast and contiguous (copied only where they are not already), their shape,
    and the (rows, k) of the tile loop (the univariate family is one row of all its elements)."""
    import torch

    shape = torch.broadcast_shapes(*(a.shape for a in arrays))
    flat = [a.detach().expand(shape).contiguous() for a in arrays]
    if family == "normal":
        return flat, shape, (1, math.prod(shape))
    return flat, shape, (math.prod(shape[:-1]), shape[-1])


def _blocks(rows, k):
    """(BLOCK_R, BLOCK_K): a row of up to _TILE columns per step, several short rows per program
    (the univariate family's one row: BLOCK_K elements a program)."""
    from triton import next_power_of_2

    block_k = min(next_power_of_2(k), _TILE)
    return max(1, min(_TILE // block_k, next_power_of_2(rows))), block_k


def _values(family, arrays):
    import torch
    from triton import cdiv

    flat, shape, (rows, k) = _prepared(family, arrays)
    if family == "normal":
        out = torch.empty(shape, dtype=flat[0].dtype, device=flat[0].device)
        if k:
            _, block = _blocks(rows, k)
            _kernels()["normal"][(cdiv(k, block),)](*flat, out, k, BLOCK=block)
        return out
    out = torch.zeros(shape[:-1], dtype=torch.float64, device=flat[0].device)
    if rows and k:
        block_r, block_k = _blocks(rows, k)
        _kernels()[family][(cdiv(rows, block_r),)](*flat, out, rows, k, BLOCK_R=block_r, BLOCK_K=block_k)
    return out


def _gradients(family, g, arrays):
    """d KL / d each argument times ``g``, reduced to each argument's shape."""
    import torch
    from triton import cdiv

    flat, shape, (rows, k) = _prepared(family, arrays)
    grads = [torch.empty(shape, dtype=flat[0].dtype, device=flat[0].device) for _ in flat]
    g = g.detach().to(torch.float64).expand(shape if family == "normal" else shape[:-1]).contiguous()
    if family == "normal" and k:
        _, block = _blocks(rows, k)
        _kernels()["normal_backward"][(cdiv(k, block),)](*flat, g, *grads, k, BLOCK=block)
    elif rows and k:
        block_r, block_k = _blocks(rows, k)
        grid = (cdiv(rows, block_r), cdiv(k, block_k))
        _kernels()[f"{family}_backward"][grid](*flat, g, *grads, rows, k, BLOCK_R=block_r, BLOCK_K=block_k)
    return [grad.sum_to_size(a.shape) for grad, a in zip(grads, arrays)]


@functools.cache
def _function():
    return autograd_function(_values, _gradients)


@functools.cache
def _kernels():
    """Defined on first use, so that the interpreter setting in force then applies."""
    from . import triton_kernels

    return triton_kernels.KERNELS
