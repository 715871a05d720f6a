"""The main job: accuracy and timing sweeps split into cells, each stored as it finishes.

A cell is one (kind, family, dtype, part): an accuracy cell runs every subject on the case sets of
one sweep part ("quick", "closeness", ...), a timing cell times every subject at one shape, the
mixture cell runs ``kl_mixture``'s sweep (``suite/mixtures.py``; approximate by nature) and a
mixture_timing cell times its approximations at one shape. Cells
are independent: accuracy cells run serially, in ``--jobs`` processes or on a Dask cluster
(``--scheduler``); timing cells run in this process one at a time. Each is written atomically to ``DIR/cells/<name>.parquet`` when it
finishes. A run started again with the same directory reuses every cell file that reads back
whole and was made the way this run would make it (``record``: the cell, seed, subjects, compiled modes,
package and reference versions, a digest of kl-bench's own source), with rows that match that record; any other is computed again and the
run says why. ``locked`` keeps a second run out of a directory in use.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .. import backends, families
from . import accuracy, mixtures, timing
from .subjects import available

# What --quick and --full measure: accuracy sweep parts, and timing shapes (timing.SHAPES).
PLANS = {
    "quick": {"accuracy": ("quick",), "timing": "quick", "compiled": False},
    "full": {"accuracy": ("full",), "timing": "full", "compiled": True},
}
RUNS_DIR = Path("reports") / "runs"
MIXTURE = mixtures.FAMILY  # the cell (and --families name) of kl_mixture's sweep
MIXTURE_TIMING = "mixture_timing"  # the cells (and table) of kl_mixture's speed


@dataclass(frozen=True)
class Cell:
    kind: str  # "accuracy", "timing" or "mixture"
    family: str
    dtype: str
    part: str  # the sweep part (accuracy) or "BxK" (timing)

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.family}-{self.dtype}-{self.part}"


def plan(mode: str = "quick", family_names=None, dtypes=None) -> list[Cell]:
    """Every cell of a run, in the order they are started."""
    spec = PLANS[mode]
    cells = []
    chosen = [f for f in family_names or families.NAMES if f != MIXTURE]
    for family in chosen:
        for dtype in dtypes or backends.FLOAT_DTYPES:
            cells += [Cell("accuracy", family, dtype, part) for part in spec["accuracy"]]
    for family in chosen:
        for dtype in [d for d in timing.default_dtypes(family) if not dtypes or d in dtypes]:
            cells += [Cell("timing", family, dtype, f"{b}x{k}") for b, k in timing.shapes(family, spec["timing"])]
    if (family_names is None or MIXTURE in family_names) and (not dtypes or "float64" in dtypes):
        cells.append(Cell(MIXTURE, MIXTURE, "float64", mode))
        cells += [Cell(MIXTURE_TIMING, MIXTURE, "float64", f"{b}x{k}") for b, k in mixtures.TIMING_SHAPES]
    return cells


def compute(cell: Cell, backend_names, compiled: bool, seed: int = 0) -> pd.DataFrame:
    """The rows of one cell (run in this process, a worker process or a Dask worker); ``compiled``
    adds this project's kernels under jax.jit and torch.compile."""
    backends.avoid_xla_cpu_hang()
    if cell.kind == "accuracy":
        subjects = available(backend_names, compiled=compiled)
        return accuracy.accuracy_sweep([cell.family], subjects, [cell.dtype], cell.part, seed, progress=False)
    if cell.kind == MIXTURE:
        return mixtures.mixture_sweep(cell.part, seed, progress=False)
    batch, k = (int(v) for v in cell.part.split("x"))
    if cell.kind == MIXTURE_TIMING:
        return mixtures.timing_sweep(batch, k, backend_names)
    subjects = timing.default_subjects(backend_names, compiled)
    # An interrupted cell must not be stored as finished: the interrupt goes through.
    return timing.timing_sweep([cell.family], subjects, [cell.dtype], at=[(batch, k)], progress=False, keep_partial=False)


