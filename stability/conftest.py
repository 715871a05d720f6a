"""Case sets are generated once per session and shared by every subject."""

import functools

from kl_bench import cases


@functools.lru_cache(maxsize=None)
def case_set(family, regime, dtype, param):
    return cases.generate(family, regime, dtype, param)
