"""Relax lowerings of the asymmetric int8 ops (convention: compiler/quant_asym.py), TVM generating every kernel.

    quantize_uint8(x, pre)            -> lo = min(min(x'), 0), hi = max(max(x'), 0), s = hi == lo ? 1 : (hi-lo)/255,
                                         z = round(clip(-lo / s, 0, 255)), q = astype(clip(round(x'/s) + z, 0, 255), u8)
    uint8_linear(q, s, z, wq, ws, b)  -> astype(matmul(q - z, wqᵀ, out_dtype=int32), f32) * s * ws + b
"""

from __future__ import annotations

from typing import Any

import torch
from tvm import relax

from fxopt.quant_asym import U8_MAX

from .quant import _DTYPES, _F32, _const
from .relax_util import arg, cast, emit, env_or_value


def quantize_uint8(node: Any, imp: Any) -> relax.Expr:
    x = cast(imp, imp.env[node.args[0]], _F32)
    pre = env_or_value(imp, arg(node, 1, "pre_scale"))
    if pre is not None:
        x = emit(imp, relax.op.multiply(x, cast(imp, pre, _F32)))
    zero = _const(0.0)
    lo = emit(imp, relax.op.minimum(emit(imp, relax.op.min(x)), zero))
    hi = emit(imp, relax.op.maximum(emit(imp, relax.op.max(x)), zero))
    span = emit(imp, relax.op.divide(emit(imp, relax.op.subtract(hi, lo)), _const(float(U8_MAX))))
    s = emit(imp, relax.op.where(emit(imp, relax.op.equal(hi, lo)), _const(1.0), span))
    z = emit(imp, relax.op.round(emit(imp, relax.op.clip(emit(imp, relax.op.divide(emit(imp, relax.op.negative(lo)),
                                                                                     s)), 0, U8_MAX))))
    r = emit(imp, relax.op.add(emit(imp, relax.op.round(emit(imp, relax.op.divide(x, s)))), z))
    q = emit(imp, relax.op.astype(emit(imp, relax.op.clip(r, 0, U8_MAX)), "uint8"))
    return emit(imp, relax.Tuple([q, s, emit(imp, relax.op.astype(z, "uint8"))]))


def uint8_linear(node: Any, imp: Any) -> relax.Expr:
    q, s, z, wq, ws = (imp.env[a] for a in node.args[:5])
    bias = env_or_value(imp, arg(node, 5, "bias"))
    out_dtype = _DTYPES[arg(node, 6, "out_dtype")]
    wide = [emit(imp, relax.op.astype(v, "int32")) for v in (q, z)]
    centered = emit(imp, relax.op.subtract(*wide))
    weight = emit(imp, relax.op.astype(emit(imp, relax.op.permute_dims(wq, [1, 0])), "int32"))
    acc = emit(imp, relax.op.matmul(centered, weight, out_dtype="int32"))
    y = emit(imp, relax.op.multiply(emit(imp, relax.op.multiply(cast(imp, acc, _F32), s)), cast(imp, ws, _F32)))
    if bias is not None:
        y = emit(imp, relax.op.add(y, cast(imp, bias, _F32)))
    return cast(imp, y, out_dtype)


def converters() -> dict:
    return {torch.ops.fxopt.quantize_uint8.default: quantize_uint8, torch.ops.fxopt.uint8_linear.default: uint8_linear}
