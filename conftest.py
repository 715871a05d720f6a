"""This repository's own pytest sessions: kl-bench's settings apply from the start (the plugin
applies them in other projects only where its options or fixtures are used)."""

from kl_bench import backends

backends.avoid_xla_cpu_hang()  # before any test module imports JAX
