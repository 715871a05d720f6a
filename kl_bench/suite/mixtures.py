"""Gaussian mixtures: the reference, the cases and the sweep of ``kl_bench.kl_mixture``.

The KL between mixtures has no closed form, so every result here is approximate, the reference
included: in one and two dimensions it is a quadrature of p ln(p/q) (``mpmath.fp.quad``,
tanh-sinh in double precision, the real line split at the components' means), with the
quadrature's error estimate; in higher dimension a Monte-Carlo run of ``REFERENCE_SAMPLES`` draws
with its standard error.

Cases (``cases(sweep)``): p has m components whose means are ``separation`` apart along the first
axis, log-variances within 0.3 of 0 and random weights; q is p with every mean moved by 0.5 and
the weights redrawn. The sweep reports, per case, the reference, the Monte-Carlo estimate (its
error in standard errors), the variational approximation and the bounds, and whether the bounds
bracket the reference.
"""

from __future__ import annotations

import functools
import math
import sys
import zlib
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

FAMILY = "mixture"  # its name where the families' names are listed (kl-bench run --families, kl-bench check --family)
SEPARATIONS = (0.0, 1.0, 2.0, 4.0, 8.0)
COUNTS = (1, 2, 4)
REFERENCE_SAMPLES = 1_000_000
NUM_SAMPLES = 4096  # the Monte-Carlo estimate the sweep judges (kl_mixture's default)
COLUMNS = ["family", "dtype", "k", "m", "separation", "seed", "reference", "reference_error", "reference_method", "mc_estimate",
           "mc_stderr", "mc_error", "mc_z", "variational", "variational_error", "lower", "upper", "brackets", "approximate"]


@dataclass(frozen=True)
class MixtureCase:
    k: int
    m: int
    separation: float
    seed: int = 0
    arrays: tuple = field(default=(), repr=False, compare=False)  # logits, loc, logvar of p, then of q

    @property
    def name(self) -> str:
        return f"mixture/k{self.k}/m{self.m}/separation{self.separation:g}/seed{self.seed}"


def generate(k: int, m: int, separation: float, seed: int = 0) -> MixtureCase:
    rng = np.random.default_rng([seed, zlib.crc32(f"mixture/{k}/{m}/{separation}".encode())])
    loc = rng.normal(scale=0.3, size=(m, k))
    loc[:, 0] += separation * (np.arange(m) - (m - 1) / 2)
    logvar = rng.uniform(-0.3, 0.3, (m, k))
    logits_p, logits_q = rng.normal(size=m), rng.normal(size=m)
    return MixtureCase(k, m, separation, seed, (logits_p, loc, logvar, logits_q, loc + 0.5, logvar))


def cases(sweep: str = "quick", seed: int = 0) -> list[MixtureCase]:
    """1-D cases over every count and separation, two 2-D ones and one in 8 dimensions (quick);
    the full sweep adds 2-D and 4-D over every separation."""
    out = [generate(1, m, s, seed) for m in COUNTS for s in SEPARATIONS]
    out += [generate(2, 2, s, seed) for s in ((1.0, 4.0) if sweep == "quick" else SEPARATIONS)]
    out += [generate(8, 3, 2.0, seed)] + ([generate(4, 2, s, seed) for s in SEPARATIONS] if sweep != "quick" else [])
    return out


def _log_density(logits, loc, logvar):
    """x -> ln of the mixture density, in Python floats (for the quadrature)."""
    log_w = logits - np.logaddexp.reduce(logits)
    components = [(float(w) - 0.5 * float(np.sum(math.log(2 * math.pi) + v)), [float(c) for c in mu], [math.exp(-float(c)) for c in v])
                  for w, mu, v in zip(log_w, loc, logvar)]

    def log_density(*x):
        terms = [a - 0.5 * sum((xi - mi) ** 2 * ii for xi, mi, ii in zip(x, mu, inv)) for a, mu, inv in components]
        top = max(terms)
        return top + math.log(sum(math.exp(t - top) for t in terms))

    return log_density


def quadrature(case: MixtureCase) -> tuple[float, float]:
    """KL(p || q) by tanh-sinh quadrature in one or two dimensions, and the error estimate."""
    from mpmath import fp

    log_p, log_q = _log_density(*case.arrays[:3]), _log_density(*case.arrays[3:])

    def integrand(*x):
        lp = log_p(*x)
        return math.exp(lp) * (lp - log_q(*x))

    locs = np.concatenate([case.arrays[1], case.arrays[4]])
    axes = [[-fp.inf, *sorted(set(np.round(locs[:, i], 6).tolist())), fp.inf] for i in range(case.k)]
    value, error = fp.quad(integrand, *axes, error=True)
    return float(value), float(error)


