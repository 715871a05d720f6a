"""The kl-bench command."""

import subprocess
import sys

import pandas as pd
import pytest

from kl_bench import cli
from kl_bench.suite import bounds


def test_run_prints_the_worst_ulps_table_and_writes_files(tmp_path, capsys):
    code = cli.main(["run", "--backends", "numpy", "--families", "normal,vae", "--dtypes", "float64", "--out", str(tmp_path / "run"),
                     "--quiet", "--csv", str(tmp_path / "acc.csv"), "--markdown", str(tmp_path / "acc.md")])
    out = capsys.readouterr().out
    assert code == 0
    assert "Worst error in ulps" in out and "near-equal" in out and "within their bounds" in out
    df = pd.read_csv(tmp_path / "acc.csv")
    assert set(df.family) == {"normal", "vae"}
    assert set(df[df.implementation == "kl_bench"].method) == {"stable", "naive"}
    assert "textbook" in set(df.implementation)  # third parties on the same inputs
    assert {"max_ulps", "median_ulps", "max_rel_err", "bits_lost", "negatives", "nans"} <= set(df.columns)
    assert (tmp_path / "acc.md").read_text().startswith("| family / regime | stable float64 | naive float64 |")


def test_run_exits_1_when_a_stable_kernel_misses_its_bound(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(bounds, "ulp_bound", lambda *args, **kwargs: 1e-3)
    assert cli.main(["run", "--backends", "numpy", "--families", "normal", "--dtypes", "float64", "--quiet", "--out", str(tmp_path)]) == 1
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


def test_accuracy_writes_csv_and_parquet_and_prints_the_headline(tmp_path, capsys):
    code = cli.main(["accuracy", "--backends", "numpy", "--families", "vae", "--dtypes", "float64", "--quiet",
                     "--out", str(tmp_path), "--markdown", str(tmp_path / "headline.md")])
    assert code == 0
    out = capsys.readouterr().out
    assert "kl_bench.stable" in out and "textbook" in out and "collapse" in out
    csv, parquet = pd.read_csv(tmp_path / "accuracy.csv"), pd.read_parquet(tmp_path / "accuracy.parquet")
    assert len(csv) == len(parquet) > 0 and list(csv.columns) == list(parquet.columns)
    assert (tmp_path / "headline.md").read_text().startswith("### float64")


def test_accuracy_subject_filter_and_bad_out(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert cli.main(["accuracy", "--subjects", "no-such-subject", "--quiet", "--out", str(tmp_path)]) == 2
    assert cli.main(["accuracy", "--backends", "numpy", "--quiet", "--out", str(blocker / "sub")]) == 2


def test_baseline_command_writes_the_stable_rows(tmp_path):
    path = tmp_path / "accuracy-baseline.csv"
    assert cli.main(["baseline", "--out", str(path), "--quiet"]) == 0
    table = pd.read_csv(path)
    assert table.subject.str.startswith("kl_bench.stable[").all() and len(table) > 50


def test_accuracy_with_gradients(tmp_path):
    pytest.importorskip("torch")
    assert cli.main(["accuracy", "--backends", "torch", "--families", "vae", "--dtypes", "float64", "--quiet",
                     "--gradients", "--out", str(tmp_path)]) == 0
    grads = pd.read_parquet(tmp_path / "gradients.parquet")
    assert {"kl_bench.stable[torch-cpu]", "torch.distributions[torch-cpu]"} <= set(grads.subject)


def test_a_reader_that_goes_away_is_not_an_error_message():
    """kl-bench ... | head: no 'Broken pipe' complaint on stderr."""
    pipeline = subprocess.run(f"{sys.executable} -m kl_bench.cli check tests.fault_corpus:textbook_vae --family vae --quiet | head -1",
                              shell=True, capture_output=True, text=True)
    assert pipeline.stdout.startswith("FAIL") and "Broken pipe" not in pipeline.stderr
