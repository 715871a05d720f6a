"""Memory one call holds beyond its inputs, as a multiple of its largest input, for the float64
array path (in blocks, kl_bench.blocks), the float32 fused kernels and the textbook formula; each
measured once on this machine (the resident-set high-water mark, kl_bench.suite.timing.peak_bytes).

    python benchmarks/memory.py > reports/memory.md
"""

from kl_bench.suite import timing
from kl_bench.suite.subjects import Subject, Textbook

SHAPES = {"vae": (2048, 4096), "diag": (2048, 4096), "cov": (8, 512)}
SUBJECTS = [Subject("numpy"), Subject("torch"), Subject("numpy", method="naive"), Subject("torch", method="naive"), Textbook()]


def main():
    print("| family, B x k | subject | dtype | peak / largest input | seconds |")
    print("|---|---|---|---|---|")
    for family, (batch, k) in SHAPES.items():
        for dtype in ("float64", "float32"):
            for subject in SUBJECTS + [Subject("numpy", mode="numba"), Subject("torch", mode="numba")]:
                if subject.unavailable(family, dtype):
                    continue
                workload = timing.Workload(subject, family, batch, k, dtype)
                result = timing.measure(workload, repeats=1, min_seconds=0.0)
                print(f"| {family}, {batch} x {k} | {subject.name} | {dtype} | {result['peak_over_input']:.2f} | "
                      f"{result['seconds']:.3g} |")


if __name__ == "__main__":
    main()
