"""Replace a hand-written softmax by a max-subtracted one.

    exp(x) / sum(exp(x), dims, keepdim=True)  =>  softmax(x, dim)                    (one dim, form="op")
                                              =>  e / sum(e, dims), e = exp(x - amax(x, dims))  (otherwise)

x may be anything (scores, scores + mask). `mul(exp(x), reciprocal(sum))` and repeated `exp(x)` nodes
are canonicalized first.

Requires: SHAPES.  Exactness: exact up to float rounding wherever the original is finite, since
softmax(x) = softmax(x - c) for any c. Where the original overflows (fp32 logits above 88.72, fp16 above
11.09) or underflows to 0/0, it returns inf/NaN (and wrong zeros beside them) and the rewritten graph
returns the finite softmax. The pass names the naive denominators (`overflow_watch`): where one of them is
inf or below the smallest normal on the example inputs, the original was wrong there and outputs are not
compared; elsewhere outputs must agree up to rounding.

Fully masked rows: with a -inf mask every entry is -inf; the original gives 0/0 = NaN, and so do
torch.softmax and the explicit form (-inf - -inf = NaN): NaN is kept, as the framework does. With a finite
large negative mask (Hugging Face's finfo.min) the original underflows to 0/0 = NaN, while the rewritten
graph gives the uniform distribution over the row, as torch.softmax does.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

from fxopt.pass_base import ROUNDING, Pass, PassContext, PassResult
from fxopt.pattern import VIEWS, Op, Var, match
from fxopt.rewrite import Rewriter
from fxopt.rules import Rule, apply_rules

aten = torch.ops.aten



def _not_max_subtracted(x, m) -> str | None:
    """exp(y - amax(y)) is already stable (the explicit form this pass writes): nothing to do."""
    is_sub = isinstance(x, fx.Node) and x.target == aten.sub.Tensor
    peak = x.args[1] if is_sub else None
    stable = isinstance(peak, fx.Node) and peak.target == aten.amax.default and peak.args[0] is x.args[0]
    return "already max-subtracted" if stable else None


EXP = Op(aten.exp.default, Var("x", where=_not_max_subtracted), name="exp")
NAIVE_SOFTMAX = Op(aten.div.Tensor, EXP, Op(aten.sum.dim_IntList, EXP, Var("dims"), True, None, name="sum"))
SUM_WITHOUT_KEEPDIM = Op(aten.div.Tensor, EXP, Op((aten.unsqueeze.default, *VIEWS),
                                                  Op(aten.sum.dim_IntList, EXP, Var("dims"), False)))
MORE_THAN_THE_SUM = Op(aten.div.Tensor, EXP, Op((aten.add.Tensor, aten.add.Scalar),
                                                Op(aten.sum.dim_IntList, EXP, Var("dims")), Var("eps"),
                                                commutative=True))


def _check(m) -> str | None:
    return None if m["x"].meta["val"].is_floating_point() else "exp of a non-float tensor"


def _rewrite(form: str):
    def rewrite(rw: Rewriter, m) -> fx.Node:
        node, x = m.root, m["x"]
        ndim = x.meta["val"].dim()
        dims = sorted({d % ndim for d in m["dims"]})
        if form == "op" and len(dims) == 1:
            return rw.call(aten.softmax.int, (x, dims[0]), before=node, like=node)
        peak = rw.call(aten.amax.default, (x, dims, True), before=node, like=node)
        e = rw.call(aten.exp.default, (rw.call(aten.sub.Tensor, (x, peak), before=node, like=node),), before=node)
        total = rw.call(aten.sum.dim_IntList, (e, dims, True), before=node, like=node)
        return rw.call(aten.div.Tensor, (e, total), before=node, like=node)
    return rewrite


@dataclass(frozen=True)
class StabilizeSoftmax(Pass):
    """exp(x)/sum(exp(x)) -> softmax(x) (form="op") or the explicit max-subtracted form (form="explicit")."""

    form: str = "op"

    name: ClassVar[str] = "stabilize_softmax"
    tolerance: ClassVar = dataclasses.replace(ROUNDING, whole_output_if_nonfinite=True)
    option_checks: ClassVar = {"form": (lambda v: v in ("op", "explicit"), "'op' or 'explicit'")}

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        rules = [Rule("exp(x) / sum(exp(x)) => softmax(x)", NAIVE_SOFTMAX, _rewrite(self.form), _check,
                      anchor="exp", stat="softmax_op" if self.form == "op" else "softmax_explicit"),
                 Rule("sum(exp(x)) without keepdim=True (not matched as a softmax)", SUM_WITHOUT_KEEPDIM, None),
                 Rule("exp(x) / sum(exp(x)) is not the whole denominator (e.g. an added eps)", MORE_THAN_THE_SUM,
                      None)]
        # the naive denominators, named in the graph before the pass: where they overflow, the original was wrong
        watch = [m["sum"].name for n in gm.graph.nodes if (m := match(NAIVE_SOFTMAX, n))]
        rw = Rewriter(gm, self.name)
        result = apply_rules(rw, rules)
        rw.finish()
        return PassResult(gm, result.changed, dict(result.counts), result.reasons(), watch)
