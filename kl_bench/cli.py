"""The ``kl-bench`` command.

- ``kl-bench run [--quick|--full]``: the main job: accuracy and timing of this project's kernels and
  every installed third party, cell by cell (resumable, ``--jobs``, ``--scheduler``), into tables
  and a report (``kl_bench.suite.runner``, ``kl_bench.suite.report``); exit 1 if a stable kernel misses its bound.
- ``kl-bench report DIR``: rebuild a run's report from its tables.
- ``kl-bench recommend --family F --shape BxK --dtype D``: the fastest subject meeting an accuracy
  requirement (``kl_bench.suite.recommend``).
- ``kl-bench accuracy``: an accuracy sweep (quick, closeness, conditioning, dimension, full) written
  as CSV and parquet, with the headline table printed.
- ``kl-bench baseline``: rewrite the accuracy baseline (``reports/accuracy-baseline.csv``).
- ``kl-bench check MODULE:FUNCTION --family F``: judge anyone's implementation; exit 1 if it fails.
- ``kl-bench export-cases DIR``: every named case set with its certified references, as parquet
  files and a schema (``kl_bench.suite.export``).
- ``kl-bench timing``: seconds per call, GB/s and fraction of the measured ceiling of every subject
  from tiny to memory-bound shapes, written as CSV and parquet, with the speed table printed.
Usage errors exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from . import backends
from .backends import FLOAT_DTYPES
from .families import NAMES as FAMILIES
from .kl import METHODS
from .suite import baseline, cases, reference, report, runner, tables, timing
from .suite.accuracy import accuracy_sweep
from .suite.gradients import gradient_sweep
from .suite.mixtures import CONFIDENCE_SIGMAS
from .suite.recommend import DEFAULT_MAX_ERROR
from .suite.subjects import available


def _choices(kind, allowed):
    def parse(text):
        values = [v for v in text.split(",") if v]
        unknown = [v for v in values if v not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {kind} {', '.join(unknown)}; choose from {', '.join(allowed)}")
        return values

    return parse


def _selection(parser, methods=True, backend_names=True, family_names=FAMILIES):
    if backend_names:
        parser.add_argument("--backends", type=_choices("backend", list(backends.BACKENDS)), help="comma-separated (default: all installed)")
    parser.add_argument("--families", type=_choices("family", family_names), help="comma-separated (default: all)")
    parser.add_argument("--dtypes", type=_choices("dtype", FLOAT_DTYPES), help="comma-separated (default: all)")
    if methods:
        parser.add_argument("--methods", type=_choices("method", METHODS), default=list(METHODS), help="this project's methods, comma-separated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kl-bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_run, _add_report, _add_recommend, _add_accuracy, _add_baseline, _add_check, _add_timing, _add_export):
        add(sub)
    return parser


def _add_run(sub):
    run = sub.add_parser(
        "run",
        help="the main job: accuracy and timing of every installed backend -> tables and a report",
        description="Runs the accuracy sweep (every KL family on every installed backend, device and dtype, "
        "this project's kernels and every installed third party, against certified high-precision references) "
        "and the timing sweep, cell by cell: each finished cell is stored in DIR/cells, and a run started again "
        "with the same --out reuses them. Writes the tables (parquet, CSV), environment.json and a report "
        "(report.md, report.html with plots) to DIR, prints the worst error in ulps per regime, and exits 1 if "
        "a stable kernel misses its bound.",
    )
    _selection(run, methods=False, family_names=(*FAMILIES, runner.MIXTURE))  # mixtures: kl_mixture's sweep
    size = run.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="the quick sweeps (default; about 5 minutes on 2 cores with every backend and third party and a cold reference cache)")
    size.add_argument("--full", action="store_true", help="every sweep, every timing shape and compiled mode (the publication run)")
    run.add_argument("--out", type=Path, help="output directory (default: a new folder under reports/runs/, with reports/runs/latest)")
    run.add_argument("--jobs", type=int, default=1, help="cells in parallel processes (default: 1)")
    run.add_argument("--scheduler", help="run the cells on this Dask distributed scheduler (host:port)")
    run.add_argument("--csv", type=Path, help="also write the accuracy table here")
    run.add_argument("--markdown", type=Path, help="also write the worst-ulps table here as Markdown")


def _add_report(sub):
    rep = sub.add_parser("report", help="rebuild a run's report from its tables",
                         description="Rebuilds report.md, report.html and plots/ in DIR from DIR's tables alone.")
    rep.add_argument("dir", type=Path)


def _add_recommend(sub):
    rec = sub.add_parser("recommend", help="the fastest subject meeting an accuracy requirement at a shape",
                         description="Prints the fastest subject (backend, mode, implementation) whose worst error on every "
                         "case set of the family and dtype is within --max-ulps (default: this project's promised bound "
                         "for each case set) at shape BxK, with its time, worst error, the runner-up and the line of code "
                         "that calls it. Reads a run's tables (--from, default reports/runs/latest) and measures what is "
                         "missing there. Exit 1 if nothing qualifies.")
    rec.add_argument("--family", required=True, choices=(*FAMILIES, runner.MIXTURE),
                     help="mixture: kl_mixture's approximations (variational, Monte-Carlo at several sizes), judged by "
                     "their worst absolute error over the run's mixture sweep (--max-error)")
    rec.add_argument("--shape", required=True, help="BxK, e.g. 2048x4096 (normal: B*K scalars; mixture: B pairs in K dimensions)")
    rec.add_argument("--dtype", choices=FLOAT_DTYPES, help="default float32 (mixture: float64, the only one measured)")
    rec.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    rec.add_argument("--max-ulps", type=float)
    rec.add_argument("--max-error", type=float, help="mixture only: the largest error allowed, in nats (default "
                     f"{DEFAULT_MAX_ERROR:g}; a Monte-Carlo estimate counts {CONFIDENCE_SIGMAS:g} standard errors)")
    rec.add_argument("--from", dest="source", type=Path, help="a run's directory (default: reports/runs/latest)")
    rec.add_argument("--backends", type=_choices("backend", list(backends.BACKENDS)), help="comma-separated (default: all installed)")
    rec.add_argument("--quiet", action="store_true", help="no progress lines")


def _add_accuracy(sub):
    acc = sub.add_parser("accuracy", help="an accuracy sweep -> CSV and parquet",
                         description="Every subject on every case set of a sweep; writes DIR/accuracy.csv and "
                         "DIR/accuracy.parquet and prints the worst ulps per subject and regime.")
    _selection(acc)
    acc.add_argument("--sweep", choices=cases.SWEEPS, default="quick", help="which case sets (default: quick)")
    acc.add_argument("--subjects", type=lambda t: [v for v in t.split(",") if v],
                     help="keep subjects whose name contains one of these, comma-separated (e.g. kl_bench.stable,torch.distributions)")
    acc.add_argument("--compiled", action="store_true", help="add this project's kernels under jax.jit and torch.compile")
    acc.add_argument("--out", type=Path, default=Path("reports"), help="directory for accuracy.csv / .parquet (default: reports)")
    acc.add_argument("--markdown", type=Path, help="also write the headline tables here as Markdown")
    acc.add_argument("--gradients", action="store_true",
                     help="also measure autodiff gradients against exact ones (float64; equal, near-equal, collapse) -> DIR/gradients.csv/.parquet")


def _add_baseline(sub):
    base = sub.add_parser("baseline", help="rewrite the accuracy baseline from the quick sweep",
                          description="Recomputes the quick sweep of this project's stable kernels on every "
                          "installed backend and rewrites the accuracy baseline that stability/test_baseline.py guards.")
    base.add_argument("--out", type=Path, help="baseline CSV (default: reports/accuracy-baseline.csv of this checkout, "
                      "or under the current directory when kl-bench is installed from a package)")
    base.add_argument("--merge", action="store_true", help="keep, per case set, the worse of the existing baseline and this "
                      "machine's result (linear algebra rounds differently on other CPUs)")
    base.add_argument("--quiet", action="store_true", help="no progress lines")


def _add_check(sub):
    chk = sub.add_parser("check", help="judge a KL implementation: kl-bench check MODULE:FUNCTION --family F",
                         description="Calls MODULE:FUNCTION like kl_bench.kl_<family> on every quick case set and "
                         "fails (exit 1) on a wrong shape, a negative, NaN or inf result where the exact KL is finite, or "
                         "an error above the accuracy kl-bench promises for the family and dtype (or --max-ulps), "
                         "+ cond(S_q) ulps for tril and cov. Exit 0 pass, 1 fail, 2 usage error.")
    chk.add_argument("target", help="MODULE:FUNCTION, e.g. mypkg.losses:kl_term")
    chk.add_argument("--family", required=True, choices=(*FAMILIES, runner.MIXTURE),
                     help="mixture: a function called like kl_bench.kl_mixture, judged against the bounds that bracket "
                     "the exact KL and, where it returns one, its standard error")
    chk.add_argument("--dtype", default="float64", choices=FLOAT_DTYPES)
    chk.add_argument("--backend", default="numpy", choices=list(backends.BACKENDS))
    chk.add_argument("--max-ulps", type=float, help="the allowance in ulps (default: kl-bench's promised bound for the family and dtype)")
    chk.add_argument("--gradients", action="store_true",
                     help="also judge the gradient of the sum with respect to every argument (torch: autograd; jax: jax.grad, "
                     "eagerly and under jax.jit) against exact gradients")
    chk.add_argument("--timeout", type=float, default=60.0,
                     help="seconds one call of the function (a case set) may take before it fails (default: 60)")
    chk.add_argument("--seed", type=int, default=0)
    chk.add_argument("--quiet", action="store_true", help="no progress lines")


def _add_timing(sub):
    tim = sub.add_parser("timing", help="a timing sweep -> CSV and parquet",
                         description="Times every subject (this project's stable and naive kernels in every mode, "
                         "torch.distributions, numpyro, the textbook in NumPy) on the shapes of a sweep; writes "
                         "DIR/timing.csv and DIR/timing.parquet and prints, per shape and backend, the stable kernel's "
                         "time, stable / textbook, torch.distributions / stable and the fraction of the measured ceiling.")
    tim.add_argument("--backends", type=_choices("backend", list(backends.BACKENDS)), help="comma-separated (default: all installed)")
    tim.add_argument("--device", choices=("cpu", "cuda"), help="only the subjects on this device (default: every device here)")
    tim.add_argument("--no-compiled", action="store_true", help="leave out this project's kernels under jax.jit and torch.compile")
    tim.add_argument("--families", type=_choices("family", FAMILIES), help="comma-separated (default: all)")
    tim.add_argument("--dtypes", type=_choices("dtype", FLOAT_DTYPES),
                     help="comma-separated (default: float32 for normal, diag, vae; float64 for tril, cov)")
    tim.add_argument("--sweep", choices=tuple(timing.SHAPES), default="quick", help="which shapes (default: quick)")
    tim.add_argument("--repeats", type=int, default=5, help="timed calls per measurement, at least (default: 5)")
    tim.add_argument("--out", type=Path, default=Path("reports"), help="directory for timing.csv / .parquet (default: reports)")
    tim.add_argument("--markdown", type=Path, help="also write the speed table here as Markdown")
    tim.add_argument("--quiet", action="store_true", help="no progress lines")


def _add_export(sub):
    exp = sub.add_parser("export-cases", help="write every named case set with its certified references -> DIR",
                         description="Writes DIR/<family>.parquet (one row per case: its name, regime, parameter, dtype, "
                         "the inputs as float64 lists that round-trip bit for bit, and the certified exact KL with its "
                         "error bound) and DIR/schema.json (the schema version and every column), so that another "
                         "project can test its KL against them without this package.")
    exp.add_argument("dir", type=Path)
    exp.add_argument("--sweep", choices=cases.SWEEPS, default="quick", help="which case sets (default: quick)")
    _selection(exp, methods=False, backend_names=False)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    backends.avoid_xla_cpu_hang()
    try:
        return COMMANDS[args.command](args)
    except BrokenPipeError:  # the reader went away (| head): nothing to say, and nowhere to say it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:  # a full disk, a missing permission: the environment's fault, said in one line
        where = f" ({exc.filename})" if exc.filename else ""
        return _cannot_run(f"{exc.strerror or exc}{where}; fix that and run the same command again")


def _usage_error(message: str) -> int:
    print(f"kl-bench: error: {message}", file=sys.stderr)
    return 2


def _cannot_run(message: str) -> int:
    """The tool itself could not do its work (environment, disk, a broken installation): exit 3."""
    print(f"kl-bench: {message}", file=sys.stderr)
    return 3


def _backends_or_error(args):
    names = args.backends or backends.installed()
    missing = [b for b in names if not backends.get(b).installed()]
    return names, (f"backend not installed: {', '.join(missing)}" if missing else None)


def _writable_dir(path: Path) -> str | None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        return f"cannot write to {path}: {exc.strerror or exc}"
    return None


def cmd_run(args) -> int:
    names, problem = _backends_or_error(args)
    if problem:
        return _usage_error(problem)
    if args.jobs < 1:
        return _usage_error(f"--jobs must be at least 1, got {args.jobs}")
    if args.scheduler and importlib.util.find_spec("distributed") is None:
        return _usage_error('--scheduler needs dask.distributed: pip install "kl-bench[dask]"')
    if args.out is not None and (problem := _writable_dir(args.out)):
        return _usage_error(problem)
    out = args.out or runner.new_run_dir()
    if (problem := _writable_dir(out / "cells")):  # checked before the work, not after it
        return _cannot_run(f"{problem}; choose another --out")
    reference.default_cache().usable()  # an unusable cache is said once here, and the run goes on without it
    mode = "full" if args.full else "quick"
    start = time.perf_counter()
    print(f"kl-bench run --{mode}: backends {', '.join(names)} -> {out}", file=sys.stderr)
    cells = runner.plan(mode, args.families, args.dtypes)
    try:
        with runner.locked(out):
            results, reused = runner.execute(cells, out, names, runner.PLANS[mode]["compiled"], args.jobs, args.scheduler,
                                             args.seed, args.quiet)
            frames = runner.frames({cell: results[cell] for cell in cells})
            written = _write_run(args, out, frames)
    except runner.Busy as exc:
        return _cannot_run(str(exc))
    except KeyboardInterrupt:
        done = len(list((out / "cells").glob("*.parquet")))
        print(f"\ninterrupted: {done} finished cells are stored in {out}; the same command with --out {out} resumes",
              file=sys.stderr)
        return 130
    except OSError as exc:
        return _cannot_run(f"cannot write to {out}: {exc.strerror or exc}" + (f" ({exc.filename})" if exc.filename else "")
                           + f"; the finished cells stay in {out / 'cells'}: make room and run the same command to resume")
    made = ", ".join(name for name, df in frames.items() if len(df))
    print(f"\n{len(cells)} cells ({reused} reused) in {time.perf_counter() - start:.1f} s -> {out}: tables "
          f"({made}; parquet and CSV), environment.json, {written}", file=sys.stderr)
    failed = report.failures(frames)
    if len(failed):
        print("\nStable kernels outside their bound:")
        print(failed.to_string(index=False))
        return 1
    print("\nAll stable kernels within their bounds.")
    return 0


def _write_run(args, out, frames) -> str:
    """A run's tables, environment, report and the extra files asked for; prints the worst-ulps table."""
    tables.write(out, frames)
    runner.write_environment(out, args.argv)
    md, page = report.build(out, frames)
    df = frames["accuracy"]
    worst = tables.worst_table(df) if len(df) else None
    if worst is not None:
        _print_table("Worst error in ulps of the output dtype (over backends, devices and parameters):", worst)
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(args.csv, index=False)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(tables.markdown(worst) if worst is not None else "")
    return f"{md.name}, {page.name}"


