"""This repository's own pytest sessions: kl-bench's settings apply from the start (the plugin
applies them in other projects only where its options or fixtures are used)."""

import importlib.util
import os

from kl_bench import backends

backends.avoid_xla_cpu_hang()  # before any test module imports JAX

# Without a GPU the Triton kernels are tested in Triton's interpreter, on CPU tensors (set before
# the kernels are first defined); with one they run compiled, on CUDA tensors.
if importlib.util.find_spec("triton") and backends.get("torch").installed() and "cuda" not in backends.get("torch").devices():
    os.environ.setdefault("TRITON_INTERPRET", "1")
