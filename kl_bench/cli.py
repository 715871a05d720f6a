"""The ``kl-bench`` command."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from . import backends, sweeps
from .backends import FLOAT_DTYPES
from .kl import FAMILIES, METHODS


def _choices(kind, allowed):
    def parse(text):
        values = [v for v in text.split(",") if v]
        unknown = [v for v in values if v not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {kind} {', '.join(unknown)}; choose from {', '.join(allowed)}")
        return values

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kl-bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        help="every family on every installed backend and dtype against the mpmath references",
        description="Runs every KL family on every installed backend, device and dtype against "
        "self-validated mpmath references on the quick case set, prints the worst error in ulps per "
        "regime, and exits 1 if a stable kernel misses its bound.",
    )
    run.add_argument("--backends", type=_choices("backend", list(backends.BACKENDS)), help="comma-separated (default: all installed)")
    run.add_argument("--families", type=_choices("family", FAMILIES), help="comma-separated (default: all)")
    run.add_argument("--dtypes", type=_choices("dtype", FLOAT_DTYPES), help="comma-separated (default: all)")
    run.add_argument("--methods", type=_choices("method", METHODS), default=list(METHODS), help="comma-separated")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--csv", type=Path, help="write the tidy per-case-set table here")
    run.add_argument("--markdown", type=Path, help="write the worst-ulps table here as Markdown")
    run.add_argument("--quiet", action="store_true", help="no progress lines")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return cmd_run(args)


def cmd_run(args) -> int:
    names = args.backends or backends.installed()
    missing = [b for b in names if not backends.get(b).installed()]
    if missing:
        print(f"kl-bench: error: backend not installed: {', '.join(missing)}", file=sys.stderr)
        return 2
    print(f"kl-bench run: backends {', '.join(names)}", file=sys.stderr)
    start = time.perf_counter()
    with np.errstate(all="ignore"):  # half-precision results that truly overflow warn on the cast
        df = sweeps.accuracy(args.families, names, args.dtypes, tuple(args.methods), args.seed, progress=not args.quiet)
    table = sweeps.worst_table(df)
    with pd.option_context("display.width", 200, "display.max_rows", 500, "display.float_format", _fmt):
        print("\nWorst error in ulps of the output dtype (over backends, devices and parameters):")
        print(table.to_string())
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(args.csv, index=False)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown(table))
    failed = df[(df.method == "stable") & (df.ok != True)]  # noqa: E712 (ok is an object column)
    print(f"\n{len(df)} subject x case-set rows in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    if len(failed):
        print("\nStable kernels outside their bound:")
        print(failed[["family", "subject", "dtype", "regime", "param", "max_ulps", "bound", "negatives", "nans"]].to_string(index=False))
        return 1
    print("All stable kernels are within their bounds.")
    return 0


def markdown(table: pd.DataFrame) -> str:
    """A Markdown table of the worst-ulps pivot (no extra dependency)."""
    headers = [" / ".join(table.index.names)] + [" ".join(map(str, c)) for c in table.columns]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for index, row in table.iterrows():
        lines.append("| " + " / ".join(map(str, index)) + " | " + " | ".join(_fmt(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def _fmt(v: float) -> str:
    if pd.isna(v):
        return "-"
    if v == float("inf"):
        return "inf"
    return f"{v:.3g}" if v < 1e4 else f"{v:.1e}"


if __name__ == "__main__":
    sys.exit(main())
