"""ZeroQuant: group-wise symmetric weights, token-wise dynamic int8 activations (Yao et al. 2022; algorithms.md §6).

    X·Wᵀ + b ≈ int8_linear(quantize_int8(X, "token"), Q_b(W), s_W, b)       weight_bits = 8 (W8A8)
             ≈ int4_linear(quantize_int8(X, "token"), pack(Q_b(W)), s_W, b) weight_bits = 4 (W4A8)

Q_b(W)[o, :] = clamp(round(W[o, :] / s_g), -qmax, qmax), qmax = 2^(b-1) - 1, s_g = max|W[rows of group g]| / qmax
(compiler/quant_ops.py: one rounding convention for the family). A group is `group_size` consecutive OUTPUT rows
(ZeroQuant's groups), so its scale is constant along the reduction and the dequantization stays in the GEMM's
epilogue: acc[t, o]·s_x[t]·s_W[o] + b[o]. Activation scales are computed per token at run time: no calibration.

Options: weight_bits (8 or 4: two codes per byte), group_size (rows per scale; default 1, one scale per output row:
the finest grouping the epilogue allows and the most accurate, at 4 bytes a row, under 1 % of an int8 row and
about 2 % of an int4 row of 384 inputs, so coarser groups save almost nothing on transformer shapes; ZeroQuant's
BERT config of 48 groups is group_size = rows / 48; group_size = rows is per-tensor. A group size that does not
divide some chosen linear's rows is refused with `PassOptionError`, nothing edited), attention_bits (the
q/k/v/o projections' bits when they differ: weight_bits=4, attention_bits=8 is ZeroQuant's W4/8), act ("token": dynamic
per-token int8, the activation quantizer of ZeroQuant's kernels), layers ("blocks": the transformer blocks'
linears, an LM head / pooler / classifier stays float; "all"), lkd_steps / lkd_lr / lkd_batches (layer-by-layer
distillation, lkd.py: each block's latent float weights trained through a straight-through estimator to match
the original block's output on the original model's block inputs; lr in quantization steps, each linear's mean
scale; 0 steps = none), min_cosine.

Requires: SHAPES (and CALIBRATION when lkd_steps > 0).  Exactness: approximate: every output's cosine to the
unquantized graph's is at least `min_cosine` on the example inputs; each quantized linear equals its fake-quant
reference within the op family's bound (2 output scales).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from torch import fx

from fxopt.calibration import BlockIO
from fxopt.pass_base import (
    ROUNDING,
    Exactness,
    Measure,
    Pass,
    PassContext,
    PassResult,
    Requirement,
    Tolerance,
    int_at_least,
)
from fxopt.quant_ops import WEIGHT_BITS, no_linear_reason
from fxopt.rewrite import Rewriter
from fxopt.structure import analyze_graph

from .lkd import distill_blocks
from .plan import LinearPlan, plan_linears
from .regions import block_regions
from .rewrite import quantize_linear, quantizer

_INF = float("inf")


def _bits(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v in WEIGHT_BITS  # not 8.0: a count of bits


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True)
class ZeroQuant(Pass):
    """Group-wise int8/int4 weights and per-token dynamic int8 activations on the transformer blocks' linears."""

    weight_bits: int = 8
    group_size: int = 1
    attention_bits: int | None = None
    act: str = "token"
    lkd_steps: int = 0
    lkd_lr: float = 3e-3
    lkd_batches: int = 8
    layers: str = "blocks"
    min_cosine: float = 0.95

    name: ClassVar[str] = "zeroquant"
    exactness: ClassVar = Exactness.APPROXIMATE
    option_checks: ClassVar = {
        "weight_bits": (lambda v: _bits(v), "8 or 4"),
        "group_size": (int_at_least(1), "an int >= 1 (output rows per scale)"),
        "attention_bits": (lambda v: v is None or _bits(v), "None, 8 or 4"),
        "act": (lambda v: v == "token", "'token' (dynamic per-token int8)"),
        "lkd_steps": (int_at_least(0), "an int >= 0"),
        "lkd_lr": (lambda v: _number(v) and 0 < v < math.inf, "a finite number > 0"),
        "lkd_batches": (int_at_least(1), "an int >= 1"),
        "layers": (lambda v: v in ("blocks", "all"), "'blocks' or 'all'"),
        "min_cosine": (lambda v: _number(v) and -1 <= v <= 1, "a number in [-1, 1]")}

    @property
    def requires(self) -> frozenset[Requirement]:  # type: ignore[override]
        return frozenset({Requirement.SHAPES} | ({Requirement.CALIBRATION} if self.lkd_steps else set()))

    def _plans(self, gm: fx.GraphModule) -> list[LinearPlan]:
        return plan_linears(gm, analyze_graph(gm), self.layers, self.weight_bits, self.group_size, self.name,
                            self.attention_bits)

    def calibration_spec(self, gm: fx.GraphModule):
        """LKD's teacher: each block's inputs and outputs in the graph before the pass (the original model)."""
        if not self.lkd_steps:
            return []
        return [BlockIO(r.input_names, r.output_names, self.lkd_batches)
                for r in block_regions(gm, self._plans(gm))]

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        plans = self._plans(gm)  # refuses a group size that does not divide, before any edit
        if not plans:
            return PassResult(gm, False, reasons=(no_linear_reason(gm, self.layers),))
        weights = {p: p.weight for p in plans}
        notes, measures = [], []
        if self.lkd_steps:  # trained latents, computed on copies of the blocks: the graph is still untouched
            fits = distill_blocks(gm, plans, weights, ctx.stats, self.lkd_steps, self.lkd_lr, self.lkd_batches)
            notes += [str(f) for f in fits]
            measures.append(Measure("LKD: block output relative MSE to the original block", "",
                                    {f.label: f.loss_before for f in fits}, {f.label: f.loss_after for f in fits},
                                    log_scale=True))
        rw = Rewriter(gm, self.name)
        order, made = {n: i for i, n in enumerate(gm.graph.nodes)}, {}
        for x in dict.fromkeys(p.site.input for p in plans):
            readers = [p for p in plans if p.site.input is x]
            first = min((p.site.reshapes[0] if p.site.reshapes else p.site.node for p in readers),
                        key=order.__getitem__)
            codes = quantizer(rw, x, first)
            for p in readers:
                quantize_linear(rw, p, weights[p], codes, made)
        rw.finish()
        rw.drop_unread_attributes()
        notes += [f"{p.site.weight_name}: int{p.bits} weights, {p.groups} group(s) of {p.group_size} row(s), "
                  f"per-token int8 activations, {p.bytes_before()} → {p.bytes_after()} weight bytes"
                  + ("" if p.placed or p.block is None else f" (in block {p.block}'s module, with no role the "
                     "structure analysis understood: quantized as a block linear, attention_bits not applied)")
                  for p in plans]
        measures.append(Measure("weight bytes per linear (codes + scales)", "bytes",
                                {p.site.weight_name: p.bytes_before() for p in plans},
                                {p.site.weight_name: p.bytes_after() for p in plans}))
        tolerance = Tolerance(rtol={dt: _INF for dt in ROUNDING.rtol}, atol=_INF, min_cosine=self.min_cosine)
        return PassResult(gm, True, dict(rw.counts), tolerance=tolerance, notes=tuple(notes),
                          measures=tuple(measures))


__all__ = ["ZeroQuant"]
