"""A report a person reads: Markdown (plots as PNG files beside it) and one self-contained HTML page (plots embedded,
no script). Built from a `Report` alone, so a saved `report.json` or a `.pt2` artifact renders the same way.

Plots, each where the report has its data: the error each step left against the bound it promised; the bytes of
the tensors the graph reads after each step (quantization, GQA); and every pass's per-site `Measure`, before and
after (activation abs-max before/after smoothing, kept magnitude without/with an N:M permutation, K/V-cache bytes
at MHA/GQA). matplotlib draws them on figures of their own (no pyplot state, no display needed).
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .pass_base import Measure
from .report import PassReport, Report

BEFORE, AFTER = "#9aa5b1", "#1f6feb"


@dataclass(frozen=True)
class Plot:
    name: str  # file stem: "errors", "weight-bytes", "measure-3" (by position, never from a step name)
    title: str
    png: bytes


def plots(report: Report) -> list[Plot]:
    """Every plot the report has data for, in reading order."""
    made = []
    checked = [p for p in report.passes if p.applied and p.numerics is not None]
    if checked:
        made.append(Plot("errors", "Error after each step, against the bound it promised", _errors(checked)))
    sized = [p for p in report.passes if p.weight_bytes is not None]
    if any(p.weight_bytes[0] != p.weight_bytes[1] for p in sized):
        made.append(Plot("weight-bytes", "Bytes of weights and constants the graph reads, after each step",
                         _weight_bytes(sized)))
    for p in report.passes:
        for m in p.measures:
            if m.before:  # file names by position: a step's name is data, not a path
                made.append(Plot(f"measure-{len(made) + 1}", f"{p.name}: {m.title}", _measure(m)))
    return made


def _text(label: str) -> str:
    """A label as matplotlib shows it literally: a "$" in a module name is text, not the start of TeX math."""
    return str(label).replace("$", r"\$")


def _figure(width: float, height: float) -> Any:
    """A figure of its own (not pyplot's: the user's backend and open figures are left alone)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=96)
    return buffer.getvalue()


def _errors(passes: list[PassReport]) -> bytes:
    names = [_text(p.name) for p in passes]
    errors = [p.numerics.max_abs for p in passes]
    bounds = [p.numerics.bound if math.isfinite(p.numerics.bound) else 0.0 for p in passes]
    gaps = [g if (g := 1 - min(p.numerics.cosine, 1.0)) > 1e-12 or not math.isfinite(g) else 0.0
            for p in passes]  # below 1e-12: float64 noise, 0
    promised = [1 - p.tolerance.min_cosine if p.tolerance is not None and p.tolerance.min_cosine is not None
                else 0.0 for p in passes]
    fig = _figure(10, 0.5 * len(names) + 1.8)
    axes = fig.subplots(1, 2)
    panels = [(axes[0], errors, bounds, "max |output error| vs the graph before the step", "bound (exact steps)"),
              (axes[1], gaps, promised, "1 − worst output cosine", "1 − min_cosine promised")]
    for ax, values, limits, label, limit_label in panels:
        shown = [v for v in values + limits if v > 0 and math.isfinite(v)] or [1e-8]
        low = min(shown) / 30
        ax.barh(names, [v if v > 0 and math.isfinite(v) else 0 for v in values], color=AFTER, left=low)
        for i, v in enumerate(values):
            if v == 0 or not math.isfinite(v):
                ax.text(low, i, " 0 (identical)" if v == 0 else f" {v} (non-finite)", va="center", fontsize=8)
        marks = [(n, v) for n, v in zip(names, limits) if v > 0]
        if marks:
            ax.scatter([v for _, v in marks], [n for n, _ in marks], marker="|", s=300, color="black",
                       label=limit_label, zorder=3)
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.28), fontsize=8, frameon=False)
        ax.set_xscale("log")
        ax.set_xlim(low, max(shown) * 30)
        ax.set_xlabel(label)
        ax.invert_yaxis()
    axes[1].set_yticklabels([])
    return _png(fig)


def _weight_bytes(passes: list[PassReport]) -> bytes:
    labels = ["captured"] + [_text(p.name) for p in passes]
    values = [passes[0].weight_bytes[0]] + [p.weight_bytes[1] for p in passes]
    fig = _figure(8, 0.45 * len(labels) + 1.4)
    ax = fig.subplots()
    bars = ax.barh(labels, [v / 2**20 for v in values], color=[BEFORE] + [AFTER] * len(passes))
    for bar, v in zip(bars, values):
        ratio = f" ({v / values[0]:.2f}×)" if values[0] else ""
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {v / 2**20:.2f} MiB{ratio}", va="center",
                fontsize=8)
    ax.set_xlabel("MiB")
    ax.set_xlim(0, max(max(values) / 2**20 * 1.35, 1e-6))
    ax.invert_yaxis()
    return _png(fig)


def short_labels(sites: list[str], width: int = 48) -> list[str]:
    """Site names without the dotted prefix they all share, cut from the left to `width` characters."""
    parts = [s.split(".") for s in sites]
    shared = len(os.path.commonprefix(parts)) if len(parts) > 1 else 0
    shared = min(shared, min(len(p) for p in parts) - 1)
    out = [".".join(p[shared:]) for p in parts]
    return [s if len(s) <= width else "…" + s[-width + 1:] for s in out]


def _measure(m: Measure) -> bytes:
    sites = list(m.before)
    y = range(len(sites))
    fig = _figure(9, 0.32 * len(sites) + 1.6)
    ax = fig.subplots()
    h = 0.4
    ax.barh([i - h / 2 for i in y], [m.before[s] for s in sites], h, color=BEFORE, label="before")
    ax.barh([i + h / 2 for i in y], [m.after[s] for s in sites], h, color=AFTER, label="after")
    ax.set_yticks(list(y), [_text(t) for t in short_labels(sites)], fontsize=8)
    ax.invert_yaxis()
    if m.log_scale:
        ax.set_xscale("log")
    ax.set_xlabel(_text(m.unit or m.title))
    ax.legend(loc="lower right", fontsize=8)
    return _png(fig)


