"""Applying the permutations, all through the Rewriter, after every group's search is done:

    producer  W'[f] = W[π(f)], b'[f] = b[π(f)]   for f in a segment's features (rows of an (out, in) weight)
    consumer  W'[:, f] = W[:, π(f)]                                            (columns)
    gather    x' = index_select(x, -1, π)        read by the group's linears instead of x

A weight touched by several groups (GPT-2's c_attn: v's rows, and its columns by the input gather) gets all of
its row and column permutations in one new constant; other readers of a tied weight keep the old one.
"""

from __future__ import annotations

import torch
from torch import fx

from fxopt.replay import cone
from fxopt.rewrite import Rewriter, get_attr
from fxopt.sites import LinearSite

from .plan import Group

aten = torch.ops.aten
META = "fxopt_nm"  # on a permuted consumer's weight: {"n", "m", "kept_before"}: its kept magnitude unpermuted


def _index(site: LinearSite, table: dict, which: int) -> torch.Tensor:
    entry = table.setdefault(id(site), [site, torch.arange(site.out_features), torch.arange(site.in_features)])
    return entry[which]


def apply_permutations(rw: Rewriter, plans: list[tuple[Group, list[torch.Tensor]]], n: int, m: int,
                       kept_before: dict[int, float]) -> None:
    table: dict[int, list] = {}
    for group, perms in plans:
        for site, feats in group.producers:
            rows = _index(site, table, 1)
            for f, pi in zip(feats, perms):
                rows[f] = f[pi]
        for site, feats in group.consumers:
            cols = _index(site, table, 2)
            for f, pi in zip(feats, perms):
                cols[f] = f[pi]
        for x in group.gathered:
            readers = [s for s, _ in group.consumers if s.input is x]
            _gather(rw, x, readers, perms[0])
    for site, rows, cols in table.values():
        w = get_attr(rw.gm, site.weight.target).detach()
        w = (w[rows][:, cols] if site.layout == "out_in" else w[cols][:, rows]).contiguous()
        new = rw.replace_constant_for(site.weight, site.node, w)
        if id(site) in kept_before:
            new.meta[META] = {"n": n, "m": m, "kept_before": kept_before[id(site)]}
        if site.bias is not None and not torch.equal(rows, torch.arange(site.out_features)):
            reader = next(u for u in site.bias.users if u in set(cone(site.node, site.output)) | {site.node})
            rw.replace_constant_for(site.bias, reader, get_attr(rw.gm, site.bias.target).detach()[rows])
        rw.counts["permuted_linear"] += 1


def _gather(rw: Rewriter, x: fx.Node, readers: list[LinearSite], pi: torch.Tensor) -> None:
    order = {nd: i for i, nd in enumerate(rw.graph.nodes)}
    nodes = [s.reshapes[0] if s.reshapes else s.node for s in readers]  # the node of each site that reads x
    first = min(nodes, key=order.__getitem__)
    index = rw.constant(f"{x.name}_perm", pi.clone(), before=first)
    gathered = rw.call(aten.index_select.default, (x, -1, index), before=first, like=x)
    for node in dict.fromkeys(nodes):
        rw.set_arg(node, list(node.args).index(x), gathered)
    rw.counts["input_gather"] += 1
