"""The int8 op family (SmoothQuant W8A8 now, ZeroQuant later): one rounding and clamping convention, declared once.

    quantize_int8(x, pre_scale, scale, granularity) = (q, s)
        x' = x32 * pre_scale                              (pre_scale: [in] or None; a smoothing scale 1/s_j)
        s  = max(absmax(x'), SCALE_MIN) / 127             granularity "token": absmax over the last dim, s has
                                                          shape x.shape[:-1] + (1,); "tensor": over all, s is 0-d;
                                                          a given `scale` (0-d, static) is used as is
        q  = clamp(round_half_even(x' / s), -127, 127)    int8
    int8_linear(q, s, wq, ws, bias, out_dtype) = ((q ·int32 wqᵀ) * s * ws + bias).to(out_dtype)
        wq: [out, in] int8; ws: [out] (per output channel) or 0-d (per tensor); exact int32 accumulation
        (|q·wq| <= 127² · in < 2³¹ for in < 133 000); the dequantize epilogue in fp32.
    quantize_weight_int8(w, granularity) = (wq, ws) with the same convention, over each output row ("channel")
        or the whole weight ("tensor"): the offline half, a plain function (no op).

Symmetric, zero point 0, the code -128 unused (so that -q is representable), round half to even (torch.round,
ONNX Round). SCALE_MIN keeps an all-zero row or tensor finite: its codes are 0 and it dequantizes to 0 exactly.
Round trip: |dequant(q) - x'| <= s/2 wherever |x'| <= 127 s (nothing saturates: s comes from the absmax, so only a
static scale saturates). All arithmetic is fp32 (fp64 for fp64 inputs), whatever the activation dtype.
"""

from __future__ import annotations

import torch

QMAX = 127
SCALE_MIN = 1e-8  # the smallest absmax a scale is taken from: 0 -> codes 0, no inf/NaN
GRANULARITIES = ("token", "tensor")


def _wide(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def scale_of(absmax: torch.Tensor) -> torch.Tensor:
    return absmax.clamp_min(SCALE_MIN) / QMAX


def codes(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.round(x / scale), -QMAX, QMAX).to(torch.int8)


def _quantize_ref(x, pre_scale, scale, granularity: str):
    xw = _wide(x)
    if pre_scale is not None:
        xw = xw * pre_scale.to(xw.dtype)
    if scale is not None:
        s = scale.to(xw.dtype)
    elif granularity == "token":
        s = scale_of(xw.abs().amax(-1, keepdim=True))
    elif granularity == "tensor":
        s = scale_of(xw.abs().amax())
    else:
        raise ValueError(f"quantize_int8: granularity must be one of {GRANULARITIES}, got {granularity!r}")
    return codes(xw, s), s


def _int8_linear_ref(q, s, wq, ws, bias, out_dtype):
    # integer products summed exactly: int8 values as fp64 are exact and so is their sum below 2^53
    return _dequantize(torch.matmul(q.to(torch.float64), wq.to(torch.float64).t()), s, ws, bias, out_dtype)


def _dequantize(acc, s, ws, bias, out_dtype):
    """The epilogue: integer sums × activation scale × weight scale (+ bias), in fp32, cast to out_dtype."""
    y = acc.to(s.dtype) * s * ws.to(s.dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(out_dtype)


def _int8_linear_cuda(q, s, wq, ws, bias, out_dtype):
    """torch._int_mm (cuBLAS int8, int32 accumulation) where its shape rules allow, else the reference."""
    flat = q.reshape(-1, q.shape[-1])
    m, k, n = flat.shape[0], flat.shape[1], wq.shape[0]
    if m <= 16 or k % 8 or n % 8:
        return _int8_linear_ref(q, s, wq, ws, bias, out_dtype)
    acc = torch._int_mm(flat.contiguous(), wq.t()).view(*q.shape[:-1], n)
    return _dequantize(acc, s, ws, bias, out_dtype)


def quantize_weight_int8(w: torch.Tensor, granularity: str = "channel") -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes, fp32 scales) of a [out, in] weight: one scale per output row ("channel") or one ("tensor")."""
    ww = _wide(w.detach())
    if granularity == "channel":
        s = scale_of(ww.abs().amax(-1))
        return codes(ww, s[:, None]), s.to(torch.float32)
    if granularity == "tensor":
        s = scale_of(ww.abs().amax())
        return codes(ww, s), s.to(torch.float32)
    raise ValueError(f"weight granularity must be 'channel' or 'tensor', got {granularity!r}")


def declarations():
    from .ops import OpDecl

    return (
        OpDecl("quantize_int8", "(Tensor x, Tensor? pre_scale, Tensor? scale, str granularity) -> (Tensor, Tensor)",
               _quantize_ref, doc="symmetric int8 quantization, per token or per tensor, dynamic or static scale",
               decomposition=_quantize_ref),
        OpDecl("int8_linear", "(Tensor q, Tensor scale, Tensor wq, Tensor w_scale, Tensor? bias, "
               "ScalarType out_dtype) -> Tensor",
               _int8_linear_ref, doc="int8 x int8 -> int32 product with a dequantize (+ bias) epilogue",
               cuda_kernel=_int8_linear_cuda),
    )
