import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import kl_bench
from kl_bench import cli
from kl_bench.suite import tables, timing
from kl_bench.suite.subjects import Subject, Textbook
from kl_bench.suite.timing import median_seconds


class CountingBackend:
    def __init__(self):
        self.synced = []

    def sync(self, x=None):
        self.synced.append(x)


def test_median_seconds_warms_up_and_synchronises_every_call():
    be, calls = CountingBackend(), []
    seconds = median_seconds(lambda: calls.append(1) or len(calls), be, repeats=4)
    assert len(calls) == 5 and be.synced == [1, 2, 3, 4, 5]  # one untimed warm-up, then 4 timed
    assert seconds >= 0


def test_input_bytes_and_flops_count_what_a_kernel_reads():
    assert timing.input_bytes("vae", 3, 5, "float32") == 2 * 3 * 5 * 4
    assert timing.input_bytes("diag", 3, 5, "float64") == 4 * 3 * 5 * 8
    assert timing.input_bytes("normal", 3, 5, "float16") == 4 * 15 * 2
    assert timing.input_bytes("cov", 2, 4, "float64") == 2 * (2 * 4 + 2 * 16) * 8
    assert timing.nominal_flops("vae", 2, 4) is None and timing.nominal_flops("tril", 2, 4) == 2 * 64


def test_workload_inputs_are_valid_and_the_call_is_synchronised():
    calls = []

    class Recording(Subject):
        def function(self, family):
            return lambda *args: calls.append(len(args)) or np.zeros(2)

    workload = timing.Workload(Recording("numpy"), "cov", 2, 3, "float64")
    s_p = workload.args[1]
    assert np.all(np.linalg.eigvalsh(s_p) > 0)
    result = timing.measure(workload, repeats=3, min_seconds=0.0)
    assert calls == [4] * 6  # first call, warm-up, three timed, one for the peak memory
    assert result["seconds"] > 0 and result["compile_seconds"] >= 0 and result["flops"] == 3 * 2 * 27
    assert 0 < result["roofline_fraction"]


def test_timing_sweep_and_speed_table():
    subjects = [Subject("numpy"), Subject("numpy", method="naive"), Textbook()]
    df = timing.timing_sweep(["vae", "cov"], subjects, at=[(4, 8)], repeats=2, progress=False)
    assert list(df.columns) == timing.COLUMNS and len(df) == 6
    assert (df.error == "").all() and (df.seconds > 0).all() and (df.gbps > 0).all()
    table = tables.speed_table(df)
    row = table.loc[("vae", "float32", 4, 8, "numpy", "cpu", "array")]
    seconds = df.set_index(["family", "subject"]).seconds
    ratio = seconds["vae", "kl_bench.stable[numpy-cpu]"] / seconds["vae", "kl_bench.naive[numpy-cpu]"]
    assert row.stable_over_textbook == pytest.approx(ratio)


def test_timing_command_writes_tables_and_refuses_bad_repeats(tmp_path, capsys):
    assert cli.main(["timing", "--repeats", "0"]) == 2
    assert cli.main(["timing", "--backends", "numpy", "--families", "normal", "--out", str(tmp_path), "--quiet",
                     "--repeats", "1", "--markdown", str(tmp_path / "speed.md")]) == 0
    assert (tmp_path / "timing.csv").exists() and (tmp_path / "timing.parquet").exists()
    assert "stable_over_textbook" in (tmp_path / "speed.md").read_text()