def cmd_report(args) -> int:
    if not args.dir.is_dir():
        return _usage_error(f"no such directory: {args.dir}")
    try:
        md, page = report.build(args.dir)
    except FileNotFoundError as exc:
        return _usage_error(str(exc))
    print(f"{md}, {page}")
    return 0


def cmd_recommend(args) -> int:
    from .suite import recommend

    try:
        batch, k = (int(v) for v in args.shape.lower().split("x"))
        if batch < 1 or k < 1:
            raise ValueError
    except ValueError:
        return _usage_error(f"--shape must be BxK with positive integers, e.g. 2048x4096, got {args.shape!r}")
    mixture = args.family == runner.MIXTURE
    if (problem := _recommend_options_problem(args, mixture)):
        return _usage_error(problem)
    dtype = args.dtype or ("float64" if mixture else "float32")
    max_error = DEFAULT_MAX_ERROR if args.max_error is None else args.max_error
    names, problem = _backends_or_error(args)
    if problem:
        return _usage_error(problem)
    if args.source is not None and not args.source.is_dir():
        return _usage_error(f"no such run directory: {args.source}")
    latest = runner.RUNS_DIR / "latest"
    # No run yet: start one (reports/runs/latest then points at it) rather than making "latest" a folder.
    source = args.source or (latest if latest.is_dir() else runner.new_run_dir())
    if (problem := _writable_dir(source)):
        return _usage_error(problem)
    try:
        with runner.locked(source):  # it may measure missing cells into the run
            if mixture:
                choices, measured = recommend.recommend_mixture(source, batch, k, args.device, max_error, names, args.quiet)
            else:
                choices, measured = recommend.recommend(source, args.family, batch, k, dtype, args.device, args.max_ulps, names,
                                                        args.quiet)
    except runner.Busy as exc:
        return _cannot_run(str(exc))
    if mixture:
        requirement = (f"error <= {max_error:g} nats on every case "
                       f"of the mixture sweep (a Monte-Carlo estimate: {CONFIDENCE_SIGMAS:g} standard errors); APPROXIMATE")
    else:
        requirement = f"<= {args.max_ulps:g} ulps" if args.max_ulps is not None else "within kl-bench's promised bound on every case set"
    print(f"{args.family}, {dtype}, B={batch}, k={k}, {args.device}; accuracy {requirement}"
          + (f" ({measured} cells measured into {source})" if measured else f" (from {source})"))
    if not choices:
        print("nothing measured meets that requirement")
        return 1
    for rank, choice in zip(("fastest", "runner-up"), choices):
        print(f"{rank}: {choice.subject}: {choice.seconds * 1e3:.3g} ms per call, worst error {choice.worst_error:.3g} {choice.unit} "
              f"(at most {choice.worst_share:.2g} of the requirement on every case set)")
        print(f"    {choice.code}")
    if len(choices) == 1:
        print("runner-up: none other meets the requirement")
    return 0


