"""The on-disk reference cache: keyed by inputs and version, corrupt entries recomputed."""

import json

import mpmath
import numpy as np
import pytest

from kl_bench.suite import reference

ARGS = ("normal", [np.float64(0.1), np.float64(1.5), np.float64(0.0), np.float64(1.0)])


@pytest.fixture
def cache(tmp_path):
    return reference.Cache(tmp_path)


def test_value_is_stored_and_reused(cache):
    first = cache.value(*ARGS)
    assert (cache.misses, cache.hits) == (1, 0)
    again = reference.Cache(cache.directory).value(*ARGS)  # a new process would see the same file
    assert again == first
    assert first == reference.certified(*ARGS).value
    assert mpmath.frexp(first)[0] != mpmath.frexp(mpmath.mpf(float(first)))[0]  # more than 53 bits kept


@pytest.mark.parametrize(
    "damage",
    [
        lambda text: text[: len(text) // 2],  # truncated
        lambda text: "",  # empty
        lambda text: text.replace('"man": "', '"man": "1'),  # changed digits, stale checksum
        lambda text: "\x00garbage",
    ],
)
def test_corrupt_entry_is_detected_and_recomputed(cache, damage):
    good = cache.value(*ARGS)
    path = cache.path(cache.key(*ARGS))
    path.write_text(damage(path.read_text()))
    fresh = reference.Cache(cache.directory)
    assert fresh.value(*ARGS) == good
    assert fresh.corrupt == 1 and fresh.misses == 1
    assert json.loads(path.read_text())["check"]  # rewritten whole


def test_key_depends_on_inputs_family_and_version(cache, monkeypatch):
    key = cache.key(*ARGS)
    assert cache.key("normal", [np.float64(0.1), np.float64(1.5), np.float64(0.0), np.float64(1.0000000000000002)]) != key
    assert cache.key("diag", ARGS[1]) != key
    monkeypatch.setattr(reference, "REFERENCE_VERSION", reference.REFERENCE_VERSION + 1)
    assert cache.key(*ARGS) != key


def test_kl_functions_use_the_cache_directory_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("KL_BENCH_CACHE", str(tmp_path / "refs"))
    reference.kl_vae([0.5, 0.1], [0.2, -0.3])
    assert len(list((tmp_path / "refs").rglob("*.json"))) == 1


def test_an_unreadable_or_read_only_cache_is_given_up_and_values_still_come(tmp_path, monkeypatch, capsys):
    """Permissions cannot be taken from root (CI runs as root): the errors are raised as the OS would."""
    cache = reference.Cache(tmp_path)
    first = cache.value(*ARGS)

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path))

    monkeypatch.setattr(type(cache.path(cache.key(*ARGS))), "read_text", denied)  # an unreadable subdirectory
    monkeypatch.setattr(reference.tempfile, "mkstemp", denied)  # and a read-only one
    again = reference.Cache(tmp_path)
    assert again.value(*ARGS) == first and again.value(*ARGS) == first
    assert again.unusable == f"Permission denied: {tmp_path}"
    assert capsys.readouterr().err.count("cannot be used") == 1
