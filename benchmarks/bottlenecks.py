"""Where the remaining time goes, for the README's "Speed" notes: one run, median of 7 calls.

    python benchmarks/bottlenecks.py > reports/bottlenecks.md

1. XLA on CPU: a select on a comparison against a plain sum and a maximum (float32, 4096 x 4096,
   under jax.jit), the reason the stable kernel's branches cost so much there.
2. kl_cov on Torch CPU (float64, batch 16, k = 256): its Cholesky, triangular solve and shifted
   Cholesky recurrence against the whole kernel.
3. Per-call time on tiny inputs (float32, B = 1, k = 64): kl_bench.kl_vae / kl_diag called
   directly against the bare textbook NumPy expression.
"""

import time

import numpy as np

import kl_bench
from kl_bench import backends, kernels
from kl_bench.suite.timing import inputs, median_seconds


def median_ms(fn, be=None):
    return median_seconds(fn, be, repeats=7) * 1e3


def xla_select():
    import jax
    import jax.numpy as jnp

    x = jnp.asarray(np.random.default_rng(0).normal(size=(4096, 4096)).astype(np.float32))
    forms = {
        "sum(x)": lambda x: x.sum(-1),
        "sum(maximum(x, 0))": lambda x: jnp.maximum(x, 0.0).sum(-1),
        "sum(where(x > 0, x, 0))": lambda x: jnp.where(x > 0, x, 0.0).sum(-1),
        "sum(exp(x))": lambda x: jnp.exp(x).sum(-1),
    }
    print("\n| jax.jit, float32 4096 x 4096 | ms |\n|---|---|")
    for name, fn in forms.items():
        compiled = jax.jit(fn)
        print(f"| `{name}` | {median_ms(lambda: compiled(x), backends.get('jax')):.2f} |")


def torch_cov():
    import torch

    be = backends.get("torch")
    loc_p, cov_p, loc_q, cov_q = (torch.as_tensor(a) for a in inputs("cov", 16, 256))
    factor = torch.linalg.cholesky(cov_q)
    rhs = torch.cat([cov_p - cov_q, (loc_p - loc_q)[..., None]], -1)
    half = torch.linalg.solve_triangular(factor, torch.linalg.solve_triangular(factor, cov_p - cov_q, upper=False).mT, upper=False)
    m = 0.5 * (half + half.mT)
    parts = {
        "cholesky (one of two)": lambda: torch.linalg.cholesky_ex(cov_q),
        "solve_triangular with k + 1 right-hand sides (one of two)": lambda: torch.linalg.solve_triangular(factor, rhs, upper=False),
        "the shifted Cholesky recurrence on M": lambda: kernels._shifted_cholesky(be, m),
        "the whole stable kernel": lambda: kernels.kl_cov(be, loc_p, cov_p, loc_q, cov_q, method="stable", check=True),
    }
    print("\n| Torch CPU kl_cov, float64, batch 16, k = 256 | ms |\n|---|---|")
    for name, fn in parts.items():
        print(f"| {name} | {median_ms(fn):.1f} |")


def tiny_calls():
    rng = np.random.default_rng(0)
    a = [rng.normal(size=(1, 64)).astype(np.float32) for _ in range(4)]
    calls = {
        "kl_bench.kl_vae": lambda: kl_bench.kl_vae(a[0], a[1]),
        "textbook VAE in NumPy": lambda: -0.5 * np.sum(1 + a[1] - a[0] ** 2 - np.exp(a[1]), axis=-1),
        "kl_bench.kl_diag": lambda: kl_bench.kl_diag(*a),
        "textbook diag in NumPy": lambda: 0.5 * np.sum(a[3] - a[1] + (np.exp(a[1]) + (a[0] - a[2]) ** 2) / np.exp(a[3]) - 1, axis=-1),
    }
    print("\n| float32, B = 1, k = 64, called directly | µs per call |\n|---|---|")
    for name, fn in calls.items():
        fn()
        n = 20000
        start = time.perf_counter()
        for _ in range(n):
            fn()
        print(f"| {name} | {(time.perf_counter() - start) / n * 1e6:.1f} |")


if __name__ == "__main__":
    for part in (torch_cov, tiny_calls, xla_select):  # JAX last: its thread pool would compete with Torch's
        try:
            part()
        except ImportError as exc:
            print(f"\n({part.__name__}: {exc})")
