"""ONNX translations of fxopt's custom ops, for the dynamo exporter's `custom_translation_table`.

    fxopt.rms_norm(x, shape, w, eps)             -> RMSNormalization(x, w, axis=-len(shape), epsilon=eps)
                                                    (opset >= 23; below: x * rsqrt(mean(x²) + eps) * w in
                                                    primitive ops)
    fxopt.add_layer_norm(x, r, shape, w, b, eps) -> com.microsoft.SkipLayerNormalization(x, r, w, b)
                                                    outputs (out, mean, inv_std, sum): we read 0 and 3
    fxopt.add_rms_norm(x, r, shape, w, eps)      -> com.microsoft.SkipSimplifiedLayerNormalization(x, r, w)
                                                    outputs (out, mean, inv_std, sum): we read 0 and 3

RMSNorm statistics are computed in fp32 (`stash_type=1`, fp32 casts in the primitive form), the normalized
value is cast back to x's dtype and then multiplied by w, as `fxopt.rms_norm` does.

The contrib ops take one normalized (last) axis and a 2-d or 3-d input; any other case (several normalized
dims, another rank, a weight whose dtype differs from x) is translated as Add + the standard norm, which is
still one norm op. ORT registers SimplifiedLayerNormalization in the ONNX domain although ONNX does not define
it, so a file using it would fail `onnx.checker`; below opset 23 RMSNorm is therefore written in primitive
ops, which ORT's own graph optimizer fuses back into SimplifiedLayerNormalization at session creation.

The int8 family (convention: fxopt/quant_ops.py), in standard ops that ORT's CPU provider runs as integer kernels:

    fxopt.quantize_int8(x, pre, scale, g)   -> s = Max(ReduceMax(Abs(x32 * pre)), SCALE_MIN) / 127 (per token:
                                               axes [-1], keepdims), q = Cast(Clip(Round(x32 * pre / s)), int8)
    fxopt.int8_linear(q, s, wq, ws, b, dt)  -> Cast(Cast(MatMulInteger(u8(q), u8(Transpose(wq)), 128, 128), float)
                                               * s * ws + b, dt), u8(v) = v + 128 as uint8 (exact)

The weights are int8 initializers; the Transpose of a constant is folded by ORT when the session is created.

Later passes extend `translation_table` (GQA) in the same way: one trace-only function per op.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar, Union

import onnx
import torch
from onnxscript import BFLOAT16, DOUBLE, FLOAT, FLOAT16
from onnxscript import opset18 as op
from onnxscript.onnx_opset import opset23 as op23
from onnxscript.values import Op, Opset

from fxopt import ops
from fxopt.quant_ops import QMAX, SCALE_MIN

TFloat = TypeVar("TFloat", bound=Union[FLOAT16, FLOAT, DOUBLE, BFLOAT16])  # noqa: UP007 (torch.onnx reads typing.Union)

MS_DOMAIN = "com.microsoft"
RMS_NORMALIZATION_OPSET = 23  # first ONNX opset with RMSNormalization
_FLOAT_TYPES = ["tensor(float)", "tensor(float16)", "tensor(double)", "tensor(bfloat16)"]


def _contrib_op(name: str, inputs: Sequence[tuple[str, bool]], outputs: Sequence[tuple[str, bool]]) -> Op:
    """An onnxscript Op for an ORT contrib op, with the schema ORT registers (names, optional-ness, epsilon)."""
    option = onnx.defs.OpSchema.FormalParameterOption

    def params(spec):
        return [onnx.defs.OpSchema.FormalParameter(n, "T", param_option=option.Optional if opt else option.Single)
                for n, opt in spec]

    schema = onnx.defs.OpSchema(
        name, MS_DOMAIN, 1, inputs=params(inputs), outputs=params(outputs),
        type_constraints=[("T", _FLOAT_TYPES, "float tensors")],
        attributes=[onnx.defs.OpSchema.Attribute("epsilon", onnx.defs.OpSchema.AttrType.FLOAT, required=False)])
    return Op(Opset(MS_DOMAIN, 1), name, schema)


_SKIP_OUTPUTS = (("output", False), ("mean", True), ("inv_std_var", True), ("input_skip_bias_sum", True))
SkipLayerNormalization = _contrib_op(
    "SkipLayerNormalization",
    (("input", False), ("skip", False), ("gamma", False), ("beta", True), ("bias", True)), _SKIP_OUTPUTS)
SkipSimplifiedLayerNormalization = _contrib_op(
    "SkipSimplifiedLayerNormalization",
    (("input", False), ("skip", False), ("gamma", False), ("bias", True)), _SKIP_OUTPUTS)


def _ones_scale(x, axis: int):
    """A weight of ones over the normalized dims (the norms' ONNX forms require a scale input)."""
    return op.Expand(op.CastLike(op.Constant(value_float=1.0), x), op.Shape(x, start=axis))


def _contrib_form(x, residual, weight) -> bool:
    """Whether the ORT contrib skip-norm kernels take this case (one trailing axis, 2-d/3-d, one dtype)."""
    rank = len(x.shape) if x.shape is not None else None
    return rank in (2, 3) and (weight is None or weight.dtype == x.dtype) and residual.dtype == x.dtype


def _rms_primitive(x, x_dtype, weight, axis: int, eps: float):
    x32 = op.Cast(x, to=onnx.TensorProto.FLOAT)
    mean_sq = op.ReduceMean(op.Mul(x32, x32), op.Constant(value_ints=list(range(axis, 0))), keepdims=1)
    inv = op.Reciprocal(op.Sqrt(op.Add(mean_sq, op.Constant(value_float=eps))))
    y = op.CastLike(op.Mul(x32, inv), x)
    return y if weight is None else _mul_weight(y, x_dtype, weight)


def _mul_weight(y, y_dtype, weight):
    """weight * y, y of dtype `y_dtype` (traced values built by CastLike carry no dtype of their own)."""
    if weight.dtype == y_dtype:
        return op.Mul(y, weight)
    # torch promotes w * y; ONNX Mul needs one dtype: cast both to the wider one (the fake kernel's dtype)
    wide = torch.promote_types(_torch_dtype(y_dtype), _torch_dtype(weight.dtype))
    to = _onnx_dtype(wide)
    return op.Mul(op.Cast(y, to=to), op.Cast(weight, to=to))


def _torch_dtype(ir_dtype) -> torch.dtype:
    return {"FLOAT": torch.float32, "FLOAT16": torch.float16, "BFLOAT16": torch.bfloat16,
            "DOUBLE": torch.float64}[ir_dtype.name]


def _onnx_dtype(dtype: torch.dtype) -> int:
    return {torch.float32: onnx.TensorProto.FLOAT, torch.float16: onnx.TensorProto.FLOAT16,
            torch.bfloat16: onnx.TensorProto.BFLOAT16, torch.float64: onnx.TensorProto.DOUBLE}[dtype]


def _rms(x, x_dtype, weight, axis: int, eps: float, opset: int):
    """`x_dtype` is passed along: values made by traced ops (an Add) carry no dtype of their own."""
    if opset < RMS_NORMALIZATION_OPSET:
        return _rms_primitive(x, x_dtype, weight, axis, eps)
    if weight is not None and weight.dtype == x_dtype:
        return op23.RMSNormalization(x, weight, axis=axis, epsilon=eps, stash_type=1)
    y = op23.RMSNormalization(x, _ones_scale(x, axis), axis=axis, epsilon=eps, stash_type=1)
    return y if weight is None else _mul_weight(y, x_dtype, weight)


def _make_rms_norm(opset: int) -> Callable:
    def fxopt_rms_norm(x: TFloat, normalized_shape: Sequence[int], weight: TFloat | None = None,
                       eps: float = 1e-6) -> TFloat:
        return _rms(x, x.dtype, weight, -len(normalized_shape), eps, opset)

    return fxopt_rms_norm


def fxopt_add_layer_norm(x: TFloat, residual: TFloat, normalized_shape: Sequence[int],
                         weight: TFloat | None = None, bias: TFloat | None = None,
                         eps: float = 1e-5) -> tuple[TFloat, TFloat]:
    axis = -len(normalized_shape)
    gamma = _ones_scale(x, axis) if weight is None else weight
    if axis == -1 and _contrib_form(x, residual, weight) and (bias is None or bias.dtype == x.dtype):
        out, _, _, total = SkipLayerNormalization(x, residual, gamma, bias, epsilon=eps)
        return out, total
    total = op.Add(x, residual)
    out, _, _ = op.LayerNormalization(total, gamma, bias, axis=axis, epsilon=eps, stash_type=1)
    return out, total


def _make_add_rms_norm(opset: int) -> Callable:
    def fxopt_add_rms_norm(x: TFloat, residual: TFloat, normalized_shape: Sequence[int],
                           weight: TFloat | None = None, eps: float = 1e-6) -> tuple[TFloat, TFloat]:
        if len(normalized_shape) == 1 and _contrib_form(x, residual, weight):
            gamma = _ones_scale(x, -1) if weight is None else weight
            out, _, _, total = SkipSimplifiedLayerNormalization(x, residual, gamma, epsilon=eps)
            return out, total
        total = op.Add(x, residual)
        return _rms(total, x.dtype, weight, -len(normalized_shape), eps, opset), total

    return fxopt_add_rms_norm


def fxopt_quantize_int8(x: TFloat, pre_scale: TFloat | None = None, scale: TFloat | None = None,
                        granularity: str = "token"):
    xw = op.Cast(x, to=onnx.TensorProto.FLOAT)
    if pre_scale is not None:
        xw = op.Mul(xw, op.Cast(pre_scale, to=onnx.TensorProto.FLOAT))
    if scale is not None:
        s = op.Cast(scale, to=onnx.TensorProto.FLOAT)
    else:
        peak = op.ReduceMax(op.Abs(xw), op.Constant(value_ints=[-1]), keepdims=1) if granularity == "token" \
            else op.ReduceMax(op.Abs(xw), keepdims=0)
        s = op.Div(op.Max(peak, op.Constant(value_float=SCALE_MIN)), op.Constant(value_float=float(QMAX)))
    r = op.Clip(op.Round(op.Div(xw, s)), op.Constant(value_float=-float(QMAX)), op.Constant(value_float=float(QMAX)))
    return op.Cast(r, to=onnx.TensorProto.INT8), s


def fxopt_int8_linear(q, scale, wq, w_scale, bias=None, out_dtype: int = onnx.TensorProto.FLOAT):
    # codes and weights as uint8 with zero point 128 (v + 128: the same integer product): on x86 without VNNI,
    # ORT's s8·s8 MatMulInteger runs ~3x slower than the FP32 MatMul, and its u8·s8 kernel saturates 16-bit pair
    # sums (inexact); u8·u8 is exact. The weight's shift is constant-folded when the session is created.
    zero = op.Constant(value=_uint8_scalar(128))
    acc = op.MatMulInteger(_shifted_u8(q), op.Transpose(_shifted_u8(wq), perm=[1, 0]), zero, zero)
    y = op.Mul(op.Mul(op.Cast(acc, to=onnx.TensorProto.FLOAT), scale), op.Cast(w_scale, to=onnx.TensorProto.FLOAT))
    if bias is not None:
        y = op.Add(y, op.Cast(bias, to=onnx.TensorProto.FLOAT))
    to = _onnx_dtype(out_dtype) if isinstance(out_dtype, torch.dtype) else int(out_dtype)
    return op.Cast(y, to=to)


def _shifted_u8(v):
    return op.Cast(op.Add(op.Cast(v, to=onnx.TensorProto.FLOAT), op.Constant(value_float=128.0)),
                   to=onnx.TensorProto.UINT8)


def _uint8_scalar(v: int) -> onnx.TensorProto:
    return onnx.helper.make_tensor("zero_point", onnx.TensorProto.UINT8, [], [v])


def translation_table(opset: int) -> dict[torch._ops.OpOverload, Callable]:
    """fxopt op overload -> trace-only ONNX translation, for the dynamo exporter at `opset`."""
    return {
        ops.rms_norm: _make_rms_norm(opset),
        ops.add_layer_norm: fxopt_add_layer_norm,
        ops.add_rms_norm: _make_add_rms_norm(opset),
        ops.quantize_int8: fxopt_quantize_int8,
        ops.int8_linear: fxopt_int8_linear,
    }

