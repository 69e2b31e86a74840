"""fuse_int8's SwiGLU rule: the gate and up GEMMs on the same codes become one GEMM with silu(gate) · up in its
epilogue, so neither product goes to memory in float and back.

    silu(int8_linear(q, s, Wg, …)) · int8_linear(q, s, Wu, …)      =>  int8_linear_swiglu(q, s, Wg, …, Wu, …)
    quantize(that, pre)                                             =>  activation_quantize_int8(swiglu, "none", pre)

Legal when both linears read the same codes and scales (one node each), have the same out dtype and weight shape,
and nothing but the SiLU and the product reads them (the match is exclusive). The op's reference is the
composition (compiler/quant_fused.py), so the rewrite is exact, bitwise on the CPU.
"""

from __future__ import annotations

import torch

from fxopt import ops
from fxopt.pattern import Op, Var
from fxopt.rewrite import Rewriter
from fxopt.rules import Rule

from .patterns import check_codes, check_same_shape, quantize, val

aten, fused = torch.ops.aten, torch.ops.fxopt


def _linear(role: str) -> Op:
    return Op(ops.int8_linear, Var("q"), Var("s"), Var(f"wq_{role}"), Var(f"ws_{role}"), Var(f"bias_{role}"),
              Var("dtype"), name=f"{role}_linear", label=f"SwiGLU's {role} int8_linear")


SWIGLU = Op(aten.mul.Tensor, Op(aten.silu.default, _linear("gate"), name="silu"), _linear("up"), commutative=True,
            name="product")
SWIGLU_QUANT = quantize(SWIGLU)


def check_swiglu(m) -> str | None:
    shared = [n for n in (m["gate_linear"], m.get("silu"), m["up_linear"]) if n is not None and len(n.users) > 1]
    if shared:  # another product reads it too: merging would run the shared GEMM once per product
        return f"{shared[0].name} at {m['product'].name} feeds more than one product"
    gate, up = val(m["wq_gate"]), val(m["wq_up"])
    if gate is None or up is None or gate.shape != up.shape:
        return f"the gate and up weights at {m['product'].name} differ in shape"
    return check_same_shape("gate_linear", "up_linear", "product silu(gate)·up")(m) or check_codes(m, "gate_linear")


def _swiglu(rw: Rewriter, m):
    args = (m["q"], m["s"], m["wq_gate"], m["ws_gate"], m["bias_gate"], m["wq_up"], m["ws_up"], m["bias_up"],
            m["dtype"])
    return rw.call(fused.int8_linear_swiglu.default, args, before=m["product"], like=m["product"])


def rewrite_swiglu_quant(rw: Rewriter, m):
    node = rw.call(fused.activation_quantize_int8.default, (_swiglu(rw, m), "none", m["pre"]), before=m.root,
                   like=m.root)
    return rw.getitem(node, 0, before=m.root), rw.getitem(node, 1, before=m.root)


# what the rules above leave when they do not apply (checked while the GEMMs are still int8_linear, before
# fuse_int8's plain rules turn them into epilogue GEMMs): two GEMMs on the same codes feeding silu_mul_quantize
TWO_GEMMS = Op(fused.silu_mul_quantize_int8.default, _linear("gate"), _linear("up"), Var("pre"), name="product")


def why_two_gemms(m) -> str:
    for role in ("gate", "up"):
        node = m[f"{role}_linear"]
        others = [u.name for u in node.users if u is not m.root]
        if others:
            return f"SwiGLU's {role} GEMM {node.name} is also read by {others[0]}: the two GEMMs stay apart"
    return check_swiglu(m) or f"SwiGLU's GEMMs at {m.root.name} stay apart"


SWIGLU_RULES = [
    Rule("quantize(silu(int8_linear(q, s, Wg)) · int8_linear(q, s, Wu)) => "
         "activation_quantize_int8(int8_linear_swiglu(q, s, Wg, Wu))", SWIGLU_QUANT, rewrite_swiglu_quant,
         check_swiglu, anchor="product", stat="int8_linear_swiglu"),
    Rule("silu(int8_linear(q, s, Wg)) · int8_linear(q, s, Wu) => int8_linear_swiglu(q, s, Wg, Wu)", SWIGLU, _swiglu,
         check_swiglu, anchor="product", stat="int8_linear_swiglu"),
    Rule("silu_mul_quantize(int8_linear(q, s, Wg), int8_linear(q, s, Wu)): near-miss", TWO_GEMMS, None, why_two_gemms,
         anchor="product", exclusive=False),
]
