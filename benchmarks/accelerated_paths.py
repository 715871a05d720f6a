"""Where models train: the stable kernels against the textbook on the same path, in one run, as
ratios (each path timed alternately with its reference, three rounds of at least 0.3 s, the median
of the rounds' medians; each section in its own process, so that no thread pool of one framework
competes with the next):

    python benchmarks/accelerated_paths.py > reports/accelerated-paths.md

1. jax.jit on the CPU (the XLA custom call): kl_vae and kl_diag against the jitted textbook,
   float32 and float64, at 2048 x 4096, 4096 x 64 and 1 x 64.
2. torch.compile(fullgraph=True) on the CPU: kl_vae (validate=False) against the compiled
   textbook, float32 2048 x 4096; and Torch eager (numba) for reference.
3. kl_cov on Torch CPU, float64, batch 16, k = 256: against torch.distributions'
   MultivariateNormal by covariance_matrix (default validation, as the stable kernel's).
"""

import subprocess
import sys

import numpy as np

import kl_bench
from kl_bench import backends
from kl_bench.suite.timing import inputs, machine, median_seconds

ROUNDS, ROUND_SECONDS = 3, 0.3


def ratio(fast, reference, be=None):
    """(ms of fast, ms of reference, fast / reference): alternating rounds, medians of each."""
    a, b = [], []
    for _ in range(ROUNDS):
        a.append(median_seconds(fast, be, repeats=3, min_seconds=ROUND_SECONDS))
        b.append(median_seconds(reference, be, repeats=3, min_seconds=ROUND_SECONDS))
    a, b = float(np.median(a)), float(np.median(b))
    return a * 1e3, b * 1e3, a / b


def jax_jit():
    import jax
    import jax.numpy as jnp

    be = backends.get("jax")
    textbook = {
        "vae": lambda m, lv: -0.5 * jnp.sum(1.0 + lv - m * m - jnp.exp(lv), axis=-1),
        "diag": lambda mp, lp, mq, lq: 0.5 * jnp.sum(lq - lp + (jnp.exp(lp) + (mp - mq) ** 2) / jnp.exp(lq) - 1.0, axis=-1),
    }
    print("## jax.jit on the CPU: stable (XLA custom call) against the jitted textbook\n")
    print("| family | dtype | B x k | stable ms | textbook ms | stable / textbook |\n|---|---|---|---|---|---|")
    for family in ("vae", "diag"):
        for dtype in ("float32", "float64"):
            with be.computing(dtype):
                for batch, k in ((2048, 4096), (4096, 64), (1, 64)):
                    args = [jnp.asarray(a.astype(dtype)) for a in inputs(family, batch, k)]
                    stable = jax.jit(getattr(kl_bench, f"kl_{family}"))
                    plain = jax.jit(textbook[family])
                    a, b, r = ratio(lambda: stable(*args), lambda: plain(*args), be)
                    print(f"| {family} | {dtype} | {batch} x {k} | {a:.3f} | {b:.3f} | {r:.2f} |")


def torch_compile():
    import torch

    print("\n## torch.compile(fullgraph=True) on the CPU, kl_vae float32 2048 x 4096\n")
    loc, logvar = (torch.as_tensor(a.astype(np.float32)) for a in inputs("vae", 2048, 4096))
    compiled_textbook = torch.compile(lambda m, lv: -0.5 * torch.sum(1.0 + lv - m * m - torch.exp(lv), -1), fullgraph=True)
    compiled_stable = torch.compile(lambda m, lv: kl_bench.kl_vae(m, lv, validate=False), fullgraph=True)
    eager_textbook = lambda: -0.5 * torch.sum(1.0 + logvar - loc * loc - torch.exp(logvar), -1)  # noqa: E731
    print("| path | stable ms | textbook ms | stable / textbook |\n|---|---|---|---|")
    a, b, r = ratio(lambda: compiled_stable(loc, logvar), lambda: compiled_textbook(loc, logvar))
    print(f"| torch.compile (inductor, C++), both compiled | {a:.2f} | {b:.2f} | {r:.2f} |")
    a, b, r = ratio(lambda: kl_bench.kl_vae(loc, logvar), eager_textbook)
    print(f"| eager (stable: the numba kernel; textbook: Torch ops) | {a:.2f} | {b:.2f} | {r:.2f} |")


def torch_cov():
    import torch
    from torch.distributions import MultivariateNormal, kl_divergence

    print("\n## kl_cov on Torch CPU, float64, batch 16, k = 256\n")
    loc_p, cov_p, loc_q, cov_q = (torch.as_tensor(a) for a in inputs("cov", 16, 256))
    td = lambda: kl_divergence(MultivariateNormal(loc_p, covariance_matrix=cov_p), MultivariateNormal(loc_q, covariance_matrix=cov_q))  # noqa: E731
    a, b, r = ratio(lambda: kl_bench.kl_cov(loc_p, cov_p, loc_q, cov_q), td)
    print("| stable ms | torch.distributions ms | stable / torch.distributions |\n|---|---|---|")
    print(f"| {a:.1f} | {b:.1f} | {r:.2f} |")


def main():
    info = machine()
    print("# Accelerated paths: stable against textbook, one run\n")
    print("Produced by `python benchmarks/accelerated_paths.py > reports/accelerated-paths.md` on "
          f"{info['cpu']} ({info['cores']} cores), Python {info['python']}, "
          + ", ".join(f"{p} {info[p]}" for p in ("torch", "jax", "numba") if p in info)
          + (f"; GPUs: {', '.join(info['gpus'])}" if info.get("gpus") else "; no GPU was available for these figures")
          + ".\n", flush=True)
    for section in SECTIONS:
        subprocess.run([sys.executable, __file__, section], check=True)


SECTIONS = {"jax_jit": jax_jit, "torch_compile": torch_compile, "torch_cov": torch_cov}

if __name__ == "__main__":
    SECTIONS[sys.argv[1]]() if len(sys.argv) > 1 else main()
