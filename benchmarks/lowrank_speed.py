"""kl_lowrank against torch.distributions' LowRankMultivariateNormal KL on identical inputs, timed
in one run with the calls interleaved (this machine's load drifts), float32 on the CPU: the value
(kl_lowrank's fused numba kernel where numba is installed), then value and gradients.

    python benchmarks/lowrank_speed.py > reports/lowrank-speed.md
"""

import importlib.metadata
import platform
import time

import numpy as np
import torch
from torch.distributions import LowRankMultivariateNormal, kl_divergence

import kl_bench

SHAPES = [(8, 4096, 16), (8, 1024, 16), (8, 4096, 4), (8, 4096, 64), (64, 256, 8)]  # (B, k, r); the first is the reference shape
ROUNDS = 40
STEADY_BYTES = 16 << 20  # a freed block this large moves glibc's threshold above every temporary here


def inputs(batch, k, r, seed=0):
    g = torch.Generator().manual_seed(seed)

    def one():
        return (torch.randn(batch, k, generator=g), torch.randn(batch, k, r, generator=g) / r**0.5,
                torch.rand(batch, k, generator=g) + 0.5)

    return one() + one()


def interleaved(functions, rounds=ROUNDS):
    """Median seconds of each function, called in turn ``rounds`` times after two untimed calls."""
    for f in functions.values():
        f(), f()
    times = {name: [] for name in functions}
    for _ in range(rounds):
        for name, f in functions.items():
            start = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def table():
    print("| B | k | r | torch.distributions | kl_lowrank (stable) | stable / torch | kl_lowrank (naive) |")
    print("|---|---|---|---|---|---|---|")
    for batch, k, r in SHAPES:
        a = inputs(batch, k, r)
        t = interleaved({
            "torch": lambda: kl_divergence(LowRankMultivariateNormal(*a[:3]), LowRankMultivariateNormal(*a[3:])),
            "stable": lambda: kl_bench.kl_lowrank(*a),
            "naive": lambda: kl_bench.kl_lowrank(*a, method="naive"),
        })
        print(f"| {batch} | {k} | {r} | {t['torch'] * 1e3:.2f} ms | {t['stable'] * 1e3:.2f} ms | "
              f"{t['stable'] / t['torch']:.2f} | {t['naive'] * 1e3:.2f} ms |")


def backward_table():
    """Forward and backward (a gradient for every argument): kl_lowrank's array path, as the fused
    kernel has no backward pass."""
    print("| B | k | r | torch.distributions | kl_lowrank (stable) | stable / torch |")
    print("|---|---|---|---|---|---|")
    for batch, k, r in SHAPES[:2]:
        a = [x.requires_grad_() for x in inputs(batch, k, r)]

        def both(f):
            def call():
                f().sum().backward()
                for x in a:
                    x.grad = None
            return call

        t = interleaved({
            "torch": both(lambda: kl_divergence(LowRankMultivariateNormal(*a[:3]), LowRankMultivariateNormal(*a[3:]))),
            "stable": both(lambda: kl_bench.kl_lowrank(*a)),
        })
        print(f"| {batch} | {k} | {r} | {t['torch'] * 1e3:.2f} ms | {t['stable'] * 1e3:.2f} ms | {t['stable'] / t['torch']:.2f} |")


def main():
    print("# kl_lowrank against torch.distributions, float32, CPU\n")
    print("Produced by `python benchmarks/lowrank_speed.py > reports/lowrank-speed.md`: median of "
          f"{ROUNDS} interleaved calls each, on identical inputs (torch tensors; kl_bench validates them, "
          "torch.distributions does not by default).\n")
    print("## A fresh process\n")
    print("Every k x r temporary of either implementation is a block of fresh pages from the system "
          "(glibc's malloc maps blocks above its threshold anew and unmaps them when freed), whose "
          "page faults can cost more than the arithmetic on it.\n")
    table()
    # glibc raises its mmap threshold to the size of the largest block freed (up to 32 MiB): from
    # here on, blocks of these sizes come from its heap and are reused
    buffer = torch.empty(STEADY_BYTES // 4)
    del buffer
    print("\n## After a 16 MiB block has been freed\n")
    print("The state of a long-running process (a training loop frees larger tensors all the time): the "
          "temporaries come from malloc's heap, already mapped, and both implementations run faster.\n")
    table()
    print("\n## Forward and backward\n")
    print("A gradient for every argument (same state): where a gradient is needed kl_lowrank runs its "
          "array path, the fused kernel having no backward pass.\n")
    backward_table()
    fused = f"numba {importlib.metadata.version('numba')}" if kl_bench.accel.REGISTRY["numba"].available() else "no numba (the array path)"
    print(f"\n{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, Torch {torch.__version__}, {fused}; "
          "no GPU was available for these figures.")


if __name__ == "__main__":
    main()
