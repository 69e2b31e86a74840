"""Applying an attention block's plan (plan.py): pooled K/V projections, the per-head path on G heads, the repeat.

    k' = linear(x, Wk'[G·dh, d], bk')        Wk'[g, :] = mean of Wk over kv heads g·r … g·r + r − 1 (init="mean")
    pure' = k' in pure's layout → the region's own ops, head-dim sizes scaled → e' (B, G, ...)
    end'  = e'.unsqueeze(2).expand(-1, -1, H_end / G, ...).flatten(1, 2)      (repeat_kv; none when H_end = G)

A KV cache written on the path (index_copy into a buffer) gets a G-head buffer holding each group's mean, and
its in-place update writes that buffer. A fused linear is split the same way: its q part becomes a linear of the
q rows alone, laid out as q's pure node was, so nothing reads the fused product any more and its K/V rows go with it.
"""

from __future__ import annotations

import torch
from torch import fx

from fxopt.attention_analysis import cache_write
from fxopt.rewrite import SOURCE, Rewriter, get_attr
from fxopt.sites import val

from .plan import OperandPlan, scaled_args

aten = torch.ops.aten


def _out_in(rw: Rewriter, p: OperandPlan) -> tuple[torch.Tensor, torch.Tensor | None]:
    w = get_attr(rw.gm, p.site.weight.target).detach()
    w = w if p.site.layout == "out_in" else w.t()
    b = None if p.site.bias is None else get_attr(rw.gm, p.site.bias.target).detach()
    return w, b


def projection(rw: Rewriter, p: OperandPlan, groups: int | None, init: str, seed: int):
    """(weight, bias) of the operand's new linear, [G·dh, d] (or q's rows as they are when groups is None)."""
    w, b = _out_in(rw, p)
    heads, dim = p.rows.shape
    rows = w[p.rows.flatten()].view(heads, dim, -1)
    brows = None if b is None else b[p.rows.flatten()].view(heads, dim)
    if groups is None:
        return rows.reshape(heads * dim, -1), None if brows is None else brows.reshape(-1)
    per = heads // groups

    def pool(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        grouped = t.double().unflatten(0, (groups, per))
        if init == "mean":
            out = grouped.mean(1)
        elif init == "first":
            out = grouped[:, 0]
        else:
            out = torch.randn(grouped[:, 0].shape, generator=gen, dtype=torch.float64) * grouped.std()
        return out.reshape(groups * dim, *t.shape[2:]).to(t.dtype)

    gen = torch.Generator().manual_seed(seed)
    return pool(rows, gen), None if brows is None else pool(brows, gen)


def _pooled_cache(rw: Rewriter, write: fx.Node, dims: frozenset, groups: int) -> fx.Node:
    cache = get_attr(rw.gm, write.args[0].target)
    (d,) = dims
    pooled = cache.double().unflatten(d, (groups, cache.shape[d] // groups)).mean(d + 1).to(cache.dtype)
    return rw.constant(str(write.args[0].target), pooled.contiguous(), before=write)


def identical_within_groups(rw: Rewriter, p: OperandPlan, groups: int) -> bool:
    """Whether every group's heads have the same weight rows (and bias): then pooling changes nothing."""
    w, b = _out_in(rw, p)
    heads, dim = p.rows.shape
    for t in (w[p.rows.flatten()], None if b is None else b[p.rows.flatten()]):
        if t is not None:
            g = t.reshape(groups, heads // groups, -1)
            if not torch.equal(g, g[:, :1].expand_as(g)):
                return False
    return True


def apply(rw: Rewriter, p: OperandPlan, weight: torch.Tensor, bias: torch.Tensor | None,
          groups: int | None, repeat: int = 1) -> list[str]:
    """Replace p's pure node by the new linear (and, for k/v, the region by its G-head clone, `end` by the
    G heads repeated `repeat` times along dim 1). Returns the new parameters' names."""
    before = p.pure
    w = rw.constant(p.site.weight_name, weight, before=before, parameter=True)
    w.meta[SOURCE] = p.site.weight_name  # the projection it replaces, by the model's name
    b = None if bias is None else rw.constant(str(p.site.bias.target), bias, before=before, parameter=True)
    lin = rw.call(aten.linear.default, (p.site.input, w, b), before=before, like=before)
    dim = p.rows.shape[1]
    new = lin
    if p.perm is not None:
        new = rw.call(aten.unflatten.int, (lin, -1, (weight.shape[0] // dim, dim)), before=before, like=before)
        if p.perm != tuple(range(len(p.perm))):
            new = rw.call(aten.permute.default, (new, list(p.perm)), before=before, like=before)
    names = [str(w.target)] + ([] if b is None else [str(b.target)])
    if groups is None:
        rw.replace(p.pure, new, "split_fused_q")
        return names
    heads = p.rows.shape[0]
    clones = {p.pure: new}
    for n in p.region:
        if cache_write(n) is not None:  # the cache buffer itself gets G heads: each group's mean
            clones[n.args[0]] = _pooled_cache(rw, n, p.head_dims[n], groups)
        args, kwargs = scaled_args(n, lambda a: clones.get(a, a), p.head_dims, heads, groups)
        clones[n] = rw.call(n.target, args, kwargs, before=n, like=n)
    for s in p.size_reads:
        moved = rw.call(s.target, tuple(clones.get(a, a) for a in s.args), before=s, like=s)
        rw.replace(s, moved)
        if s.target is aten.copy_.default:
            rw.graph.erase_node(s)
    end = clones[p.e]
    if repeat > 1:
        rank = val(p.end).dim()
        up = rw.call(aten.unsqueeze.default, (end, 2), before=p.end, like=p.end)
        wide = rw.call(aten.expand.default, (up, [-1, -1, repeat] + [-1] * (rank - 2)), before=p.end, like=p.end)
        end = rw.call(aten.flatten.using_ints, (wide, 1, 2), before=p.end, like=p.end)
    rw.replace(p.end, end, f"{p.which}_heads_pooled")
    return names