def _recommend_options_problem(args, mixture: bool) -> str:
    """What is wrong with recommend's options for the family, or ''."""
    if mixture and args.max_ulps is not None:
        return "--max-ulps does not apply to --family mixture (approximations, judged in nats: use --max-error)"
    if mixture and args.dtype not in (None, "float64"):
        return f"--family mixture is measured in float64 only, got --dtype {args.dtype}"
    if not mixture and args.max_error is not None:
        return "--max-error applies to --family mixture only (the other families are judged in ulps: use --max-ulps)"
    return _allowance_problem("--max-ulps", args.max_ulps) or _allowance_problem("--max-error", args.max_error)


def _allowance_problem(option: str, value: float | None) -> str:
    """An error allowance (--max-ulps, --max-error) must be a number >= 0 where given."""
    return f"{option} must be a number >= 0, got {value}" if value is not None and not value >= 0 else ""


def cmd_accuracy(args) -> int:
    names, problem = _backends_or_error(args)
    if problem:
        return _usage_error(problem)
    subjects = available(names, tuple(args.methods), args.subjects, args.compiled)
    if not subjects:
        return _usage_error("no subject matches --subjects/--backends here")
    if (problem := _writable_dir(args.out)):
        return _usage_error(problem)
    reference.default_cache().usable()
    print(f"kl-bench accuracy: {args.sweep} sweep, {len(subjects)} subjects", file=sys.stderr)
    start = time.perf_counter()
    df = accuracy_sweep(args.families, subjects, args.dtypes, args.sweep, args.seed, progress=not args.quiet)
    tables.write(args.out, {"accuracy": df})
    parts = []
    for dtype in [d for d in FLOAT_DTYPES if d in set(df.dtype)]:
        table = tables.headline(df, dtype)
        _print_table(f"Worst error in ulps, {dtype} (over backends, devices and parameters):", table)
        parts.append(f"### {dtype}\n\n" + tables.markdown(table))
    if args.gradients:
        grads = gradient_sweep(args.families, subjects, progress=not args.quiet)
        tables.write(args.out, {"gradients": grads})
        table = tables.headline(grads.assign(dtype="float64"))
        _print_table("Worst gradient error, normwise ulps, float64 (over backends and parameters):", table)
        parts.append("### gradients, float64 (normwise ulps)\n\n" + tables.markdown(table))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text("\n".join(parts))
    raised = df[df.error != ""]
    if len(raised):
        print(f"\n{len(raised)} subject x case-set rows raised (see the error column), e.g. "
              f"{raised.subject.iloc[0]} on {raised.family.iloc[0]}/{raised.dtype.iloc[0]}: {raised.error.iloc[0]}")
    print(f"\n{len(df)} rows in {time.perf_counter() - start:.1f} s -> {args.out / 'accuracy.csv'}, {args.out / 'accuracy.parquet'}",
          file=sys.stderr)
    return 0


