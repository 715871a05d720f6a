"""pytest-benchmark suites: machine information and the ``quick`` marker."""

from kl_bench.suite import timing


def pytest_configure(config):
    config.addinivalue_line("markers", "quick: the subset that runs in under two minutes on 2 cores")


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["kl_bench"] = timing.machine()
