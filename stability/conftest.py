"""Case sets are generated once per session and shared by every subject; tests of JAX subjects run
with JAX's float64 switched on (for that test only), as they build float64 arrays themselves."""

import functools

import pytest

from kl_bench.suite import cases


@functools.cache
def case_set(family, regime, dtype, param):
    return cases.generate(family, regime, dtype, param)


@pytest.fixture(autouse=True)
def _jax_float64(request):
    params = getattr(request.node, "callspec", None)
    subject = params and (params.params.get("kl_subject") or params.params.get("kl_target"))
    if subject is not None and subject.backend == "jax":
        with subject.be.computing("float64"):
            yield
    else:
        yield
