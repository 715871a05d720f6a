"""The main job: cells stored atomically and reused, corrupt cells recomputed, processes and a Dask
LocalCluster giving the same tables, the report rebuilt from tables alone, and recommend."""

import json
import os

import numpy as np
import pandas as pd
import pytest

from kl_bench import backends, cli
from kl_bench.suite import report, runner

SMALL = [runner.Cell("accuracy", "normal", "float64", "quick"), runner.Cell("accuracy", "vae", "float32", "quick"),
         runner.Cell("timing", "vae", "float32", "4x8")]


def _record(cell, names=("numpy",), seed=0):
    return runner.record(cell, list(names), False, seed)


def _accuracy(results):
    return runner.frames(results)["accuracy"].sort_values(["family", "subject", "regime", "param"]).reset_index(drop=True)


def test_plan_names_every_cell_once():
    for mode in runner.PLANS:
        cells = runner.plan(mode)
        assert len({c.name for c in cells}) == len(cells)
    quick = runner.plan("quick", ["vae"], ["float32"])
    assert [c.name for c in quick] == ["accuracy-vae-float32-quick", "timing-vae-float32-1x64",
                                       "timing-vae-float32-4096x64", "timing-vae-float32-2048x4096"]


def test_cells_are_reused_and_corrupt_ones_recomputed(tmp_path, capsys):
    first, reused = runner.execute(SMALL, tmp_path, ["numpy"], compiled=False)
    assert reused == 0 and all(runner.cell_path(tmp_path, c).exists() for c in SMALL)
    assert not list((tmp_path / "cells").glob("*.tmp"))  # written atomically: no leftovers
    again, reused = runner.execute(SMALL, tmp_path, ["numpy"], compiled=False)
    assert reused == len(SMALL) and "3 reused" in capsys.readouterr().err
    pd.testing.assert_frame_equal(_accuracy(again), _accuracy(first))
    path = runner.cell_path(tmp_path, SMALL[0])
    path.write_bytes(path.read_bytes()[:100])  # truncated, as by a kill mid-write without the rename
    assert runner.load(tmp_path, SMALL[0], _record(SMALL[0])) == (None, "it is unreadable (truncated or corrupt)")
    third, reused = runner.execute(SMALL, tmp_path, ["numpy"], compiled=False)
    assert reused == len(SMALL) - 1
    pd.testing.assert_frame_equal(_accuracy(third), _accuracy(first))


def test_processes_give_the_same_tables(tmp_path):
    serial, _ = runner.execute(SMALL[:2], tmp_path / "serial", ["numpy"], compiled=False, quiet=True)
    parallel, _ = runner.execute(SMALL[:2], tmp_path / "jobs", ["numpy"], compiled=False, jobs=2, quiet=True)
    pd.testing.assert_frame_equal(_accuracy(parallel), _accuracy(serial))


def test_dask_local_cluster_gives_the_same_tables(tmp_path):
    distributed = pytest.importorskip("distributed")
    serial, _ = runner.execute(SMALL[:2], tmp_path / "serial", ["numpy"], compiled=False, quiet=True)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        on_dask, _ = runner.execute(SMALL[:2], tmp_path / "dask", ["numpy"], compiled=False, scheduler=cluster.scheduler_address,
                                    quiet=True)
    pd.testing.assert_frame_equal(_accuracy(on_dask), _accuracy(serial))
    assert runner.load(tmp_path / "dask", SMALL[0], _record(SMALL[0]))[0] is not None  # the same storage and resume logic


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert cli.main(["run", "--backends", "numpy", "--families", "vae", "--dtypes", "float32", "--out", str(out), "--quiet"]) == 0
    return out


