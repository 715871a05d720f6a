"""Aten operations per call on Torch, stable against textbook: the CPU-measurable stand-in for GPU
memory traffic (on a GPU each aten op is at least one pass over its operands).

    python benchmarks/aten_ops.py > reports/aten-ops.md

Counted with a ``TorchDispatchMode`` on CPU tensors (B = 64, k = 256; the count does not depend on
the shape): the stable array path (what Torch CUDA ran before the Triton kernels, and what
``torch.func`` transforms trace), the textbook formula (``method="naive"``), and the Triton kernel
(the aten ops around its launch, plus its kernel launches; run in Triton's interpreter where there
is no GPU, with the interpreter's own work inside the launch left out of the count).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the Triton kernels are first defined

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

import kl_bench
from kl_bench import accel
from kl_bench.suite import cases

FAMILIES = ("vae", "diag", "normal")


class Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def _launches(fn):
    """Triton kernel launches during ``fn()`` (the kernels' ``run``, counted by wrapping it)."""
    from kl_bench.accel import triton_gpu

    launched = []
    originals = dict(triton_gpu._kernels())
    try:
        for name, kernel in originals.items():
            wrapped = _Launcher(kernel, name, launched)
            triton_gpu._kernels()[name] = wrapped
        fn()
    finally:
        triton_gpu._kernels().update(originals)
    return len(launched)


class _Launcher:
    def __init__(self, kernel, name, launched):
        self.kernel, self.name, self.launched = kernel, name, launched

    def __getitem__(self, grid):
        self.launched.append(self.name)
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            # the interpreter copies tensors around inside a launch; a GPU launch issues no aten op
            with _disable_current_modes():
                return launch(*args, **kwargs)
        return run


def count(family, dtype, method, kernel):
    case = cases.generate(family, "generic", "float64", n=64, k=None if family == "normal" else 256)
    args = [torch.tensor(a, dtype=getattr(torch, dtype)) for a in case.arrays]
    f = getattr(kl_bench, f"kl_{family}")
    with accel.use(kernel):
        f(*args, method=method)  # first call: imports and caches outside the count
        counter = Count()
        with counter:
            call = lambda: f(*args, method=method)  # noqa: E731
            launches = _launches(call) if kernel == "triton" else 0
            if kernel != "triton":
                call()
    return counter.ops, launches


def main():
    print("# Aten operations per call, Torch\n\nProduced by `python benchmarks/aten_ops.py > reports/aten-ops.md`.\n")
    print("| family | dtype | textbook | stable (array path) | stable / textbook | Triton: aten ops + launches |")
    print("|---|---|---|---|---|---|")
    for family in FAMILIES:
        for dtype in ("float32", "float64"):
            naive, _ = count(family, dtype, "naive", "array")
            stable, _ = count(family, dtype, "stable", "array")
            fused, launches = count(family, dtype, "stable", "triton")
            print(f"| {family} | {dtype} | {naive} | {stable} | {stable / naive:.1f} | {fused} + {launches} |")
    print(f"\nTorch {torch.__version__}; counts per call with validation (the default), views and the"
          " conversion of the B-length result included. The textbook and the Triton kernel each read the"
          " inputs once; the array path reads or writes a full-size array at most of its ops.")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
