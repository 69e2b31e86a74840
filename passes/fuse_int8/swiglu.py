"""fuse_int8's SwiGLU rule: the gate and up GEMMs on the same codes become one GEMM with silu(gate) · up in its
epilogue, so neither product goes to memory in float and back.

    silu(int8_linear(q, s, Wg, Sg, bg)) · int8_linear(q, s, Wu, Su, bu)  =>  int8_linear_swiglu(q, s, W, S, b)
    quantize(that, pre)                                             =>  activation_quantize_int8(swiglu, "none", pre)

where W, S, b are the gate's and the up's rows interleaved (`interleave_gate_up`: gate j, up j), new constants
that replace them (one copy per distinct gate/up pair: tied blocks share it; a weight also read by another GEMM
stays beside its interleaved copy). Legal when both linears read the same codes and scales (one node each), have
the same out dtype and weight shape, their weights, scales and biases are constants, and nothing but the SiLU and
the product reads them (the match is exclusive). The op's reference is the composition on the de-interleaved rows
(compiler/quant_fused.py), so the rewrite is exact, bitwise on the CPU (a missing bias of one side becomes zeros:
x + 0 is x).
"""

from __future__ import annotations

import torch

from fxopt import ops
from fxopt.pattern import Op, Var
from fxopt.quant_fused import interleave_gate_up
from fxopt.rewrite import Rewriter, get_attr
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
    computed = [m[k].name for k in _OPERANDS if m[k] is not None and getattr(m[k], "op", None) != "get_attr"]
    if computed:  # interleaving them would take a copy per call
        return f"SwiGLU's {computed[0]} at {m['product'].name} is computed, not a constant: the GEMMs stay apart"
    return check_same_shape("gate_linear", "up_linear", "product silu(gate)·up")(m) or check_codes(m, "gate_linear")


_OPERANDS = ("wq_gate", "ws_gate", "bias_gate", "wq_up", "ws_up", "bias_up")
_MADE_FROM = "fxopt_gate_up_of"  # on an interleaved constant: (the six operands' attribute names, which of the 3)


def _interleaved(rw: Rewriter, m) -> list:
    """The interleaved weight, scales and bias of this SwiGLU: new constants, or the ones an earlier match made
    from the same attributes (tied weights stay one copy), moved before this GEMM if they come after it."""
    key = tuple(None if m[k] is None else m[k].target for k in _OPERANDS)
    made = {n.meta[_MADE_FROM][1]: n for n in rw.graph.nodes
            if n.op == "get_attr" and n.meta.get(_MADE_FROM, (None,))[0] == key}
    at = m["gate_linear"]
    if made:
        rw.hoist(made.values(), before=at)
        return [made.get(i) for i in range(3)]
    with torch.no_grad():  # the weights' tensors, not an autograd function of the user's parameters
        tensors = interleave_gate_up(*(None if m[k] is None else get_attr(rw.gm, m[k].target).detach()
                                       for k in _OPERANDS))
    names = ("wq_gate", "ws_gate", "bias_gate" if m["bias_gate"] is not None else "bias_up")
    out = []
    for i, (name, t) in enumerate(zip(names, tensors, strict=True)):
        node = None if t is None else rw.constant(f"{m[name].name}_gate_up", t, before=at)
        if node is not None:
            node.meta[_MADE_FROM] = (key, i)
        out.append(node)
    return out


def _swiglu(rw: Rewriter, m):
    return rw.call(fused.int8_linear_swiglu.default, (m["q"], m["s"], *_interleaved(rw, m), m["dtype"]),
                   before=m["product"], like=m["product"])


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
         "activation_quantize_int8(int8_linear_swiglu(q, s, interleaved Wg, Wu))", SWIGLU_QUANT,
         rewrite_swiglu_quant, check_swiglu, anchor="product", stat="int8_linear_swiglu"),
    Rule("silu(int8_linear(q, s, Wg)) · int8_linear(q, s, Wu) => int8_linear_swiglu(q, s, interleaved Wg, Wu)",
         SWIGLU, _swiglu, check_swiglu, anchor="product", stat="int8_linear_swiglu"),
    Rule("silu_mul_quantize(int8_linear(q, s, Wg), int8_linear(q, s, Wu)): near-miss", TWO_GEMMS, None, why_two_gemms,
         anchor="product", exclusive=False),
]
