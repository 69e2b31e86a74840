"""Post-LN blocks (BERT's order: LayerNorm(sublayer(h) + h)): the residual add moves out of the norm into the GEMM's
epilogue, where the add+norm's sum is read by nothing else,

    add_norm(int8_linear(q, s, W, b), r)[0]   =>  norm(int8_linear_epilogue(q, s, W, b, "none", r))

so that the norm, whose output is both the next GEMM's input and the next residual, then fuses its quantizer and
keeps its output (`<norm>_and_quantize_int8`, fuse_int8's norm rule). The same function, bit for bit: the
add+norm rounds x + r to x's dtype before normalizing, as the epilogue rounds its residual sum to the output's.
Pre-LN blocks (the sum is the next residual) never match: the predicate on the sum keeps them out silently.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from fxopt import ops
from fxopt.pattern import Op, Var, node_args
from fxopt.rewrite import Rewriter
from fxopt.rules import Rule

from .patterns import NORM_ARITY, check_codes, check_same_shape

aten, fused = torch.ops.aten, torch.ops.fxopt
PLAIN_NORM = {ops.add_rms_norm: ops.rms_norm, ops.add_layer_norm: aten.layer_norm.default}


def _sum_unread(node: fx.Node, m) -> bool:
    """Nothing reads the add+norm's residual sum: its normalized output alone goes on (and something reads that:
    an add+norm another rule already replaced lingers, unread, until the graph's dead code goes)."""
    items = [(g.args[1], bool(g.users)) if g.target is operator.getitem else (None, True) for g in node.users]
    return (0, True) in items and all(i == 0 or not read for i, read in items)


LINEAR = Op(ops.int8_linear, Var("q"), Var("s"), Var("wq"), Var("ws"), Var("bias"), Var("dtype"), name="linear")
ADD_NORM_OF_LINEAR = Op(tuple(PLAIN_NORM), LINEAR, Var("residual"), commutative=True, where=_sum_unread,
                        name="norm")


def check(m) -> str | None:
    return check_same_shape("linear", "residual", "residual add")(m) or check_codes(m)


def rewrite(rw: Rewriter, m):
    norm = m["norm"]
    epilogue = rw.call(fused.int8_linear_epilogue.default, (m["q"], m["s"], m["wq"], m["ws"], m["bias"], "none",
                                                            m["residual"], m["dtype"]), before=norm, like=m["linear"])
    rest = node_args(norm)[2:NORM_ARITY[norm.target]]
    return rw.call(PLAIN_NORM[norm.target], (epilogue, *rest), before=norm, like=norm), None  # the sum: unread


POST_NORM_RULES = [
    Rule("add_norm(int8_linear(q, s, W), r)[0] => norm(int8_linear_epilogue(q, s, W, r))", ADD_NORM_OF_LINEAR,
         rewrite, check, stat="residual_into_epilogue"),
]
