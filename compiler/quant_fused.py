"""The int8 family's fused forms: quantize inside the producing op, dequantize inside the GEMM epilogue.

Each op is the composition of the unfused reference ops (compiler/ops.py, compiler/quant_ops.py), so on the
CPU a fused op and the sequence it replaces are the same function, bit for bit. Activations are quantized per
token (`quantize_int8(·, pre_scale, None, "token")`: the quantizer that a one-row kernel can fuse).

    rms_norm_quantize_int8(x, shape, w, eps, pre)           = quantize(rms_norm(x, shape, w, eps), pre)
    layer_norm_quantize_int8(x, shape, w, b, eps, pre)      = quantize(layer_norm(x, shape, w, b, eps), pre)
    add_rms_norm_quantize_int8(x, r, shape, w, eps, pre)    = (*quantize(y, pre), s)    y, s = add_rms_norm(x, r, ...)
    add_layer_norm_quantize_int8(x, r, shape, w, b, eps, pre) = (*quantize(y, pre), s)  y, s = add_layer_norm(x, r, ...)
    rms_norm_and_quantize_int8(x, shape, w, eps, pre)       = (*quantize(y, pre), y)    y = rms_norm(x, shape, w, …)
    layer_norm_and_quantize_int8(x, shape, w, b, eps, pre)  = (*quantize(y, pre), y)    y = layer_norm(x, shape, …)
    silu_mul_quantize_int8(gate, up, pre)                   = quantize(silu(gate) * up, pre)
    activation_quantize_int8(x, activation, pre)            = quantize(act(x), pre)
    int8_linear_epilogue(q, s, wq, ws, bias, activation, residual, out_dtype)
                                                      = act(int8_linear(q, s, wq, ws, bias, out_dtype)) [+ residual]
    int8_linear_swiglu(q, s, w, ws, b, out_dtype)     = silu(int8_linear(q, s, w[0::2], ws[0::2], b[0::2], …))
                                                          · int8_linear(q, s, w[1::2], ws[1::2], b[1::2], …)
    int8_linear_quantize(q, s, wq, ws, bias, activation, pre, out_dtype)
                                                      = quantize(act(int8_linear(q, s, wq, ws, bias, out_dtype)), pre)
    int8_linear_swiglu_quantize(q, s, w, ws, b, pre, out_dtype) = quantize(int8_linear_swiglu(q, s, w, ws, b, …), pre)

The SwiGLU ops take the gate and up weights as one [2N, K] tensor whose rows alternate, gate j then up j
(`interleave_gate_up`; the per-row scales [2N] and the bias likewise): one GEMM over it puts each gate value beside
its up value, so a kernel's accumulator tile holds both halves of its SwiGLU outputs, and the two GEMMs run at
one GEMM's tile efficiency.

The last two requantize a GEMM's output for the next GEMM: on CUDA the GEMM's epilogue also takes each row's
abs-max (an atomic max across the row's tiles, exact in any order), so the codes need one streaming pass over
the output instead of a row kernel's two.

quantize(·, pre) returns (codes int8, per-token scales fp32 of shape x.shape[:-1] + (1,)); the add+norm forms
return the residual sum (x + r, in x's dtype) third, as add_rms_norm / add_layer_norm do; the `_and_quantize` norms
return the norm's output third (a post-LN block reads it as a float too: the next residual), so the norm is computed
once and its output read once. `activation` is one of
ACTIVATIONS: "none", "relu", "silu", "gelu" (erf), "gelu_tanh"; it is applied to the int8 linear's output after its
rounding to out_dtype, and the residual (out_dtype, the output's shape) is added after that, rounded once more
(the unfused `act(y) + r`). Every rounding of the sequence is kept: a kernel never skips one (an RMSNorm's output
is rounded to x's dtype before the weight multiply and again after it; silu(gate) is rounded before the product).

CUDA kernels are Triton (compiler/triton_int8.py); they compute the reference's roundings in its order, with
CUDA's own transcendental functions where the reference's ATen kernel may use another implementation (exp, erf,
rsqrt): within a unit in the last place of the float intermediate, which moves a code by at most one where the
scaled value lies on a rounding boundary. The int32 accumulation is exact in both (|q·wq| <= 127²·in < 2³¹).
No op declares a decomposition: torch.compile keeps them opaque and calls the Triton kernels, which already
fuse what Inductor would.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812

from . import triton_int8
from .quant_ops import _int8_linear_ref, _quantize_ref

ACTIVATIONS = ("none", "relu", "silu", "gelu", "gelu_tanh")


def activate(y: torch.Tensor, activation: str) -> torch.Tensor:
    """The ATen activation a graph spells: relu, silu, gelu (erf) or gelu(approximate="tanh"); "none" is y."""
    if activation == "none":
        return y
    if activation == "relu":
        return torch.relu(y)
    if activation == "silu":
        return F.silu(y)
    if activation in ("gelu", "gelu_tanh"):
        return F.gelu(y, approximate="tanh" if activation == "gelu_tanh" else "none")
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def _token(x: torch.Tensor, pre_scale: torch.Tensor | None):
    return _quantize_ref(x, pre_scale, None, "token")


def _norms():
    from . import ops  # ops imports this module to collect the declarations

    return ops


def _rms_norm_quantize_ref(x, normalized_shape, weight, eps, pre_scale):
    return _token(_norms()._rms_norm_ref(x, normalized_shape, weight, eps), pre_scale)


def _layer_norm_quantize_ref(x, normalized_shape, weight, bias, eps, pre_scale):
    return _token(F.layer_norm(x, normalized_shape, weight, bias, eps), pre_scale)


def _add_rms_norm_quantize_ref(x, residual, normalized_shape, weight, eps, pre_scale):
    y, s = _norms()._add_rms_norm_ref(x, residual, normalized_shape, weight, eps)
    return (*_token(y, pre_scale), s)


def _add_layer_norm_quantize_ref(x, residual, normalized_shape, weight, bias, eps, pre_scale):
    y, s = _norms()._add_layer_norm_ref(x, residual, normalized_shape, weight, bias, eps)
    return (*_token(y, pre_scale), s)


def _rms_norm_and_quantize_ref(x, normalized_shape, weight, eps, pre_scale):
    y = _norms()._rms_norm_ref(x, normalized_shape, weight, eps)
    return (*_token(y, pre_scale), y)


def _layer_norm_and_quantize_ref(x, normalized_shape, weight, bias, eps, pre_scale):
    y = F.layer_norm(x, normalized_shape, weight, bias, eps)
    return (*_token(y, pre_scale), y)


def _silu_mul_quantize_ref(gate, up, pre_scale):
    return _token(F.silu(gate) * up, pre_scale)


def _activation_quantize_ref(x, activation, pre_scale):
    return _token(activate(x, activation), pre_scale)


def _int8_linear_epilogue_ref(q, scale, wq, w_scale, bias, activation, residual, out_dtype):
    y = activate(_int8_linear_ref(q, scale, wq, w_scale, bias, out_dtype), activation)
    return y if residual is None else y + residual


def interleave_gate_up(wq_gate, ws_gate, bias_gate, wq_up, ws_up, bias_up):
    """The SwiGLU ops' weight operands from the gate's and the up's: rows (and per-row scales, biases)
    alternating gate j, up j. A per-tensor scale is repeated per row, a missing bias of one is zeros (the other's
    dtype); both missing, None."""
    n = wq_gate.shape[0]

    def rows(gate, up):
        return torch.stack((gate, up), 1).flatten(0, 1).contiguous()

    def per_row(ws):
        return ws.reshape(-1).expand(n) if ws.numel() == 1 else ws.reshape(n)
    bias = None
    if bias_gate is not None or bias_up is not None:
        like = bias_gate if bias_gate is not None else bias_up
        bias = rows(*(b if b is not None else torch.zeros_like(like) for b in (bias_gate, bias_up)))
    return rows(wq_gate, wq_up), rows(per_row(ws_gate), per_row(ws_up)), bias


def _gate_up(t):
    return (None, None) if t is None else (t[0::2], t[1::2])


def _check_gate_up(wq_gate_up, ws_gate_up, bias_gate_up) -> None:
    rows = wq_gate_up.shape[0] if wq_gate_up.dim() == 2 else -1
    if rows < 0 or rows % 2:
        raise ValueError(f"wq_gate_up must be [2N, K] (gate and up rows interleaved), got {tuple(wq_gate_up.shape)}")
    for name, t in (("ws_gate_up", ws_gate_up), ("bias_gate_up", bias_gate_up)):
        if t is not None and t.numel() != rows:
            raise ValueError(f"{name} must hold one value per row of wq_gate_up ({rows}), got {tuple(t.shape)}")


def _int8_linear_swiglu_ref(q, scale, wq_gate_up, ws_gate_up, bias_gate_up, out_dtype):
    _check_gate_up(wq_gate_up, ws_gate_up, bias_gate_up)
    ws_gate_up = ws_gate_up.reshape(-1)
    (wg, wu), (sg, su), (bg, bu) = _gate_up(wq_gate_up), _gate_up(ws_gate_up), _gate_up(bias_gate_up)
    return F.silu(_int8_linear_ref(q, scale, wg, sg, bg, out_dtype)) * _int8_linear_ref(q, scale, wu, su, bu,
                                                                                        out_dtype)


def _int8_linear_quantize_ref(q, scale, wq, w_scale, bias, activation, pre_scale, out_dtype):
    return _activation_quantize_ref(_int8_linear_ref(q, scale, wq, w_scale, bias, out_dtype), activation, pre_scale)


def _int8_linear_swiglu_quantize_ref(q, scale, wq_gate_up, ws_gate_up, bias_gate_up, pre_scale, out_dtype):
    return _token(_int8_linear_swiglu_ref(q, scale, wq_gate_up, ws_gate_up, bias_gate_up, out_dtype), pre_scale)


REFERENCES = {
    "rms_norm_quantize_int8": _rms_norm_quantize_ref,
    "layer_norm_quantize_int8": _layer_norm_quantize_ref,
    "add_rms_norm_quantize_int8": _add_rms_norm_quantize_ref,
    "add_layer_norm_quantize_int8": _add_layer_norm_quantize_ref,
    "rms_norm_and_quantize_int8": _rms_norm_and_quantize_ref,
    "layer_norm_and_quantize_int8": _layer_norm_and_quantize_ref,
    "silu_mul_quantize_int8": _silu_mul_quantize_ref,
    "activation_quantize_int8": _activation_quantize_ref,
    "int8_linear_epilogue": _int8_linear_epilogue_ref,
    "int8_linear_swiglu": _int8_linear_swiglu_ref,
    "int8_linear_quantize": _int8_linear_quantize_ref,
    "int8_linear_swiglu_quantize": _int8_linear_swiglu_quantize_ref,
}

_NORM = "SymInt[] normalized_shape, Tensor? weight"
_SCHEMAS = {
    "rms_norm_quantize_int8": (f"(Tensor x, {_NORM}, float eps, Tensor? pre_scale) -> (Tensor, Tensor)",
                               "per-token int8 quantization of an RMSNorm's output, in the norm's kernel"),
    "layer_norm_quantize_int8": (f"(Tensor x, {_NORM}, Tensor? bias, float eps, Tensor? pre_scale) -> "
                                 "(Tensor, Tensor)", "per-token int8 quantization of a LayerNorm's output"),
    "add_rms_norm_quantize_int8": (f"(Tensor x, Tensor residual, {_NORM}, float eps, Tensor? pre_scale) -> "
                                   "(Tensor, Tensor, Tensor)", "residual add + RMSNorm + per-token int8 codes"),
    "add_layer_norm_quantize_int8": (f"(Tensor x, Tensor residual, {_NORM}, Tensor? bias, float eps, "
                                     "Tensor? pre_scale) -> (Tensor, Tensor, Tensor)",
                                     "residual add + LayerNorm + per-token int8 codes"),
    "rms_norm_and_quantize_int8": (f"(Tensor x, {_NORM}, float eps, Tensor? pre_scale) -> (Tensor, Tensor, Tensor)",
                                   "an RMSNorm's output and its per-token int8 codes in one kernel (post-norm)"),
    "layer_norm_and_quantize_int8": (f"(Tensor x, {_NORM}, Tensor? bias, float eps, Tensor? pre_scale) -> "
                                     "(Tensor, Tensor, Tensor)",
                                     "a LayerNorm's output and its per-token int8 codes in one kernel (post-LN)"),
    "silu_mul_quantize_int8": ("(Tensor gate, Tensor up, Tensor? pre_scale) -> (Tensor, Tensor)",
                               "SwiGLU's silu(gate) * up, quantized per token"),
    "activation_quantize_int8": ("(Tensor x, str activation, Tensor? pre_scale) -> (Tensor, Tensor)",
                                 "an activation (GELU, SiLU, ReLU) quantized per token"),
    "int8_linear_epilogue": ("(Tensor q, Tensor scale, Tensor wq, Tensor w_scale, Tensor? bias, str activation, "
                             "Tensor? residual, ScalarType out_dtype) -> Tensor",
                             "int8 GEMM with dequantize (+ bias, + activation, + residual) in its epilogue"),
    "int8_linear_swiglu": ("(Tensor q, Tensor scale, Tensor wq_gate_up, Tensor ws_gate_up, Tensor? bias_gate_up, "
                           "ScalarType out_dtype) -> Tensor",
                           "SwiGLU's gate and up int8 GEMMs as one over their interleaved rows, silu(gate) · up in "
                           "the epilogue"),
    "int8_linear_quantize": ("(Tensor q, Tensor scale, Tensor wq, Tensor w_scale, Tensor? bias, str activation, "
                             "Tensor? pre_scale, ScalarType out_dtype) -> (Tensor, Tensor)",
                             "int8 GEMM whose output (+ bias, activation) is requantized per token for the next GEMM"),
    "int8_linear_swiglu_quantize": ("(Tensor q, Tensor scale, Tensor wq_gate_up, Tensor ws_gate_up, "
                                    "Tensor? bias_gate_up, Tensor? pre_scale, ScalarType out_dtype) -> "
                                    "(Tensor, Tensor)",
                                    "the SwiGLU GEMM, its output requantized per token for the down GEMM"),
}


def declarations():
    from .ops import OpDecl

    return tuple(OpDecl(name, schema, REFERENCES[name], doc=doc, cuda_kernel=triton_int8.cuda_kernel(name))
                 for name, (schema, doc) in _SCHEMAS.items())
