"""kl-bench export-cases: the files round-trip bit for bit and carry the certified values."""

import json

import mpmath
import numpy as np
import pandas as pd

from kl_bench import cli, families
from kl_bench.suite import cases, export, reference


def test_export_round_trips_inputs_and_certificates(tmp_path):
    assert cli.main(["export-cases", str(tmp_path), "--families", "vae,cov", "--dtypes", "float32,float64", "--quiet"]) == 0
    schema = json.loads((tmp_path / "schema.json").read_text())
    assert schema["schema_version"] == export.SCHEMA_VERSION and [a["name"] for a in schema["arguments"]["cov"]][1] == "cov_p"
    for family in ("vae", "cov"):
        table = pd.read_parquet(tmp_path / f"{family}.parquet")
        expected = [c for d in ("float32", "float64") for c in cases.quick(family, d)]
        assert list(dict.fromkeys(table.case_set)) == [c.name for c in expected]
        for case in expected:
            rows = table[table.case_set == case.name].sort_values("case")
            assert len(rows) == case.n
            for arg, array in zip(families.get(family).args, case.arrays):
                back = np.stack([np.asarray(v, dtype=np.float64) for v in rows[arg.name]]).reshape(array.shape)
                assert back.tobytes() == array.tobytes()  # bit for bit
            certified = reference.certificates(family, *case.arrays)
            for row, c in zip(rows.itertuples(), certified):
                with mpmath.workprec(4096):
                    value = mpmath.mpf(int(row.exact_mantissa)) * mpmath.mpf(2) ** int(row.exact_exponent)
                assert value == c.value and row.prec == c.prec
                assert (pd.isna(row.radius_log2) and c.radius_log2 is None) or row.radius_log2 == c.radius_log2
                assert row.exact == reference.nearest_float64(c.value)


def test_nearest_float64_rounds_to_nearest_even_and_overflows_to_inf():
    with mpmath.workprec(200):
        one_and_half_ulp = 1 + mpmath.mpf(2) ** -53  # a tie between 1 and 1 + 2^-52: to even
        assert reference.nearest_float64(one_and_half_ulp) == 1.0
        assert reference.nearest_float64(one_and_half_ulp + mpmath.mpf(2) ** -150) == 1.0 + 2**-52
        assert reference.nearest_float64(mpmath.mpf(2) ** 1024) == float("inf")
        assert reference.nearest_float64(mpmath.mpf(2) ** -1075 * 3) == 5e-324 * 2  # 1.5 subnormal ulps: to even