def test_run_writes_tables_environment_and_a_self_contained_report(run_dir):
    for name in ("accuracy", "timing"):
        assert len(pd.read_parquet(run_dir / f"{name}.parquet")) == len(pd.read_csv(run_dir / f"{name}.csv")) > 0
    env = json.loads((run_dir / "environment.json").read_text())
    assert {"cpu", "cores", "numpy", "git_revision", "command"} <= set(env) and "--families vae" in env["command"]
    page = (run_dir / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(list((run_dir / "plots").glob("*.png"))) >= 4
    assert "every stable kernel within its bound" in (run_dir / "report.md").read_text()


def test_rerun_reuses_every_cell(run_dir, capsys):
    before = pd.read_parquet(run_dir / "timing.parquet")
    assert cli.main(["run", "--backends", "numpy", "--families", "vae", "--dtypes", "float32", "--out", str(run_dir)]) == 0
    assert "4 reused" in capsys.readouterr().err
    pd.testing.assert_frame_equal(pd.read_parquet(run_dir / "timing.parquet"), before)


def test_report_is_rebuilt_from_the_tables_alone(run_dir, tmp_path):
    for name in ("accuracy.parquet", "timing.parquet"):
        (tmp_path / name).write_bytes((run_dir / name).read_bytes())
    assert cli.main(["report", str(tmp_path)]) == 0
    assert (tmp_path / "report.html").exists() and (tmp_path / "plots" / "time-vs-size.png").exists()
    assert cli.main(["report", str(tmp_path / "absent")]) == 2


def test_recommend_from_a_run_and_measuring_what_is_missing(run_dir, capsys):
    assert cli.main(["recommend", "--family", "vae", "--shape", "4096x64", "--dtype", "float32", "--from", str(run_dir), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "fastest: " in text and "runner-up: " in text and "kl_bench.kl_vae(loc, logvar)" in text and "measured" not in text
    assert cli.main(["recommend", "--family", "vae", "--shape", "8x16", "--dtype", "float32", "--from", str(run_dir), "--quiet"]) == 0
    assert "1 cells measured" in capsys.readouterr().out
    cell = runner.Cell("timing", "vae", "float32", "8x16")
    assert runner.load(run_dir, cell, runner.record(cell, backends.installed(), False, 0))[0] is not None
    assert cli.main(["recommend", "--family", "vae", "--shape", "8x16", "--dtype", "float32", "--from", str(run_dir),
                     "--max-ulps", "0.01"]) == 1


@pytest.mark.parametrize("argv", [
    ["run", "--jobs", "0"],
    ["run", "--out", "{file}"],
    ["recommend", "--family", "vae", "--shape", "64", "--from", "{dir}"],
    ["recommend", "--family", "vae", "--shape", "8x16", "--from", "{dir}/absent"],
])
def test_bad_arguments_exit_2_before_any_work(argv, tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("")
    called = []
    monkeypatch.setattr(runner, "execute", lambda *a, **k: called.append(1))
    argv = [a.format(file=tmp_path / "file", dir=tmp_path) for a in argv]
    assert cli.main(argv) == 2 and not called
    assert "kl-bench: error:" in capsys.readouterr().err


def test_run_refuses_a_backend_that_is_not_installed(monkeypatch, capsys):
    monkeypatch.setattr(backends.get("jax"), "installed", lambda: False)
    assert cli.main(["run", "--backends", "jax", "--out", "unused"]) == 2
    assert "not installed: jax" in capsys.readouterr().err


def test_failures_table_lists_stable_rows_outside_their_bound():
    acc = pd.DataFrame({"family": ["vae"], "subject": ["s"], "implementation": ["kl_bench"], "method": ["stable"], "dtype": ["float32"],
                        "regime": ["generic"], "param": [None], "max_ulps": [99.0], "bound": [4.0], "ok": [False], "error": [""]})
    assert len(report.failures({"accuracy": acc})) == 1


def test_an_interrupted_run_resumes_where_it_stopped(tmp_path, monkeypatch, capsys):
    argv = ["run", "--backends", "numpy", "--families", "vae", "--dtypes", "float32", "--out", str(tmp_path), "--quiet"]
    real = runner.compute

    def interrupted(cell, *args):
        if cell.part == "4096x64":
            raise KeyboardInterrupt
        return real(cell, *args)

    monkeypatch.setattr(runner, "compute", interrupted)
    assert cli.main(argv) == 130
    assert "2 finished cells are stored" in capsys.readouterr().err
    monkeypatch.setattr(runner, "compute", real)
    assert cli.main(argv[:-1]) == 0
    assert "2 reused" in capsys.readouterr().err
    assert len(pd.read_parquet(tmp_path / "timing.parquet").groupby(["B", "k"])) == 3


def test_recommend_without_a_run_starts_one_behind_latest(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["recommend", "--family", "vae", "--shape", "8x16", "--dtype", "float32", "--backends", "numpy", "--quiet"]
    assert cli.main(argv) == 0 and "2 cells measured" in capsys.readouterr().out
    latest = runner.RUNS_DIR / "latest"
    assert latest.is_symlink() and (latest / "cells" / "timing-vae-float32-8x16.parquet").exists()
    assert cli.main(argv) == 0 and "(from reports/runs/latest)" in capsys.readouterr().out  # reused, nothing measured


# --- a run reuses only its own cells -------------------------------------------------------


def test_a_rerun_with_another_seed_or_backends_recomputes_and_says_why(tmp_path, capsys):
    cells = SMALL[:1]
    runner.execute(cells, tmp_path, ["numpy"], compiled=False, quiet=True)
    _, reused = runner.execute(cells, tmp_path, ["numpy"], compiled=False, seed=1)
    assert reused == 0 and "it was made with another seed 0 (this run: 1)" in capsys.readouterr().err
    if backends.get("torch").installed():
        _, reused = runner.execute(cells, tmp_path, ["numpy", "torch"], compiled=False, seed=1)
        assert reused == 0 and "another set of subjects" in capsys.readouterr().err


def test_a_cell_made_by_other_source_code_is_computed_again(tmp_path, capsys, monkeypatch):
    cells = SMALL[:1]
    runner.execute(cells, tmp_path, ["numpy"], compiled=False, quiet=True)
    assert runner.execute(cells, tmp_path, ["numpy"], compiled=False, quiet=True)[1] == 1
    monkeypatch.setattr(runner, "_source_digest", lambda: "0" * 16)  # a kernel edited, the version unchanged
    _, reused = runner.execute(cells, tmp_path, ["numpy"], compiled=False)
    assert reused == 0 and "it was made with another kl-bench source" in capsys.readouterr().err


def test_a_swapped_or_unrecorded_cell_is_not_accepted(tmp_path, capsys):
    first, _ = runner.execute(SMALL[:2], tmp_path, ["numpy"], compiled=False, quiet=True)
    normal, vae = (runner.cell_path(tmp_path, c) for c in SMALL[:2])
    vae.write_bytes(normal.read_bytes())  # another family's valid cell in its place
    assert runner.load(tmp_path, SMALL[1], _record(SMALL[1]))[1].startswith("it was made with another cell")
    pd.DataFrame({"family": []}).to_parquet(normal)  # a valid parquet file that no run wrote
    assert runner.load(tmp_path, SMALL[0], _record(SMALL[0])) == (None, "it has no record of what made it")
    again, reused = runner.execute(SMALL[:2], tmp_path, ["numpy"], compiled=False)
    assert reused == 0
    pd.testing.assert_frame_equal(_accuracy(again), _accuracy(first))


def test_rows_that_do_not_match_their_record_are_not_accepted(tmp_path):
    import pyarrow.parquet as pq

    runner.execute(SMALL[:1], tmp_path, ["numpy"], compiled=False, quiet=True)
    path = runner.cell_path(tmp_path, SMALL[0])
    table = pq.read_table(path)
    pq.write_table(table.slice(0, 3), path)  # rows dropped, the record kept
    assert runner.load(tmp_path, SMALL[0], _record(SMALL[0])) == (None, "its rows do not match its record")


def test_a_second_run_into_a_directory_in_use_is_refused(tmp_path, capsys):
    with runner.locked(tmp_path):
        argv = ["run", "--backends", "numpy", "--families", "normal", "--dtypes", "float64", "--out", str(tmp_path), "--quiet"]
        assert cli.main(argv) == 3
    err = capsys.readouterr().err
    assert f"{tmp_path} is in use by another kl-bench run (pid {os.getpid()})" in err
    assert not (tmp_path / "cells").exists() or not list((tmp_path / "cells").glob("*.parquet"))


# --- environment faults: one line, exit 3, checked before the work where they can be ----------


def test_a_file_where_the_cells_go_is_found_before_any_work(tmp_path, monkeypatch, capsys):
    (tmp_path / "cells").write_text("")
    called = []
    monkeypatch.setattr(runner, "execute", lambda *a, **k: called.append(1))
    assert cli.main(["run", "--backends", "numpy", "--out", str(tmp_path), "--quiet"]) == 3 and not called
    assert "cannot write to" in capsys.readouterr().err


def test_a_full_disk_while_writing_tables_is_one_line_and_exit_3(tmp_path, monkeypatch, capsys):
    from kl_bench.suite import tables

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "accuracy.parquet"))

    monkeypatch.setattr(tables, "write", full)
    assert cli.main(["run", "--backends", "numpy", "--families", "normal", "--dtypes", "float64", "--out", str(tmp_path),
                     "--quiet"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"kl-bench: cannot write to {tmp_path}: No space left on device") and "resume" in err[-1]
    assert list((tmp_path / "cells").glob("*.parquet"))  # the finished cells are kept


def test_an_unusable_reference_cache_is_said_once_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    from kl_bench.suite import reference

    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("KL_BENCH_CACHE", str(blocker))
    assert cli.main(["run", "--backends", "numpy", "--families", "normal", "--dtypes", "float64", "--out", str(tmp_path / "run"),
                     "--quiet"]) == 0
    err = capsys.readouterr().err
    assert err.count("the reference cache") == 1 and "continuing without it" in err
    full = reference.Cache(tmp_path / "cache")
    monkeypatch.setattr(reference.Cache, "put", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    full.certified("vae", [np.zeros(2), np.ones(2)])
    assert full.unusable == "No space left on device" and "continuing without it" in capsys.readouterr().err
