"""Reading a K/V path by replaying index tensors: the cone between two nodes, the pure node and its layout, the
dims that carry heads, and an op's literal sizes on those dims scaled from H to G heads."""

from __future__ import annotations

import math
from itertools import permutations

import torch
from torch import fx

from fxopt.attention_analysis import NotUnderstood, cache_write
from fxopt.replay import SHAPE_OPS, Replay, ReplayError, shape
from fxopt.sites import val
from fxopt.structure import ELEMENTWISE

aten = torch.ops.aten
POINTWISE = frozenset(ELEMENTWISE - SHAPE_OPS)
SIZES_AT_1 = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default)


def passthrough(path: set):
    """Replay shortcut: a pointwise op stands for its (same-shaped) input on the path — it moves no element — and
    a KV-cache write for the entries it writes (attention_analysis.cache_write)."""
    def shortcut(n: fx.Node):
        if cache_write(n) is not None and n.args[3] in path:
            return n.args[3]
        if n.op == "call_function" and n.target in POINTWISE:
            ins = [a for a in n.all_input_nodes if a in path]
            if ins and shape(ins[0]) == shape(n):
                return ins[0]
        return None
    return shortcut


def layout_of(u: torch.Tensor, t4: torch.Tensor) -> tuple[bool, tuple[int, ...] | None]:
    merged = t4.flatten(-2)
    if u.shape == merged.shape and torch.equal(u, merged):
        return True, None
    for perm in permutations(range(t4.dim())):
        p = t4.permute(perm)
        if p.shape == u.shape and torch.equal(p, u):
            return True, perm
    return False, None


def in_layout(t4: torch.Tensor, perm: tuple[int, ...] | None) -> torch.Tensor:
    return t4.flatten(-2) if perm is None else t4.permute(perm)


def is_tensor(n) -> bool:
    return isinstance(val(n), torch.Tensor)


def pure_node(which: str, path: list[fx.Node], rp: Replay, t4: torch.Tensor, end: fx.Node):
    """The first value of `path` that holds exactly t4's elements in a known layout and dominates `end`."""
    features = int(val(path[0]).shape[-1])
    wanted = set(t4.flatten().remainder(features).tolist())
    on_path = set(path)
    for i, n in enumerate(path):
        if not is_tensor(n) or math.prod(shape(n)) != t4.numel():
            continue
        try:
            u = rp(n)
        except (ReplayError, RuntimeError, TypeError, IndexError):
            continue
        if set(u.flatten().remainder(features).tolist()) != wanted:
            continue
        below = dominated(n, path[i:], on_path)
        if end not in below:
            continue
        found, perm = layout_of(u, t4)
        if found:
            return n, perm, below
    raise NotUnderstood(end, f"no value on the path from {path[0].name} holds only the {which} heads, in "
                             "(tokens, heads, head_dim) order, on every way to the attention")


def dominated(n: fx.Node, rest: list[fx.Node], on_path: set) -> set:
    """Nodes of `rest` (graph order, starting at n) every path input of which comes from n or its dominated."""
    dom = {n}
    for m in rest[1:]:
        ins = [a for a in m.all_input_nodes if a in on_path]
        if ins and all(a in dom for a in ins):
            dom.add(m)
    return dom


def varying_dims(t: torch.Tensor) -> frozenset[int]:
    return frozenset(d for d in range(t.dim()) if t.shape[d] > 1 and bool((t.diff(dim=d) != 0).any()))


def unflatten_at(n: fx.Node) -> int:
    return n.args[1] % val(n).dim() if n.args[1] >= 0 else n.args[1] + val(n).dim() - len(n.args[2]) + 1


def size_positions(n: fx.Node, dims: frozenset) -> list[int]:
    """The output dims of n whose literal size is written in its arguments and carry heads."""
    if n.target in SIZES_AT_1:
        return sorted(dims)
    if n.target is aten.unflatten.int:
        at = unflatten_at(n)
        return [d for d in sorted(dims) if at <= d < at + len(n.args[2])]
    return []


def scaled_args(n: fx.Node, lookup, head_dims: dict, heads: int, groups: int):
    """n's arguments with nodes looked up and literal head-dim sizes scaled from `heads` to `groups`."""
    args, kwargs = fx.node.map_arg((n.args, n.kwargs), lookup)
    positions = size_positions(n, head_dims.get(n, frozenset()))
    if positions:
        at, offset = (1, 0) if n.target in SIZES_AT_1 else (2, unflatten_at(n))
        sizes = list(args[at])
        for d in positions:
            if isinstance(sizes[d - offset], int) and sizes[d - offset] != -1:
                sizes[d - offset] = sizes[d - offset] * groups // heads
        args = (*args[:at], sizes, *args[at + 1:])
    return args, kwargs
