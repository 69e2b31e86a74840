"""Where an attention block's K and V heads live in the graph, and the proof that G of them can stand there.

For each of k and v of an attention core (compiler/structure.py), the path from its linear to the core is

    site.output ──(fused split: shape ops)──▶ pure ──(per-head ops: views, RoPE, casts)──▶ e ──(repeat_kv)──▶ end

`pure` is the first value holding only this operand's features that every path to the core goes through; its
layout is (tokens..., heads·head_dim) or a permutation of (tokens..., heads, head_dim), heads in the core's
order. `e` is the last value holding each kv head once, heads on dim 1: `end = e.repeat_interleave(r, 1)`
(r = 1 for MHA, or for SDPA reading kv heads itself). Every op between them must treat the heads alike —
constants broadcast over the head dims, binary ops combine the same head — so the same ops on G heads compute
what the model would with G kv heads. The literal sizes they carry are scaled on the head dims (found by
replaying head indices), and the plan is proven before anything is edited: the region is simulated on G heads
of an index tensor and must give exactly the original's heads 0, r', 2r', ... at `e`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import fx

from fxopt.attention_analysis import NotUnderstood, cache_write
from fxopt.replay import IDENTITY_OPS, SHAPE_OPS, Replay, _attr, concrete, cone, shape
from fxopt.sites import LinearSite, val
from fxopt.structure import Attention

from .paths import (
    POINTWISE,
    SIZES_AT_1,
    in_layout,
    is_tensor,
    passthrough,
    pure_node,
    scaled_args,
    size_positions,
    unflatten_at,
    varying_dims,
)

aten = torch.ops.aten


@dataclass(frozen=True, eq=False)
class OperandPlan:
    which: str  # "q" | "k" | "v"
    site: LinearSite
    rows: torch.Tensor  # (heads, head_dim): the site's output features, heads in the core's order
    pure: fx.Node
    perm: tuple[int, ...] | None  # pure = unflatten(-1, (heads, head_dim)).permute(perm); None: merged heads·dim
    region: tuple[fx.Node, ...] = ()  # after `pure` up to `e`, graph order: cloned on G heads
    head_dims: dict | None = None  # node -> the dims of its value that carry heads
    e: fx.Node | None = None
    end: fx.Node | None = None
    size_reads: tuple[fx.Node, ...] = ()  # off-path reads moved to the clone: sym_size (of a non-head dim), the
    # copy_ of a KV-cache update back into its buffer


def operand_plan(a: Attention, which: str, groups: int | None) -> OperandPlan:
    """The plan for q (groups=None: only its pure node, for a fused linear being split) or k/v (G = groups)."""
    site, rows = a.q if which == "q" else a.k if which == "k" else a.v, getattr(a, f"{which}_rows")
    end = getattr(a.core, which)
    path = cone(site.output, end)
    enc = torch.arange(math.prod(shape(site.output))).view(shape(site.output))
    t4 = enc[..., rows.flatten()].unflatten(-1, tuple(rows.shape))
    rp = Replay({site.output: enc}, SHAPE_OPS, passthrough(set(path)))
    pure, perm, below = pure_node(which, path, rp, t4, end)
    if groups is None:
        return OperandPlan(which, site, rows, pure, perm)
    heads = rows.shape[0]
    hid = torch.arange(heads).view(heads, 1).expand(rows.shape).expand(t4.shape)
    rph = Replay({pure: in_layout(hid, perm)}, SHAPE_OPS, passthrough(below))
    chain = [n for n in path if n in below]
    e = _last_once(chain, rp, rph, heads, end)
    region = [n for n in cone(pure, e) if n is not pure]
    head_dims = {n: varying_dims(rph(n)) for n in [pure, *region] if is_tensor(n)}
    for n in region:
        _check_per_head(n, below, rph, head_dims, heads, groups)
    size_reads = _outside_readers(chain + cone(end, a.core.output)[1:], end, set(region) | {pure}, head_dims)
    plan = OperandPlan(which, site, rows, pure, perm, tuple(region), head_dims, e, end, tuple(size_reads))
    _prove(plan, t4, rp, heads, groups)
    return plan


def _last_once(chain: list[fx.Node], rp: Replay, rph: Replay, heads: int, end: fx.Node) -> fx.Node:
    """The value nearest the core holding each kv head once on dim 1, with end = e.repeat_interleave(r, 1)."""
    want_end = rp(end)
    for n in reversed(chain):
        if not is_tensor(n) or val(n).dim() != val(end).dim() or shape(n)[1] != heads:
            continue
        if shape(n)[:1] + shape(n)[2:] != shape(end)[:1] + shape(end)[2:] or shape(end)[1] % heads:
            continue
        h = rph(n)
        if varying_dims(h) != {1} or not torch.equal(h.select(0, 0).flatten(1)[:, 0], torch.arange(heads)):
            continue
        if torch.equal(rp(n).repeat_interleave(shape(end)[1] // heads, 1), want_end):
            return n
    raise NotUnderstood(end, f"{end.name} is not a repeat along dim 1 of a value holding the {heads} kv heads "
                             "once, heads on dim 1")


def _check_per_head(n: fx.Node, path: set, rph: Replay, head_dims: dict, heads: int, groups: int) -> None:
    dims = head_dims.get(n, frozenset())
    if n.op != "call_function":
        raise NotUnderstood(n, f"{n.op} on the k/v path")
    if n.target in POINTWISE:
        on = [a for a in n.all_input_nodes if a in path]
        if len(on) > 1 and not all(torch.equal(rph(on[0]), rph(b)) for b in on[1:]):
            raise NotUnderstood(n, f"{n.name} combines different heads")
        rank = val(n).dim()
        for a in n.all_input_nodes:
            if a not in path and is_tensor(a):
                s = shape(a)
                if any(s[d - rank + len(s)] != 1 for d in dims if d - rank + len(s) >= 0):
                    raise NotUnderstood(n, f"{n.name} reads {a.name}, which differs between heads")
    elif cache_write(n) is not None:
        dim = n.args[1] % val(n).dim()
        if dim in dims or n.args[3] not in path or shape(n.args[0]) != shape(n):
            raise NotUnderstood(n, f"{n.name} writes the cache along a head dim, or not this path's values")
        if any(shape(n)[d] != heads for d in dims):
            raise NotUnderstood(n, f"{n.name}'s cache {n.args[0].name} does not keep the {heads} heads on one dim")
    elif n.target not in SHAPE_OPS and n.target not in IDENTITY_OPS and n.target is not aten.sym_size.int:
        raise NotUnderstood(n, f"{n.name} ({getattr(n.target, '__name__', n.target)}) is not a shape op or "
                               "pointwise on the k/v path")
    if (d := _selected_dim(n, head_dims)) is not None:
        raise NotUnderstood(n, f"{n.name} ({getattr(n.target, '__name__', n.target)}) selects or joins along a "
                               f"head dim ({d}): heads are treated differently")
    for i in size_positions(n, dims):
        size = n.args[1][i] if n.target in SIZES_AT_1 else n.args[2][i - unflatten_at(n)]
        if isinstance(size, int) and size != -1 and (size * groups) % heads:
            raise NotUnderstood(n, f"{n.name}'s size {size} on a head dim does not scale from {heads} to "
                                   f"{groups} heads")


# ops that pick, split or join along one dim (position of the dim argument, its default): on a head dim they
# treat heads differently, and their bounds are written for H heads
_ALONG_DIM = {aten.slice.Tensor: (1, 0), aten.narrow.default: (1, 0), aten.select.int: (1, 0),
              aten.index_select.default: (1, 0), aten.split.Tensor: (2, 0), aten.split_with_sizes.default: (2, 0),
              aten.chunk.default: (2, 0), aten.unbind.int: (1, 0), aten.cat.default: (1, 0),
              aten.stack.default: (1, 0), aten.repeat_interleave.self_int: (2, None)}


def _selected_dim(n: fx.Node, head_dims: dict) -> int | None:
    """The head dim of n's input that n selects, splits, joins, indexes or repeats along, if any."""
    first = n.args[0][0] if isinstance(n.args[0], (list, tuple)) else n.args[0]
    heads = head_dims.get(first, frozenset()) if isinstance(first, fx.Node) else frozenset()
    if not heads or not is_tensor(first):
        return None
    rank = val(first).dim()
    if n.target is aten.repeat_interleave.self_int and n.args[1] == 1:
        return None  # repeats nothing
    if n.target in _ALONG_DIM:
        at, default = _ALONG_DIM[n.target]
        dim = n.args[at] if len(n.args) > at else n.kwargs.get("dim", default)
        if dim is None:  # repeat_interleave without a dim flattens
            return min(heads)
        return dim % rank if dim % rank in heads else None
    if n.target is aten.index.Tensor:
        return next((d for d, i in enumerate(n.args[1]) if i is not None and d in heads), None)
    if n.target is aten.repeat.default:
        return next((d for d, r in enumerate(n.args[1][-rank:]) if r != 1 and d in heads), None)
    return None


