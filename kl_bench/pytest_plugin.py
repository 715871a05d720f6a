"""pytest plugin (registered through the ``pytest11`` entry point): options and fixtures shared by
``stability/`` and ``benchmarks/``.

- ``--kl-backend NAME`` (repeatable, or comma-separated): run only these backends.
- ``--kl-device cpu|cuda`` (repeatable): run only these devices.
- fixture ``kl_subject``: parametrised over every backend x device x mode x method of this
  project (mode "numba": the fused CPU kernels); absent frameworks and devices skip with the reason.
- fixture ``kl_target``: the same with ``method="stable"``.

It loads in every pytest session where kl-bench is installed, so it changes nothing there
(environment, JAX or Torch settings, warning filters) unless the session uses kl-bench's options
or fixtures: only then does it apply kl-bench's workaround for an XLA CPU hang
(``backends.avoid_xla_cpu_hang``, which acts only if JAX is not imported yet). Its own imports
are light: the suite is imported when a kl-bench fixture is used.
"""

from __future__ import annotations

import pytest

FIXTURES = ("kl_subject", "kl_target", "kl_dtype_skip")


def pytest_addoption(parser):
    group = parser.getgroup("kl-bench")
    group.addoption("--kl-backend", action="append", default=[], help="run only this backend (numpy, torch, jax)")
    group.addoption("--kl-device", action="append", default=[], help="run only this device (cpu, cuda)")


def _selected(config, option):
    return {v for item in config.getoption(option) for v in item.split(",") if v}


def pytest_configure(config):
    if not (_selected(config, "--kl-backend") or _selected(config, "--kl-device")):
        return  # a session that does not use kl-bench's options
    from . import backends

    unknown = _selected(config, "--kl-backend") - set(backends.BACKENDS)
    if unknown:
        raise pytest.UsageError(f"--kl-backend: unknown {', '.join(sorted(unknown))}; known: {', '.join(backends.BACKENDS)}")
    backends.avoid_xla_cpu_hang()


def _params(config, methods):
    from .suite.subjects import ARRAY, ours

    wanted_backends = _selected(config, "--kl-backend")
    wanted_devices = _selected(config, "--kl-device")
    params = []
    for subject in ours(methods):
        if wanted_backends and subject.backend not in wanted_backends:
            continue
        if wanted_devices and subject.device not in wanted_devices:
            continue
        reason = subject.unavailable()
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        ident = "-".join([subject.backend, subject.device] + [subject.mode] * (subject.mode != ARRAY)
                         + [subject.method] * (len(methods) > 1))
        params.append(pytest.param(subject, id=ident, marks=marks))
    return params


def pytest_generate_tests(metafunc):
    if any(name in metafunc.fixturenames for name in FIXTURES):  # the session uses kl-bench's fixtures
        from . import backends

        backends.avoid_xla_cpu_hang()
    if "kl_subject" in metafunc.fixturenames:
        metafunc.parametrize("kl_subject", _params(metafunc.config, ("stable", "naive")))
    if "kl_target" in metafunc.fixturenames:
        metafunc.parametrize("kl_target", _params(metafunc.config, ("stable",)))


@pytest.fixture
def kl_dtype_skip():
    """Call with (subject, dtype[, family]) to skip when the subject lacks the dtype or family."""

    def check(subject, dtype: str, family: str | None = None):
        reason = subject.unavailable(family=family, dtype=dtype)
        if reason:
            pytest.skip(reason)

    return check
