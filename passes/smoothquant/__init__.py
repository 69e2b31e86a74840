"""SmoothQuant: migrate activation outliers into the weights, then W8A8 int8 (Xiao et al. 2023; algorithms.md §4).

    X·Wᵀ + b = (X·diag(s)⁻¹)·(W·diag(s))ᵀ + b                                  (smoothing: exact)
             ≈ int8_linear(quantize_int8(X·diag(s)⁻¹), Q(W·diag(s)), b + Δb)    (W8A8: approximate)

s[j] = max(act_max[j]^α / w_max[j]^(1-α), 1e-5) per smoothing group (linears reading one activation share it:
q/k/v, gate/up), act_max the per-channel abs-max of X over the calibration data, w_max over the group's weights.
diag(s)⁻¹ is folded into the norm producing X (γ/s, β/s) when every reader of the norm's output is one of the
group's linears; otherwise (a post-LN model's norm output that is also the residual, o_proj, down_proj, fc2) it
is the quantizer's per-channel pre-scale, free inside a fused quantize kernel; an attention's o_proj gets it in v's
output rows and bias instead (V→O, fold_vo=True: attention mixes tokens, not channels; plan.py). Only the
transformer blocks' linears are quantized by default (layers="blocks"; an LM head, pooler or classifier stays float).

Δb = E[X·Wᵀ − Q(X·diag(s)⁻¹)·Q(W·diag(s))ᵀ] over the kept calibration tokens (bias correction, scales.py).

Options: alpha (float in [0, 1] or "auto": per group, the α of a grid minimising the fake-quantized output error on
the kept calibration batches, each scored with the s the other batches' maxima give (cross-fitted, scales.py), or
no smoothing where that error is smaller still), act ("token" dynamic per token,
"tensor" dynamic per tensor, "tensor_asym" dynamic per tensor, asymmetric: uint8 codes with a zero point over the
tensor's own range, ONNX DynamicQuantizeLinear's numerics (compiler/quant_asym.py), "tensor_static" per tensor from
calibration), weight ("channel" or "tensor"),
smooth=False (W8A8 without smoothing, the baseline), embeddings (int8 embedding tables, one scale per row, where
no float reader shares the table: embeddings.py), smooth_only=True (stop after the exact folds; groups whose
scale would go into the quantizer get it as an explicit multiply x·(1/s) instead), layers ("blocks" or "all"),
fold_vo (o_proj's 1/s into v's rows where the structure proves it; else the quantizer), bias_correction (Δb
above; False: Δb = 0; "auto", the default: with per-tensor activations, where a batch-wide step leaves systematic
error, not per token, where the estimate's noise from a small calibration set outweighs what it removes),
auto_batches (calibration batches kept per quantized input for "auto" and Δb),
min_cosine (the contract below).

Requires: SHAPES, CALIBRATION.  Exactness: smooth_only is exact up to float rounding (ROUNDING). W8A8 is
approximate: every output's cosine similarity to the unquantized graph's is at least `min_cosine` on the
example inputs; each int8 linear is within 2 output scales of its fake-quant reference (the op family's
convention, compiler/quant_ops.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

from fxopt.calibration import BlockIO, ChannelAbsMax
from fxopt.pass_base import ROUNDING, Exactness, Measure, Pass, PassContext, PassResult, Requirement, Tolerance, is_bool
from fxopt.quant_ops import no_linear_reason
from fxopt.rewrite import Rewriter, get_attr
from fxopt.structure import analyze_graph, block_linears

from .embeddings import plan_tables, quantize_table
from .plan import Group, plan_groups, tie_rows, v_rows
from .rewrite import fold_into_norm, prescale_group, quantize_group, quantized_weights, smooth_weight
from .scales import best_alpha, input_means, out_in, smoothing_scale, weight_max

_INF = float("inf")
ACT = ("token", "tensor", "tensor_asym", "tensor_static")  # activation quantizers: per token or per tensor


def _alpha_ok(v) -> bool:
    return v == "auto" or (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1)


@dataclass(frozen=True)
class SmoothQuant(Pass):
    """Smoothing scales folded into norms (or the activation quantizer), then W8A8 int8 linears."""

    alpha: float | str = 0.5
    act: str = "token"
    weight: str = "channel"
    smooth: bool = True
    smooth_only: bool = False
    layers: str = "blocks"
    min_cosine: float = 0.95
    auto_batches: int = 8
    embeddings: bool = True
    fold_vo: bool = True
    bias_correction: bool | str = "auto"

    name: ClassVar[str] = "smoothquant"
    requires: ClassVar = frozenset({Requirement.SHAPES, Requirement.CALIBRATION})
    exactness: ClassVar = Exactness.APPROXIMATE
    option_checks: ClassVar = {
        "alpha": (_alpha_ok, "a number in [0, 1] or 'auto'"),
        "act": (lambda v: v in ACT, f"one of {', '.join(map(repr, ACT))}"),
        "weight": (lambda v: v in ("channel", "tensor"), "'channel' or 'tensor'"),
        "smooth": (is_bool, "a bool"), "smooth_only": (is_bool, "a bool"), "embeddings": (is_bool, "a bool"),
        "fold_vo": (is_bool, "a bool"), "bias_correction": (lambda v: is_bool(v) or v == "auto", "a bool or 'auto'"),
        "layers": (lambda v: v in ("blocks", "all"), "'blocks' or 'all'"),
        "min_cosine": (lambda v: isinstance(v, (int, float)) and -1 <= v <= 1, "a number in [-1, 1]"),
        "auto_batches": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an int >= 1")}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.smooth_only and not self.smooth:
            from fxopt.errors import PassOptionError
            raise PassOptionError(self.name, "smooth_only", "needs smooth=True (smoothing is all it would do)")

    def _groups(self, gm: fx.GraphModule) -> list[Group]:
        structure = analyze_graph(gm)
        targets = block_linears(structure) if self.layers == "blocks" else list(structure.linears)
        return plan_groups(structure, set(targets), self.fold_vo and self.smooth)

    def calibration_spec(self, gm: fx.GraphModule):
        inputs = [x.name for g in self._groups(gm) for x in g.inputs]
        specs = [ChannelAbsMax(x) for x in inputs]
        if self._keeps_batches:
            specs += [BlockIO((x,), (), self.auto_batches) for x in inputs]
        return specs

    @property
    def _keeps_batches(self) -> bool:
        """Calibration batches of every quantized input are kept (auto_batches of them) for α="auto"'s search and
        for bias correction."""
        return (self.alpha == "auto" and self.smooth) or (self._corrects and not self.smooth_only)

    def _means(self, ctx: PassContext, s: torch.Tensor, act_max: torch.Tensor):
        """x -> (E[x/s], E[Q(x/s)]) over the kept batches of input x, for bias correction; None when off."""
        return (lambda x: input_means(self._kept(ctx, [x]), s, self.act, act_max)) if self._corrects else None

    @property
    def _corrects(self) -> bool:
        return self.act != "token" if self.bias_correction == "auto" else self.bias_correction

    def _kept(self, ctx: PassContext, inputs) -> list[torch.Tensor]:
        """Per kept calibration batch, the group's input (several input nodes, views of one activation: their
        tokens side by side, so a batch stays one fold)."""
        per_node = [[b[0] for b in ctx.stats.of(BlockIO((x.name,), (), self.auto_batches)).inputs] for x in inputs]
        if len(per_node) == 1:
            return per_node[0]
        return [torch.cat([t.reshape(-1, t.shape[-1]) for t in batch]) for batch in zip(*per_node, strict=True)]

    def _scale(self, gm, group: Group, ctx: PassContext) -> tuple[torch.Tensor, torch.Tensor, float | None]:
        """(act_max, s, α) of one group; s ≡ 1 without smoothing."""
        act = torch.stack([ctx.stats.of(ChannelAbsMax(x.name)).double() for x in group.inputs]).amax(0)
        smoothed = group.sites if group.norm is not None else group.quantized
        weights = [out_in(get_attr(gm, s.weight.target).detach(), s.layout) for s in smoothed]
        if not self.smooth:
            return act, torch.ones_like(act), None
        alpha, tie = self.alpha, tie_rows(group)
        if alpha == "auto":
            alpha = best_alpha(self._kept(ctx, group.inputs), weights, act, self.act, self.weight == "channel", tie)
            if alpha is None:  # smoothing this group only adds quantization error
                return act, torch.ones_like(act), None
        return act, tie(smoothing_scale(act, weight_max(weights), float(alpha))), float(alpha)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        groups = self._groups(gm)
        if not groups:
            return PassResult(gm, False, reasons=(no_linear_reason(gm, self.layers),))
        plans = [(g, *self._scale(gm, g, ctx)) for g in groups]  # everything computed before the first edit
        rows = v_rows(plans)
        weights = {} if self.smooth_only else {t: w for g, act, s, _ in plans for t, w in quantized_weights(
            gm, g, s, rows, self.weight, self._means(ctx, s, act)).items()}
        tables, notes = ([], []) if self.smooth_only or not self.embeddings else \
            plan_tables(gm, {t.node for g in groups for t in g.quantized})
        rw = Rewriter(gm, self.name)
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        made: dict = {}  # weight name -> its quantized constants so far (a tied weight's equal codes are shared)
        for g, act, s, alpha in plans:
            smoothed = alpha is not None  # α="auto" may leave a group unsmoothed: nothing folded, no multiply
            multiply = self.smooth_only and g.norm is None and g.v_fold is None
            where = ("none (smooth=False)" if not self.smooth else "none" if not smoothed else
                     "a multiply x·(1/s)" if multiply else g.destination)
            if smoothed and g.norm is not None:
                fold_into_norm(rw, g, s)
                for site in (g.sites if self.smooth_only else [t for t in g.sites if t not in g.quantized]):
                    smooth_weight(rw, site, s, rows.pop(site, None))
                    rw.counts["smoothed_into_norm"] += 1
            if self.smooth_only and smoothed and g.norm is None and g.v_fold is not None:
                smooth_weight(rw, g.sites[0], s, rows.pop(g.sites[0], None))
                rw.counts["smoothed_into_v"] += 1
            elif self.smooth_only and smoothed and g.norm is None:
                prescale_group(rw, g, s, order, rows)
            elif not self.smooth_only:
                quantize_group(rw, g, act, s if smoothed else None, order, rows, self.act, weights, made)
            a = (f", α={alpha:g}" if smoothed else
                 ", α=auto chose no smoothing" if self.smooth and self.alpha == "auto" else "")
            folded = g.norm is not None or g.v_fold is not None
            notes += [f"{t.weight_name}: scale in {where}{a}" + ("" if folded or not smoothed else
                      f" ({g.why_quantizer})") + (", int8" if t in g.quantized and not self.smooth_only else ", float")
                      for t in g.sites]
        for site, r in rows.items():  # a v that no group rewrote (not quantized, no norm fold): its rows alone
            smooth_weight(rw, site, torch.ones(site.in_features, dtype=torch.float64), r)
        smoothed = [(g.label, act, s) for g, act, s, alpha in plans if alpha is not None]
        measures = [Measure("activation abs-max at the group's input (largest channel)", "",
                            {k: float(a.max()) for k, a, _ in smoothed},
                            {k: float((a / s).max()) for k, a, s in smoothed}, log_scale=True)] if smoothed else []
        for table in tables:
            quantize_table(rw, table)
            notes.append(f"{table.weight.target}: int8 embedding table, one scale per row")
        rw.finish()
        rw.drop_unread_attributes()
        tolerance = ROUNDING if self.smooth_only else Tolerance(
            rtol={dt: _INF for dt in ROUNDING.rtol}, atol=_INF, min_cosine=self.min_cosine)
        return PassResult(gm, bool(plans), dict(rw.counts), tolerance=tolerance, notes=notes, measures=measures)
