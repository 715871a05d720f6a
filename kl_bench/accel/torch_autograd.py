"""The Torch autograd side of the fused kernels (numba, Triton, the torch.compile custom op)."""

from __future__ import annotations

from .. import backends, kernels


def gradients_from_derivatives(family, g, arrays):
    """d KL / d each argument times ``g`` (the incoming gradient, one per batch element), from
    ``kernels.derivatives`` in Torch ops, reduced to each argument's shape."""
    g = g[..., None].to(arrays[0].dtype)
    derivatives = kernels.derivatives(backends.get("torch"), family, arrays)
    return [(g * d).sum_to_size(a.shape) for d, a in zip(derivatives, arrays)]


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
