"""Observers: what a pass may ask calibration for (frozen specs naming nodes), their bounded-memory
accumulators and result types. Used through fxopt.calibration, which runs them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch.utils import _pytree as pytree

from .errors import CalibrationError, PassOptionError


@dataclass(frozen=True)
class Observe:
    """A statistic of named node values. Subclasses are frozen (hashable: equal specs are gathered once)."""

    kind: ClassVar[str]

    def nodes(self) -> tuple[str, ...]:
        return (self.node,)  # type: ignore[attr-defined]

    def observer(self) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass(frozen=True)
class ChannelAbsMax(Observe):
    """max |x| per channel of the last dim, over all other dims and batches (SmoothQuant's activation scale).
    Result: a 1-d CPU tensor (fp32, or fp64 for fp64 values)."""

    node: str
    kind: ClassVar[str] = "channel_absmax"

    def observer(self) -> _ChannelAbsMax:
        return _ChannelAbsMax(self)


@dataclass(frozen=True)
class TokenAbsMax(Observe):
    """max |x| over the last dim, per token (every other position), summarised as a `HistogramSummary` of
    those per-token maxima (exact max and count; percentiles to within one bin)."""

    node: str
    bins: int = 256
    kind: ClassVar[str] = "token_absmax"

    def __post_init__(self) -> None:
        _check_bins(self)

    def observer(self) -> _Tokens:
        return _Tokens(self)


@dataclass(frozen=True)
class Histogram(Observe):
    """Histogram of every finite value, `bins` fixed bins; the range doubles (merging bin pairs, exact) when a
    value falls outside it. Result: a `HistogramSummary`."""

    node: str
    bins: int = 2048
    kind: ClassVar[str] = "histogram"

    def __post_init__(self) -> None:
        _check_bins(self)

    def observer(self) -> _Values:
        return _Values(self)


@dataclass(frozen=True)
class MinMax(Observe):
    """Smallest and largest finite value over all batches. Result: a `Range`."""

    node: str
    kind: ClassVar[str] = "min_max"

    def observer(self) -> _Values:
        return _Values(self, bins=None)


@dataclass(frozen=True)
class BlockIO(Observe):
    """The values of a block's input and output nodes (for distillation), kept on CPU for the first
    `max_batches` batches only. Result: a `BlockSamples`."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    max_batches: int
    kind: ClassVar[str] = "block_io"

    def __post_init__(self) -> None:
        if not isinstance(self.max_batches, int) or self.max_batches < 1:
            raise PassOptionError(type(self).__name__, "max_batches", f"must be an int >= 1, got {self.max_batches!r}")

    def nodes(self) -> tuple[str, ...]:
        return tuple(self.inputs) + tuple(self.outputs)

    def observer(self) -> _Samples:
        return _Samples(self)


def _check_bins(spec: Any) -> None:
    if not isinstance(spec.bins, int) or spec.bins < 2 or spec.bins % 2:
        raise PassOptionError(type(spec).__name__, "bins", f"must be an even int >= 2, got {spec.bins!r}")


@dataclass(frozen=True)
class Range:
    min: float
    max: float


@dataclass(frozen=True)
class HistogramSummary:
    lo: float
    hi: float
    counts: torch.Tensor  # float64, one per bin of width (hi - lo) / bins
    count: int  # finite values seen
    min: float
    max: float
    nonfinite: int = 0

    @property
    def edges(self) -> torch.Tensor:
        return torch.linspace(self.lo, self.hi, len(self.counts) + 1, dtype=torch.float64)

    def percentile(self, q: float) -> float:
        """The q-th percentile (0..100), interpolated within its bin: exact to one bin width."""
        if self.count == 0:
            return float("nan")
        target = q / 100 * self.count
        cum = torch.cumsum(self.counts, 0)
        i = min(int(torch.searchsorted(cum, torch.tensor(target, dtype=torch.float64))), len(cum) - 1)
        below = float(cum[i - 1]) if i else 0.0
        inside = float(self.counts[i])
        width = (self.hi - self.lo) / len(self.counts)
        value = self.lo + width * (i + ((target - below) / inside if inside else 0.0))
        return min(max(value, self.min), self.max)


@dataclass(frozen=True)
class BlockSamples:
    inputs: tuple[tuple[Any, ...], ...]  # per kept batch, the input nodes' values in the spec's order
    outputs: tuple[tuple[Any, ...], ...]


def _tensor(spec: Observe, name: str, value: Any) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        got = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
        raise CalibrationError(f"observer {spec} needs a floating-point tensor, but node {name!r} produces {got}")
    return value.detach()


def _wide(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _ChannelAbsMax:
    def __init__(self, spec: ChannelAbsMax):
        self.spec, self.value = spec, None

    def update(self, name: str, value: Any) -> None:
        x = _tensor(self.spec, name, value)
        if x.dim() == 0:
            raise CalibrationError(f"observer {self.spec}: node {name!r} is a scalar; it has no channels")
        m = x.abs().reshape(-1, x.shape[-1]).amax(0).to("cpu", _wide(x.dtype)) if x.numel() else None
        if m is None:
            return
        if self.value is not None and self.value.shape != m.shape:
            raise CalibrationError(f"observer {self.spec}: node {name!r} has {m.numel()} channels on this batch, "
                                   f"{self.value.numel()} before")
        self.value = m if self.value is None else torch.maximum(self.value, m)

    def result(self) -> torch.Tensor | None:
        return self.value


class _Bins:
    """Fixed bins over [lo, hi); the range doubles up or down (bin pairs merge exactly) to hold new values."""

    def __init__(self, bins: int):
        self.bins, self.counts = bins, torch.zeros(bins, dtype=torch.float64)
        self.lo = self.hi = None
        self.count, self.min, self.max, self.nonfinite = 0, float("inf"), float("-inf"), 0

    def add(self, x: torch.Tensor) -> None:
        flat = x.reshape(-1).to(torch.float64)
        finite = torch.isfinite(flat)
        self.nonfinite += int((~finite).sum())
        flat = flat[finite]
        if flat.numel() == 0:
            return
        lo, hi = flat.min().item(), flat.max().item()
        if self.lo is None:
            width = (hi - lo) or max(abs(lo), 1e-30) * 2 ** -20
            self.lo, self.hi = lo, lo + width * (1 + 1 / self.bins)  # [lo, hi): the max inside the last bin
        while lo < self.lo or hi >= self.hi:
            self._grow(up=hi >= self.hi)
        idx = ((flat - self.lo) * (self.bins / (self.hi - self.lo))).floor().clamp_(0, self.bins - 1).long()
        self.counts += torch.bincount(idx, minlength=self.bins).to(torch.float64)
        self.count += flat.numel()
        self.min, self.max = min(self.min, lo), max(self.max, hi)

    def _grow(self, up: bool) -> None:
        merged, half, span = self.counts.view(-1, 2).sum(1), self.bins // 2, self.hi - self.lo
        self.counts = torch.zeros_like(self.counts)
        if up:
            self.counts[:half], self.hi = merged, self.lo + 2 * span
        else:
            self.counts[half:], self.lo = merged, self.hi - 2 * span

    def summary(self) -> HistogramSummary | None:
        if self.lo is None:
            return None
        return HistogramSummary(self.lo, self.hi, self.counts.clone(), self.count, self.min, self.max, self.nonfinite)


class _Values:
    def __init__(self, spec: Observe, bins: int | None = -1):
        self.spec = spec
        self.bins = _Bins(spec.bins if bins == -1 else 2)  # type: ignore[attr-defined]
        self.range_only = bins is None

    def update(self, name: str, value: Any) -> None:
        self.bins.add(_tensor(self.spec, name, value))

    def result(self) -> HistogramSummary | Range | None:
        s = self.bins.summary()
        return s if s is None or not self.range_only else Range(s.min, s.max)


class _Tokens(_Values):
    def update(self, name: str, value: Any) -> None:
        x = _tensor(self.spec, name, value)
        if x.dim() == 0:
            raise CalibrationError(f"observer {self.spec}: node {name!r} is a scalar; it has no tokens")
        self.bins.add(x.abs().amax(-1) if x.numel() else x.reshape(-1))


class _Samples:
    def __init__(self, spec: BlockIO):
        self.spec, self.kept = spec, {n: [] for n in spec.nodes()}

    def update(self, name: str, value: Any) -> None:
        kept = self.kept[name]
        if len(kept) < self.spec.max_batches:
            kept.append(pytree.tree_map_only(torch.Tensor, lambda t: t.detach().to("cpu", copy=True), value))

    def result(self) -> BlockSamples:
        def per_batch(names: Sequence[str]) -> tuple[tuple[Any, ...], ...]:
            return tuple(zip(*(self.kept[n] for n in names))) if names else ()

        return BlockSamples(per_batch(self.spec.inputs), per_batch(self.spec.outputs))
