"""The pattern language over fx nodes. Patterns are data; matching never mutates.

    Var("x", where=pred)          anything; binds it (a name bound twice must bind the same node)
    Const("eps", where=pred)      a Python number (not a node, not a bool)
    Op(targets, *args, name=, commutative=, users=, where=, label=)
                                  a call_function node whose target is one of `targets` and whose positional
                                  arguments (keywords and schema defaults folded in) match `args`; `users=n`
                                  requires exactly n users; `commutative` also tries the two leading arguments
                                  swapped; `label` says in words what it is (used in failure reasons)
    AnyOf(p1, p2, ..., name=)     the first alternative that matches (backtracking over the rest)
    Through(p, VIEWS | CASTS, name=, max=)
                                  `p`, seen through up to `max` declared look-through ops (views, casts);
                                  `name` binds the outermost node (the value the consumer reads)
    Cast(p, name=)                `p` or one dtype conversion of it (Through with CASTS, max 1)
    maybe(wrap, p)                an optional tail: AnyOf(wrap(p), p)
    Multi(p1, p2, ...)            several roots matched together, sharing variables (`match_multi`)

Any other value in a pattern must equal the argument (floats compare numerically). Predicates return
`None`/`True` for success, or `False`/a reason string for failure; they see the value and the bindings so far.

`explain(pattern, node)` returns a `Match` or the `MatchFailure` that got furthest, with the node and reason,
so that "why didn't this apply" comes from the matcher itself. Graphs are canonicalized first
(compiler/canonicalize.py), so patterns name one spelling of each computation.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

aten = torch.ops.aten

CAST_TARGETS = (aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout,
                torch.ops.prims.convert_element_type.default)
VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
CASTS = CAST_TARGETS
Predicate = Callable[[Any, "Match"], Any]


@dataclass(frozen=True)
class Var:
    name: str
    where: Predicate | None = None


@dataclass(frozen=True)
class Const:
    name: str
    where: Predicate | None = None


@dataclass(frozen=True)
class Op:
    targets: tuple
    args: tuple
    name: str | None = None
    commutative: bool = False
    users: int | None = None
    where: Predicate | None = None
    label: str | None = None

    def __init__(self, targets, *args, name: str | None = None, commutative: bool = False,
                 users: int | None = None, where: Predicate | None = None, label: str | None = None):
        targets = tuple(targets) if isinstance(targets, (tuple, list)) else (targets,)
        for k, v in (("targets", targets), ("args", args), ("name", name), ("commutative", commutative),
                     ("users", users), ("where", where), ("label", label)):
            object.__setattr__(self, k, v)


@dataclass(frozen=True)
class AnyOf:
    alternatives: tuple
    name: str | None = None

    def __init__(self, *alternatives, name: str | None = None):
        object.__setattr__(self, "alternatives", alternatives)
        object.__setattr__(self, "name", name)


@dataclass(frozen=True)
class Through:
    inner: Any
    targets: tuple = VIEWS
    name: str | None = None
    max: int = 4


def Cast(inner: Any, name: str | None = None) -> Through:  # noqa: N802 - a pattern constructor
    return Through(inner, CASTS, name, 1)


def maybe(wrap: Callable[[Any], Any], inner: Any) -> AnyOf:
    """An optional tail: `wrap(inner)` where it matches, else `inner` alone."""
    return AnyOf(wrap(inner), inner)


@dataclass(frozen=True)
class Multi:
    roots: tuple

    def __init__(self, *roots):
        object.__setattr__(self, "roots", roots)


@dataclass(frozen=True)
class MatchFailure:
    """Why a pattern did not match: the node where it failed and the reason."""

    reason: str
    node: fx.Node | None = None
    depth: int = 0  # op nodes matched before the failure (the furthest failure is the one reported)
    bound: frozenset = frozenset()  # names bound when it failed
    covered: tuple = ()  # a complete match's nodes, where its check failed

    def __str__(self) -> str:
        return f"{self.node.name}: {self.reason}" if isinstance(self.node, fx.Node) else self.reason


@dataclass
class Match:
    bindings: dict[str, Any] = field(default_factory=dict)
    nodes: list[fx.Node] = field(default_factory=list)  # every op node the pattern covered, inner first
    root: fx.Node | None = None
    failure: MatchFailure | None = None  # the furthest failure seen (also on success, after backtracking)
    holder: fx.Node | None = field(default=None, repr=False)  # the op node whose arguments are being matched

    def __getitem__(self, key: str) -> Any:
        return self.bindings[key]

    def __contains__(self, key: str) -> bool:
        return key in self.bindings

    def get(self, key: str, default: Any = None) -> Any:
        return self.bindings.get(key, default)

    def _fail(self, reason: str, node: Any) -> bool:
        depth = len(self.nodes)
        if self.failure is None or depth > self.failure.depth:
            # a failure on a literal argument is named by the op node that holds it
            self.failure = MatchFailure(reason, node if isinstance(node, fx.Node) else self.holder, depth,
                                        frozenset(self.bindings))
        return False


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


def is_call(node: Any, targets: Iterable | None = None) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and (
        targets is None or node.target in tuple(targets))


def is_cast(node: Any) -> bool:
    return is_call(node, CAST_TARGETS)


def describe(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._schema.name.split('::')[-1]}"
    return getattr(target, "__name__", str(target))


def _what(v: Any) -> str:
    if is_call(v):
        return describe(v.target)
    if isinstance(v, fx.Node):
        return f"{v.op} {v.name}"
    return repr(v)


def match(pattern: Any, value: Any) -> Match | None:
    m = explain(pattern, value)
    return m if isinstance(m, Match) else None


def explain(pattern: Any, value: Any) -> Match | MatchFailure:
    """The match of `pattern` rooted at `value`, or the furthest failure with its node and reason."""
    m = Match(root=value if isinstance(value, fx.Node) else None)
    if _match(pattern, value, m):
        return m
    return m.failure or MatchFailure("no match", value if isinstance(value, fx.Node) else None)


def _check(pred: Predicate | None, v: Any, m: Match, node: Any) -> bool:
    if pred is None:
        return True
    verdict = pred(v, m)
    if verdict is None or verdict is True:
        return True
    return m._fail(verdict if isinstance(verdict, str) else f"{_what(v)} fails {pred.__name__}", node)


def _match(p: Any, v: Any, m: Match) -> bool:
    if isinstance(p, Var):
        return _bind(m, p.name, v) and _check(p.where, v, m, v)
    if isinstance(p, Const):
        if not isinstance(v, numbers.Number) or isinstance(v, bool):
            return m._fail(f"expected a constant for {p.name}, got {_what(v)}", v)
        return _bind(m, p.name, v) and _check(p.where, v, m, v)
    if isinstance(p, AnyOf):
        for alt in p.alternatives:
            saved = _save(m)
            if _match(alt, v, m) and (p.name is None or _bind(m, p.name, v)):
                return True
            _restore(m, saved)
        return False
    if isinstance(p, Through):
        return _match_through(p, v, m)
    if isinstance(p, Op):
        return _match_op(p, v, m)
    if isinstance(p, (list, tuple)):
        if not (isinstance(v, (list, tuple)) and len(p) == len(v)):
            return m._fail(f"expected {list(p)!r}, got {_what(v)}", None)
        return all(_match(a, b, m) for a, b in zip(p, v))
    same = (isinstance(v, numbers.Number) and not isinstance(v, bool) and p == v) if isinstance(p, float) \
        else (type(p) is type(v) and p == v)
    return same or m._fail(f"expected {p!r}, got {_what(v)}", v)


def _match_op(p: Op, v: Any, m: Match) -> bool:
    if not (is_call(v) and v.target in p.targets):
        want = p.label or " | ".join(describe(t) for t in p.targets)
        return m._fail(f"expected {want}, found {_what(v)}", v)
    if p.users is not None and len(v.users) != p.users:
        what = p.label or describe(v.target)
        return m._fail(f"{what} has {len(v.users)} users where the pattern allows {p.users} "
                       f"(its value is used elsewhere)", v)
    args = node_args(v)
    if len(args) < len(p.args):
        return m._fail(f"{describe(v.target)} has {len(args)} arguments, expected {len(p.args)}", v)
    orders = [args] + ([[args[1], args[0], *args[2:]]] if p.commutative else [])
    outer = m.holder
    for order in orders:
        saved = _save(m)
        m.nodes.append(v)
        if _match_args(p.args, order, v, m) and (p.name is None or _bind(m, p.name, v)) \
                and _check(p.where, v, m, v):
            m.nodes.remove(v)
            m.nodes.append(v)  # inner nodes first, the root last
            m.holder = outer
            return True
        _restore(m, saved)
    m.holder = outer
    return False


def _match_args(patterns: Sequence[Any], values: Sequence[Any], holder: fx.Node, m: Match) -> bool:
    for pa, a in zip(patterns, values):
        m.holder = holder
        if not _match(pa, a, m):
            return False
    return True


def _match_through(p: Through, v: Any, m: Match) -> bool:
    chain, cur = [], v
    while len(chain) < p.max and is_call(cur, p.targets):
        chain.append(cur)
        cur = cur.args[0]
    # the longest look-through first, then shorter ones: `p` may itself start with a declared op
    for k in range(len(chain), -1, -1):
        saved = _save(m)
        m.nodes.extend(chain[:k])
        inner = chain[k - 1].args[0] if k else v
        if _match(p.inner, inner, m) and (p.name is None or _bind(m, p.name, v)):
            return True
        _restore(m, saved)
    return False


def _save(m: Match) -> tuple[dict, int]:
    return dict(m.bindings), len(m.nodes)


def _restore(m: Match, saved: tuple[dict, int]) -> None:
    m.bindings = saved[0]
    del m.nodes[saved[1]:]


def _bind(m: Match, name: str, v: Any) -> bool:
    if name in m.bindings:
        old = m.bindings[name]
        if old is v or (not isinstance(v, fx.Node) and not isinstance(old, fx.Node) and old == v):
            return True
        return m._fail(f"{name} must be the same value in both places: {_what(old)} and {_what(v)}", v)
    m.bindings[name] = v
    return True


def match_multi(pattern: Multi, root: fx.Node, candidates: Callable[[Match, int], Sequence[fx.Node]]
                ) -> Match | MatchFailure:
    """Match `pattern.roots[0]` at `root`, then each further root at one of `candidates(match, i)` (e.g. the
    users of a node already bound), sharing variables; backtracks over the candidates."""
    m = Match(root=root)
    if not _match(pattern.roots[0], root, m):
        return m.failure or MatchFailure("no match", root)

    missing: list[tuple[int, MatchFailure]] = []  # the furthest root no candidate matched, and why

    def rest(i: int) -> bool:
        if i == len(pattern.roots):
            return True
        for node in candidates(m, i):
            if node in m.nodes:
                continue
            saved = _save(m)
            if _match(pattern.roots[i], node, m) and rest(i + 1):
                return True
            _restore(m, saved)
        if not missing or missing[-1][0] < i:  # a later root that could not be placed says more
            closest = f" (closest: {m.failure})" if m.failure else ""
            missing.append((i, MatchFailure(f"no node matches root {i} of the pattern{closest}", root,
                                            len(m.nodes), frozenset(m.bindings))))
        return False

    return m if rest(1) else missing[-1][1]


def users_outside(nodes: Iterable[fx.Node], allowed: Sequence[fx.Node]) -> list[fx.Node]:
    """Inner nodes of a match that are used by something other than the match itself."""
    nodes = list(nodes)
    inside = set(nodes) | set(allowed)
    return [n for n in nodes if n not in allowed and any(u not in inside for u in n.users)]
