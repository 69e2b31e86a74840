"""Calibration as a service: a pass declares the statistics it needs; the pipeline gathers them for it.

    @dataclass(frozen=True)
    class MyPass(Pass):
        requires = frozenset({Requirement.SHAPES, Requirement.CALIBRATION})

        def calibration_spec(self, gm):                  # called on the graph as it is just before the pass
            return [ChannelAbsMax("linear"), TokenAbsMax("linear_1")]

        def run(self, gm, ctx):
            scale = ctx.stats.of(ChannelAbsMax("linear"))  # a [C] tensor; ctx.stats["linear"] has all of them

The pipeline runs that graph over every calibration item (fx Interpreter, torch.no_grad, a tqdm bar) and feeds
each observer the value of the node it names. Observers keep bounded state (running maxima, fixed-size
histograms, at most `max_batches` kept samples), never a list of all activations.

Calibration data (`optimize(..., calibration=...)`): any iterable, iterated anew for each pass that calibrates
(it is never `list()`-ed). Each item is a tensor (the one positional input), a dict (keyword inputs), an
`(args_tuple, kwargs_dict)` pair, or a tuple/list of positional inputs; non-tensor keyword inputs captured as
constants (`use_cache=False`) are taken from the example kwargs when an item leaves them out. Refused before
anything runs (`CalibrationError`, naming the passes): no data for a pass that requires it, a non-iterable,
`len() == 0`, and a one-shot iterator (`iter(x) is x`: a generator) when more than one pass calibrates (give a
list or a re-iterable such as a DataLoader). An empty iterable without `len()` is detected on first use, before
the pass that needs it runs (capture and earlier passes have run then). An item that does not match the
captured signature → `CalibrationInputError` naming the item's index and the argument.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import is_concrete_int
from torch.utils import _pytree as pytree

from .errors import CalibrationError, CalibrationInputError, PassOptionError


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

    def nbytes(self) -> int:
        return 0 if self.value is None else self.value.nbytes


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

    def nbytes(self) -> int:
        return self.bins.counts.nbytes


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

    def nbytes(self) -> int:
        return sum(t.nbytes for v in self.kept.values() for t in pytree.tree_leaves(v) if isinstance(t, torch.Tensor))


@dataclass(frozen=True)
class CalibrationStats(Mapping):
    """What the pipeline gathered for one pass: `stats.of(spec)` is one observer's result; `stats[node]` maps
    each spec naming that node to its result. `batches`: calibration items run."""

    batches: int
    results: Mapping[Observe, Any]

    def of(self, spec: Observe) -> Any:
        if spec not in self.results:
            raise KeyError(f"{spec} was not in the calibration spec; gathered: {list(self.results)}")
        return self.results[spec]

    def __getitem__(self, node: str) -> dict[Observe, Any]:
        found = {s: r for s, r in self.results.items() if node in s.nodes()}
        if not found:
            raise KeyError(f"no statistics for node {node!r}; observed nodes: {sorted(self._nodes())}")
        return found

    def _nodes(self) -> set[str]:
        return {n for s in self.results for n in s.nodes()}

    def __iter__(self):
        return iter(sorted(self._nodes()))

    def __len__(self) -> int:
        return len(self._nodes())


def check_source(source: Any, passes: Sequence[str]) -> None:
    """Refuse, before anything runs, calibration data that cannot serve `passes` (those that calibrate)."""
    if not passes:
        return
    who = ", ".join(map(repr, passes))
    if source is None:
        raise CalibrationError(f"pass {who} requires calibration data, which was not given (nothing has run); "
                               f"pass calibration=[inputs, ...] or a DataLoader")
    if not isinstance(source, Iterable):
        raise CalibrationError(f"calibration for pass {who} must be an iterable of inputs, got "
                               f"{type(source).__name__} (nothing has run)")
    try:
        empty = len(source) == 0  # type: ignore[arg-type]
    except TypeError:
        empty = False  # no len(): detected on first use
    if empty:
        raise CalibrationError(f"calibration for pass {who} is empty (len() == 0; nothing has run)")
    if len(passes) > 1 and iter(source) is source:
        raise CalibrationError(f"calibration is a one-shot iterator ({type(source).__name__}), but passes {who} "
                               f"each calibrate on it; give a list or a re-iterable such as a DataLoader "
                               f"(nothing has run)")


def as_call(item: Any, index: int) -> tuple[tuple, dict]:
    """One calibration item as (args, kwargs)."""
    if isinstance(item, torch.Tensor):
        return (item,), {}
    if isinstance(item, Mapping):
        return (), dict(item)
    if isinstance(item, (tuple, list)):
        if len(item) == 2 and isinstance(item[0], (tuple, list)) and isinstance(item[1], Mapping):
            return tuple(item[0]), dict(item[1])
        return tuple(item), {}
    raise CalibrationInputError(index, None, f"is a {type(item).__name__}; expected a tensor, a tuple of "
                                "positional inputs, a dict of keyword inputs or an (args, kwargs) pair")


class _Binder:
    """Turns calibration items into the graph's flat inputs, checked against the captured signature."""

    def __init__(self, gm: fx.GraphModule, example_kwargs: Mapping[str, Any]):
        self.spec = getattr(gm, "_in_spec", None)
        self.placeholders = list(gm.graph.find_nodes(op="placeholder"))
        self.constants = {k: v for k, v in example_kwargs.items() if not isinstance(v, torch.Tensor)}
        self.plain = self.spec is not None and all(c.is_leaf() for part in self.spec.children()
                                                   for c in part.children())

    def flat(self, item: Any, index: int) -> list[Any]:
        args, kwargs = as_call(item, index)
        kwargs = {**self.constants, **kwargs}
        if self.spec is None:  # a symbolically traced module: placeholders are the arguments, in order
            rest = [p.name for p in self.placeholders[len(args):]]
            self._same_keys(index, kwargs, rest)
            leaves = list(args) + [kwargs[k] for k in rest]
        else:
            keys = list(self.spec.child(1).context or [])
            args = self._by_name(args, kwargs)
            self._same_keys(index, kwargs, keys)
            leaves, spec = self._flatten(args, {k: kwargs[k] for k in keys})
            if spec != self.spec:
                raise CalibrationInputError(index, None, f"is structured as {_brief(spec)}; the graph was captured "
                                            f"with {_brief(self.spec)}")
        if len(leaves) != len(self.placeholders):
            raise CalibrationInputError(index, None, f"gives {len(leaves)} inputs; the graph takes "
                                        f"{len(self.placeholders)} ({', '.join(p.name for p in self.placeholders)})")
        for leaf, p in zip(leaves, self.placeholders):
            _check_leaf(index, p, leaf)
        return leaves

    def _flatten(self, args: tuple, kwargs: dict[str, Any]) -> tuple[list[Any], Any]:
        # torch's tree_flatten leaves a reference cycle per call; plain leaves (the usual case) need none
        flat = [*args, *kwargs.values()]
        if self.plain and len(args) == self.spec.child(0).num_children and \
                not any(isinstance(v, (tuple, list, dict)) for v in flat):
            return flat, self.spec
        return pytree.tree_flatten((args, kwargs))

    def _by_name(self, args: tuple, kwargs: dict[str, Any]) -> tuple:
        """Arguments captured positionally may be given by name (a dict item), as Python binds a call."""
        positional = self.spec.child(0)
        if len(args) >= positional.num_children or not all(c.is_leaf() for c in positional.children()):
            return args
        for p in self.placeholders[len(args):positional.num_children]:
            if p.name not in kwargs:
                break
            args += (kwargs.pop(p.name),)
        return args

    def _same_keys(self, index: int, kwargs: Mapping[str, Any], keys: Sequence[str]) -> None:
        if extra := sorted(set(kwargs) - set(keys)):
            raise CalibrationInputError(index, extra[0], f"is not an argument the graph takes by keyword ({keys})")
        if missing := [k for k in keys if k not in kwargs]:
            raise CalibrationInputError(index, missing[0], "is missing")