def _outside_readers(chain: list[fx.Node], end: fx.Node, cloned: set, head_dims: dict) -> list[fx.Node]:
    """The sym_size reads of cloned values from off the path (they move to the clone); NotUnderstood for any
    other reader off the path from the projection through the attention core."""
    mine, reads = set(chain), []
    for n in chain[:chain.index(end) + 1]:
        for u in n.users:
            if u in mine:
                continue
            if (u.target is aten.sym_size.int and n in cloned and u.args[1] % val(n).dim()
                    not in head_dims.get(n, ())) or (n in cloned and _writes_back(u, n)):
                reads.append(u)
                continue
            raise NotUnderstood(n, f"{n.name}, on the way from the projection to the attention, is also read by "
                                   f"{u.name}: it would see G heads")
    return reads


def _writes_back(u: fx.Node, n: fx.Node) -> bool:
    """u = copy_(cache, n): the in-place update of the cache buffer that n = index_copy(cache, ...) computed."""
    return u.target is aten.copy_.default and cache_write(n) is not None and u.args[0] is n.args[0] and u.args[1] is n


def _prove(p: OperandPlan, t4: torch.Tensor, rp: Replay, heads: int, groups: int) -> None:
    """Run the region on G heads of the index tensor; `e` must hold the original's heads 0, r, 2r, ..."""
    keep = torch.arange(0, heads, heads // groups)
    values = {p.pure: in_layout(t4.index_select(-2, keep), p.perm)}
    shortcut = passthrough(set(p.region) | {p.pure})

    def lookup(a: fx.Node):
        if a in values:
            return values[a]
        if isinstance(val(a), (torch.SymInt, int)):
            return concrete(val(a))
        if a.op == "get_attr":
            return _attr(a)
        raise NotUnderstood(a, f"the k/v path reads {a.name}")

    try:
        for n in p.region:
            alias = shortcut(n)
            if alias is not None or n.target in IDENTITY_OPS:
                values[n] = values[alias if alias is not None else n.args[0]]
                continue
            args, kwargs = scaled_args(n, lookup, p.head_dims, heads, groups)
            values[n] = n.target(*args, **kwargs)
    except (RuntimeError, TypeError, IndexError) as e:
        raise NotUnderstood(n, f"{n.name} does not run on {groups} heads: {e}") from e
    if not torch.equal(values[p.e], rp(p.e).index_select(1, keep)):
        raise NotUnderstood(p.e, f"the path to {p.e.name} does not carry {groups} heads where it carried {heads}")
