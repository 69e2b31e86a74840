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

from fxopt.canonicalize import canonicalize
from fxopt.pass_base import ROUNDING, Pass, PassContext, PassResult
from fxopt.pattern import Op, Var, match, users_outside
from fxopt.rewrite import Rewriter

aten = torch.ops.aten

EXP = Op(aten.exp.default, Var("x"), name="exp")
NAIVE_SOFTMAX = Op(aten.div.Tensor, EXP, Op(aten.sum.dim_IntList, EXP, Var("dims"), True, None, name="sum"),
                   name="softmax")


def _check(m, node: fx.Node) -> str | None:
    leaked = users_outside([m["exp"], m["sum"]], [node])
    if leaked:
        return f"{leaked[0].name}: exp/sum of the softmax at {node.name} is used elsewhere"
    return None


def _explain(exp: fx.Node) -> str | None:
    for user in exp.users:
        if user.target == aten.sum.dim_IntList:
            if len(user.args) < 3 or not user.args[2]:
                return f"{user.name}: sum(exp(x)) without keepdim=True (not matched as a softmax)"
            return f"{user.name}: exp(x) / sum(exp(x)) is not the whole denominator (e.g. an added eps)"
    return None


def _rewrite(rw: Rewriter, node: fx.Node, x: fx.Node, dims: list[int], form: str) -> None:
    ndim = x.meta["val"].dim()
    dims = sorted({d % ndim for d in dims})
    if form == "op" and len(dims) == 1:
        rw.replace(node, rw.call(aten.softmax.int, (x, dims[0]), before=node, like=node), "softmax_op")
        return
    peak = rw.call(aten.amax.default, (x, dims, True), before=node, like=node)
    e = rw.call(aten.exp.default, (rw.call(aten.sub.Tensor, (x, peak), before=node, like=node),), before=node)
    total = rw.call(aten.sum.dim_IntList, (e, dims, True), before=node, like=node)
    rw.replace(node, rw.call(aten.div.Tensor, (e, total), before=node, like=node), "softmax_explicit")


@dataclass(frozen=True)
class StabilizeSoftmax(Pass):
    """exp(x)/sum(exp(x)) -> softmax(x) (form="op") or the explicit max-subtracted form (form="explicit")."""

    form: str = "op"

    name: ClassVar[str] = "stabilize_softmax"
    tolerance: ClassVar = dataclasses.replace(ROUNDING, whole_output_if_nonfinite=True)
    option_checks: ClassVar = {"form": (lambda v: v in ("op", "explicit"), "'op' or 'explicit'")}

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        rw = Rewriter(gm, self.name)
        canonicalize(rw)
        reasons: list[str] = []
        watch: list[str] = []
        for node in list(gm.graph.nodes):
            if getattr(node, "_erased", False):
                continue
            if node.target == aten.exp.default and not any(match(NAIVE_SOFTMAX, u) for u in node.users):
                if why := _explain(node):
                    reasons.append(why)
            m = match(NAIVE_SOFTMAX, node)
            if m is None or not m["x"].meta["val"].is_floating_point():
                continue
            if why := _check(m, node):
                reasons.append(why)
                continue
            watch.append(m["sum"].name)
            _rewrite(rw, node, m["x"], list(m["dims"]), self.form)
        stats = dict(rw.counts)
        rw.finish()
        return PassResult(gm, any(k.startswith("softmax") for k in stats), stats, reasons, watch)