def test_benchmark_suite_collects_and_runs():
    """The pytest-benchmark suite itself, one shape, benchmarks off (each runs once)."""
    done = subprocess.run([sys.executable, "-m", "pytest", "benchmarks", "-q", "-p", "no:cacheprovider", "--benchmark-disable",
                           "-k", "vae-float32-4096x64 and numpy"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert " passed" in done.stdout


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("family, batch, k", [("vae", 512, 4096), ("diag", 512, 4096), ("cov", 8, 256)])
def test_the_float64_array_path_holds_at_most_four_inputs_of_memory(backend, family, batch, k):
    """Evaluated in blocks (kl_bench.blocks): measured, not timed; 9-13 x before blocks."""
    subject = Subject(backend)
    if subject.unavailable(family, "float64"):
        pytest.skip(subject.unavailable(family, "float64"))
    workload = timing.Workload(subject, family, batch, k, "float64")
    workload()
    peak = timing.peak_bytes(workload)
    if peak is None:
        pytest.skip("the resident-set high-water mark cannot be reset here (/proc/self/clear_refs)")
    assert peak <= 4 * workload.largest_input_bytes, peak / workload.largest_input_bytes


def test_blocks_give_the_same_values():
    from kl_bench import blocks

    rng = np.random.default_rng(5)
    args = [rng.normal(size=(300, 700)), rng.normal(size=700), rng.normal(size=(300, 1)), rng.normal(size=(300, 700))]
    whole = kl_bench.kl_diag(*args)
    plan = blocks.plan(kl_bench.families.get("diag"), [np.asarray(a) for a in args])
    assert plan == (0, 37)  # 210000 elements in blocks of an eighth: 37 rows of 700
    np.testing.assert_array_equal(whole, kl_bench.kl_diag(*args, validate=False))
    long = [rng.normal(size=(2, 200_000)), rng.normal(size=(2, 200_000))]
    assert blocks.plan(kl_bench.families.get("vae"), long)[0] == -1  # a few long vectors: coordinate blocks
    with np.errstate(all="ignore"):
        direct = 0.5 * np.sum(np.expm1(long[1]) - long[1] + long[0] ** 2, axis=-1)
    np.testing.assert_allclose(kl_bench.kl_vae(*long), direct, rtol=1e-12)
    normal = [rng.normal(size=100_000), np.exp(rng.normal(size=100_000)), 0.0, 1.0]
    assert blocks.plan(kl_bench.families.get("normal"), [np.asarray(a, dtype=float) for a in normal]) is not None
    blocks_off = kl_bench.kl_normal(*[a[:10] if np.ndim(a) else a for a in normal])
    np.testing.assert_array_equal(kl_bench.kl_normal(*normal)[:10], blocks_off)


def test_timing_selects_a_device_and_leaves_compiled_modes_out(tmp_path, capsys):
    if not any(s.device == "cuda" for s in timing.default_subjects(compiled=False)):
        assert cli.main(["timing", "--device", "cuda", "--out", str(tmp_path), "--quiet"]) == 2
        assert "no subject runs on cuda here" in capsys.readouterr().err
    argv = ["timing", "--device", "cpu", "--no-compiled", "--backends", "numpy", "--families", "vae", "--dtypes", "float32",
            "--repeats", "1", "--out", str(tmp_path), "--quiet"]
    assert cli.main(argv) == 0
    df = pd.read_parquet(tmp_path / "timing.parquet")
    assert set(df.device) == {"cpu"} and not set(df["mode"]) & {"jax.jit", "torch.compile"}


def test_the_textbook_low_rank_is_not_timed_where_it_would_form_huge_matrices():
    from kl_bench.suite import subjects

    row = timing._timed_row(subjects.Textbook(), "lowrank", "float32", 8, 4 * timing.DENSE_LOW_RANK_LIMIT, repeats=1)
    assert row["error"].startswith("not timed: the textbook forms k x k covariances") and "seconds" not in row
    assert timing.input_bytes("lowrank", 2, 10, "float32") == 2 * (4 * 10 + 2 * 10 * timing.TIMING_RANK) * 4


def test_low_rank_runs_whole_and_blocks_count_a_factor_by_its_elements():
    from kl_bench import blocks

    rng = np.random.default_rng(6)
    args = [rng.normal(size=(64, 300)), rng.normal(size=(64, 300, 4)), np.exp(rng.normal(size=(64, 300)))] * 2
    assert blocks.plan(kl_bench.families.get("lowrank"), args) == (0, 8)  # 64 x 300 x 4 factor elements in eighths
    assert not kl_bench.families.get("lowrank").in_blocks  # ... but kl_lowrank runs whole
