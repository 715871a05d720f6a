"""``kl-bench export-cases DIR``: every named case set with its certified references, as files that
another project can test its KL against without this package, mpmath or any backend.

DIR gets one parquet file per family (``<family>.parquet``, one row per case) and ``schema.json``,
which names ``SCHEMA_VERSION`` and every column. The inputs are float64 list columns, one per
argument, in the order of ``kl_bench.kl_<family>``, matrices flattened row by row (k x k), so they
round-trip bit for bit; each case's exact KL is ``exact_mantissa * 2**exact_exponent`` (integers, as
strings), within ``2**radius_log2`` of the true value (``radius_log2`` null: exactly it), and
``exact`` is that value rounded to the nearest float64 (inf beyond float64's range).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import pandas as pd

from .. import families
from . import cases, reference

SCHEMA_VERSION = 1
LABELS = ["case_set", "family", "regime", "param", "dtype", "k", "seed", "case"]
CERTIFICATE = ["exact", "exact_mantissa", "exact_exponent", "radius_log2", "prec"]


def schema() -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "files": "one <family>.parquet per family, one row per case",
        "columns": {
            "case_set": "the case set's name: family/regime[@param]/dtype/k<k>/seed<seed>",
            "family, regime, param, dtype, k, seed": "what the name says; param is null where the regime has none",
            "case": "the case's index in its case set",
            "<argument>": "float64 list: the argument of kl_bench.kl_<family> for this case (already rounded to dtype), "
                          "matrices flattened row by row",
            "exact": "the exact KL rounded to the nearest float64",
            "exact_mantissa, exact_exponent": "the certified value, exactly: int(exact_mantissa) * 2**int(exact_exponent)",
            "radius_log2": "|certified value - exact KL| <= 2**radius_log2; null when the certified value is the exact KL",
            "prec": "the working precision (bits) of the ball arithmetic that certified it; 0: none was needed",
        },
        "arguments": {f.name: [{"name": a.name, "kind": a.kind, "core_ndim": a.core_ndim} for a in f.args]
                      for f in families.TABLE.values()},
    }


def rows(case: cases.CaseSet) -> list[dict]:
    """One row per case of a case set, with its inputs and certificate."""
    certificates = reference.certificates(case.family, *case.arrays)
    names = families.get(case.family).names
    out = []
    for i in range(case.n):
        certified = certificates[i]
        man, exp = reference.mantissa_exponent(certified.value)
        out.append({"case_set": case.name, "family": case.family, "regime": case.regime, "param": case.param,
                    "dtype": case.dtype, "k": case.k, "seed": case.seed, "case": i,
                    **{name: a[i].ravel().tolist() for name, a in zip(names, case.arrays)},
                    "exact": reference.nearest_float64(certified.value), "exact_mantissa": str(man),
                    "exact_exponent": str(exp), "radius_log2": certified.radius_log2, "prec": certified.prec})
    return out


def export(out: Path, sweep: str = "quick", family_names=None, dtypes=None, seed: int = 0, progress: bool = True) -> list[Path]:
    """Write every case set of ``sweep`` to ``out``; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for family in family_names or families.NAMES:
        found = []
        for dtype in dtypes or cases.LIMITS:
            for case in cases.case_sets(family, dtype, sweep, seed=seed):
                if progress:
                    print(f"  {case.name}", file=sys.stderr, flush=True)
                found += rows(case)
        table = pd.DataFrame(found, columns=LABELS + list(families.get(family).names) + CERTIFICATE)
        written.append(_atomic(out / f"{family}.parquet", lambda path, df=table: df.to_parquet(path, index=False)))
    written.append(_atomic(out / "schema.json", lambda path: Path(path).write_text(json.dumps(schema(), indent=2) + "\n")))
    return written


def _atomic(path: Path, write) -> Path:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp's files are private; these are for others to read
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
