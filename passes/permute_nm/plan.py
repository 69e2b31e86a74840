"""Permutation groups, from the structure analysis: whose rows and whose columns share one channel permutation.

    ffn    up (and gate) output rows + bias  ↔  down input columns            through the elementwise activation
    vo     v output rows + bias, per kv head  ↔  o input columns of the q heads reading it   (attention mixes
           tokens, not channels, so any within-head permutation commutes with it)
    input  a linear whose input no producer can absorb (q/k/v and up/gate after a norm, or any group member
           that was refused) reads its input through one index_select shared by every linear reading that value

A group is legal only when proven: every value between the producers and the consumers is read by nothing else
(a graph output, a KV-cache buffer, another op), and the region between them is channel-equivariant, checked by
replaying it on a random probe and on the same probe permuted (ffn), or given by the analysis' rows and columns
(vo: shape ops only, replayed by the structure analysis). A refused group says why.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from fxopt.attention_analysis import cache_write
from fxopt.replay import SHAPE_OPS, Replay, ReplayError, cone, index_tensor, shape
from fxopt.sites import LinearSite, through, val
from fxopt.structure import ELEMENTWISE, MLP, Attention, Structure

Features = torch.Tensor  # (segments, width): feature indices; one permutation per segment


@dataclass(frozen=True, eq=False)
class Group:
    name: str
    kind: str  # "ffn" | "vo" | "input"
    producers: tuple[tuple[LinearSite, Features], ...]  # output features permuted (rows, bias)
    consumers: tuple[tuple[LinearSite, Features], ...]  # input features permuted (columns)
    gathered: tuple[fx.Node, ...] = field(default=())  # "input": the values read through an index_select

    @property
    def segments(self) -> int:
        return self.consumers[0][1].shape[0]


class Refused(Exception):
    pass


def _readers(site: LinearSite) -> set[fx.Node]:
    return {site.node, *site.reshapes}


def _closed(region: list[fx.Node], allowed: set[fx.Node], what: str, elsewhere=None) -> None:
    """Nothing outside `region` ∪ `allowed` reads a value of `region`, but readers `elsewhere(u)` accepts."""
    inside = set(region) | allowed
    for n in region:
        if n.op == "output" or any(u.op == "output" for u in n.users):
            raise Refused(f"{n.name} ({what}) is a graph output")
        if cache_write(n) is not None:
            raise Refused(f"{n.name} writes {what} into the cache buffer {n.args[0].target} (state kept between "
                          "calls)")
        outside = [u for u in n.users if u not in inside]
        if elsewhere is not None:
            for u in outside:
                elsewhere(u)
        elif outside:
            raise Refused(f"{n.name} ({what}) is also read by {outside[0].name}")


def _bias_ok(site: LinearSite) -> None:
    if site.bias is not None and site.bias.op != "get_attr":
        raise Refused(f"{site.weight_name}: bias {site.bias.name} is computed, not a constant")


def ffn_group(index: int, mlp: MLP) -> Group:
    ups = [s for s in (mlp.up, mlp.gate) if s is not None]
    width = mlp.down.in_features
    for s in ups:
        _bias_ok(s)
        if s.out_features != width:
            raise Refused(f"{s.weight_name} has {s.out_features} outputs, {mlp.down.weight_name} {width} inputs")
    end = mlp.down.input
    region = list(dict.fromkeys(n for s in ups for n in cone(s.output, end)))
    _closed([n for n in region if n is not end], {end}, "the MLP's hidden activation")
    _closed([end], _readers(mlp.down), "the MLP's hidden activation")
    _prove_equivariant(ups, end, width)
    every = torch.arange(width)[None]
    return Group(f"block {index} ffn", "ffn", tuple((s, every) for s in ups), ((mlp.down, every),))


def _prove_equivariant(ups: list[LinearSite], end: fx.Node, width: int) -> None:
    """act(z)[π] = act(z[π]) on the graph's own region, for a random probe and a random π."""
    gen = torch.Generator().manual_seed(0)
    pi = torch.randperm(width, generator=gen)
    probes = {s.output: torch.randn(shape(s.output), generator=gen, dtype=torch.float64) for s in ups}
    try:
        plain = Replay(probes, ELEMENTWISE)(end)
        permuted = Replay({k: v[..., pi] for k, v in probes.items()}, ELEMENTWISE)(end)
    except (ReplayError, RuntimeError, TypeError, IndexError) as e:
        raise Refused(f"the region from {ups[0].weight_name} to {end.name} is not elementwise: {e}") from e
    if plain.shape[-1] != width or not torch.allclose(permuted, plain[..., pi], rtol=1e-12, atol=0):
        raise Refused(f"the region from {ups[0].weight_name} to {end.name} does not commute with a channel "
                      "permutation")


