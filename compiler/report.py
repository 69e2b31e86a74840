"""The per-pass report returned with every optimized module."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .capture import CaptureInfo
from .numerics import Numerics
from .pass_base import Measure, Tolerance


@dataclass(frozen=True)
class PassReport:
    name: str
    applied: bool
    exactness: str
    seconds: float
    stats: Mapping[str, int] = field(default_factory=dict)
    why_not: str | None = None  # set when the pass did not apply
    reasons: Sequence[str] = ()  # near-misses: "node: reason" for candidates left unchanged
    numerics: Numerics | None = None
    tolerance: Tolerance | None = None  # the bound the numerics were checked against (the pass's own, or its run's)
    notes: Sequence[str] = ()  # what the pass did where, one line per site
    measures: Sequence[Measure] = ()  # per-site quantities before and after (the report's plots)
    # bytes of the tensors the graph reads (parameters, buffers, constants; shared storage once) before and after
    weight_bytes: tuple[int, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        tol = self.tolerance
        return {"name": self.name, "applied": self.applied, "exactness": self.exactness, "seconds": self.seconds,
                "stats": dict(self.stats), "why_not": self.why_not, "reasons": list(self.reasons),
                "numerics": dataclasses.asdict(self.numerics) if self.numerics else None,
                "tolerance": None if tol is None else {
                    "rtol": {str(k).removeprefix("torch."): v for k, v in tol.rtol.items()}, "atol": tol.atol,
                    "min_cosine": tol.min_cosine, "whole_output_if_nonfinite": tol.whole_output_if_nonfinite},
                "notes": list(self.notes), "measures": [m.to_dict() for m in self.measures],
                "weight_bytes": None if self.weight_bytes is None else list(self.weight_bytes)}


@dataclass
class Report:
    capture: CaptureInfo
    passes: list[PassReport] = field(default_factory=list)

    def __getitem__(self, name: str) -> PassReport:
        for p in self.passes:
            if p.name == name:
                return p
        raise KeyError(f"no pass {name!r} in this report; passes: {[p.name for p in self.passes]}")

    def __contains__(self, name: object) -> bool:
        return any(p.name == name for p in self.passes)

    def to_dict(self) -> dict[str, Any]:
        return {"capture": dataclasses.asdict(self.capture), "passes": [p.to_dict() for p in self.passes]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Report:
        """The report `to_dict()` (or the JSON of `to_json()`) describes."""
        cap = dict(data["capture"])
        cap["failed_attempts"] = [tuple(a) for a in cap.get("failed_attempts", [])]
        return cls(CaptureInfo(**cap), [_pass_from_dict(p) for p in data["passes"]])

    def to_json(self, indent: int | None = 2) -> str:
        """JSON of `to_dict()`; a non-finite error (an output that became inf) is written as a string."""
        return json.dumps(_finite(self.to_dict()), indent=indent, default=str)

    def to_html(self, run: Mapping[str, Any] | None = None) -> str:
        """One self-contained HTML page with the plots embedded (fxopt.render); `run`: what the command line
        records about a run (model, command, calibration)."""
        from .render import to_html

        return to_html(self, run or {})

    def to_markdown(self, plot_dir: str | None = None, run: Mapping[str, Any] | None = None) -> str:
        """Markdown; with `plot_dir`, the plots are written there as PNGs and linked by that path."""
        from pathlib import Path

        from .render import to_markdown

        return to_markdown(self, run or {}, None if plot_dir is None else Path(plot_dir),
                           "" if plot_dir is None else f"{Path(plot_dir).as_posix()}/")

    def __str__(self) -> str:
        cap = self.capture
        lines = [f"capture: {cap.method} ({cap.seconds:.2f} s); dynamic dims: "
                 + ", ".join(f"{k}{v}" for k, v in cap.dynamic_dims.items())]
        lines += [f"  note: {n}" for n in cap.notes]
        lines.append(f"{'pass':<20} {'applied':<8} {'seconds':>8} {'max|err|':>10} {'max rel':>10}  stats / why not")
        for p in self.passes:
            num = p.numerics
            unchecked = num is not None and num.nonfinite_before and not num.compared
            err = f"{num.max_abs:10.3g} {num.max_rel:10.3g}" if num and not unchecked else f"{'-':>10} {'-':>10}"
            stats = ", ".join(f"{k}={v}" for k, v in sorted(p.stats.items()) if v)
            lines.append(f"{p.name:<20} {p.applied!s:<8} {p.seconds:8.3f} {err}  "
                         + (stats if p.applied else f"not applied: {p.why_not}"))
            if num is not None and num.summary():
                lines.append(f"    numerics: {num.summary()}")
            if tuple(p.reasons) != (p.why_not,):  # a single reason is already the why-not
                lines += [f"    near-miss: {r}" for r in p.reasons]
            lines += [f"    {n}" for n in p.notes]
        return "\n".join(lines)


def tensor_bytes(gm: torch.fx.GraphModule) -> int:
    """Bytes of the tensors `gm`'s graph reads (parameters, buffers, constants), each storage counted once."""
    seen: dict[int, int] = {}
    for n in gm.graph.find_nodes(op="get_attr"):
        t = gm
        for part in str(n.target).split("."):
            t = getattr(t, part, None)
        if isinstance(t, torch.Tensor):
            storage = t.untyped_storage()
            seen[id(t) if t.is_meta else storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _pass_from_dict(d: Mapping[str, Any]) -> PassReport:
    num, tol = d.get("numerics"), d.get("tolerance")
    numerics = None if num is None else Numerics(**{
        k: float(v) if k in ("max_abs", "max_rel", "cosine", "bound") else v for k, v in num.items()})
    tolerance = None if tol is None else Tolerance(
        {getattr(torch, k): float(v) for k, v in tol["rtol"].items()}, float(tol["atol"]), tol["min_cosine"],
        tol["whole_output_if_nonfinite"])
    measures = tuple(Measure(m["title"], m["unit"], {k: float(v) for k, v in m["before"].items()},
                             {k: float(v) for k, v in m["after"].items()}, m["log_scale"])
                     for m in d.get("measures", ()))  # float(): "inf"/"nan" were written as strings
    weight_bytes = d.get("weight_bytes")
    return PassReport(d["name"], d["applied"], d["exactness"], d["seconds"], dict(d["stats"]), d["why_not"],
                      tuple(d["reasons"]), numerics, tolerance, tuple(d.get("notes", ())), measures,
                      None if weight_bytes is None else (int(weight_bytes[0]), int(weight_bytes[1])))


def _finite(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v