def cmd_baseline(args) -> int:
    subjects = available(names=["kl_bench.stable"])
    df = accuracy_sweep(None, subjects, None, "quick", progress=not args.quiet)
    path = args.out or baseline.default_path()
    table = baseline.write(df, path, merge=args.merge)
    print(f"{len(table)} rows ({', '.join(sorted(set(table.subject)))}) -> {path}")
    return 0


def cmd_check(args) -> int:
    from .suite import gradient_checks
    from .suite.checker import check
    from .suite.isolation import UserFunction

    if (problem := _allowance_problem("--max-ulps", args.max_ulps)):
        return _usage_error(problem)
    if not args.timeout > 0:
        return _usage_error(f"--timeout must be a number of seconds > 0, got {args.timeout}")
    if args.gradients and (problem := gradient_checks.unsupported(args.backend)):
        return _usage_error(problem)
    module_name, _, attribute = args.target.partition(":")
    if not module_name or not attribute:
        return _usage_error(f"target must be MODULE:FUNCTION, got {args.target!r}")
    sys.path.insert(0, os.getcwd())  # as ``python -m`` does: the user's own modules import
    try:
        fn = importlib.import_module(module_name)
        for part in attribute.split("."):
            fn = getattr(fn, part)
    except Exception as exc:  # ImportError, AttributeError, or the module's own error
        return _usage_error(f"cannot load {args.target}: {type(exc).__name__}: {exc}")
    if not callable(fn):
        return _usage_error(f"{args.target} is not callable")
    if args.family == runner.MIXTURE:
        return _check_mixture(args, fn)
    reason = UserFunction(backend=args.backend, fn=fn).unavailable(args.family, args.dtype)
    if reason:  # the backend or dtype is not available here
        return _usage_error(reason)
    try:
        result = check(fn, args.family, args.dtype, args.backend, max_ulps=args.max_ulps, seed=args.seed,
                       progress=not args.quiet, timeout=args.timeout, gradients=args.gradients)
    except Exception as exc:  # the checker itself could not run: not the function's verdict
        return _cannot_run(f"the check could not run: {type(exc).__name__}: {exc}")
    print(result.report())
    return 0 if result.passed else 1