_REFERENCES: dict = {}  # this process's references, by the bytes of the case's arrays (a 2-D quadrature takes seconds)


def reference(case: MixtureCase) -> tuple[float, float, str]:
    """(value, error, method): quadrature for k <= 2, else a large Monte-Carlo run (the error its
    standard error), in chunks."""
    key = tuple((np.shape(a), np.asarray(a, dtype=np.float64).tobytes()) for a in case.arrays) + (case.seed,)
    if key not in _REFERENCES:
        _REFERENCES[key] = _reference(case)
    return _REFERENCES[key]


def _reference(case: MixtureCase) -> tuple[float, float, str]:
    if case.k <= 2:
        return (*quadrature(case), "quadrature")
    from .. import kl_mixture

    chunks = [kl_mixture(*case.arrays, num_samples=REFERENCE_SAMPLES // 10, seed=[case.seed, 1, i]) for i in range(10)]
    estimates = np.array([float(c.estimate) for c in chunks])
    stderrs = np.array([float(c.stderr) for c in chunks])
    return float(estimates.mean()), float(np.sqrt(np.sum(stderrs**2)) / len(chunks)), "monte-carlo"


def judged(case: MixtureCase) -> dict:
    """The row of one case: every approximation against the reference."""
    from .. import kl_mixture

    value, error, how = reference(case)
    mc = kl_mixture(*case.arrays, num_samples=NUM_SAMPLES, seed=case.seed)
    variational = float(kl_mixture(*case.arrays, method="variational").estimate)
    mc_error = float(mc.estimate) - value
    spread = math.hypot(float(mc.stderr), error)
    slack = error + 1e-12 * max(1.0, abs(value))  # the reference's own uncertainty
    return {"family": FAMILY, "dtype": "float64", "k": case.k, "m": case.m, "separation": case.separation, "seed": case.seed,
            "reference": value, "reference_error": error, "reference_method": how, "mc_estimate": float(mc.estimate),
            "mc_stderr": float(mc.stderr), "mc_error": mc_error, "mc_z": mc_error / spread if spread > 0 else 0.0,
            "variational": variational, "variational_error": variational - value, "lower": float(mc.lower),
            "upper": float(mc.upper), "brackets": bool(float(mc.lower) - slack <= value <= float(mc.upper) + slack),
            "approximate": True}


def mixture_sweep(sweep: str = "quick", seed: int = 0, progress: bool = True) -> pd.DataFrame:
    """One row per case of ``cases(sweep)``: a tidy DataFrame with the columns ``COLUMNS``."""
    rows = []
    for case in cases(sweep, seed):
        if progress:
            print(f"  {case.name}", file=sys.stderr, flush=True)
        rows.append(judged(case))
    return pd.DataFrame(rows, columns=COLUMNS)


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per dimension and component count: the worst absolute error of each approximation, the
    largest |z| of the Monte-Carlo estimate, the widest bracket and the share of cases the bounds
    bracketed (1: all)."""
    return df.assign(width=df.upper - df.lower).groupby(["k", "m"]).agg(
        cases=("reference", "size"), worst_mc_error=("mc_error", lambda e: e.abs().max()), worst_mc_z=("mc_z", lambda z: z.abs().max()),
        worst_variational_error=("variational_error", lambda e: e.abs().max()),
        widest_bracket=("width", "max"), bracketed=("brackets", "mean")).reset_index()


# -- kl-bench check --family mixture ------------------------------------------------------------

CHECK_SIGMAS = 4.0  # a function that states its standard error must be within this many of the reference
CHECK_RULE = (f"allowed: inside the bounds that bracket the exact KL, and within {CHECK_SIGMAS:g} standard errors of the "
              "reference where the function returns one (exactly 0 for two identical mixtures without one); "
              "mixture results are approximate")


@dataclass(frozen=True)
class MixtureCheck:
    """One row per case of ``check``; ``passed``: the verdict."""

    cases: pd.DataFrame
    passed: bool
    target: str = "your_kl"

    def report(self) -> str:
        failures = int((~self.cases.passed).sum())
        lines = [f"{'PASS' if self.passed else 'FAIL'}: {failures} of {len(self.cases)} cases fail ({CHECK_RULE})", ""]
        shown = self.cases[["case", "computed", "stderr", "reference", "lower", "upper", "reason"]]
        with pd.option_context("display.width", 250, "display.max_colwidth", 90):
            lines.append(shown.to_string(index=False, float_format=lambda v: f"{v:.6g}"))
        return "\n".join(lines)


def _estimate_and_stderr(fn, backend):
    """``fn`` with a tuple result (a named tuple like ``kl_bench.MixtureKL``) reduced to one array
    of its first two entries, the estimate and its standard error, for the worker to send back."""
    def call(*args):
        out = fn(*args)
        if isinstance(out, tuple):
            from .. import backends

            xp = backends.get(backend).xp
            out = xp.stack([xp.asarray(v) for v in out[:2]])
        return out

    return call


def check_cases(seed: int = 0) -> list[MixtureCase]:
    """The quick cases, then two identical mixtures (the exact KL is 0)."""
    same = generate(2, 2, 1.0, seed)
    return cases("quick", seed) + [MixtureCase(2, 2, 1.0, seed, same.arrays[:3] * 2)]


def _judged_call(values, problem, case, exact, error) -> dict:
    from .. import kl_mixture

    bounds = kl_mixture(*case.arrays, method="variational")
    lower, upper = float(bounds.lower), float(bounds.upper)
    row = {"case": case.name + ("/identical" if exact == 0 else ""), "computed": np.nan, "stderr": np.nan, "reference": exact,
           "lower": lower, "upper": upper, "passed": False, "reason": problem}
    if problem:
        return row
    values = np.ravel(np.asarray(values, dtype=np.float64))
    if values.size not in (1, 2):
        return row | {"reason": f"returned {values.size} numbers (expected an estimate, or a tuple that starts with it "
                                "and its standard error)"}
    estimate, stderr = values[0], (values[1] if values.size == 2 else None)
    row |= {"computed": estimate, "stderr": np.nan if stderr is None else stderr}
    slack = error + 1e-12 * max(1.0, abs(exact))
    spread = math.hypot(stderr or 0.0, error)
    if not np.isfinite(estimate):
        why = "not finite where the exact KL is"
    elif not lower - slack <= estimate <= upper + slack:
        why = f"outside the bounds [{lower:.6g}, {upper:.6g}] that bracket the exact KL"
    elif abs(estimate - exact) > CHECK_SIGMAS * spread and (stderr is not None or exact == 0):
        why = (f"{abs(estimate - exact) / spread:.3g} standard errors from the reference" if spread > 0
               else "not exactly 0 for two identical mixtures")
    else:
        why = ""
    return row | {"passed": not why, "reason": why}


def check(fn, backend: str = "numpy", seed: int = 0, timeout: float | None = None, progress: bool = False) -> MixtureCheck:
    """Judge ``fn``, called like ``kl_bench.kl_mixture`` (the six arrays of one pair of mixtures,
    in ``backend``'s float64) and returning an estimate, or a tuple whose first two entries are the
    estimate and its standard error, on ``check_cases``; it runs in a worker process
    (``isolation``)."""
    from .isolation import DEFAULT_TIMEOUT, Isolated, target_name

    rows = []
    with Isolated(_estimate_and_stderr(fn, backend), backend, timeout or DEFAULT_TIMEOUT) as isolated:
        for case in check_cases(seed):
            if progress:
                print(f"  {case.name}", file=sys.stderr, flush=True)
            identical = all(np.array_equal(a, b) for a, b in zip(case.arrays[:3], case.arrays[3:]))
            exact, error, _ = (0.0, 0.0, "exact") if identical else reference(case)
            values, problem = isolated.call(FAMILY, case.arrays, "float64")
            rows.append(_judged_call(values, problem, case, exact, error))
    df = pd.DataFrame(rows)
    return MixtureCheck(df, bool(df.passed.all()), target_name(fn))



# -- speed, and the approximations' error for kl-bench recommend --family mixture ----------------

SAMPLE_COUNTS = (1024, 4096, 16384, 65536)  # the Monte-Carlo sizes timed and judged
TIMING_COMPONENTS = 4  # m of the timed mixtures (both p and q)
TIMING_SHAPES = ((8, 8),)  # (B, k) of kl-bench run's mixture timing cell
TIMING_MEMORY_LIMIT = 2**28  # bytes: a call holds about B x draws x m x k float64 numbers at once
TIMING_COLUMNS = ["family", "subject", "backend", "device", "dtype", "method", "num_samples", "B", "k", "m", "seconds", "error"]
CONFIDENCE_SIGMAS = 4.0  # a Monte-Carlo estimate's error, for recommend: this many standard errors


def approximations() -> list[tuple[str, int]]:
    """(method, num_samples) of every approximation timed and judged (0 draws: the variational one)."""
    return [("variational", 0)] + [("mc", n) for n in SAMPLE_COUNTS]


def approximation_label(method: str, num_samples: int) -> str:
    return "variational" if method == "variational" else f"mc, {num_samples} draws"


def timing_subjects(backend_names=None) -> list:
    """Where ``kl_mixture`` is timed: this project's array path on every backend and device here."""
    from .subjects import ARRAY, available

    return [s for s in available(backend_names, methods=("stable",)) if s.ours and s.mode == ARRAY]


def timing_sweep(batch: int, k: int, backend_names=None, repeats: int = 5, progress: bool = False) -> pd.DataFrame:
    """Seconds per call of ``kl_mixture`` with every approximation, on every backend and device,
    at B pairs of mixtures of ``TIMING_COMPONENTS`` components in k dimensions (float64): a tidy
    DataFrame with the columns ``TIMING_COLUMNS``. A Monte-Carlo size whose draws would hold more
    than ``TIMING_MEMORY_LIMIT`` bytes is not timed (the row says so)."""
    from .. import kl_mixture
    from .timing import median_seconds

    case = generate(k, TIMING_COMPONENTS, 2.0)
    arrays = [np.broadcast_to(a, (batch, *np.shape(a))) for a in case.arrays]
    rows = []
    for subject in timing_subjects(backend_names):
        with subject.be.computing("float64"):
            given = [subject.asarray(np.ascontiguousarray(a), "float64") for a in arrays]
            for method, n in approximations():
                row = {"family": FAMILY, "subject": f"kl_mixture[{subject.backend}-{subject.device}]", "backend": subject.backend,
                       "device": subject.device, "dtype": "float64", "method": method, "num_samples": n, "B": batch, "k": k,
                       "m": TIMING_COMPONENTS, "seconds": np.nan, "error": ""}
                if batch * n * TIMING_COMPONENTS * k * 8 > TIMING_MEMORY_LIMIT:
                    rows.append(row | {"error": f"not timed: its draws would hold more than {TIMING_MEMORY_LIMIT >> 20} MiB"})
                    continue
                if progress:
                    print(f"  timing mixture B={batch} k={k} {row['subject']} {approximation_label(method, n)}", file=sys.stderr, flush=True)
                options = {"method": method} | ({"num_samples": n, "seed": 0} if n else {})
                row["seconds"] = median_seconds(functools.partial(kl_mixture, *given, **options), subject.be, repeats)
                rows.append(row)
    return pd.DataFrame(rows, columns=TIMING_COLUMNS)


def approximation_errors(sweep: pd.DataFrame) -> pd.DataFrame:
    """Per approximation, its worst error over the sweep's cases (nats): the variational one's
    distance from the reference plus the reference's own error; a Monte-Carlo estimate's
    ``CONFIDENCE_SIGMAS`` standard errors, scaled from the sweep's ``NUM_SAMPLES`` draws to its own
    by 1/sqrt(draws) (it is unbiased: its error is its spread)."""
    variational = float((sweep.variational_error.abs() + sweep.reference_error).max())
    spread = float(sweep.mc_stderr.max())
    worst = [variational if method == "variational" else CONFIDENCE_SIGMAS * spread * math.sqrt(NUM_SAMPLES / n)
             for method, n in approximations()]
    return pd.DataFrame({"method": [m for m, _ in approximations()], "num_samples": [n for _, n in approximations()],
                         "worst_error": worst})


def timing_table(df: pd.DataFrame) -> pd.DataFrame:
    """ms per call: one row per shape and approximation, one column per backend and device."""
    df = df[df.error.fillna("") == ""].assign(where=lambda d: d.backend + "-" + d.device, ms=lambda d: d.seconds * 1e3)
    table = df.pivot_table(index=["B", "k", "m", "method", "num_samples"], columns="where", values="ms", aggfunc="min")
    labels = [(b, k, m, approximation_label(method, n)) for b, k, m, method, n in table.index]  # draws in numeric order
    table.index = pd.MultiIndex.from_tuples(labels, names=["B", "k", "m", "approximation"])
    return table
