"""Replay a graph region on index tensors: which output feature of a linear lands where.

`replay(end, sources, allowed)` evaluates the nodes between `sources` (node -> tensor, or a callable returning a
tensor or None) and `end`, running each node's own ATen target on concrete tensors; shape arguments that are
symbolic take their example value. Only ops in `allowed` are run; any other op, or a tensor read from outside
the region (other than a constant get_attr), stops the replay with the node and the reason. `identity` ops pass
their first input through (casts, scalar scaling: they move no element), and `shortcut(node)` may name a node
whose value stands for `node` (RoPE: the rotated q is, element for element, the q it rotates).

Replaying `arange(out_features)` from a linear's output to an attention operand gives, per (head, dim), the
weight row that feeds it: fused QKV splits, per-head interleavings and grouped layouts all fall out of the
model's own shape ops, with nothing enumerated.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import fx

from .sites import CAST_TARGETS, val

aten = torch.ops.aten

SHAPE_OPS = frozenset({
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.permute.default, aten.transpose.int,
    aten.t.default, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default,
    aten.expand.default, aten.slice.Tensor, aten.select.int, aten.split.Tensor, aten.split_with_sizes.default,
    aten.chunk.default, aten.unbind.int, aten.clone.default, aten.contiguous.default, aten.alias.default,
    aten.index.Tensor, aten.index_select.default, aten.flatten.using_ints, aten.unflatten.int, aten.narrow.default,
    aten.cat.default, aten.stack.default, aten.repeat.default, aten.repeat_interleave.self_int,
    aten.movedim.int, operator.getitem,
})
IDENTITY_OPS = frozenset(CAST_TARGETS)


class ReplayError(Exception):
    def __init__(self, node: fx.Node, reason: str):
        super().__init__(f"{node.name}: {reason}")
        self.node, self.reason = node, reason


def concrete(v):
    """An int for a SymInt (its example value), else v."""
    if isinstance(v, torch.SymInt):
        return int(v.node.hint) if v.node.hint is not None else int(v.node.require_hint())
    return v


@dataclass
class Replay:
    sources: Mapping[fx.Node, torch.Tensor] | Callable[[fx.Node], torch.Tensor | None]
    allowed: frozenset = SHAPE_OPS
    shortcut: Callable[[fx.Node], fx.Node | None] = lambda n: None
    scalar_identity: bool = False  # mul/div by a Python number moves no element: pass through
    used: list[fx.Node] = field(default_factory=list)  # the sources the replay read, first use order
    scale: float = 1.0  # the product of the scalar factors passed through (scalar_identity)
    _memo: dict = field(default_factory=dict)

    def source(self, n: fx.Node):
        if callable(self.sources):
            return self.sources(n)
        return self.sources.get(n)

    def __call__(self, n: fx.Node) -> torch.Tensor:
        if n in self._memo:
            return self._memo[n]
        value = self._eval(n)
        self._memo[n] = value
        return value

    def _eval(self, n: fx.Node):
        src = self.source(n)
        if src is not None:
            self.used.append(n)
            return src
        if n.op == "get_attr":
            return _attr(n)
        if isinstance(val(n), (torch.SymInt, int)) and not isinstance(val(n), bool):
            return concrete(val(n))
        if n.op != "call_function":
            raise ReplayError(n, f"reads {n.op} {n.name}, which does not come from the replayed value")
        alias = self.shortcut(n)
        if alias is not None:
            return self(alias)
        if n.target in IDENTITY_OPS:
            return self(n.args[0])
        if self.scalar_identity and n.target in (aten.mul.Tensor, aten.div.Tensor) and _scalar(n.args[1]):
            self.scale *= n.args[1] if n.target is aten.mul.Tensor else 1.0 / n.args[1]
            return self(n.args[0])
        if n.target not in self.allowed:
            raise ReplayError(n, f"{_name(n.target)} is not a shape op")
        args, kwargs = fx.node.map_arg((n.args, n.kwargs), self)
        return n.target(*args, **kwargs)


def _scalar(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _name(target) -> str:
    return getattr(target, "__name__", str(target))


def _attr(n: fx.Node):
    mod = n.graph.owning_module
    obj = mod
    for part in str(n.target).split("."):
        obj = getattr(obj, part)
    if isinstance(obj, torch.nn.Parameter):
        raise ReplayError(n, f"reads parameter {n.target}")
    return obj


def shape(n: fx.Node) -> tuple[int, ...]:
    return tuple(concrete(s) for s in val(n).shape)


def index_tensor(n: fx.Node, features: int) -> torch.Tensor:
    """arange(features) along the last dim of n's example shape."""
    return torch.arange(features).expand(*shape(n)[:-1], features).contiguous()


def token_invariant(t: torch.Tensor, batch_dim: int, seq_dim: int) -> torch.Tensor | None:
    """t with batch and sequence dims dropped, if every (batch, position) holds the same indices; else None."""
    ref = t.select(seq_dim, 0).select(batch_dim, 0) if seq_dim > batch_dim else None
    if ref is None:
        return None
    moved = t.movedim((batch_dim, seq_dim), (0, 1))
    return ref if bool((moved == ref).all()) else None


def cone(src: fx.Node, end: fx.Node) -> list[fx.Node]:
    """Nodes that depend on `src` and that `end` depends on, in graph order (both included)."""
    up, stack = set(), [end]
    while stack:
        n = stack.pop()
        if n not in up:
            up.add(n)
            stack.extend(n.all_input_nodes)
    down, stack = set(), [src]
    while stack:
        n = stack.pop()
        if n not in down and n in up:
            down.add(n)
            stack.extend(n.users)
    return [n for n in src.graph.nodes if n in down]