def _check_mixture(args, fn) -> int:
    from .suite import mixtures

    refused = [option for option, given in (("--gradients", args.gradients), ("--max-ulps", args.max_ulps is not None),
                                            ("--dtype", args.dtype != "float64")) if given]
    if refused:
        return _usage_error(f"{', '.join(refused)} do not apply to --family mixture (float64 cases, no ulp bound: the "
                            "bounds that bracket the KL and the function's own standard error judge it)")
    if not backends.get(args.backend).installed():
        return _usage_error(f"{args.backend} is not installed")
    try:
        result = mixtures.check(fn, args.backend, args.seed, args.timeout, progress=not args.quiet)
    except Exception as exc:  # the checker itself could not run: not the function's verdict
        return _cannot_run(f"the check could not run: {type(exc).__name__}: {exc}")
    print(result.report())
    return 0 if result.passed else 1


def cmd_timing(args) -> int:
    if args.repeats < 1:
        return _usage_error(f"--repeats must be at least 1, got {args.repeats}")
    if (problem := _writable_dir(args.out)):
        return _usage_error(problem)
    subjects = [s for s in timing.default_subjects(args.backends, compiled=not args.no_compiled)
                if args.device in (None, s.device)]
    if not subjects:
        return _usage_error(f"no subject runs on {args.device} here")
    print(f"kl-bench timing: {args.sweep} shapes, {len(subjects)} subjects", file=sys.stderr)
    start = time.perf_counter()
    df = timing.timing_sweep(args.families, subjects, args.dtypes, args.sweep, args.repeats, progress=not args.quiet)
    tables.write(args.out, {"timing": df})
    table = tables.speed_table(df)
    title = ("Stable kernel per shape and backend: ms per call, stable / textbook (same backend and mode), "
             "torch.distributions / stable (same device), GB/s of inputs, fraction of the measured ceiling:")
    _print_table(title, table)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(tables.markdown(table))
    print(f"\n{len(df)} rows in {time.perf_counter() - start:.1f} s -> {args.out / 'timing.csv'}, {args.out / 'timing.parquet'}",
          file=sys.stderr)
    return 0


def _print_table(title: str, table: pd.DataFrame) -> None:
    with pd.option_context("display.width", 250, "display.max_rows", 500, "display.max_columns", 50, "display.float_format", tables.fmt):
        print(f"\n{title}")
        print(table.to_string())


def cmd_export_cases(args) -> int:
    from .suite import export

    if (problem := _writable_dir(args.dir)):
        return _usage_error(problem)
    start = time.perf_counter()
    written = export.export(args.dir, args.sweep, args.families, args.dtypes, args.seed, progress=not args.quiet)
    print(f"{len(written)} files in {time.perf_counter() - start:.1f} s -> {args.dir}: {', '.join(p.name for p in written)}")
    return 0


COMMANDS = {"run": cmd_run, "accuracy": cmd_accuracy, "baseline": cmd_baseline, "check": cmd_check, "timing": cmd_timing,
            "report": cmd_report, "recommend": cmd_recommend, "export-cases": cmd_export_cases}


if __name__ == "__main__":
    sys.exit(main())
