"""The fused Torch kernels (numba on the CPU, Triton on CUDA) as one ``torch.library`` custom op,
``kl_bench::fused``, so that ``torch.compile`` calls them as a single opaque node instead of
tracing the array path (which Inductor turns into code that evaluates every branch of phi). Its
fake implementation gives the output's shape and dtype; its backward is
``torch_autograd.gradients_from_derivatives``, Torch ops that Inductor compiles. Imported only from
inside such a trace (with Torch present), and defined at import, which torch.compile runs outside
its trace.
"""

from __future__ import annotations

import torch

from .. import backends, kernels
from .torch_autograd import gradients_from_derivatives


def kl(kernel, be, family, arrays, check):
    """(KL, problems) by the fused ``kernel`` module inside torch.compile: the row-sum families
    through the custom op; the univariate family (Triton's, elementwise) and the low-rank family
    (numba's kernel has no backward pass) trace the array path."""
    if family in ("normal", "lowrank"):
        return kernels.KERNELS[family](be, *arrays, method="stable", check=check)
    return _FUSED(kernel.__name__.rsplit(".", 1)[-1], family, list(arrays)), {}


def _define():
    @torch.library.custom_op("kl_bench::fused", mutates_args=())
    def fused(kernel: str, family: str, arrays: list[torch.Tensor]) -> torch.Tensor:
        if kernel == "triton_gpu":
            from . import triton_gpu

            return triton_gpu._values(family, arrays)
        from . import numba_cpu

        return numba_cpu._values(backends.get("torch"), family, arrays)

    @fused.register_fake
    def _(kernel, family, arrays):
        shape = torch.broadcast_shapes(*(a.shape for a in arrays))[:-1]
        return arrays[0].new_empty(shape, dtype=torch.float64)

    def setup_context(ctx, inputs, output):
        ctx.family = inputs[1]
        ctx.save_for_backward(*inputs[2])

    def backward(ctx, g):
        return None, None, gradients_from_derivatives(ctx.family, g, ctx.saved_tensors)

    fused.register_autograd(backward, setup_context=setup_context)
    return fused


_FUSED = _define()
