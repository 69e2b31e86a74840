"""SmoothQuant's analysis: which linears share one smoothing scale, and where its 1/s can go. Plain data; the
graph is never touched here.

A *smoothing group* is a set of linear sites that read one activation X (q/k/v of one attention, gate/up of one
MLP) and therefore share s. Its 1/s goes

  - into a norm ("norm"): X is the output of a norm op whose every reader is one of the group's linears, through
    casts and views that keep the channel (last) dim, and whose γ/β are constants (or absent) of shape [C];
  - into v's output rows ("V→O"): X is an attention's output read only by o_proj; attention mixes tokens, not
    channels, so o's input channel c is v's output row rows[c] scaled (per head, through the reshapes): v's
    rows and bias get 1/s (permute_nm's v/o proof decides legality; a row feeding several q heads (GQA) gets one
    s, the largest of theirs);
  - otherwise into the activation quantizer ("quantizer"): x·(1/s) inside quantize_int8, free in a fused kernel.
    Only the quantized linears of such a group are smoothed (a float reader of X keeps its weight).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import fx

from fxopt.pattern import CAST_TARGETS
from fxopt.sites import LinearSite, NormGroup, is_call, val
from fxopt.structure import Attention, Structure

aten = torch.ops.aten
_KEEPS_CHANNELS = (*CAST_TARGETS, aten.clone.default, aten.contiguous.default, aten.alias.default)
_RESHAPES = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


@dataclass(frozen=True, eq=False)
class VFold:
    """o's input channel c is v's output row `rows[c]` (a row may feed several channels: GQA)."""

    v: LinearSite
    rows: torch.Tensor  # [o.in_features] int64


@dataclass(frozen=True, eq=False)
class Group:
    sites: tuple[LinearSite, ...]  # every linear that gets the scale s (all read X, through channel-keeping ops)
    quantized: tuple[LinearSite, ...]  # those of `sites` the W8A8 rewrite replaces
    inputs: tuple[fx.Node, ...]  # the distinct input nodes of `sites` (one X, maybe seen through views)
    norm: NormGroup | None  # where 1/s is folded, or None: into the quantizer
    why_quantizer: str | None = None  # why no norm absorbs 1/s
    v_fold: VFold | None = None  # 1/s goes into v's rows (V→O) instead of the quantizer

    @property
    def destination(self) -> str:
        return (f"norm {self.norm.norm.name}" if self.norm is not None else
                f"{self.v_fold.v.weight_name} rows (V→O)" if self.v_fold is not None else "quantizer")

    @property
    def label(self) -> str:
        """The group's linears by module path, e.g. 'layers.0.self_attn.{q_proj,k_proj,v_proj}'."""
        paths = [s.weight_name.removesuffix(".weight").split(".") for s in self.sites]
        shared = os.path.commonprefix(paths) if len(paths) > 1 else paths[0][:-1]
        tails = [".".join(p[len(shared):]) for p in paths]
        return ".".join(shared + [tails[0] if len(tails) == 1 else "{" + ",".join(tails) + "}"])

    @property
    def channels(self) -> int:
        return self.sites[0].in_features


def _weight_arg(group: NormGroup) -> tuple[int, int | None]:
    """Positions of γ and β in the norm op's arguments (β None for RMSNorm)."""
    fused = group.fused_residual
    return (3, 4 if group.kind == "layer_norm" else None) if fused else (2, 3 if group.kind == "layer_norm" else None)


def _keeps_channels(x: fx.Node, out: fx.Node, channels: int) -> bool:
    """Whether `x` is `out` seen through casts and reshapes that keep the last dim (channel j stays j)."""
    n = x
    while n is not out:
        if not is_call(n, (*_KEEPS_CHANNELS, *_RESHAPES)):
            return False
        src = n.args[0]
        if is_call(n, _RESHAPES) and (val(src) is None or val(src).shape[-1] != channels
                                      or val(n).shape[-1] != channels):
            return False
        n = src
    return True