def _num(v: float) -> str:
    return "-" if v is None else f"{v:.3g}" if math.isfinite(v) else str(v)


def _rows(report: Report) -> list[list[str]]:
    rows = []
    for p in report.passes:
        num, tol = p.numerics, p.tolerance
        promise = "-" if tol is None else (f"cosine ≥ {tol.min_cosine}" if tol.min_cosine is not None else
                                           f"|err| ≤ {_num(num.bound)}" if num is not None else "rounding")
        what = ", ".join(f"{k}={v}" for k, v in sorted(p.stats.items()) if v) if p.applied else \
            f"not applied: {p.why_not}"
        rows.append([p.name, "yes" if p.applied else "no", f"{p.seconds:.2f}",
                     _num(num.max_abs) if num else "-", f"{num.cosine:.6f}" if num else "-", promise, what])
    return rows


HEADER = ["step", "applied", "seconds", "max abs err", "worst cosine", "promised", "what it did / why not"]


def _run_lines(report: Report, run: Mapping[str, Any]) -> list[str]:
    cap = report.capture
    lines = [f"model: {run['model']}"] if run.get("model") else []
    if run.get("command"):
        lines.append(f"command: {run['command']}")
    lines.append(f"capture: {cap.method} ({cap.seconds:.2f} s); dynamic dims: "
                 + (", ".join(f"{k}{v}" for k, v in cap.dynamic_dims.items()) or "none"))
    lines += [f"capture note: {n}" for n in cap.notes]
    if run.get("calibration"):
        lines.append(f"calibration: {run['calibration']}")
    if run.get("written"):
        lines.append(f"wrote: {', '.join(run['written'])}")
    return lines


def _details(p: PassReport) -> list[tuple[str, list[str]]]:
    """(heading, lines) of one step: near-misses and what it did where."""
    out = []
    if p.numerics is not None and p.numerics.summary():
        out.append(("numerics", [p.numerics.summary()]))
    near = [r for r in p.reasons if r != p.why_not]
    if near:
        out.append((f"near-misses ({len(near)})", list(near)))
    if p.notes:
        out.append((f"sites ({len(p.notes)})", list(p.notes)))
    return out


def _md(text: str) -> str:
    """Text as Markdown shows it: HTML escaped, one line, no table breaks, no emphasis, link or code syntax
    (an underscore inside a word is not emphasis in CommonMark, so node names stay readable)."""
    text = html.escape(" ".join(str(text).split()), quote=False)
    return "".join("\\" + c if c in "\\|*[]`" else c for c in text)


def to_markdown(report: Report, run: Mapping[str, Any], plot_dir: Path | None, plot_prefix: str = "") -> str:
    """The report as Markdown; with `plot_dir`, the plots are written there as PNGs and linked as
    `plot_prefix + name + '.png'`."""
    lines = ["# fxopt report", ""] + [f"- {_md(ln)}" for ln in _run_lines(report, run)] + ["", "## Steps", ""]
    lines += ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(_md(c) for c in row) + " |" for row in _rows(report)]
    for p in report.passes:
        for heading, items in _details(p):
            lines += ["", f"### {_md(p.name)}: {heading}", ""] + [f"- {_md(i)}" for i in items]
    if plot_dir is not None:
        made = plots(report)
        if made:
            lines += ["", "## Plots"]
        plot_dir.mkdir(parents=True, exist_ok=True)
        for plot in made:
            (plot_dir / f"{plot.name}.png").write_bytes(plot.png)
            lines += ["", f"### {_md(plot.title)}", "", f"![{_md(plot.title)}](<{plot_prefix}{plot.name}.png>)"]
    return "\n".join(lines) + "\n"


_CSS = """body{font:14px/1.45 system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#1b1f24}
table{border-collapse:collapse;width:100%;font-size:13px}th,td{border:1px solid #d0d7de;padding:4px 8px;
text-align:left;vertical-align:top}th{background:#f6f8fa}td.no{color:#8c959f}img{max-width:100%;display:block;
margin:.5em 0 1.5em}code{font-size:12px}details{margin:.3em 0}summary{cursor:pointer}ul{margin:.3em 0}"""


def to_html(report: Report, run: Mapping[str, Any]) -> str:
    """The report as one HTML page: no script, no external resource, the plots as data: URIs."""
    e = html.escape
    body = ["<h1>fxopt report</h1>", "<ul>"] + [f"<li>{e(ln)}</li>" for ln in _run_lines(report, run)] + ["</ul>"]
    body += ["<h2>Steps</h2>", "<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in HEADER) + "</tr>"]
    for row in _rows(report):
        cls = "" if row[1] == "yes" else ' class="no"'
        body.append(f"<tr{cls}>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>")
    body.append("</table>")
    for p in report.passes:
        for heading, items in _details(p):
            body.append(f"<details><summary>{e(p.name)}: {e(heading)}</summary><ul>"
                        + "".join(f"<li><code>{e(i)}</code></li>" for i in items) + "</ul></details>")
    made = plots(report)
    if made:
        body.append("<h2>Plots</h2>")
    for plot in made:
        data = base64.b64encode(plot.png).decode()
        body += [f"<h3>{e(plot.title)}</h3>", f'<img alt="{e(plot.title)}" src="data:image/png;base64,{data}">']
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>fxopt report</title>"
            "<link rel=\"icon\" href=\"data:,\">"
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
