"""Relax lowerings of the int8 op family (convention: fxopt/quant_ops.py), TVM generating every kernel.

    quantize_int8(x, pre, scale, g) -> q = astype(clip(round(x32 * pre / s), -127, 127), int8), s
                                       s = max(absmax(x32 * pre), SCALE_MIN) / 127 (per token or per tensor)
    int8_linear(q, s, wq, ws, b, dt) -> astype(astype(matmul(q, wqᵀ, out_dtype=int32), f32) * s * ws + b, dt)
    int4_linear(q, s, wp, ws, b, dt) -> int8_linear(q, s, wq, ws, b, dt), wq the codes unpacked in the graph:
                                       [wp mod 16, wp // 16] interleaved along K, the first K kept, minus 8
"""

from __future__ import annotations

from typing import Any

import torch
from tvm import relax

from fxopt.quant_ops import QMAX, SCALE_MIN

from .relax_util import arg, cast, emit, env_or_value

_F32 = "float32"
_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float64: "float64"}


def _const(v: float) -> relax.Expr:
    return relax.const(v, _F32)


def quantize_int8(node: Any, imp: Any) -> relax.Expr:
    x = cast(imp, imp.env[node.args[0]], _F32)
    pre, scale = env_or_value(imp, arg(node, 1, "pre_scale")), env_or_value(imp, arg(node, 2, "scale"))
    granularity = arg(node, 3, "granularity")
    if pre is not None:
        x = emit(imp, relax.op.multiply(x, cast(imp, pre, _F32)))
    if scale is not None:
        s = cast(imp, scale, _F32)
    else:
        axis = [-1] if granularity == "token" else None
        peak = emit(imp, relax.op.max(emit(imp, relax.op.abs(x)), axis=axis, keepdims=granularity == "token"))
        s = emit(imp, relax.op.divide(emit(imp, relax.op.maximum(peak, _const(SCALE_MIN))), _const(QMAX)))
    r = emit(imp, relax.op.round(emit(imp, relax.op.divide(x, s))))
    q = emit(imp, relax.op.astype(emit(imp, relax.op.clip(r, -QMAX, QMAX)), "int8"))
    return emit(imp, relax.Tuple([q, s]))


def _product(node: Any, imp: Any, q: relax.Expr, s: relax.Expr, wq: relax.Expr, ws: relax.Expr) -> relax.Expr:
    """(q ·int32 wqᵀ) · s · ws (+ bias, args[4]) in fp32, cast to out_dtype (args[5]): the int8 linears' GEMM."""
    bias = env_or_value(imp, arg(node, 4, "bias"))
    acc = emit(imp, relax.op.matmul(q, emit(imp, relax.op.permute_dims(wq, [1, 0])), out_dtype="int32"))
    y = emit(imp, relax.op.multiply(emit(imp, relax.op.multiply(cast(imp, acc, _F32), s)), cast(imp, ws, _F32)))
    if bias is not None:
        y = emit(imp, relax.op.add(y, cast(imp, bias, _F32)))
    return cast(imp, y, _DTYPES[arg(node, 5, "out_dtype")])


def int8_linear(node: Any, imp: Any) -> relax.Expr:
    q, s, wq, ws = (imp.env[a] for a in node.args[:4])
    return _product(node, imp, q, s, wq, ws)


def _unpack_int4(imp: Any, packed: relax.Expr, rows: int, cols: int, k: int) -> relax.Expr:
    """pack_int4's bytes [N, ceil(K/2)] -> int8 codes [N, K] (low nibble = even column, zero point 8)."""
    wide = emit(imp, relax.op.astype(packed, "int32"))
    sixteen = relax.const(16, "int32")
    lo = emit(imp, relax.op.floor_mod(wide, sixteen))
    hi = emit(imp, relax.op.floor_divide(wide, sixteen))
    both = emit(imp, relax.op.stack([lo, hi], axis=2))
    flat = emit(imp, relax.op.reshape(both, (rows, 2 * cols)))
    if 2 * cols != k:
        flat = emit(imp, relax.op.strided_slice(flat, axes=[1], begin=[0], end=[k]))
    return emit(imp, relax.op.astype(emit(imp, relax.op.subtract(flat, relax.const(8, "int32"))), "int8"))


def int4_linear(node: Any, imp: Any) -> relax.Expr:
    q, s, wp, ws = (imp.env[a] for a in node.args[:4])
    rows, cols = (int(d) for d in node.args[2].meta["val"].shape)
    wq = _unpack_int4(imp, wp, rows, cols, int(node.args[0].meta["val"].shape[-1]))
    return _product(node, imp, q, s, wq, ws)