# -- storage ----------------------------------------------------------------------------------


CELL_FORMAT = 1
RECORD_KEY = b"kl_bench_cell"


def cell_path(out: Path, cell: Cell) -> Path:
    return out / "cells" / f"{cell.name}.parquet"


def record(cell: Cell, backend_names, compiled: bool, seed: int) -> dict:
    """What produces a cell: it is reused only by a run that would produce it the same way."""
    from .. import __version__
    from .reference import REFERENCE_VERSION

    subjects = {"accuracy": lambda: available(backend_names, compiled=compiled), MIXTURE: list,
                MIXTURE_TIMING: lambda: mixtures.timing_subjects(backend_names),
                "timing": lambda: timing.default_subjects(backend_names, compiled)}[cell.kind]()
    return {"format": CELL_FORMAT, "cell": cell.name, "seed": seed, "compiled": compiled,
            "subjects": sorted(s.name for s in subjects), "kl_bench": __version__, "reference": REFERENCE_VERSION,
            "versions": _versions(), "source": _source_digest()}


@functools.cache
def _source_digest() -> str:
    """SHA-256 of kl-bench's Python source: a kernel changed under the same version number makes
    its earlier cells stale."""
    package = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _versions() -> dict:
    import importlib.metadata

    found = {}
    for package in ("numpy", "scipy", "mpmath", "python-flint", "torch", "jax", "jaxlib", "numba", "numpyro"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


_WORDS = {"subjects": "set of subjects", "versions": "set of package versions", "kl_bench": "kl-bench version",
          "reference": "reference version", "format": "cell format",
          "source": "kl-bench source"}


class Busy(RuntimeError):
    """Another kl-bench process holds the output directory."""


@contextlib.contextmanager
def locked(out: Path):
    """Hold ``out`` for this process: a second run (or recommend) into it raises ``Busy`` at once,
    naming the process that holds it. The lock goes with the process, however it ends."""
    out.mkdir(parents=True, exist_ok=True)
    handle = open(out / ".kl-bench.lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise Busy(f"{out} is in use by another kl-bench run ({holder}); wait for it to finish or choose another --out") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}")
    handle.flush()
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def store(out: Path, cell: Cell, df: pd.DataFrame, made: dict) -> None:
    """Write a cell with the record of what made it, atomically: a temporary file in the same
    directory, then a rename."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = cell_path(out, cell)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(df, preserve_index=False)
    metadata = {**(table.schema.metadata or {}), RECORD_KEY: json.dumps(made | {"rows": len(df)}).encode()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{cell.name}.", suffix=".tmp")
    os.close(fd)
    try:
        pq.write_table(table.replace_schema_metadata(metadata), tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load(out: Path, cell: Cell, expected: dict) -> tuple[pd.DataFrame | None, str]:
    """A finished cell that this run would have made itself, or (None, why it is not reused; "" when
    there is none)."""
    import pyarrow.parquet as pq

    path = cell_path(out, cell)
    if not path.exists():
        return None, ""
    try:
        table = pq.read_table(path)
        made = json.loads((table.schema.metadata or {})[RECORD_KEY])
        df = table.to_pandas()
    except KeyError:
        return None, "it has no record of what made it"
    except Exception:  # truncated or corrupt: computed again
        return None, "it is unreadable (truncated or corrupt)"
    differ = [key for key in expected if made.get(key) != expected[key]]
    if differ:
        return None, "it was made with another " + "; ".join(
            f"{key} {made.get(key)!r} (this run: {expected[key]!r})" if key in ("seed", "cell", "compiled") else _WORDS.get(key, key)
            for key in differ)
    if len(df) != made.get("rows") or (len(df) and (set(df.family) != {cell.family} or set(df.dtype) != {cell.dtype})):
        return None, "its rows do not match its record"
    return df, ""


# -- running ----------------------------------------------------------------------------------


class Progress:
    """A tqdm bar on a terminal, plain lines otherwise (both on stderr)."""

    def __init__(self, total: int, quiet: bool = False):
        self.quiet, self.done, self.total = quiet, 0, total
        self.bar = None
        if not quiet and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, file=sys.stderr, unit="cell")

    def step(self, label: str) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix_str(label, refresh=False)
            self.bar.update(1)
        elif not self.quiet:
            print(f"  [{self.done}/{self.total}] {label}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def execute(cells, out: Path, backend_names, compiled: bool, jobs: int = 1, scheduler: str | None = None,
            seed: int = 0, quiet: bool = False) -> tuple[dict, int]:
    """Run the cells not already stored in ``out``; returns ({cell: rows}, number reused)."""
    results, todo, made = {}, [], {cell: record(cell, backend_names, compiled, seed) for cell in cells}
    for cell in cells:
        df, why = load(out, cell, made[cell])
        if df is None:
            todo.append(cell)
            if why and not quiet:
                print(f"cell {cell.name} is computed again: {why}", file=sys.stderr)
        else:
            results[cell] = df
    reused = len(results)
    if not quiet:
        print(f"{len(cells)} cells: {reused} reused from {out}, {len(todo)} to compute", file=sys.stderr)
    progress = Progress(len(todo), quiet)

    def finished(cell, df):
        store(out, cell, df, made[cell])
        results[cell] = load(out, cell, made[cell])[0]  # the tables always come from stored cells: a resumed run gives the same
        progress.step(cell.name)

    # Accuracy cells may run anywhere at once; timing cells run here, one at a time, so that they
    # measure this machine (the one environment.json describes) without contention.
    spread = [c for c in todo if c.kind == "accuracy"] if (scheduler or jobs > 1) else []
    here = [c for c in todo if c not in spread]
    try:
        if spread and scheduler:
            from distributed import Client
            from distributed import as_completed as dask_completed

            with Client(scheduler) as client:
                futures = {client.submit(compute, c, backend_names, compiled, seed, pure=False): c for c in spread}
                for future in dask_completed(futures):
                    finished(futures[future], future.result())
        elif spread:
            with ProcessPoolExecutor(jobs) as pool:
                futures = {pool.submit(compute, c, backend_names, compiled, seed): c for c in spread}
                for future in as_completed(futures):
                    finished(futures[future], future.result())
        for cell in here:
            finished(cell, compute(cell, backend_names, compiled, seed))
    finally:
        progress.close()
    return results, reused


def frames(results: dict) -> dict[str, pd.DataFrame]:
    """The tidy tables of a run, in plan order: accuracy, timing, mixture and mixture_timing."""
    out = {}
    for kind, columns in (("accuracy", accuracy.COLUMNS), ("timing", timing.COLUMNS), (MIXTURE, mixtures.COLUMNS),
                          (MIXTURE_TIMING, mixtures.TIMING_COLUMNS)):
        parts = [df for cell, df in results.items() if cell.kind == kind and len(df)]
        out[kind] = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)
    return out


def environment(argv) -> dict:
    """Machine, versions, git revision and the command line of a run."""
    info = timing.machine()
    try:
        info["git_revision"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                              cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["git_revision"] = None
    info["command"] = " ".join(["kl-bench", *argv])
    return info


def write_environment(out: Path, argv) -> None:
    (out / "environment.json").write_text(json.dumps(environment(argv), indent=2) + "\n")


def new_run_dir() -> Path:
    """A new folder under reports/runs/ (named by the time), with reports/runs/latest pointing at it."""
    stamp = pd.Timestamp.now().strftime("%Y%m%d-%H%M%S")
    out = RUNS_DIR / stamp
    n = 1
    while out.exists():
        n += 1
        out = RUNS_DIR / f"{stamp}-{n}"
    out.mkdir(parents=True)
    latest = RUNS_DIR / "latest"
    if latest.is_symlink() or latest.exists():
        latest.unlink()
    latest.symlink_to(out.name)
    return out

