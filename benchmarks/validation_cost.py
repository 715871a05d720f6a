"""What validate=True costs: time per call with and without value checks, per family and backend.

    python benchmarks/validation_cost.py

Prints a Markdown table (median of repeated calls, in microseconds, and the ratio). Times include
the framework's own dispatch; JAX calls are compiled once before timing and blocked on.
"""


import kl_bench
from kl_bench import backends
from kl_bench.suite import cases
from kl_bench.suite.subjects import Subject
from kl_bench.suite.timing import median_seconds

SHAPES = {"normal": 4096, "diag": 64, "vae": 64, "tril": 16, "cov": 16}  # batch size (k from the case sets)


def main():
    print("| family | backend | shape | validate=True (us) | validate=False (us) | ratio |")
    print("|---|---|---|---|---|---|")
    for family, n in SHAPES.items():
        case = cases.generate(family, "generic", "float32", n=n)
        for name in backends.installed():
            subject = Subject(name)
            args = [subject.asarray(a, "float32") for a in case.arrays]
            fn = getattr(kl_bench, f"kl_{family}")
            on = median_seconds(lambda: fn(*args), subject.be, repeats=30)
            off = median_seconds(lambda: fn(*args, validate=False), subject.be, repeats=30)
            shape = "x".join(map(str, case.arrays[1].shape))
            print(f"| {family} | {name} | {shape} | {on * 1e6:.0f} | {off * 1e6:.0f} | {on / off:.2f} |")


if __name__ == "__main__":
    main()
