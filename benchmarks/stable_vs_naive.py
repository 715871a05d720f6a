"""Time of the stable VAE kernel against the textbook formula on the same inputs, in one run.

    python benchmarks/stable_vs_naive.py

float32, B=4096 x k=4096, validate=False, median of 5 calls after a warm-up (JAX: compiled once
before timing, blocked on). Prints a Markdown table with the ratio stable / naive per backend.
"""

import numpy as np

import kl_bench
from kl_bench import backends
from kl_bench.suite.subjects import Subject
from kl_bench.suite.timing import median_seconds

SHAPE = (4096, 4096)


def main():
    rng = np.random.default_rng(0)
    loc, logvar = rng.normal(size=SHAPE), rng.normal(size=SHAPE)
    print("| backend | naive (ms) | stable (ms) | stable / naive |")
    print("|---|---|---|---|")
    for name in backends.installed():
        subject = Subject(name)
        args = [subject.asarray(a, "float32") for a in (loc, logvar)]
        naive, stable = (
            median_seconds(lambda m=m: kl_bench.kl_vae(*args, method=m, validate=False), subject.be)
            for m in ("naive", "stable")
        )
        print(f"| {name} | {naive * 1e3:.1f} | {stable * 1e3:.1f} | {stable / naive:.1f} |")


if __name__ == "__main__":
    main()
