"""A small pattern language over fx nodes.

Patterns are data: `Op(targets, *args)` matches a call_function node whose target is one of `targets` and
whose positional arguments (schema defaults filled in) match `args`; `Var(name)` matches anything and binds
it (a name bound twice must bind the same node); `Const(name)` matches a Python number; any other value in
a pattern must be equal to the argument. `commutative=True` also tries the two leading arguments swapped.
`Cast(p)` matches `p` or a dtype conversion of something matching `p`.

Matching never mutates. Graphs are canonicalized first (compiler/canonicalize.py), so patterns name one
spelling of each computation.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

aten = torch.ops.aten

CAST_TARGETS = (aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout,
                torch.ops.prims.convert_element_type.default)


@dataclass(frozen=True)
class Var:
    name: str


@dataclass(frozen=True)
class Const:
    name: str


@dataclass(frozen=True)
class Op:
    targets: tuple
    args: tuple
    name: str | None = None
    commutative: bool = False

    def __init__(self, targets, *args, name: str | None = None, commutative: bool = False):
        object.__setattr__(self, "targets", tuple(targets) if isinstance(targets, (tuple, list)) else (targets,))
        object.__setattr__(self, "args", args)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "commutative", commutative)


@dataclass(frozen=True)
class Cast:
    inner: Any
    name: str | None = None


@dataclass
class Match:
    bindings: dict[str, Any] = field(default_factory=dict)
    nodes: list[fx.Node] = field(default_factory=list)  # every op node the pattern covered

    def __getitem__(self, key: str) -> Any:
        return self.bindings[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.bindings.get(key, default)


@functools.cache
def _schema_defaults(target) -> tuple[list[str], list[Any]]:
    schema = getattr(target, "_schema", None)
    if schema is None:
        return [], []
    names = [a.name for a in schema.arguments]
    defaults = [a.default_value if a.has_default_value() else None for a in schema.arguments]
    return names, defaults


def node_args(node: fx.Node) -> list[Any]:
    """Positional arguments with keyword arguments and schema defaults folded in."""
    names, defaults = _schema_defaults(node.target)
    args = list(node.args)
    for i in range(len(args), len(names)):
        args.append(node.kwargs.get(names[i], defaults[i]))
    return args


def is_cast(node: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in CAST_TARGETS


def match(pattern: Any, value: Any) -> Match | None:
    m = Match()
    return m if _match(pattern, value, m) else None


def _match(p: Any, v: Any, m: Match) -> bool:
    if isinstance(p, Var):
        return _bind(m, p.name, v)
    if isinstance(p, Const):
        return isinstance(v, numbers.Number) and not isinstance(v, bool) and _bind(m, p.name, v)
    if isinstance(p, Cast):
        if is_cast(v):
            saved = (dict(m.bindings), len(m.nodes))
            m.nodes.append(v)
            if _match(p.inner, v.args[0], m) and (p.name is None or _bind(m, p.name, v)):
                return True
            m.bindings, m.nodes[:] = saved[0], m.nodes[: saved[1]]
        return _match(p.inner, v, m)
    if isinstance(p, Op):
        if not (isinstance(v, fx.Node) and v.op == "call_function" and v.target in p.targets):
            return False
        args = node_args(v)
        if len(args) < len(p.args):
            return False
        orders = [args]
        if p.commutative:
            orders.append([args[1], args[0], *args[2:]])
        for order in orders:
            saved = (dict(m.bindings), len(m.nodes))
            if all(_match(pa, a, m) for pa, a in zip(p.args, order)) and (
                    p.name is None or _bind(m, p.name, v)):
                m.nodes.append(v)
                return True
            m.bindings, m.nodes[:] = saved[0], m.nodes[: saved[1]]
        return False
    if isinstance(p, (list, tuple)):
        return isinstance(v, (list, tuple)) and len(p) == len(v) and all(_match(a, b, m) for a, b in zip(p, v))
    return type(p) is type(v) and p == v if not isinstance(p, float) else isinstance(v, numbers.Number) and p == v


def _bind(m: Match, name: str, v: Any) -> bool:
    if name in m.bindings:
        return m.bindings[name] is v or (not isinstance(v, fx.Node) and m.bindings[name] == v)
    m.bindings[name] = v
    return True


def users_outside(nodes: Iterable[fx.Node], allowed: Sequence[fx.Node]) -> list[fx.Node]:
    """Inner nodes of a match that are used by something other than the match itself."""
    inside = set(nodes) | set(allowed)
    return [n for n in nodes if n not in allowed and any(u not in inside for u in n.users)]
