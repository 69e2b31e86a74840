"""ONNX translations of the fused int8 ops (compiler/quant_fused.py): each op written as the unfused sequence
it stands for, from the existing translations (translations.py), so ORT runs the same integer kernels.

    <norm>_quantize_int8(x, [r,] …, pre)   -> the norm's translation (SkipLayerNormalization, RMSNormalization,
                                              LayerNormalization, …), then fxopt_quantize_int8(y, pre)
    <norm>_and_quantize_int8(x, …, pre)    -> y = the norm's translation; (*fxopt_quantize_int8(y, pre), y)
    silu_mul_quantize_int8(g, u, pre)      -> quantize(Cast(g32 · Sigmoid(g32), dt) · u, pre)
    activation_quantize_int8(x, act, pre)  -> quantize(act(x), pre)
    int8_linear_epilogue(…, act, r, dt)    -> act(fxopt_int8_linear(…, dt)) [+ r]
    int8_linear_swiglu(q, s, W, S, b, dt)  -> Cast(g32 · Sigmoid(g32), dt) · u, g and u the even and the odd
                                              columns of fxopt_int8_linear(q, s, W, S, b, dt): one GEMM over the
                                              interleaved rows (the same per-column arithmetic as two)
    int8_linear_quantize(…, act, pre, dt)      -> quantize(act(fxopt_int8_linear(…, dt)), pre)
    int8_linear_swiglu_quantize(…, pre, dt)    -> quantize(int8_linear_swiglu(…, dt), pre)

Activations are computed in fp32 and cast back to the tensor's dtype, as ATen's kernels round them:
gelu = 0.5·x·(1 + Erf(x/√2)), gelu_tanh with Tanh, silu = x·Sigmoid(x), relu = Relu.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeVar, Union

import onnx
from onnxscript import BFLOAT16, DOUBLE, FLOAT, FLOAT16
from onnxscript import opset18 as op

from fxopt.quant_fused import ACTIVATIONS

TFloat = TypeVar("TFloat", bound=Union[FLOAT16, FLOAT, DOUBLE, BFLOAT16])  # noqa: UP007 (torch.onnx reads typing.Union)


def _f(v: float):
    return op.Constant(value_float=v)


def _activate(x, activation: str):
    if activation == "none":
        return x
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if activation == "relu":
        return op.Relu(x)
    v = op.Cast(x, to=onnx.TensorProto.FLOAT)
    if activation == "silu":
        y = op.Mul(v, op.Sigmoid(v))
    elif activation == "gelu":
        y = op.Mul(op.Mul(_f(0.5), v), op.Add(_f(1.0), op.Erf(op.Mul(v, _f(1 / math.sqrt(2))))))
    else:
        inner = op.Mul(_f(math.sqrt(2 / math.pi)), op.Add(v, op.Mul(_f(0.044715), op.Mul(v, op.Mul(v, v)))))
        y = op.Mul(op.Mul(_f(0.5), v), op.Add(_f(1.0), op.Tanh(inner)))
    return op.CastLike(y, x)


def _pairs(y):
    """A SwiGLU GEMM's output [..., 2N] (column 2j gate j, 2j+1 up j) as (gate, up), each [..., N]."""
    pairs = op.Reshape(y, op.Concat(op.Slice(op.Shape(y), op.Constant(value_ints=[0]), op.Constant(value_ints=[-1])),
                                     op.Constant(value_ints=[-1, 2]), axis=0))
    gate, up = op.Split(pairs, axis=-1, num_outputs=2)
    last = op.Constant(value_ints=[-1])
    return op.Squeeze(gate, last), op.Squeeze(up, last)


def _layer_norm(x, normalized_shape, weight, bias, eps):
    from .translations import _ones_scale

    axis = -len(normalized_shape)
    gamma = _ones_scale(x, axis) if weight is None else weight
    out, _, _ = op.LayerNormalization(x, gamma, bias, axis=axis, epsilon=eps, stash_type=1)
    return out


