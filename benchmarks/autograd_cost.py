"""Forward and backward pass of the float32 VAE term on Torch CPU (2048 x 4096), fused (numba)
against the array path, median of 5 after a warm-up.

    python benchmarks/autograd_cost.py
"""

import time

import numpy as np
import torch

import kl_bench
from kl_bench import accel


def main():
    torch.manual_seed(0)
    loc, logvar = (torch.randn(2048, 4096, requires_grad=True) for _ in range(2))

    def step():
        kl_bench.kl_vae(loc, logvar).sum().backward()
        loc.grad = logvar.grad = None

    print("| path | forward + backward (ms) |")
    print("|---|---|")
    for name, kernel in (("fused (numba)", "numba"), ("array path", "array")):
        with accel.use(kernel):
            step()
            times = []
            for _ in range(5):
                start = time.perf_counter()
                step()
                times.append(time.perf_counter() - start)
        print(f"| {name} | {np.median(times) * 1e3:.0f} |")


if __name__ == "__main__":
    main()
