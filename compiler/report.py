"""The per-pass report returned with every optimized module."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .capture import CaptureInfo
from .numerics import Numerics


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


@dataclass
class Report:
    capture: CaptureInfo
    passes: list[PassReport] = field(default_factory=list)

    def __getitem__(self, name: str) -> PassReport:
        for p in self.passes:
            if p.name == name:
                return p
        raise KeyError(f"no pass {name!r} in this report; passes: {[p.name for p in self.passes]}")

    def __str__(self) -> str:
        cap = self.capture
        lines = [f"capture: {cap.method} ({cap.seconds:.2f} s); dynamic dims: "
                 + ", ".join(f"{k}{v}" for k, v in cap.dynamic_dims.items())]
        lines += [f"  note: {n}" for n in cap.notes]
        lines.append(f"{'pass':<20} {'applied':<8} {'seconds':>8} {'max|err|':>10} {'max rel':>10}  stats / why not")
        for p in self.passes:
            num = p.numerics
            err = f"{num.max_abs:10.3g} {num.max_rel:10.3g}" if num else f"{'-':>10} {'-':>10}"
            stats = ", ".join(f"{k}={v}" for k, v in sorted(p.stats.items()) if v)
            lines.append(f"{p.name:<20} {p.applied!s:<8} {p.seconds:8.3f} {err}  "
                         + (stats if p.applied else f"not applied: {p.why_not}"))
            lines += [f"    near-miss: {r}" for r in p.reasons]
        return "\n".join(lines)
