"""Relax lowerings of the fused int8 ops (compiler/quant_fused.py): each op as the unfused sequence it stands for,
through the existing converters (convert.py's norms, quant.py's quantize_int8 / int8_linear), so TVM generates
the same kernels it does for the unfused graph (and may fuse them itself).

    <norm>_quantize_int8(x, [r,] …, pre)  -> the norm's converter, then quantize_int8(y, pre, None, "token")
    <norm>_and_quantize_int8(x, …, pre)   -> y = the norm's converter; (*quantize_int8(y, pre, …), y)
    silu_mul_quantize_int8(g, u, pre)     -> quantize_int8(astype(silu(g32), dt) · u, pre)
    activation_quantize_int8(x, act, pre) -> quantize_int8(act(x), pre)
    int8_linear_epilogue(…, act, r, dt)   -> act(int8_linear(…, dt)) [+ r]
    int8_linear_swiglu(q, s, W, S, b, dt)  -> astype(silu(g32), dt) · u, g and u the even and the odd columns of
                                             int8_linear(q, s, W, S, b, dt): one GEMM over the interleaved rows
    int8_linear_quantize(…, act, pre, dt)  -> quantize_int8(act(int8_linear(…, dt)), pre)
    int8_linear_swiglu_quantize(…, pre, dt) -> quantize_int8(int8_linear_swiglu(…, dt), pre)

Activations run in fp32 and are cast back to the tensor's dtype, as ATen rounds them.
"""

from __future__ import annotations

from typing import Any

from tvm import relax

from fxopt.quant_fused import ACTIVATIONS

from . import convert as cv
from . import quant
from .relax_util import arg, cast, dtype_of, emit, shape_of


class _Value:
    """An env key for an intermediate Relax value (the converters read `imp.env[node.args[i]]`)."""

    op = "relax"


class _Call:
    """The arguments of an unfused op, for its converter (which reads only `args` and `kwargs`)."""

    def __init__(self, *args: Any):
        self.args, self.kwargs = args, {}


def _bind(imp: Any, expr: relax.Expr) -> _Value:
    key = _Value()
    imp.env[key] = expr
    return key


def _item(imp: Any, t: relax.Expr, i: int) -> relax.Expr:
    return emit(imp, relax.TupleGetItem(t, i))


def _activate(imp: Any, y: relax.Expr, activation: str) -> relax.Expr:
    if activation == "none":
        return y
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    fn = {"relu": relax.op.nn.relu, "silu": relax.op.nn.silu, "gelu": relax.op.nn.gelu,
          "gelu_tanh": relax.op.nn.gelu_tanh}[activation]
    return cast(imp, emit(imp, fn(cast(imp, y, "float32"))), dtype_of(y))


def _quantize(imp: Any, y: relax.Expr, pre: Any) -> relax.Expr:
    return quant.quantize_int8(_Call(_bind(imp, y), pre, None, "token"), imp)


def _norm_quantize(norm: Any, n_args: int, with_sum: bool, with_output: bool = False):
    """(codes, scales) of a norm's output; then the residual sum (with_sum) or the output itself (with_output)."""
    def convert(node: Any, imp: Any) -> relax.Expr:
        out = norm(_Call(*node.args[:n_args]), imp)
        pre = arg(node, n_args, "pre_scale")
        if not (with_sum or with_output):
            return _quantize(imp, out, pre)
        y = _item(imp, out, 0) if with_sum else out
        qs = _quantize(imp, y, pre)
        return emit(imp, relax.Tuple([_item(imp, qs, 0), _item(imp, qs, 1), _item(imp, out, 1) if with_sum else y]))
    return convert


def silu_mul_quantize(node: Any, imp: Any) -> relax.Expr:
    gate, up = imp.env[node.args[0]], imp.env[node.args[1]]
    product = emit(imp, relax.op.multiply(_activate(imp, gate, "silu"), up))
    return _quantize(imp, product, arg(node, 2, "pre_scale"))


def activation_quantize(node: Any, imp: Any) -> relax.Expr:
    return _quantize(imp, _activate(imp, imp.env[node.args[0]], node.args[1]), arg(node, 2, "pre_scale"))


def int8_linear_epilogue(node: Any, imp: Any) -> relax.Expr:
    q, s, wq, ws = node.args[:4]
    y = quant.int8_linear(_Call(q, s, wq, ws, arg(node, 4, "bias"), arg(node, 7, "out_dtype")), imp)
    y = _activate(imp, y, arg(node, 5, "activation"))
    residual = arg(node, 6, "residual")
    return y if residual is None else emit(imp, relax.op.add(y, imp.env[residual]))


def _swiglu(node: Any, imp: Any, dtype: Any) -> relax.Expr:
    """One int8 GEMM over the interleaved rows, its output [..., 2N] split into gate (even columns) and up (odd)."""
    q, s, w, ws = node.args[:4]
    y = quant.int8_linear(_Call(q, s, w, ws, arg(node, 4, "bias_gate_up"), dtype), imp)
    dims = list(shape_of(y))
    pairs = emit(imp, relax.op.reshape(y, [*dims[:-1], int(dims[-1]) // 2, 2]))
    halves = emit(imp, relax.op.split(pairs, 2, axis=-1))
    gate, up = (emit(imp, relax.op.squeeze(_item(imp, halves, i), axis=[-1])) for i in range(2))
    return emit(imp, relax.op.multiply(_activate(imp, gate, "silu"), up))


def int8_linear_swiglu(node: Any, imp: Any) -> relax.Expr:
    return _swiglu(node, imp, arg(node, 5, "out_dtype"))


def int8_linear_quantize(node: Any, imp: Any) -> relax.Expr:
    q, s, wq, ws = node.args[:4]
    y = quant.int8_linear(_Call(q, s, wq, ws, arg(node, 4, "bias"), arg(node, 7, "out_dtype")), imp)
    return _quantize(imp, _activate(imp, y, arg(node, 5, "activation")), arg(node, 6, "pre_scale"))


def int8_linear_swiglu_quantize(node: Any, imp: Any) -> relax.Expr:
    return _quantize(imp, _swiglu(node, imp, arg(node, 6, "out_dtype")), arg(node, 5, "pre_scale"))


def converters() -> dict:
    import torch

    f = torch.ops.fxopt
    return {
        f.rms_norm_quantize_int8.default: _norm_quantize(cv.rms_norm, 4, False),
        f.layer_norm_quantize_int8.default: _norm_quantize(cv.layer_norm, 5, False),
        f.add_rms_norm_quantize_int8.default: _norm_quantize(cv.add_rms_norm, 5, True),
        f.add_layer_norm_quantize_int8.default: _norm_quantize(cv.add_layer_norm, 6, True),
        f.rms_norm_and_quantize_int8.default: _norm_quantize(cv.rms_norm, 4, False, with_output=True),
        f.layer_norm_and_quantize_int8.default: _norm_quantize(cv.layer_norm, 5, False, with_output=True),
        f.silu_mul_quantize_int8.default: silu_mul_quantize,
        f.activation_quantize_int8.default: activation_quantize,
        f.int8_linear_epilogue.default: int8_linear_epilogue,
        f.int8_linear_swiglu.default: int8_linear_swiglu,
        f.int8_linear_quantize.default: int8_linear_quantize,
        f.int8_linear_swiglu_quantize.default: int8_linear_swiglu_quantize,
    }
