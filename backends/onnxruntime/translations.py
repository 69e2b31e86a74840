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

The int8 family (convention: fxopt/quant_ops.py), in the ops ORT's CPU provider runs as fused integer kernels:

    fxopt.quantize_int8(x, pre, scale, g)   -> s = Max(ReduceMax(Abs(x32 * pre)), SCALE_MIN) / 127 (per token:
                                               axes [-1], keepdims), codes = QuantizeLinear(x32 * pre, s, 128)
                                               (per token: on the [tokens, in] view, one scale per row)
    fxopt.int8_linear(q, s, wq, ws, b, dt)  -> per token:  Cast(MatMulIntegerToFloat(codes, wqᵀ, 1, ws) * s + b, dt)
                                               per tensor: Cast(MatMulIntegerToFloat(codes, wqᵀ, s, ws, bias=b), dt)

The codes travel between the two as uint8 q + 128 with zero point 128: QuantizeLinear divides by s and rounds
half to even (MLAS), and |x/s| <= 127 for a scale taken from the absmax, so the uint8 codes are exactly the
op's q + 128 (a static scale clips x to ±127 s first, as the op clamps the codes to ±127). The integer product
is the op's: weights as int8 with zero point 0 (ORT's uint8·int8 kernel) where `int8_gemm.u8s8_exact` proves
that kernel exact on this CPU, else as uint8 wq + 128 with zero point 128 (uint8·uint8, exact everywhere).
The epilogue is the op's fp32 product in another order: (acc · ws) · s for a per-token scale (ORT's
MatMulIntegerToFloat takes one A scale; a per-row one would be applied after its bias), acc · (s · ws) + b
per tensor, each within an ulp or two of (acc · s) · ws.
The weights are int8 initializers; the Transpose (and uint8 shift) of a constant is folded by ORT when the
session is created, and MatMulIntegerToFloat packs them once.

    fxopt.int4_linear(q, s, wp, ws, b, dt)  -> Cast(com.microsoft.MatMulNBits(q · s, wp as (N, k_blocks, blob),
                                               ws repeated over the k_blocks, bias=b; bits=4, block_size=bs), dt)