def _brief(spec: Any) -> str:
    return " ".join(str(spec).split())


def _check_leaf(index: int, p: fx.Node, leaf: Any) -> None:
    val = p.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return
    if not isinstance(leaf, torch.Tensor):
        raise CalibrationInputError(index, p.name, f"must be a tensor, got {type(leaf).__name__}")
    if leaf.dtype != val.dtype or leaf.dim() != val.dim():
        raise CalibrationInputError(index, p.name, f"is {leaf.dim()}-d {leaf.dtype}; captured as {val.dim()}-d "
                                    f"{val.dtype}")
    for d, (got, want) in enumerate(zip(leaf.shape, val.shape)):
        if is_concrete_int(want) and got != int(want):
            raise CalibrationInputError(index, p.name, f"has size {got} in dim {d}, which was captured static "
                                        f"at {int(want)}")


class _Observing(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, observers: Mapping[str, list[Any]]):
        super().__init__(gm)
        self.observers = observers

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        for obs in self.observers.get(n.name, ()):
            obs.update(n.name, out)
        return out


def show_progress(progress: bool | None) -> bool:
    """`progress=None`: a bar when stderr is a terminal."""
    return sys.stderr.isatty() if progress is None else bool(progress)


def calibrate(gm: fx.GraphModule, specs: Sequence[Observe], source: Iterable, *, label: str = "calibration",
              example_kwargs: Mapping[str, Any] | None = None, progress: bool | None = None) -> CalibrationStats:
    """Run `gm` over every item of `source` with torch.no_grad, feeding `specs`' observers (bounded memory)."""
    from tqdm.auto import tqdm

    specs = tuple(dict.fromkeys(specs))
    known = {n.name for n in gm.graph.nodes}
    for s in specs:
        if missing := [n for n in s.nodes() if n not in known]:
            raise CalibrationError(f"pass {label!r}: {s} names node {missing[0]!r}, which is not in the graph")
    observers = {s: s.observer() for s in specs}
    by_node: dict[str, list[Any]] = {}
    for s, obs in observers.items():
        for n in s.nodes():
            by_node.setdefault(n, []).append(obs)
    binder, interpreter, batches = _Binder(gm, example_kwargs or {}), _Observing(gm, by_node), 0
    total = len(source) if hasattr(source, "__len__") else None  # type: ignore[arg-type]
    bar = tqdm(source, total=total, desc=f"calibrating {label}", unit="batch", leave=False,
               disable=not show_progress(progress))
    with torch.no_grad():
        for index, item in enumerate(bar):
            flat = binder.flat(item, index)
            try:
                interpreter.run(*flat)
            except CalibrationError:
                raise
            except Exception as e:
                raise CalibrationInputError(index, None, f"does not run through the graph: {type(e).__name__}: "
                                            f"{str(e).strip()[:300]}") from e
            batches += 1
    if batches == 0:
        raise CalibrationError(f"calibration for pass {label!r} yielded no items (detected on first use; "
                               f"the pass has not run)")
    return CalibrationStats(batches, {s: obs.result() for s, obs in observers.items()})
