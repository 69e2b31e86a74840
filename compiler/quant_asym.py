"""Asymmetric per-tensor activations: uint8 codes with a zero point, ONNX `DynamicQuantizeLinear`'s convention.

    quantize_uint8(x, pre_scale) = (q, s, z)
        x' = x32 * pre_scale                                   (pre_scale: [in] or None; a smoothing scale 1/s_j)
        lo = min(min(x'), 0), hi = max(max(x'), 0)             the range always holds 0
        s  = (hi - lo) / 255, or 1 where hi == lo               fp32, 0-d
        z  = round_half_even(clamp(-lo / s, 0, 255))            uint8, 0-d: the code of 0.0
        q  = clamp(round_half_even(x' / s) + z, 0, 255)         uint8
    uint8_linear(q, s, z, wq, ws, bias, out_dtype) = (((q - z) ·int32 wqᵀ) * s * ws + bias).to(out_dtype)
        wq: [out, in] int8 with per-channel or per-tensor scales ws (quant_ops.quantize_weight_int8); exact int32
        accumulation (|q - z| <= 255, |wq| <= 127: exact for in < 66 000); the dequantize epilogue in fp32.

Every level of the 256 lies in [lo, hi] (a symmetric per-tensor quantizer of a one-sided activation, a GELU
output, spends half its levels on values that never occur), and 0.0 is exactly representable (code z), so
zero padding stays zero. Round trip: |s·(q - z) - x'| <= s/2 for every finite x' (nothing saturates: lo and
hi are the tensor's own range, up to the rounding of z, which moves the grid by at most s/2 and keeps
min/max within a code of the ends). These are the numerics ONNX Runtime's `DynamicQuantizeLinear` and its
fused `DynamicQuantizeMatMul`/`MatMulIntegerToFloat` kernels compute (its GetQuantizationParameter and MLAS's
QuantizeLinear: x / s rounded half to even, then + z, saturated), so the ONNX lowering is those ops and the
codes agree bit for bit. All arithmetic is fp32 (fp64 for fp64 inputs), whatever the activation dtype.
"""

from __future__ import annotations

import torch

from .quant_ops import _dequantize, _wide

U8_MAX = 255


def uint8_grid(xw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, z) of the tensor `xw`'s own range, z still a float: the step and the code of 0.0."""
    zero = xw.new_zeros(())
    lo, hi = (torch.minimum(xw.amin(), zero), torch.maximum(xw.amax(), zero)) if xw.numel() else (zero, zero)
    s = torch.where(hi == lo, torch.ones_like(hi), (hi - lo) / U8_MAX)
    return s, torch.round(torch.clamp(-lo / s, 0, U8_MAX))


def uint8_codes(xw: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The codes of `xw` on the grid (s, z), as floats in [0, 255]."""
    return torch.clamp(torch.round(xw / s) + z, 0, U8_MAX)


def _quantize_uint8_ref(x: torch.Tensor, pre_scale: torch.Tensor | None):
    xw = _wide(x)
    if pre_scale is not None:
        xw = xw * pre_scale.to(xw.dtype)
    s, z = uint8_grid(xw)
    return uint8_codes(xw, s, z).to(torch.uint8), s, z.to(torch.uint8)


def _uint8_linear_ref(q, s, z, wq, ws, bias, out_dtype):
    # q - z in [-255, 255] and wq in [-127, 127] as fp64: exact products and an exact sum below 2^53
    centered = q.to(torch.float64) - z.to(torch.float64)
    return _dequantize(torch.matmul(centered, wq.to(torch.float64).t()), s, ws, bias, out_dtype)


def declarations():
    from .ops import OpDecl

    return (
        OpDecl("quantize_uint8", "(Tensor x, Tensor? pre_scale) -> (Tensor, Tensor, Tensor)", _quantize_uint8_ref,
               doc="asymmetric per-tensor uint8 quantization with a zero point (DynamicQuantizeLinear's numerics)",
               decomposition=_quantize_uint8_ref),
        OpDecl("uint8_linear", "(Tensor q, Tensor scale, Tensor zero_point, Tensor wq, Tensor w_scale, Tensor? bias, "
               "ScalarType out_dtype) -> Tensor", _uint8_linear_ref,
               doc="(uint8 codes - zero point) x int8 -> int32 product with a dequantize (+ bias) epilogue"),
    )
