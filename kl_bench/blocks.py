"""The array path in blocks, so that its temporaries stay a fraction of the inputs' memory.

The array path makes a dozen temporaries as large as what they are computed from; on a large batch
that is many times the inputs. Evaluated in blocks of batch elements (or, for a few long vectors,
of coordinates, whose partial KLs add up: every term is >= 0), the temporaries are those of one
block. Row blocks give bit-identical results; coordinate blocks change only the order of a sum of
non-negative terms. Used for NumPy arrays and Torch CPU tensors outside a compiler (``kl.py``);
on a GPU memory is plentiful and each block would be more kernel launches.
"""

from __future__ import annotations

import math

from .backends import common_shape

MIN_ELEMENTS = 1 << 16  # below this, one block: the temporaries are small anyway
BLOCKS = 8  # above it, at least this many blocks ...
MAX_BLOCK = 1 << 18  # ... of at most this many elements (2 MiB of float64 per temporary)


def plan(fam, arrays) -> tuple[int, int] | None:
    """(axis, block length along it), or None for one block. ``axis`` 0 splits batch elements, -1
    splits coordinates (elementwise and summed families only)."""
    if fam.full:  # batch axes only: a matrix is never split
        batch = tuple(arrays[1].shape[:-2])
        per_row = math.prod(arrays[1].shape[-2:]) * (math.prod(batch[1:]) if batch else 1)  # k x k, or k x r
    else:  # every axis; the last one holds the coordinates where they are summed
        batch = common_shape(a.shape for a in arrays)
        per_row = math.prod(batch[1:])
    if not batch or batch[0] * per_row < MIN_ELEMENTS:
        return None
    total = batch[0] * per_row
    block = min(MAX_BLOCK, total // BLOCKS)
    if per_row <= block:
        return 0, max(1, block // per_row)
    if fam.full or len(batch) == 1:
        return None  # one matrix, or one vector that is a single batch element
    return -1, max(1, block // (total // batch[-1]))


def run(be, fam, kernel, arrays, along: tuple[int, int]):
    """``kernel(*arrays) -> (kl, problems)`` evaluated block by block and put together."""
    xp = be.xp
    axis, length = along
    if not fam.full:
        shape = common_shape(a.shape for a in arrays)
        arrays = [xp.broadcast_to(a, shape) for a in arrays]
    size = arrays[1].shape[axis] if fam.full else arrays[0].shape[axis]
    out, kl, masks = None, None, {}
    for start in range(0, size, length):
        index = (slice(start, start + length),) if axis == 0 else (..., slice(start, start + length))
        piece, problems = kernel(*[a[index] for a in arrays])
        for key, mask in problems.items():
            masks.setdefault(key, []).append(mask)
        if axis == -1 and not fam.elementwise:  # partial sums over coordinates (each >= 0)
            kl = piece if kl is None else kl + piece
            continue
        if out is None:  # written in place, block by block: no second copy of the result
            whole = piece.shape[:axis] + (size,) + piece.shape[axis:][1:] if axis == 0 else piece.shape[:-1] + (size,)
            out = xp.empty(whole, dtype=piece.dtype, device=piece.device)
        out[index] = piece
    problems = {key: xp.concat(parts, axis=0 if axis == 0 else -1) for key, parts in masks.items()}
    return (out if kl is None else kl), problems
