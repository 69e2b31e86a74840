"""fuse_int8's requantize rules: a GEMM whose output only the next GEMM's per-token quantizer reads hands that
quantizer its rows' abs-maxima from its epilogue, so the codes take one pass over the output instead of two (the
CUDA kernels do so from 128 rows and without an activation between; otherwise they run the GEMM, then the row
quantizer: the same codes, compiler/triton_int8.py).

    activation_quantize_int8(int8_linear_epilogue(q, s, W, …, act₁), act₂, pre)
                                                   =>  int8_linear_quantize(q, s, W, …, act₁ or act₂, pre)
    activation_quantize_int8(int8_linear_swiglu(q, s, W, S, b), "none", pre)
                                                   =>  int8_linear_swiglu_quantize(q, s, W, S, b, pre)

These run after the fusions and the plain rules, on the fused family's canonical forms. Legal when the GEMM's
float output has no other reader (a second reader, another quantizer included, needs the float output anyway, and
two requantizing GEMMs would compute it twice), no residual is added in the epilogue, and at most one of the two
activations is not "none" (none after a SwiGLU). The ops' references are the compositions
(compiler/quant_fused.py), so the rewrite is exact, bitwise on the CPU.
"""

from __future__ import annotations

import torch

from fxopt.pattern import AnyOf, Op, Var
from fxopt.rewrite import Rewriter
from fxopt.rules import Rule

fused = torch.ops.fxopt

# users=1: a second reader of the float output (another quantizer included) keeps the GEMM as it is, which
# computes it once
_EPILOGUE = Op(fused.int8_linear_epilogue.default, Var("q"), Var("s"), Var("wq"), Var("ws"), Var("bias"),
               Var("gemm_act"), None, Var("dtype"), name="gemm", users=1,
               label="an epilogue GEMM without a residual, read only by the quantizer")
_SWIGLU = Op(fused.int8_linear_swiglu.default, Var("q"), Var("s"), Var("wq"), Var("ws"), Var("bias"), Var("dtype"),
             name="swiglu", users=1,
             label="the SwiGLU GEMM, read only by the quantizer")
REQUANT = Op(fused.activation_quantize_int8.default, AnyOf(_EPILOGUE, _SWIGLU), Var("act"), Var("pre"),
             name="quantizer")


def check_requant(m) -> str | None:
    if "swiglu" in m and m["act"] != "none":
        return f"{m.root.name} applies {m['act']} to the SwiGLU GEMM's output: int8_linear_swiglu_quantize has none"
    acts = [a for a in (m.get("gemm_act", "none"), m["act"]) if a != "none"]
    if len(acts) > 1:
        return f"{m['gemm'].name} and its quantizer {m.root.name} each apply an activation"
    return None


def rewrite_requant(rw: Rewriter, m):
    if "swiglu" in m:
        node = rw.call(fused.int8_linear_swiglu_quantize.default,
                       (m["q"], m["s"], m["wq"], m["ws"], m["bias"], m["pre"], m["dtype"]), before=m.root,
                       like=m.root)
    else:
        act = m["act"] if m["act"] != "none" else m["gemm_act"]
        node = rw.call(fused.int8_linear_quantize.default,
                       (m["q"], m["s"], m["wq"], m["ws"], m["bias"], act, m["pre"], m["dtype"]),
                       before=m.root, like=m.root)
    return rw.getitem(node, 0, before=m.root), rw.getitem(node, 1, before=m.root)


REQUANT_RULES = [
    Rule("activation_quantize_int8(int8_linear_epilogue | int8_linear_swiglu) => int8_linear[_swiglu]_quantize",
         REQUANT, rewrite_requant, check_requant, anchor="quantizer", stat="requantize"),
]
