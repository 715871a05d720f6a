"""What the certified references cost: every quick case set of every family and dtype, evaluated
cold (no cache), per family: rows, seconds, milliseconds per row, and the working precisions that
certified them.

    python benchmarks/reference_cost.py > reports/reference-cost.md
"""

import collections
import time

from kl_bench import families
from kl_bench.suite import cases, reference


def main():
    print("| family | rows | seconds | ms per row | rows by certifying precision (bits) |")
    print("|---|---|---|---|---|")
    for family in families.NAMES:
        rows, seconds, precisions = 0, 0.0, collections.Counter()
        for dtype in cases.LIMITS:
            for case in cases.quick(family, dtype):
                start = time.perf_counter()
                certified = reference.certificates(family, *case.arrays, cache=False)
                seconds += time.perf_counter() - start
                rows += case.n
                precisions.update(c.prec for c in certified)
        spread = ", ".join(f"{p}: {n}" for p, n in sorted(precisions.items()))
        print(f"| {family} | {rows} | {seconds:.2f} | {seconds / rows * 1e3:.3f} | {spread} |")


if __name__ == "__main__":
    main()