MatMulNBits (ORT 1.31's registered schema): B is uint8 (N, k_blocks, block_size·bits/8), k_blocks =
ceil(K / block_size), 4-bit values low nibble first, dequantized as (nibble − zero_point)·scale with the default
zero point 2^(bits−1) = 8 when none is given; scales (N, k_blocks) in A's dtype. That is exactly pack_int4's
layout (quant_ops), so the bytes are only reshaped (rows padded with 0x88, two code-0 nibbles, up to whole
blocks). Our scale is one per row (ZeroQuant's row groups), so it is the same in each of a row's K blocks. A is
the dequantized activation q·s (fp32, exact products of an int8 code and a scale up to one rounding), so ORT's
fp32 kernel (accuracy_level 0: A is not requantized) computes Σ_k (q·s)·(c·ws) in fp32 where the op sums the
integers exactly and scales once: equal up to fp32 rounding of the sum.

Later passes extend `translation_table` (GQA) in the same way: one trace-only function per op.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar, Union

import onnx
import onnx_ir as ir
import torch
from onnxscript import BFLOAT16, DOUBLE, FLOAT, FLOAT16
from onnxscript import opset18 as op
from onnxscript.onnx_opset import opset23 as op23
from onnxscript.values import Op, Opset

from fxopt import ops
from fxopt.quant_ops import QMAX, SCALE_MIN

from . import int8_asym, int8_fused

TFloat = TypeVar("TFloat", bound=Union[FLOAT16, FLOAT, DOUBLE, BFLOAT16])  # noqa: UP007 (torch.onnx reads typing.Union)

MS_DOMAIN = "com.microsoft"
INT8_GEMMS = ("u8s8", "u8u8")
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


U8_ZERO_POINT = 128  # the codes q in [-127, 127] as uint8 q + 128


def _ms_op(name: str, inputs: Sequence[tuple[str, str, bool]], outputs: Sequence[tuple[str, str]],
           types: Sequence[tuple[str, Sequence[str]]]) -> Op:
    """An onnxscript Op for an ORT contrib op with typed inputs ((name, type var, optional), ...)."""
    option = onnx.defs.OpSchema.FormalParameterOption
    schema = onnx.defs.OpSchema(
        name, MS_DOMAIN, 1,
        inputs=[onnx.defs.OpSchema.FormalParameter(n, t, param_option=option.Optional if o else option.Single)
                for n, t, o in inputs],
        outputs=[onnx.defs.OpSchema.FormalParameter(n, t) for n, t in outputs],
        type_constraints=[(t, list(allowed), "") for t, allowed in types])
    return Op(Opset(MS_DOMAIN, 1), name, schema)


_INT8 = ["tensor(uint8)", "tensor(int8)"]
MatMulIntegerToFloat = _ms_op(
    "MatMulIntegerToFloat",
    (("A", "T1", False), ("B", "T2", False), ("a_scale", "T3", False), ("b_scale", "T3", False),
     ("a_zero_point", "T1", True), ("b_zero_point", "T2", True), ("bias", "T3", True)),
    (("Y", "T3"),), (("T1", _INT8), ("T2", _INT8), ("T3", ["tensor(float)"])))


def _uint8_scalar(v: int) -> onnx.TensorProto:
    return onnx.helper.make_tensor("zero_point", onnx.TensorProto.UINT8, [], [v])


def _u8_zero_point():
    return op.Constant(value=_uint8_scalar(U8_ZERO_POINT))


def _as_uint8(value):
    # the exporter would otherwise type the codes as the torch op's int8
    value.dtype = ir.DataType.UINT8
    return value


def fxopt_quantize_int8(x: TFloat, pre_scale: TFloat | None = None, scale: TFloat | None = None,
                        granularity: str = "token"):
    xw = op.Cast(x, to=onnx.TensorProto.FLOAT)
    if pre_scale is not None:
        xw = op.Mul(xw, op.Cast(pre_scale, to=onnx.TensorProto.FLOAT))
    if scale is not None:  # static: a value beyond ±127 s would reach code -128 in QuantizeLinear
        s = op.Cast(scale, to=onnx.TensorProto.FLOAT)
        bound = op.Mul(s, op.Constant(value_float=float(QMAX)))
        return _as_uint8(op.QuantizeLinear(op.Clip(xw, op.Neg(bound), bound), s, _u8_zero_point())), s
    if granularity != "token":
        peak = op.ReduceMax(op.Abs(xw), keepdims=0)
        s = op.Div(op.Max(peak, op.Constant(value_float=SCALE_MIN)), op.Constant(value_float=float(QMAX)))
        return _as_uint8(op.QuantizeLinear(xw, s, _u8_zero_point())), s
    peak = op.ReduceMax(op.Abs(xw), op.Constant(value_ints=[-1]), keepdims=1)
    s = op.Div(op.Max(peak, op.Constant(value_float=SCALE_MIN)), op.Constant(value_float=float(QMAX)))
    # QuantizeLinear takes one scale per index of one axis: the tokens of the [tokens, in] view
    rows = op.Reshape(xw, op.Concat(op.Constant(value_ints=[-1]), op.Shape(xw, start=-1), axis=0))
    row_scale = op.Reshape(s, op.Constant(value_ints=[-1]))
    codes = op.QuantizeLinear(rows, row_scale, op.Expand(_u8_zero_point(), op.Shape(row_scale)), axis=0)
    return _as_uint8(op.Reshape(codes, op.Shape(xw))), s


def gemm_operands(wq, w_scale, bias, u8s8: bool) -> tuple:
    """(Bᵀ, B's zero point, fp32 weight scales, fp32 bias) of an int8 weight for MatMulIntegerToFloat: int8 with
    zero point 0 (uint8·int8) or uint8 wq + 128 with zero point 128 (uint8·uint8, exact on every CPU)."""
    if u8s8:
        weight, weight_zero = op.Transpose(wq, perm=[1, 0]), None
    else:
        weight, weight_zero = op.Transpose(_shifted_u8(wq), perm=[1, 0]), _u8_zero_point()
    b = None if bias is None else op.Cast(bias, to=onnx.TensorProto.FLOAT)
    return weight, weight_zero, op.Cast(w_scale, to=onnx.TensorProto.FLOAT), b


def _make_int8_linear(u8s8: bool) -> Callable:
    def fxopt_int8_linear(q, scale, wq, w_scale, bias=None, out_dtype: int = onnx.TensorProto.FLOAT):
        codes = q if q.dtype == ir.DataType.UINT8 else _shifted_u8(q)  # int8 codes from elsewhere: shifted here
        weight, weight_zero, ws, b = gemm_operands(wq, w_scale, bias, u8s8)
        if scale.shape is not None and scale.shape.rank() == 0:  # per tensor: scales and bias in the GEMM
            y = MatMulIntegerToFloat(codes, weight, scale, ws, _u8_zero_point(), weight_zero, b)
        else:
            y = op.Mul(MatMulIntegerToFloat(codes, weight, op.Constant(value_float=1.0), ws, _u8_zero_point(),
                                            weight_zero), scale)
            if b is not None:
                y = op.Add(y, b)
        to = _onnx_dtype(out_dtype) if isinstance(out_dtype, torch.dtype) else int(out_dtype)
        return y if to == onnx.TensorProto.FLOAT else op.Cast(y, to=to)

    return fxopt_int8_linear


INT4_BLOCK_MAX = 128  # MatMulNBits' K block: a power of two >= 16; one scale per row makes its size free


def _matmul_nbits_op() -> Op:
    option = onnx.defs.OpSchema.FormalParameterOption
    attr = onnx.defs.OpSchema.Attribute
    ints = onnx.defs.OpSchema.AttrType.INT
    schema = onnx.defs.OpSchema(
        "MatMulNBits", MS_DOMAIN, 1,
        inputs=[onnx.defs.OpSchema.FormalParameter(n, t, param_option=option.Optional if o else option.Single)
                for n, t, o in (("A", "T1", False), ("B", "T2", False), ("scales", "T1", False),
                                ("zero_points", "T3", True), ("g_idx", "T4", True), ("bias", "T1", True))],
        outputs=[onnx.defs.OpSchema.FormalParameter("Y", "T1")],
        type_constraints=[("T1", ["tensor(float)"], ""), ("T2", ["tensor(uint8)"], ""),
                          ("T3", ["tensor(uint8)", "tensor(float)"], ""), ("T4", ["tensor(int32)"], "")],
        attributes=[attr("K", ints, required=True), attr("N", ints, required=True),
                    attr("bits", ints, required=False), attr("block_size", ints, required=True),
                    attr("accuracy_level", ints, required=False)])
    return Op(Opset(MS_DOMAIN, 1), "MatMulNBits", schema)


MatMulNBits = _matmul_nbits_op()


def int4_block_size(k: int) -> int:
    """MatMulNBits' K block for K inputs: the next power of two >= K, between 16 and INT4_BLOCK_MAX."""
    return min(INT4_BLOCK_MAX, max(16, 1 << max(k - 1, 1).bit_length()))


def fxopt_int4_linear(q, scale, w_packed, w_scale, bias=None, out_dtype: int = onnx.TensorProto.FLOAT):
    k, n = q.shape[-1], w_packed.shape[0]
    if not isinstance(k, int) or not isinstance(n, int):
        raise ValueError(f"int4_linear: MatMulNBits needs static K and N, got K={k}, N={n}")
    codes = op.Cast(q, to=onnx.TensorProto.FLOAT)
    if q.dtype == ir.DataType.UINT8:  # the quantizer's codes travel as q + 128
        codes = op.Sub(codes, op.Constant(value_float=float(U8_ZERO_POINT)))
    a = op.Mul(codes, op.Cast(scale, to=onnx.TensorProto.FLOAT))
    block = int4_block_size(k)
    blocks = -(-k // block)
    extra = blocks * block // 2 - w_packed.shape[1]
    padded = w_packed if extra == 0 else op.Pad(
        w_packed, op.Constant(value_ints=[0, 0, 0, extra]),
        op.Constant(value=onnx.helper.make_tensor("pad", onnx.TensorProto.UINT8, [], [0x88])))
    b = op.Reshape(padded, op.Constant(value_ints=[n, blocks, block // 2]))
    ws = op.Cast(w_scale, to=onnx.TensorProto.FLOAT)
    scales = op.Expand(op.Reshape(ws, op.Constant(value_ints=[n, 1])), op.Constant(value_ints=[n, blocks]))
    bias32 = None if bias is None else op.Cast(bias, to=onnx.TensorProto.FLOAT)
    y = MatMulNBits(a, b, scales, None, None, bias32, K=k, N=n, bits=4, block_size=block)
    to = _onnx_dtype(out_dtype) if isinstance(out_dtype, torch.dtype) else int(out_dtype)
    return y if to == onnx.TensorProto.FLOAT else op.Cast(y, to=to)


def _shifted_u8(v):
    return op.Cast(op.Add(op.Cast(v, to=onnx.TensorProto.FLOAT), op.Constant(value_float=float(U8_ZERO_POINT))),
                   to=onnx.TensorProto.UINT8)


def translation_table(opset: int, *, int8_gemm: str = "u8u8") -> dict[torch._ops.OpOverload, Callable]:
    """fxopt op overload -> trace-only ONNX translation, for the dynamo exporter at `opset`; `int8_gemm`:
    "u8s8" (int8 weights, for a CPU where `int8_gemm.u8s8_exact()`) or "u8u8" (exact on every CPU)."""
    if int8_gemm not in INT8_GEMMS:
        raise ValueError(f"int8_gemm must be one of {INT8_GEMMS}, got {int8_gemm!r}")
    return {
        ops.rms_norm: _make_rms_norm(opset),
        ops.add_layer_norm: fxopt_add_layer_norm,
        ops.add_rms_norm: _make_add_rms_norm(opset),
        ops.quantize_int8: fxopt_quantize_int8,
        ops.int8_linear: _make_int8_linear(int8_gemm == "u8s8"),
        torch.ops.fxopt.int4_linear.default: fxopt_int4_linear,
        **int8_asym.translations(int8_gemm),
        **int8_fused.translations(opset, int8_gemm),
    }

