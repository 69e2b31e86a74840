"""Channel permutation for N:M sparsity (Pool & Yu 2021; algorithms.md §3): the same function, weights whose
N:M masks keep more magnitude.

    W_c[:, π] · f(W_p[π] x + b_p[π]) = W_c · f(W_p x + b_p)        f elementwise (ffn), or attention (v/o, per head)
    W[:, π] · x[π]                    = W · x                       (input: one index_select per value read)

Groups (plan.py) come from the structure analysis and are applied only where proven; the permutation of each
group is searched on its consumers' weights stacked along rows (search.py), and a group whose best is the
identity is left untouched. The report's notes give, per group, the kept magnitude before → after and the
efficacy; each consumer weight records its unpermuted kept magnitude for `prune_nm`'s report.

Options: n, m (the N:M pattern), ffn / vo / gather_inputs (which groups), layers ("blocks": the transformer
blocks' linears; "all": every linear, an LM head included), swaps_per_column (the search's effort), seed.
Requires: SHAPES.  Exactness: EXACT (a permutation moves values, it computes nothing: float rounding only,
from the changed order of a product's sums).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

from fxopt.calibration import show_progress
from fxopt.pass_base import Measure, Pass, PassContext, PassResult, int_at_least, is_bool
from fxopt.rewrite import Rewriter, get_attr
from fxopt.sites import LinearSite
from fxopt.structure import analyze_graph, block_linears

from .plan import Group, plan_groups
from .rewrite import apply_permutations
from .search import kept, search

_KINDS = {"ffn": "ffn", "vo": "vo", "input": "gather_inputs"}


def check_pattern(name: str, n: int, m: int) -> None:
    """n of every m weights are kept: n < m."""
    if n >= m:
        from fxopt.errors import PassOptionError
        raise PassOptionError(name, "n", f"must be below m={m} (n of every m weights are kept)")


def out_in(gm: fx.GraphModule, site: LinearSite) -> torch.Tensor:
    w = get_attr(gm, site.weight.target).detach()
    return w if site.layout == "out_in" else w.t()


def stacked(gm: fx.GraphModule, group: Group, segment: int) -> torch.Tensor:
    """The consumer weights of one segment, their columns in segment order, stacked along rows."""
    return torch.cat([out_in(gm, s)[:, f[segment]] for s, f in group.consumers]).double()


@dataclass(frozen=True)
class PermuteForNM(Pass):
    """Input channels regrouped so that N:M masks keep the most magnitude; the function is unchanged."""

    n: int = 2
    m: int = 4
    ffn: bool = True
    vo: bool = True
    gather_inputs: bool = True
    layers: str = "blocks"
    swaps_per_column: int = 6000
    seed: int = 0
    progress: bool | None = None

    name: ClassVar[str] = "permute_nm"
    option_checks: ClassVar = {
        "n": (int_at_least(1), "an int >= 1"), "m": (int_at_least(2), "an int >= 2"),
        "ffn": (is_bool, "a bool"), "vo": (is_bool, "a bool"), "gather_inputs": (is_bool, "a bool"),
        "layers": (lambda v: v in ("blocks", "all"), "'blocks' or 'all'"),
        "swaps_per_column": (int_at_least(0), "an int >= 0"), "seed": (int_at_least(0), "an int >= 0"),
        "progress": (lambda v: v is None or isinstance(v, bool), "None or a bool")}

    def __post_init__(self) -> None:
        super().__post_init__()
        check_pattern(self.name, self.n, self.m)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        from tqdm.auto import tqdm

        structure = analyze_graph(gm)
        sites = block_linears(structure) if self.layers == "blocks" else list(structure.linears)
        kinds = {kind for kind, option in _KINDS.items() if getattr(self, option)}
        groups, reasons = plan_groups(structure, {id(s) for s in sites}, kinds)
        plans, notes, shares = [], [], {}
        bar = tqdm(groups, desc="permute_nm search", unit="group", leave=False,
                   disable=not show_progress(self.progress))
        for g in bar:  # every search done before the first edit
            width = g.consumers[0][1].shape[1]
            if width % self.m or width < 2 * self.m:
                reasons.append(f"{g.name}: {width} channels per segment, not a multiple of {self.m} (≥ {2 * self.m})")
                continue
            perms, before, after = [], 0.0, 0.0
            for seg in range(g.segments):
                w = stacked(gm, g, seg)
                pi = search(w, self.n, self.m, self.swaps_per_column, seed=self.seed)
                perms.append(pi)
                before, after = before + kept(w, self.n, self.m), after + kept(w[:, pi], self.n, self.m)
            total = sum(float(out_in(gm, s)[:, f.flatten()].abs().double().sum()) for s, f in g.consumers)
            if after <= before:
                reasons.append(f"{g.name}: the identity is already the best permutation found")
            else:
                plans.append((g, perms))
                notes.append(f"{g.name}: kept {before / total:.4f} → {after / total:.4f} of |W| ({self.n}:{self.m})")
                shares[g.name] = (before / total, after / total)
        if not plans:
            return PassResult(gm, False, reasons=reasons or ["no linear of a transformer block in the graph"])
        kept_before = {id(s): kept(out_in(gm, s), self.n, self.m) for g, _ in plans for s, _ in g.consumers
                       if s.in_features % self.m == 0}
        rw = Rewriter(gm, self.name)
        apply_permutations(rw, plans, self.n, self.m, kept_before)
        rw.finish()
        rw.drop_unread_attributes()
        unpermuted, permuted = ({k: v[i] for k, v in shares.items()} for i in (0, 1))
        measure = Measure(f"share of |W| an {self.n}:{self.m} mask keeps, before → after the permutation",
                          "share of |W|", unpermuted, permuted)
        return PassResult(gm, True, dict(rw.counts), reasons=reasons, notes=notes, measures=[measure])
