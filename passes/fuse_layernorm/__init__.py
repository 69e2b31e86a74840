"""Fuse decomposed LayerNorm and RMSNorm into one op each, and a residual add into the norm after it.

    (x - mean(x)) * rsqrt(var(x, correction=0) + eps) [* γ] [+ β]  =>  layer_norm(x, shape, γ, β, eps)
    x * rsqrt(mean(x²) + eps) [* γ]                                 =>  fxopt.rms_norm(x, shape, γ, eps)
    norm(a + b)                                                     =>  out, s = fxopt.add_<norm>(a, b, ...)
                                                                        (s = a + b replaces the add's other uses)

The reductions run over the trailing dims (`shape` = those dims of x); eps is a Python number. γ and β are
folded in when they are constants of the normalized shape; otherwise (a per-head (heads, head_dim) weight, a
per-token γ) the core is fused and the multiply stays. Spellings (div by sqrt, var/var_mean/std with
correction 0, x*x, commuted operands, Llama's fp32 casts, eval dropout) are canonicalized first
(compiler/canonicalize.py) by the pipeline.

Near-misses left unchanged, each with the matcher's or the check's reason: unbiased variance, eps outside the
root, reduction not over the trailing dims, an intermediate used elsewhere, a fused op that would change the
output's memory layout, an add with a constant, broadcasting or mixed-dtype operand.

Requires: SHAPES.  Exactness: exact up to float rounding (tolerance ROUNDING). The residual fusion is
bit-exact; the norms differ from their decompositions only by reduction order (and fp32 accumulation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import fx

from fxopt import ops
from fxopt.pass_base import Pass, PassContext, PassResult, is_bool
from fxopt.rewrite import Rewriter
from fxopt.rules import Rule, apply_rules

from .norms import EPS_OUTSIDE_LN, EPS_OUTSIDE_RMS, LAYER_NORM, RMS_NORM, aten, check_norm, rewrite_norm
from .residual import RESIDUAL, check_residual, rewrite_residual


def _rules(rms: bool, residual: bool) -> list[Rule]:
    rules = [Rule("(x-μ)·rsqrt(var(x)+eps)[·γ][+β] => layer_norm(x)", LAYER_NORM,
                  rewrite_norm(aten.layer_norm.default), lambda m: check_norm(m, aten.layer_norm.default),
                  anchor="centered", stat="layer_norm")]
    if rms:
        rules.append(Rule("x·rsqrt(mean(x²)+eps)[·γ] => rms_norm(x)", RMS_NORM, rewrite_norm(ops.rms_norm),
                          lambda m: check_norm(m, ops.rms_norm), anchor="x_pow", stat="rms_norm"))
    rules += [Rule("eps is added outside the square root ((x-μ)/(σ+eps) is not LayerNorm)", EPS_OUTSIDE_LN, None),
              Rule("eps is added outside the square root (x/(rms(x)+eps) is not RMSNorm)", EPS_OUTSIDE_RMS, None)]
    if residual:
        rules.append(Rule("norm(a + b) => add_norm(a, b)", RESIDUAL, rewrite_residual, check_residual,
                          anchor="add", exclusive=False, stat="add_norm"))
    return rules


@dataclass(frozen=True)
class FuseLayerNorm(Pass):
    """Decomposed LayerNorm/RMSNorm -> one op; residual add + norm -> one fused add+norm op."""

    fuse_residual_add: bool = True
    rms_norm: bool = True

    name: ClassVar[str] = "fuse_layernorm"
    option_checks: ClassVar = {"fuse_residual_add": (is_bool, "a bool"), "rms_norm": (is_bool, "a bool")}

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        rw = Rewriter(gm, self.name)
        result = apply_rules(rw, _rules(self.rms_norm, self.fuse_residual_add))
        rw.finish()
        return PassResult(gm, result.changed, dict(result.counts), result.reasons())
