"""MHA → GQA: K and V carry G heads, mean-pooled over contiguous groups of kv heads (Ainslie et al. 2023;
algorithms.md §5).

    K'_g = x·mean_{j<r}(Wk[g·r + j])ᵀ + mean_{j<r}(bk[g·r + j]) = mean_{j<r} K_{g·r+j}      (r = H_kv / G)
    attention(Q, K, V) with query head h reading kv head h // (H / G)                        (repeat_kv's grouping)

Every attention block of the structure analysis is converted: separate or fused projections (any layout the
analysis can replay), explicit softmax(q·kᵀ)·v or SDPA, with RoPE (linear and the same for every head, so pooling
before it equals pooling after it), already-GQA models (groups of existing kv heads pooled). K and V keep G heads
from their projection to the attention; they are repeated to the query heads there (or SDPA's own GQA reads
them). A fused QKV linear is split into q and the new k/v linears. The K/V parameters shrink by H_kv / G.

Options: num_kv_heads (G; must divide every block's kv heads), init ("mean", "first": the first head of each
group, "random": seeded normal with the group's std — the comparisons of the paper), seed, min_cosine,
sdpa_gqa (SDPA reads the G heads itself, enable_gqa=True, instead of a repeat before it: no H-head copy
of the cache per step), uptrain_steps / uptrain_lr (distil the new K/V projections towards the MHA outputs on
the calibration items: uptrain.py; 0 = none). A static KV cache on the path (index_copy into a buffer) shrinks
with it: the buffer keeps G heads, each group's mean.

Requires: SHAPES (and CALIBRATION when uptrain_steps > 0).  Exactness: approximate. The converted model is a
different function (attention is not linear in K); the pass promises cosine ≥ `min_cosine` of every output to
the MHA graph's on the example inputs. Where the heads in every group are already identical, pooling changes
nothing and it promises ROUNDING instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import fx

from fxopt.attention_analysis import NotUnderstood
from fxopt.errors import StructureError
from fxopt.pass_base import ROUNDING, Exactness, Measure, Pass, PassContext, PassResult, Requirement, Tolerance, is_bool
from fxopt.pipeline import clone_graph_module
from fxopt.rewrite import Rewriter
from fxopt.sites import val
from fxopt.structure import Attention, analyze_graph

from .plan import OperandPlan, operand_plan
from .rewrite import apply, identical_within_groups, projection
from .uptrain import distill

_INF = float("inf")


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


@dataclass(frozen=True, eq=False)
class _BlockPlan:
    attention: Attention
    k: OperandPlan
    v: OperandPlan
    q: OperandPlan | None  # the q part of a fused projection, split off
    repeat: int  # G heads repeated this many times where the core reads them
    set_gqa: bool  # SDPA reads the G heads itself: enable_gqa=True set on it


@dataclass(frozen=True)
class ConvertToGQA(Pass):
    """Every attention's K/V projections mean-pooled to `num_kv_heads` heads, the graph carrying G heads."""

    num_kv_heads: int = 1
    init: str = "mean"
    seed: int = 0
    min_cosine: float = 0.5
    uptrain_steps: int = 0
    uptrain_lr: float = 1e-3
    sdpa_gqa: bool = True

    name: ClassVar[str] = "mha_to_gqa"
    exactness: ClassVar = Exactness.APPROXIMATE
    option_checks: ClassVar = {
        "num_kv_heads": (_count, "an int >= 1"),
        "init": (lambda v: v in ("mean", "first", "random"), "'mean', 'first' or 'random'"),
        "seed": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an int"),
        "min_cosine": (lambda v: isinstance(v, (int, float)) and -1 <= v <= 1, "a number in [-1, 1]"),
        "uptrain_steps": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an int >= 0"),
        "sdpa_gqa": (is_bool, "a bool"),
        "uptrain_lr": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0, "a number > 0")}

    @property
    def requires(self) -> frozenset[Requirement]:  # type: ignore[override]
        return frozenset({Requirement.SHAPES} | ({Requirement.CALIBRATION} if self.uptrain_steps else set()))

    def _plan(self, a: Attention) -> _BlockPlan | None:
        g, kv = self.num_kv_heads, a.num_kv_heads
        if kv % g or a.num_heads % g:
            raise StructureError(f"pass {self.name!r}: num_kv_heads={g} does not divide the {kv} kv heads "
                                 f"({a.num_heads} query heads) of the attention at {a.core.node.name}")
        if g == kv:
            return None
        fused = a.q.node is a.k.node or a.q.node is a.v.node
        k, v = operand_plan(a, "k", g), operand_plan(a, "v", g)
        q = operand_plan(a, "q", None) if fused else None
        gqa = a.core.enable_gqa or (self.sdpa_gqa and a.kind == "sdpa" and len(a.core.node.args) <= 7)
        return _BlockPlan(a, k, v, q, 1 if gqa else val(a.core.k).shape[1] // g, gqa and not a.core.enable_gqa)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        structure = analyze_graph(gm)
        attentions = [b.attention for b in structure.blocks if b.attention is not None]
        if not attentions:
            raise StructureError(f"pass {self.name!r}: no attention to convert: "
                                 + "; ".join(structure.not_understood or ("no attention core",)))
        plans, reasons = [], []
        for a in attentions:  # every plan proven before the first edit
            try:
                plan = self._plan(a)
            except NotUnderstood as e:
                reasons.append(f"{e.node.name}: attention at {a.core.node.name} left as it is: {e.reason}")
                continue
            if plan is None:
                reasons.append(f"{a.core.node.name}: already {a.num_kv_heads} kv heads")
            else:
                plans.append(plan)
        if not plans:
            return PassResult(gm, False, reasons=tuple(reasons))
        before = clone_graph_module(gm) if self.uptrain_steps else None
        rw = Rewriter(gm, self.name)
        g = self.num_kv_heads
        # pooling identical heads changes nothing; a random init or uptraining does
        exact = self.init != "random" and not self.uptrain_steps and \
            all(identical_within_groups(rw, op, g) for p in plans for op in (p.k, p.v))
        weights = [(p, op, *projection(rw, op, None if op.which == "q" else g, self.init, self.seed + i))
                   for i, p in enumerate(plans) for op in (p.k, p.v, p.q) if op is not None]
        notes, trained = [], []
        for p, op, w, b in weights:
            names = apply(rw, op, w, b, None if op.which == "q" else g, p.repeat)
            if op.which != "q":
                trained += names
                notes.append(f"{op.site.weight_name}: {op.which} heads {p.attention.num_kv_heads} → {g} "
                             f"(init {self.init}), {tuple(w.shape)}")
        rw.set_kwarg([p.attention.core.node for p in plans if p.set_gqa], "enable_gqa", True)
        cache = {}
        for p in plans:
            a = p.attention
            per_token = 2 * a.head_dim * val(a.core.k).element_size()
            cache[a.core.node.name] = (per_token * a.num_kv_heads, per_token * g)
            notes.append(f"{a.core.node.name}: {a.num_heads} query heads, kv heads {a.num_kv_heads} → {g}; K/V "
                         f"bytes per token per layer {per_token * a.num_kv_heads} → {per_token * g}")
        rw.finish()
        rw.drop_unread_attributes()
        if before is not None:
            notes.append(str(distill(before, gm, trained, ctx.calibration, ctx.example_kwargs, self.uptrain_steps,
                                     self.uptrain_lr)))
        tolerance = ROUNDING if exact else Tolerance(rtol={dt: _INF for dt in ROUNDING.rtol}, atol=_INF,
                                                     min_cosine=self.min_cosine)
        measure = Measure("K/V-cache bytes per token, per attention", "bytes", {k: b for k, (b, _) in cache.items()},
                          {k: a for k, (_, a) in cache.items()})
        return PassResult(gm, True, dict(rw.counts), tuple(reasons), tolerance=tolerance, notes=tuple(notes),
                          measures=(measure,))
