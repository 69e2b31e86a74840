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
    quantize_weight_groups(w, bits, group_size) = (wq, ws): ZeroQuant's row groups, b bits (8 or 4): rows
        g·group_size .. (g+1)·group_size - 1 share s_g = max(absmax(W[group]), SCALE_MIN) / qmax(b), qmax(b) =
        2^(b-1) - 1 (127, 7), wq = clamp(round_half_even(w / s_g), -qmax, qmax); ws is s_g repeated per row ([out])
        so the epilogue is int8_linear's. group_size = 1 is "channel", group_size = out is "tensor", bitwise.
    int4_linear(q, s, wp, ws, bias, out_dtype) = int8_linear(q, s, unpack_int4(wp, q.shape[-1]), ws, bias, out_dtype)
        wp: [out, ceil(in/2)] uint8, two 4-bit codes per byte (pack_int4): the stored weight is in/2 bytes a row,
        1/2 of int8, 1/4 of fp16, 1/8 of fp32. The codes are in [-7, 7], so |q·wq| <= 127·7·in: exact.

int4 packing (pack_int4 / unpack_int4): byte[o, j] = (wq[o, 2j] + 8) | (wq[o, 2j+1] + 8) << 4, i.e. each code as
the unsigned nibble code + 8 (zero point 8: nibble 8 is 0, nibble 0 unused), the even input column in the low
nibble; an odd `in` is padded with a code 0 (nibble 8). This is ONNX Runtime's MatMulNBits layout (bits=4, low
nibble first, default zero point 2^(bits-1) = 8), so its lowering reshapes the bytes, never repacks them.