def why_not_foldable(group: NormGroup, sites: tuple[LinearSite, ...]) -> str | None:
    """Why the norm of `group` cannot absorb 1/s for its linears `sites`; None when it can."""
    norm = group.norm
    if group.other_readers:
        return f"norm {norm.name}'s output is also read by {', '.join(n.name for n in group.other_readers)}"
    shape_at = 2 if group.fused_residual else 1
    shape = list(norm.args[shape_at])
    channels = sites[0].in_features
    if shape != [channels]:
        return f"norm {norm.name} normalizes {shape}, not the {channels} input channels"
    for i in (p for p in _weight_arg(group) if p is not None):
        a = norm.args[i] if len(norm.args) > i else None
        if a is not None and (not isinstance(a, fx.Node) or a.op != "get_attr" or tuple(val(a).shape) != (channels,)):
            return f"norm {norm.name}'s affine argument {i} is not a [{channels}] constant"
    if not all(_keeps_channels(s.input, group.output, channels) for s in sites):
        return f"a linear reads norm {norm.name} through a view that moves channels"
    return None


def v_fold(a: Attention) -> VFold | str:
    """Where o's input channels come from in v's output rows, or why 1/s cannot go there."""
    from fxopt.passes.permute_nm.plan import Refused, vo_group  # the v/o channel proof, shared

    try:
        vo_group(0, a)
    except Refused as e:
        return str(e)
    rows = torch.full((a.o.in_features,), -1, dtype=torch.long)
    rows[a.o_cols.flatten()] = a.v_rows[list(a.kv_head_of)].flatten()
    return VFold(a.v, rows) if bool((rows >= 0).all()) else f"{a.o.weight_name} reads channels no v head writes"


def plan_groups(structure: Structure, quantize: set[LinearSite], fold_vo: bool = True) -> list[Group]:
    """Smoothing groups covering every site in `quantize` (and the float linears that share a norm with them)."""
    groups, claimed = [], set()
    for ng in structure.norm_groups:
        sites = tuple(ng.linears)
        if not sites or not any(s in quantize for s in sites):
            continue
        if len({s.in_features for s in sites}) == 1 and (why := why_not_foldable(ng, sites)) is None:
            inputs = tuple(dict.fromkeys(s.input for s in sites))
            groups.append(Group(sites, tuple(s for s in sites if s in quantize), inputs, ng))
            claimed |= set(sites)
    by_input: dict[fx.Node, list[LinearSite]] = {}
    for s in structure.linears:
        if s in quantize and s not in claimed:
            by_input.setdefault(s.input, []).append(s)
    attention_of = {b.attention.o: b.attention for b in structure.blocks if b.attention is not None}
    for x, sites in by_input.items():
        ng = next((g for g in structure.norm_groups if any(t in g.linears for t in sites)), None)
        why = "no norm op produces its input" if ng is None else why_not_foldable(ng, tuple(ng.linears))
        fold = v_fold(attention_of[sites[0]]) if fold_vo and len(sites) == 1 and sites[0] in attention_of else None
        if isinstance(fold, str):
            why, fold = f"{why}; not into v's rows: {fold}", None
        groups.append(Group(tuple(sites), tuple(sites), (x,), None, why or "its norm feeds other linears too", fold))
    return groups


def tie_rows(group: Group):
    """s -> s with one value per v row (the largest of the channels the row feeds: GQA) for a V→O fold."""
    if group.v_fold is None:
        return lambda s: s
    rows = group.v_fold.rows
    return lambda s: s.new_zeros(int(rows.max()) + 1).scatter_reduce(0, rows, s, "amax")[rows]


def v_rows(plans) -> dict:
    """{v site: 1/s on its output rows (ones elsewhere)} of every V→O fold in `plans` ((group, act, s, α), ...)."""
    out = {}
    for g, _, s, alpha in plans:
        if g.v_fold is not None and alpha is not None:
            v = g.v_fold.v
            r = out.setdefault(v, torch.ones(v.out_features, dtype=torch.float64))
            r[g.v_fold.rows] = 1 / s
    return out