def translations(opset: int, int8_gemm: str) -> dict:
    import torch

    from . import translations as t

    quantize = t.fxopt_quantize_int8
    rms, add_rms = t._make_rms_norm(opset), t._make_add_rms_norm(opset)
    linear = t._make_int8_linear(int8_gemm == "u8s8")
    fused = torch.ops.fxopt

    def rms_norm_quantize_int8(x: TFloat, normalized_shape: Sequence[int], weight: TFloat | None = None,
                               eps: float = 1e-6, pre_scale: TFloat | None = None):
        return quantize(rms(x, normalized_shape, weight, eps), pre_scale, None, "token")

    def layer_norm_quantize_int8(x: TFloat, normalized_shape: Sequence[int], weight: TFloat | None = None,
                                 bias: TFloat | None = None, eps: float = 1e-5, pre_scale: TFloat | None = None):
        return quantize(_layer_norm(x, normalized_shape, weight, bias, eps), pre_scale, None, "token")

    def add_rms_norm_quantize_int8(x: TFloat, residual: TFloat, normalized_shape: Sequence[int],
                                   weight: TFloat | None = None, eps: float = 1e-6, pre_scale: TFloat | None = None):
        y, total = add_rms(x, residual, normalized_shape, weight, eps)
        return (*quantize(y, pre_scale, None, "token"), total)

    def add_layer_norm_quantize_int8(x: TFloat, residual: TFloat, normalized_shape: Sequence[int],
                                     weight: TFloat | None = None, bias: TFloat | None = None, eps: float = 1e-5,
                                     pre_scale: TFloat | None = None):
        y, total = t.fxopt_add_layer_norm(x, residual, normalized_shape, weight, bias, eps)
        return (*quantize(y, pre_scale, None, "token"), total)

    def rms_norm_and_quantize_int8(x: TFloat, normalized_shape: Sequence[int], weight: TFloat | None = None,
                                   eps: float = 1e-6, pre_scale: TFloat | None = None):
        y = rms(x, normalized_shape, weight, eps)
        return (*quantize(y, pre_scale, None, "token"), y)

    def layer_norm_and_quantize_int8(x: TFloat, normalized_shape: Sequence[int], weight: TFloat | None = None,
                                     bias: TFloat | None = None, eps: float = 1e-5, pre_scale: TFloat | None = None):
        y = _layer_norm(x, normalized_shape, weight, bias, eps)
        return (*quantize(y, pre_scale, None, "token"), y)

    def silu_mul_quantize_int8(gate: TFloat, up: TFloat, pre_scale: TFloat | None = None):
        return quantize(op.Mul(_activate(gate, "silu"), up), pre_scale, None, "token")

    def activation_quantize_int8(x: TFloat, activation: str = "none", pre_scale: TFloat | None = None):
        return quantize(_activate(x, activation), pre_scale, None, "token")

    def int8_linear_epilogue(q, scale, wq, w_scale, bias=None, activation: str = "none", residual=None,
                             out_dtype: int = onnx.TensorProto.FLOAT):
        y = _activate(linear(q, scale, wq, w_scale, bias, out_dtype), activation)
        return y if residual is None else op.Add(y, op.CastLike(residual, y))

    def int8_linear_swiglu(q, scale, wq_gate_up, ws_gate_up, bias_gate_up=None,
                           out_dtype: int = onnx.TensorProto.FLOAT):
        gate, up = _pairs(linear(q, scale, wq_gate_up, ws_gate_up, bias_gate_up, out_dtype))
        return op.Mul(_activate(gate, "silu"), up)

    def int8_linear_quantize(q, scale, wq, w_scale, bias=None, activation: str = "none", pre_scale=None,
                             out_dtype: int = onnx.TensorProto.FLOAT):
        y = _activate(linear(q, scale, wq, w_scale, bias, out_dtype), activation)
        return quantize(y, pre_scale, None, "token")

    def int8_linear_swiglu_quantize(q, scale, wq_gate_up, ws_gate_up, bias_gate_up=None, pre_scale=None,
                                    out_dtype: int = onnx.TensorProto.FLOAT):
        y = int8_linear_swiglu(q, scale, wq_gate_up, ws_gate_up, bias_gate_up, out_dtype)
        return quantize(y, pre_scale, None, "token")

    return {getattr(fused, f.__name__).default: f for f in (
        rms_norm_quantize_int8, layer_norm_quantize_int8, add_rms_norm_quantize_int8, add_layer_norm_quantize_int8,
        rms_norm_and_quantize_int8, layer_norm_and_quantize_int8, silu_mul_quantize_int8, activation_quantize_int8,
        int8_linear_epilogue, int8_linear_swiglu,
        int8_linear_quantize, int8_linear_swiglu_quantize)}
