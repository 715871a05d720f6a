"""The kl-bench command."""

import subprocess
import sys

import pandas as pd
import pytest

from kl_bench import bounds, cli


def test_run_prints_the_worst_ulps_table_and_writes_files(tmp_path, capsys):
    code = cli.main(["run", "--backends", "numpy", "--families", "normal,vae", "--dtypes", "float64",
                     "--quiet", "--csv", str(tmp_path / "acc.csv"), "--markdown", str(tmp_path / "acc.md")])
    out = capsys.readouterr().out
    assert code == 0
    assert "Worst error in ulps" in out and "near-equal" in out and "within their bounds" in out
    df = pd.read_csv(tmp_path / "acc.csv")
    assert set(df.family) == {"normal", "vae"} and set(df.method) == {"stable", "naive"}
    assert {"max_ulps", "median_ulps", "max_rel_err", "bits_lost", "negatives", "nans"} <= set(df.columns)
    assert (tmp_path / "acc.md").read_text().startswith("| family / regime | stable float64 | naive float64 |")


def test_run_exits_1_when_a_stable_kernel_misses_its_bound(monkeypatch, capsys):
    monkeypatch.setattr(bounds, "ulp_bound", lambda *args, **kwargs: 1e-3)
    assert cli.main(["run", "--backends", "numpy", "--families", "normal", "--dtypes", "float64", "--quiet"]) == 1
    assert "outside their bound" in capsys.readouterr().out


def test_bad_arguments_exit_2():
    for args in (["run", "--backends", "tensorflow"], ["run", "--families", "gamma"], ["frobnicate"]):
        result = subprocess.run([sys.executable, "-m", "kl_bench.cli", *args], capture_output=True, text=True)
        assert result.returncode == 2, args
        assert "error" in result.stderr


def test_console_script_is_installed():
    pytest.importorskip("importlib.metadata")
    from importlib.metadata import entry_points

    assert any(e.name == "kl-bench" for e in entry_points(group="console_scripts"))
