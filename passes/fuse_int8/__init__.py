"""Fuse the int8 family's quantizers into their producers and the dequantize into the GEMM epilogue.

    quantize(silu(int8_linear(q, s, Wg)) · int8_linear(q, s, Wu), pre)
                                                   =>  activation_quantize_int8(int8_linear_swiglu(q, s, W))
                                                       W: Wg's and Wu's rows interleaved (swiglu.py)
    quantize(norm(x, …), pre)                      =>  <norm>_quantize_int8(x, …, pre)        (rms_norm, layer_norm)
    quantize(add_norm(x, r, …)[0], pre)            =>  q, s, x + r = add_<norm>_quantize_int8(x, r, …, pre)
    quantize(y = norm(x, …), pre), y also read     =>  q, s, y = <norm>_and_quantize_int8(x, …, pre)   (post-LN)
    add_norm(int8_linear(…), r)[0], x + r unread   =>  norm(int8_linear_epilogue(…, residual=r))  (post_norm.py)
    quantize(silu(g) · u, pre)                     =>  silu_mul_quantize_int8(g, u, pre)
    quantize(act(x), pre)                          =>  activation_quantize_int8(x, act, pre)  (gelu, silu, relu)
    [act](int8_linear(q, s, Wq, Ws, b)) [+ r]      =>  int8_linear_epilogue(q, s, Wq, Ws, b, act, r)

    quantize(x, pre)                               =>  activation_quantize_int8(x, "none", pre)      (then, the rest)
    int8_linear(q, s, Wq, Ws, b)                   =>  int8_linear_epilogue(q, s, Wq, Ws, b, "none", None)

    activation_quantize_int8(GEMM(…), act, pre)    =>  int8_linear[_swiglu]_quantize(…, act, pre)   (last: requantize)

quantize is `quantize_int8(·, pre, None, "token")` (dynamic per token: one row, one kernel); what smoothquant
and zeroquant leave, after canonicalization and fuse_layernorm. The fusions run first, quantizer rules before
the epilogue's (users first: the quantizer is visited before the activation it reads, so an activation that
feeds a quantizer goes into the quantizer, not the GEMM); then what is left on its own becomes the fused family's
row quantizer and epilogue GEMM (one kernel each on CUDA, where the unfused ops take several), so no per-token
quantize_int8 or int8_linear remains. Last, a GEMM whose output only a row quantizer reads requantizes it
(requantize.py: the epilogue takes the rows' abs-maxima, the codes one pass).

Requires: SHAPES.  Exactness: exact up to float rounding: each fused op's reference is the composition it
replaces (compiler/quant_fused.py), bitwise on the CPU. The CUDA kernels keep its roundings, but a norm's
reduction order or an erf/exp ulp moves ~1e-5 of the codes by one and a deep network amplifies that, so on a GPU
the pipeline checks this pass on the ops' references (`check_on_references`); benchmarks/int8_gpu.py the kernels.
Near-misses, unchanged with a reason: an add+norm's output also read as a float where its add cannot move into a
GEMM (its sum is read too), a per-tensor or static quantizer, a product or residual that broadcasts or mixes
dtypes, a norm output or residual sum read before the quantizer's inputs exist.
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

from fxopt import ops
from fxopt.pass_base import Pass, PassContext, PassResult, Requirement
from fxopt.pattern import AnyOf, Op, Var, node_args
from fxopt.rewrite import Rewriter
from fxopt.rules import Rule, apply_rules

from .patterns import NORM_ARITY, check_codes, check_same_shape, quantize
from .post_norm import POST_NORM_RULES
from .requantize import REQUANT_RULES
from .swiglu import SWIGLU_RULES

aten, fused = torch.ops.aten, torch.ops.fxopt
_KEEPING = {ops.rms_norm: fused.rms_norm_and_quantize_int8.default,
            aten.layer_norm.default: fused.layer_norm_and_quantize_int8.default}
_NORMS = {ops.rms_norm: fused.rms_norm_quantize_int8.default,
          aten.layer_norm.default: fused.layer_norm_quantize_int8.default,
          ops.add_rms_norm: fused.add_rms_norm_quantize_int8.default,
          ops.add_layer_norm: fused.add_layer_norm_quantize_int8.default}
_ACTS = (aten.gelu.default, aten.silu.default, aten.relu.default)


def _order(n: fx.Node) -> dict:
    return {x: i for i, x in enumerate(n.graph.nodes)}


def _activation(node: fx.Node) -> str:
    if node.target is aten.gelu.default:
        return "gelu_tanh" if node_args(node)[1] == "tanh" else "gelu"
    return "silu" if node.target is aten.silu.default else "relu"


# ---- patterns -----------------------------------------------------------------------------------------------

NORM_QUANT = quantize(AnyOf(Op((ops.rms_norm, aten.layer_norm.default), Var("x"), name="norm"),
                             Op(operator.getitem, Op((ops.add_rms_norm, ops.add_layer_norm), Var("x"), name="norm"),
                                0, name="norm_out")))
SILU_MUL_QUANT = quantize(Op(aten.mul.Tensor, Op(aten.silu.default, Var("gate")), Var("up"), commutative=True,
                              name="product"))
ACT_QUANT = quantize(Op(_ACTS, Var("x"), name="act"))
_LINEAR = Op(ops.int8_linear, Var("q"), Var("s"), Var("wq"), Var("ws"), Var("bias"), Var("dtype"), name="linear")
_ACTED = Op(_ACTS, _LINEAR, name="act")
EPILOGUE = AnyOf(Op(aten.add.Tensor, AnyOf(_ACTED, _LINEAR), Var("residual"), 1, commutative=True, name="add"), _ACTED)
QUANT = quantize(Var("x"))


# ---- checks -------------------------------------------------------------------------------------------------

def _insertion_point(m) -> fx.Node:
    """The fused norm goes where its last input is ready: after the norm, and after a pre-scale defined later."""
    order = _order(m.root)
    pre = m["pre"]
    return max([m["norm"]] + ([pre] if isinstance(pre, fx.Node) else []), key=order.__getitem__)


def _float_readers(m) -> list[fx.Node]:
    """Readers of the quantized norm output other than the quantizer (a post-LN block's next residual)."""
    return [u for u in m.get("norm_out", m["norm"]).users if u is not m.root]


def check_norm_quant(m) -> str | None:
    out, readers, at, order = m.get("norm_out", m["norm"]), _float_readers(m), _insertion_point(m), _order(m.root)
    if readers and "norm_out" in m:
        return (f"the norm output {out.name} is also read as a float by {readers[0].name} (a post-LN residual), "
                f"and the add of {m['norm'].name} cannot move into a GEMM's epilogue")
    if "norm_out" in m and any(g.target is not operator.getitem or g.args[1] not in (0, 1) for g in m["norm"].users):
        return f"{m['norm'].name}'s outputs are read other than through its (norm, sum) items"
    sums = [u for g in m["norm"].users if g.target is operator.getitem and g.args[1] == 1 for u in g.users]
    early = [u for u in readers + sums if order[u] <= order[at]]
    if early:
        return f"{early[0].name} reads the norm's output or sum before the quantizer's pre-scale exists"
    return None


def check_epilogue(m) -> str | None:
    return ("residual" in m and check_same_shape("linear", "residual", "residual add")(m)) or check_codes(m)


# ---- rewrites -----------------------------------------------------------------------------------------------

def rewrite_norm_quant(rw: Rewriter, m):
    norm = m["norm"]
    at = _insertion_point(m).next
    args = node_args(norm)[:NORM_ARITY[norm.target]]
    args[-1] = float(args[-1])
    readers = _float_readers(m)
    node = rw.call((_KEEPING if readers else _NORMS)[norm.target], (*args, m["pre"]), before=at, like=m.root)
    items = tuple(rw.getitem(node, i, before=at) for i in range(3 if "norm_out" in m or readers else 2))
    if "norm_out" in m:
        for g in [g for g in norm.users if g.args[1] == 1]:
            rw.replace(g, items[2])
    elif readers:  # the norm's output, for its float readers, from the fused kernel
        rw.replace(norm, items[2])
    return items[:2]



def rewrite_silu_mul(rw: Rewriter, m):
    node = rw.call(fused.silu_mul_quantize_int8.default, (m["gate"], m["up"], m["pre"]), before=m.root, like=m.root)
    return rw.getitem(node, 0, before=m.root), rw.getitem(node, 1, before=m.root)


def rewrite_act_quant(rw: Rewriter, m):
    act = _activation(m["act"]) if "act" in m else "none"
    node = rw.call(fused.activation_quantize_int8.default, (m["x"], act, m["pre"]),
                   before=m.root, like=m.root)
    return rw.getitem(node, 0, before=m.root), rw.getitem(node, 1, before=m.root)


def rewrite_epilogue(rw: Rewriter, m) -> fx.Node:
    act = _activation(m["act"]) if "act" in m else "none"
    args = (m["q"], m["s"], m["wq"], m["ws"], m["bias"], act, m.get("residual"), m["dtype"])
    return rw.call(fused.int8_linear_epilogue.default, args, before=m.root, like=m["linear"])


RULES = [
    *SWIGLU_RULES,
    Rule("quantize(norm(x)) => norm_quantize_int8(x)", NORM_QUANT, rewrite_norm_quant, check_norm_quant,
         anchor="norm", exclusive=False, stat="norm_quantize"),
    *POST_NORM_RULES,
    Rule("quantize(silu(g)·u) => silu_mul_quantize_int8(g, u)", SILU_MUL_QUANT, rewrite_silu_mul,
         check_same_shape("gate", "up", "product silu(g)·u"), anchor="product", stat="silu_mul_quantize"),
    Rule("quantize(act(x)) => activation_quantize_int8(x)", ACT_QUANT, rewrite_act_quant, anchor="act",
         stat="activation_quantize"),
    Rule("act(int8_linear(q, s, W)) [+ r] => int8_linear_epilogue(q, s, W, act, r)", EPILOGUE, rewrite_epilogue,
         check_epilogue, anchor="linear", stat="int8_linear_epilogue"),
]
PLAIN_RULES = [
    Rule("quantize(x) => activation_quantize_int8(x, 'none')", QUANT, rewrite_act_quant, stat="quantize"),
    Rule("int8_linear(q, s, W) => int8_linear_epilogue(q, s, W)", _LINEAR, rewrite_epilogue, check_codes,
         anchor="linear", stat="int8_linear_epilogue"),
]


@dataclass(frozen=True)
class FuseInt8(Pass):
    """Per-token quantizers fused into their norm/activation producers; dequantize (+ bias, activation, residual)
    into the int8 GEMM's epilogue."""

    name: ClassVar[str] = "fuse_int8"
    requires: ClassVar = frozenset({Requirement.SHAPES})
    check_on_references: ClassVar[bool] = True  # Triton's reductions and erf/exp may move a code by one

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        rw = Rewriter(gm, self.name)
        stages = [apply_rules(rw, rules) for rules in (RULES, PLAIN_RULES, REQUANT_RULES)]
        rw.finish()
        rw.drop_unread_attributes()  # the gate and up weights the SwiGLU GEMM's interleaved copies replace
        changed = any(stage.changed for stage in stages)
        reasons = [r for stage in stages for r in stage.reasons()]
        if not changed and not reasons:
            reasons = ["no per-token int8 quantizer or int8_linear in the graph (run smoothquant or zeroquant first)"]
        return PassResult(gm, changed, dict(sum((stage.counts for stage in stages), Counter())), reasons)