def vo_group(index: int, a: Attention) -> Group:
    _bias_ok(a.v)
    core = a.core
    region = cone(a.v.output, core.v)
    rows = set(a.v_rows.flatten().tolist())
    for which, site, other in (("k", a.k, a.k_rows), ("q", a.q, a.q_rows)):
        if site is a.v and rows & set(other.flatten().tolist()):
            raise Refused(f"{a.v.weight_name}'s v features are also read as {which}")
    if {core.q, core.k, getattr(core, "k_transposed", None)} & set(region):
        raise Refused(f"v's path from {a.v.weight_name} is also the attention's q or k")
    _closed(region, {core.node, core.output}, "v", lambda u: _disjoint(u, a.v, rows))
    extra = [u for u in a.o.input.users if u not in _readers(a.o)]
    if extra:
        raise Refused(f"the attention output {a.o.input.name} is also read by {extra[0].name}")
    groups = [[h for h, g in enumerate(a.kv_head_of) if g == kv] for kv in range(a.num_kv_heads)]
    consumers = tuple((a.o, a.o_cols[[heads[j] for heads in groups]]) for j in range(len(groups[0])))
    return Group(f"block {index} v/o", "vo", ((a.v, a.v_rows),), consumers)


def _disjoint(u: fx.Node, site: LinearSite, rows: set) -> None:
    """A reader of a fused projection's output that takes none of v's features (q's and k's parts of a split)."""
    try:
        got = Replay({site.output: index_tensor(site.output, site.out_features)}, SHAPE_OPS)(u)
    except (ReplayError, RuntimeError, TypeError, IndexError) as e:
        raise Refused(f"{u.name} reads {site.weight_name}'s output other than as q/k/v: {e}") from e
    parts = got if isinstance(got, (list, tuple)) else [got]
    if any(rows & set(p.flatten().tolist()) for p in parts if isinstance(p, torch.Tensor)):
        raise Refused(f"{u.name} also reads v's features of {site.weight_name}")


def input_groups(sites: list[LinearSite], taken: set[int]) -> list[Group]:
    """Linears whose columns no group permutes, grouped by the value they read: one gather each."""
    by_input: dict[fx.Node, list[LinearSite]] = {}
    for s in sites:
        if id(s) not in taken and int(val(s.input).shape[-1]) == s.in_features:
            by_input.setdefault(through(s.input), []).append(s)
    out = []
    for src, members in by_input.items():
        every = torch.arange(members[0].in_features)[None]
        if all(s.in_features == members[0].in_features for s in members):
            out.append(Group(f"input {src.name} → {', '.join(s.weight_name for s in members)}", "input", (),
                             tuple((s, every) for s in members), tuple(dict.fromkeys(s.input for s in members))))
    return out


def plan_groups(structure: Structure, targets: set[int], kinds: set[str]) -> tuple[list[Group], list[str]]:
    """The groups of `kinds` ("ffn", "vo", "input") whose consumers are all in `targets` (ids of sites), and the
    refusals with their reasons."""
    groups, reasons = [], []
    for b in structure.blocks:
        for make, part in ((ffn_group, b.mlp), (vo_group, b.attention)):
            if part is None or ("ffn" if make is ffn_group else "vo") not in kinds:
                continue
            try:
                g = make(b.index, part)
            except Refused as e:
                reasons.append(f"block {b.index} {'ffn' if make is ffn_group else 'v/o'}: {e}")
                continue
            if all(id(s) in targets for s, _ in g.consumers):
                groups.append(g)
    if "input" in kinds:
        taken = {id(s) for g in groups for s, _ in g.consumers}
        groups += input_groups([s for s in structure.linears if id(s) in targets], taken)
    return groups, reasons
