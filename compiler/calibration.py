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
(it is never `list()`-ed). Each item is a tensor (the one positional input), a dict (inputs by name), an
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
from typing import Any

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import is_concrete_int
from torch.utils import _pytree as pytree

from .errors import CalibrationError, CalibrationInputError
from .numerics import preserved_buffers
from .observers import (
    BlockIO,
    BlockSamples,
    ChannelAbsMax,
    Histogram,
    HistogramSummary,
    MinMax,
    Observe,
    Range,
    TokenAbsMax,
)

__all__ = ["BlockIO", "BlockSamples", "CalibrationStats", "ChannelAbsMax", "Histogram", "HistogramSummary",
           "MinMax", "Observe", "Range", "TokenAbsMax", "as_call", "calibrate", "check_source"]


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
    with torch.no_grad(), preserved_buffers(gm):  # the graph's buffers (a cache, a counter) as they were
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
