"""A run's report, from its tables alone: Markdown and a self-contained HTML page with PNG plots
(matplotlib) of error versus closeness, error versus condition number, error by dtype, time versus
size and the fraction of the copy bandwidth reached."""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .. import families
from ..backends import FLOAT_DTYPES
from . import mixtures, tables

PLOTS = {
    "error-vs-closeness": "Worst error (ulps, {dtype}) versus closeness of p and q",
    "error-vs-condition": "Worst error (ulps, {dtype}) versus cond(S_q)",
    "error-by-dtype": "Worst error (ulps) by dtype, over families, regimes and backends",
    "time-vs-size": "Seconds per call versus B x k",
    "bandwidth-fraction": "Fraction of the measured copy bandwidth (diagonal families)",
}


def _label(subject: pd.Series) -> pd.Series:
    return subject.str.split("[", regex=False).str[0]


def _ulps_floor(values):
    # 0 ulps drawn at 0.1 on the log axis, inf (a finite KL computed as inf) at 1e30
    return np.clip(values.astype(float), 0.1, 1e30)


@dataclass
class _Canvas:
    """Where the plots go, with one colour per line name (the same in every panel and plot) and the
    dtype that the accuracy plots show."""

    plt: object
    plots_dir: Path
    color: dict
    dtype: str
    made: list = field(default_factory=list)

    def panels(self, names):
        """One panel per family, three to a row; the legend goes right of the panels."""
        n = max(len(names), 1)
        cols = min(n, 3)
        rows = -(-n // cols)
        fig, axes = self.plt.subplots(rows, cols, figsize=(4.2 * cols + 3.0, 3.3 * rows), squeeze=False)
        flat = list(axes.flat)
        for ax in flat[n:]:
            ax.remove()
        return fig, dict(zip(names, flat))

    def save(self, fig, name, axes=None):
        if axes is not None:  # a legend for all the panels
            handles = {}
            for ax in axes.values():
                for h, label in zip(*ax.get_legend_handles_labels()):
                    handles.setdefault(label, h)
            fig.legend(list(handles.values()), list(handles), loc="center right", fontsize=7, frameon=False)
            fig.subplots_adjust(right=1 - 2.9 / fig.get_figwidth(), hspace=0.5, wspace=0.3, top=0.86)
        fig.suptitle(PLOTS[name].format(dtype=self.dtype), fontsize=10)
        fig.savefig(self.plots_dir / f"{name}.png", dpi=90)
        self.plt.close(fig)
        self.made.append(name)


def plot_all(frames: dict[str, pd.DataFrame], plots_dir: Path) -> list[str]:
    """Write the plots that the tables have data for; returns their names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots_dir.mkdir(parents=True, exist_ok=True)
    acc = frames.get("accuracy", pd.DataFrame())
    tim = frames.get("timing", pd.DataFrame())
    if len(acc):
        acc = acc[acc.error.fillna("") == ""].assign(label=lambda d: _label(d.subject))
    if len(tim):
        tim = tim[tim.error.fillna("") == ""].assign(size=lambda d: d.B * d.k)
    names = sorted(set(acc.get("label", [])) | set(tim.get("subject", [])))
    palette = plt.get_cmap("tab20").colors
    # The accuracy plots show one dtype: float64 where the run has it.
    dtypes = list(acc.get("dtype", []))
    dtype = "float64" if "float64" in dtypes else (max(set(dtypes), key=dtypes.count) if dtypes else "float64")
    canvas = _Canvas(plt, plots_dir, {name: palette[i % len(palette)] for i, name in enumerate(names)}, dtype)
    if len(acc):
        _error_vs_closeness(canvas, acc[acc.dtype == dtype])
        _error_vs_condition(canvas, acc[acc.dtype == dtype])
        _error_by_dtype(canvas, acc)
    if len(tim):
        _versus_size(canvas, tim, "seconds", "time-vs-size", yscale="log", ylabel="seconds")
        _versus_size(canvas, tim[~tim.family.map(lambda f: families.get(f).full)], "roofline_fraction",
                     "bandwidth-fraction", ylabel="fraction of copy bandwidth")
    return canvas.made


def _error_vs_closeness(canvas, acc):
    close = acc[acc.regime.isin(["near-equal", "collapse"]) & acc.param.notna()]
    if not len(close):
        return
    fig, axes = canvas.panels(sorted(set(close.family)))
    for family, ax in axes.items():
        part = close[close.family == family].groupby(["label", "param"]).max_ulps.max().reset_index()
        for label, line in part.groupby("label"):
            ax.plot(line.param, _ulps_floor(line.max_ulps), marker="o", ms=3, label=label, color=canvas.color[label])
        ax.set(xscale="log", yscale="log", xlabel="closeness", ylabel="ulps", title=family)
    canvas.save(fig, "error-vs-closeness", axes)


def _error_vs_condition(canvas, acc):
    cond = acc[acc.cond.notna()]
    if not len(cond):
        return
    fig, axes = canvas.panels(sorted(set(cond.family)))
    for family, ax in axes.items():
        for label, points in cond[cond.family == family].groupby("label"):
            ax.scatter(points.cond, _ulps_floor(points.max_ulps), s=10, label=label, color=canvas.color[label])
        ax.set(xscale="log", yscale="log", xlabel="cond(S_q), median of the case set", ylabel="ulps", title=family)
    canvas.save(fig, "error-vs-condition", axes)


def _error_by_dtype(canvas, acc):
    worst = acc.pivot_table(index="label", columns="dtype", values="max_ulps", aggfunc="max")
    fig, ax = canvas.plt.subplots(figsize=(8, 3.6))
    width = 0.8 / max(len(worst.columns), 1)
    for i, dtype in enumerate(worst.columns):
        ax.bar(np.arange(len(worst)) + i * width, _ulps_floor(worst[dtype].fillna(0)), width, label=dtype)
    ax.set_xticks(np.arange(len(worst)) + 0.4 - width / 2, worst.index, rotation=20, ha="right", fontsize=7)
    ax.set(yscale="log", ylabel="worst ulps")
    ax.legend(fontsize=7)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    canvas.save(fig, "error-by-dtype")


def _versus_size(canvas, tim, column, name, **axis):
    """One line per subject of ``column`` against B x k, a panel per family."""
    if not len(tim):
        return
    fig, axes = canvas.panels(sorted(set(tim.family)))
    for family, ax in axes.items():
        for subject, line in tim[tim.family == family].groupby("subject"):
            line = line.sort_values("size")
            ax.plot(line["size"], line[column], marker="o", ms=3, label=subject, color=canvas.color[subject])
        ax.set(xscale="log", xlabel="B x k", title=family, **axis)
    canvas.save(fig, name, axes)


def sections(frames: dict[str, pd.DataFrame]) -> list[tuple[str, pd.DataFrame]]:
    """(title, table) of the report: worst ulps per implementation and dtype, then the speed table."""
    out = []
    acc = frames.get("accuracy")
    if acc is not None and len(acc):
        for dtype in [d for d in FLOAT_DTYPES if d in set(acc.dtype)]:
            out.append((f"Worst error in ulps, {dtype} (over backends, devices and parameters)", tables.headline(acc, dtype)))
    tim = frames.get("timing")
    if tim is not None and len(tim):
        out.append(("Speed: the stable kernel per shape and backend (ms; stable / textbook on the same backend and mode; "
                    "torch.distributions / stable on the same device; GB/s; fraction of the ceiling)", tables.speed_table(tim)))
    mix = frames.get("mixture")
    if mix is not None and len(mix):
        out.append(("Gaussian mixtures, kl_mixture (APPROXIMATE: no closed form; the reference is a quadrature in 1 and 2 "
                    "dimensions and a Monte-Carlo run above; errors are absolute, in nats; mc_z is the Monte-Carlo "
                    "estimate's error in standard errors; widest_bracket: upper - lower; bracketed: the share of cases "
                    "whose reference the bounds held)",
                    mixtures.summary(mix).set_index(["k", "m"])))
    mix_time = frames.get("mixture_timing")
    if mix_time is not None and len(mix_time):
        out.append(("Gaussian mixtures, kl_mixture: ms per call of each approximation (APPROXIMATE; float64, "
                    f"{mixtures.TIMING_COMPONENTS} components; kl-bench recommend --family mixture weighs them by error)",
                    mixtures.timing_table(mix_time)))
    return out


def failures(frames) -> pd.DataFrame:
    acc = frames.get("accuracy")
    if acc is None or not len(acc):
        return pd.DataFrame()
    bad = acc[(acc.implementation == "kl_bench") & (acc.method == "stable") & (acc.ok != True)]  # noqa: E712 (object column)
    return bad[["family", "subject", "dtype", "regime", "param", "max_ulps", "bound", "error"]]


def build(out: Path, frames: dict[str, pd.DataFrame] | None = None) -> tuple[Path, Path]:
    """Write ``report.md``, ``report.html`` and ``plots/`` in ``out`` from its tables (read from
    ``out`` unless the caller already holds them)."""
    frames = tables.read(out) if frames is None else frames
    if not frames:
        raise FileNotFoundError(f"no accuracy.parquet or timing.parquet in {out}")
    env_path = out / "environment.json"
    env = json.loads(env_path.read_text()) if env_path.exists() else {}
    made = plot_all(frames, out / "plots")
    machine = ", ".join(f"{key} {value}" for key, value in env.items() if key not in ("command",))
    bad = failures(frames)
    verdict = "every stable kernel within its bound" if not len(bad) else f"{len(bad)} case sets of stable kernels outside their bound"

    md = [f"# kl-bench report\n\n`{env.get('command', 'kl-bench run')}`\n\n{machine}\n\n**{verdict}**\n"]
    page = [f"<h1>kl-bench report</h1><p><code>{html.escape(env.get('command', 'kl-bench run'))}</code></p>"
            f"<p>{html.escape(machine)}</p><p><b>{html.escape(verdict)}</b></p>"]
    for title, table in sections(frames):
        md.append(f"## {title}\n\n{tables.markdown(table)}")
        page.append(f"<h2>{html.escape(title)}</h2>" + table.to_html(float_format=lambda v: f"{v:.3g}", na_rep="-"))
    if len(bad):
        md.append("## Outside their bound\n\n```\n" + bad.to_string(index=False) + "\n```\n")
        page.append("<h2>Outside their bound</h2>" + bad.to_html(index=False))
    for name in made:
        md.append(f"## {name}\n\n![{name}](plots/{name}.png)\n")
        data = base64.b64encode((out / "plots" / f"{name}.png").read_bytes()).decode()
        page.append(f"<h2>{html.escape(name)}</h2><img alt='{name}' src='data:image/png;base64,{data}'>")
    (out / "report.md").write_text("\n".join(md))
    style = ("body{font-family:sans-serif;max-width:1400px;margin:auto}table{border-collapse:collapse;font-size:12px}"
             "td,th{border:1px solid #ccc;padding:2px 6px}img{max-width:100%}")
    (out / "report.html").write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>kl-bench report</title>"
                                     f"<style>{style}</style></head><body>{''.join(page)}</body></html>\n")
    return out / "report.md", out / "report.html"