Symmetric, zero point 0, the code -128 unused (so that -q is representable), round half to even (torch.round,
ONNX Round). SCALE_MIN keeps an all-zero row or tensor finite: its codes are 0 and it dequantizes to 0 exactly.
Round trip: |dequant(q) - x'| <= s/2 wherever |x'| <= 127 s (nothing saturates: s comes from the absmax, so only a
static scale saturates). All arithmetic is fp32 (fp64 for fp64 inputs), whatever the activation dtype.
"""

from __future__ import annotations

import torch

from . import triton_int8

QMAX = 127
SCALE_MIN = 1e-8  # the smallest absmax a scale is taken from: 0 -> codes 0, no inf/NaN
GRANULARITIES = ("token", "tensor")


def _wide(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def qmax_of(bits: int) -> int:
    """The largest code of a symmetric `bits`-bit quantizer (the code -2^(bits-1) is unused): 127, 7."""
    return 2 ** (bits - 1) - 1


def scale_of(absmax: torch.Tensor, qmax: int = QMAX) -> torch.Tensor:
    """absmax / qmax, correctly rounded to absmax's dtype on every device.

    ATen's CUDA kernel divides by a Python number as a multiply by its rounded reciprocal, one ulp off the
    quotient now and then, and every code on a rounding boundary follows that ulp. The quotient taken in fp64 and
    rounded once is the correctly rounded one (a 24-bit dividend over 127 never lies within 2^-50 of a midpoint),
    which is what a kernel's IEEE division, ONNX `Div` and TVM compute.
    """
    a = absmax.clamp_min(SCALE_MIN)
    if a.dtype == torch.float64 or a.device.type == "mps":  # MPS has no fp64
        return a / qmax
    return (a.double() / qmax).to(a.dtype)


def codes(x: torch.Tensor, scale: torch.Tensor, qmax: int = QMAX) -> torch.Tensor:
    return torch.clamp(torch.round(x / scale), -qmax, qmax).to(torch.int8)


def _quantize_ref(x, pre_scale, scale, granularity: str):
    xw = _wide(x)
    if pre_scale is not None:
        xw = xw * pre_scale.to(xw.dtype)
    if scale is not None:
        s = scale.to(xw.dtype)
    elif granularity == "token":
        s = scale_of(xw.abs().amax(-1, keepdim=True))
    elif granularity == "tensor":
        s = scale_of(xw.abs().amax() if xw.numel() else xw.new_zeros(()))  # an empty batch: the smallest scale
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


def _quantize_cuda(x, pre_scale, scale, granularity):
    """Dynamic per-token: the Triton row kernel (one pass, the reference's codes); else the reference."""
    if scale is None and granularity == "token":
        return triton_int8.activation_quantize_cuda(x, "none", pre_scale)
    return _quantize_ref(x, pre_scale, scale, granularity)


def _int8_linear_cuda(q, s, wq, ws, bias, out_dtype):
    """The Triton GEMM with the dequantize in its epilogue (compiler/triton_int8.py) where it covers the call;
    else torch._int_mm (cuBLAS int8, int32 accumulation) where its shape rules allow; else the reference."""
    out = triton_int8.int8_linear_cuda(q, s, wq, ws, bias, out_dtype)
    if out is not None:
        return out
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


WEIGHT_BITS = (8, 4)
INT4_ZERO = 8  # the nibble of code 0


def quantize_weight_groups(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes in [-qmax, qmax], fp32 scale per output row) of a [out, in] weight, `group_size` consecutive
    output rows sharing one scale (ZeroQuant's groups); `group_size` must divide `out`."""
    if bits not in WEIGHT_BITS:
        raise ValueError(f"weight bits must be one of {WEIGHT_BITS}, got {bits!r}")
    out = w.shape[0]
    if group_size < 1 or out % group_size:
        raise ValueError(f"group_size {group_size} does not divide the weight's {out} rows")
    ww, qmax = _wide(w.detach()), qmax_of(bits)
    peak = ww.abs().reshape(out // group_size, -1).amax(-1)
    s = scale_of(peak, qmax).repeat_interleave(group_size)
    return codes(ww, s[:, None], qmax), s.to(torch.float32)


def pack_int4(wq: torch.Tensor) -> torch.Tensor:
    """[out, in] codes in [-7, 7] -> [out, ceil(in/2)] uint8: even columns in the low nibble, zero point 8."""
    if wq.numel() and int(wq.abs().max()) > qmax_of(4):
        raise ValueError("pack_int4: codes must lie in [-7, 7]")
    u = (wq.to(torch.int16) + INT4_ZERO).to(torch.uint8)
    if u.shape[-1] % 2:
        u = torch.nn.functional.pad(u, (0, 1), value=INT4_ZERO)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """The int8 codes of `pack_int4`'s bytes, the first `in_features` columns."""
    nibbles = torch.stack((packed & 15, packed >> 4), -1).reshape(*packed.shape[:-1], -1)[..., :in_features]
    return (nibbles.to(torch.int16) - INT4_ZERO).to(torch.int8)


def _int4_linear_ref(q, s, w_packed, ws, bias, out_dtype):
    return _int8_linear_ref(q, s, unpack_int4(w_packed, q.shape[-1]), ws, bias, out_dtype)


def declarations():
    from .ops import OpDecl

    return (
        OpDecl("quantize_int8", "(Tensor x, Tensor? pre_scale, Tensor? scale, str granularity) -> (Tensor, Tensor)",
               _quantize_ref, doc="symmetric int8 quantization, per token or per tensor, dynamic or static scale",
               decomposition=_quantize_ref, cuda_kernel=_quantize_cuda),
        OpDecl("int8_linear", "(Tensor q, Tensor scale, Tensor wq, Tensor w_scale, Tensor? bias, "
               "ScalarType out_dtype) -> Tensor",
               _int8_linear_ref, doc="int8 x int8 -> int32 product with a dequantize (+ bias) epilogue",
               cuda_kernel=_int8_linear_cuda),
        OpDecl("int4_linear", "(Tensor q, Tensor scale, Tensor w_packed, Tensor w_scale, Tensor? bias, "
               "ScalarType out_dtype) -> Tensor",
               _int4_linear_ref, doc="int8 activations x int4 weights packed two per byte -> exact integer "
               "product with a dequantize (+ bias) epilogue"),
    )


def no_linear_reason(gm: torch.fx.GraphModule, layers: str) -> str:
    """Why a quantizing pass found no linear to take: none of a block (or none at all), or those there are quantized
    already, by an earlier pass (fxopt's quantized linear ops: int8_linear, int4_linear, their fused forms)."""
    quantized = [n for n in gm.graph.nodes if n.op == "call_function" and getattr(n.target, "namespace", None)
                 == "fxopt" and "linear" in n.target.name()]
    where = "of a transformer block " if layers == "blocks" else ""
    if not quantized:
        return f"no linear {where}in the graph"
    kinds = sorted({n.target.name().split("::")[-1] for n in quantized})
    return (f"no float linear {where}in the graph: {len(quantized)} linears are quantized already "
            f"({', '.join(kinds)}), by an earlier pass")
