"""Seconds per call of every subject (this project's stable and naive kernels in every mode,
torch.distributions, numpyro, the textbook in NumPy) x family x shape x dtype, grouped per
(family, dtype, shape) so that one table compares everything on identical inputs.

    pytest benchmarks --benchmark-only                 # everything (torch.compile: seconds per shape)
    pytest benchmarks --benchmark-only -m quick        # under two minutes on 2 cores

The timed call synchronises (CUDA, JAX) before returning; the first call (compilation) is timed
apart and reported in extra_info with bytes, GB/s, flops, the fraction of the measured ceiling and
the memory one call holds beyond its inputs (``peak_over_input``, a multiple of the largest input)
(kl_bench.suite.timing, the same code as ``kl-bench timing``).
"""

import pytest

from kl_bench.families import NAMES as FAMILIES
from kl_bench.suite import timing
from kl_bench.suite.subjects import registry

ROUNDS = 5
QUICK_SHAPES = {(4096, 64), (2048, 4096), (16, 256)}
QUICK_FAMILIES = ("vae", "diag", "cov")
SUBJECTS = [s for s in registry(compiled=True) if timing.timed(s)]


def _cases():
    for family in FAMILIES:
        for dtype in timing.default_dtypes(family):
            for batch, k in timing.shapes(family, "full"):
                for subject in SUBJECTS:
                    quick = family in QUICK_FAMILIES and (batch, k) in QUICK_SHAPES and subject.mode != "torch.compile"
                    yield pytest.param(subject, family, dtype, batch, k, id=f"{family}-{dtype}-{batch}x{k}-{subject.name}",
                                       marks=[pytest.mark.quick] if quick else [])


@pytest.mark.parametrize("subject,family,dtype,batch,k", _cases())
def test_speed(benchmark, subject, family, dtype, batch, k):
    reason = subject.unavailable(family, dtype)
    if reason:
        pytest.skip(reason)
    workload = timing.Workload(subject, family, batch, k, dtype)
    compile_seconds = workload.first_call_seconds()
    benchmark.group = f"{family} {dtype} B={batch} k={k}"
    benchmark.pedantic(workload, rounds=ROUNDS, warmup_rounds=1)
    benchmark.extra_info["compile_seconds"] = compile_seconds
    peak = timing.peak_bytes(workload) if subject.device == "cpu" else None
    benchmark.extra_info["peak_over_input"] = None if peak is None else peak / workload.largest_input_bytes
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info.update(workload.throughput(benchmark.stats.stats.median))
