"""ONNX translations of the asymmetric int8 ops (compiler/quant_asym.py): ORT's own dynamic quantization ops.

    fxopt.quantize_uint8(x, pre)                   -> DynamicQuantizeLinear(x32 * pre)      (q, s, z)
    fxopt.uint8_linear(q, s, z, wq, ws, b, dt)     -> Cast(MatMulIntegerToFloat(q, wqᵀ, s, ws, z, wz, bias=b), dt)

DynamicQuantizeLinear's numerics are the op's by definition (quant_asym's docstring): the codes, scale and zero
point agree bit for bit. The product is exact in int32 either way: weights as int8 (zero point 0, ORT's
uint8·int8 kernel) where `int8_gemm.u8s8_exact` proves that kernel exact on the exporting CPU, else as uint8
wq + 128 with zero point 128 (uint8·uint8). Scales and bias go into the GEMM, so each linear is one kernel after
one quantizer pass per activation; ORT fuses a quantizer with a single reader into `DynamicQuantizeMatMul`.
"""

from __future__ import annotations

from collections.abc import Callable

import onnx
import torch
from onnxscript import opset18 as op

from fxopt import ops  # noqa: F401  (defines torch.ops.fxopt)


def _quantize_uint8(x, pre_scale=None):
    xw = op.Cast(x, to=onnx.TensorProto.FLOAT)
    if pre_scale is not None:
        xw = op.Mul(xw, op.Cast(pre_scale, to=onnx.TensorProto.FLOAT))
    q, s, z = op.DynamicQuantizeLinear(xw)
    return q, s, z


def _make_uint8_linear(u8s8: bool) -> Callable:
    from .translations import MatMulIntegerToFloat, _onnx_dtype, gemm_operands

    def fxopt_uint8_linear(q, scale, zero_point, wq, w_scale, bias=None, out_dtype: int = onnx.TensorProto.FLOAT):
        weight, weight_zero, ws, b = gemm_operands(wq, w_scale, bias, u8s8)
        y = MatMulIntegerToFloat(q, weight, scale, ws, zero_point, weight_zero, b)
        to = _onnx_dtype(out_dtype) if isinstance(out_dtype, torch.dtype) else int(out_dtype)
        return y if to == onnx.TensorProto.FLOAT else op.Cast(y, to=to)

    return fxopt_uint8_linear


def translations(int8_gemm: str) -> dict:
    return {torch.ops.fxopt.quantize_uint8.default: _quantize_uint8,
            torch.ops.fxopt.uint8_linear.default: _make_uint8_linear(int8_gemm == "u8s8")}
