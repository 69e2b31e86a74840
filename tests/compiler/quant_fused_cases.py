"""Test arguments for the fused int8 ops whose schema test_ops.py's generic builder does not cover (a second
tensor that is not a residual, an activation name, int8 codes): `args(op, x, other, with_weight)`."""

from __future__ import annotations

import torch

from fxopt import ops
from fxopt.quant_fused import interleave_gate_up
from fxopt.quant_ops import quantize_weight_int8

f = torch.ops.fxopt
OPS = (f.silu_mul_quantize_int8.default, f.activation_quantize_int8.default, f.int8_linear_epilogue.default,
       f.int8_linear_swiglu.default, f.int8_linear_quantize.default, f.int8_linear_swiglu_quantize.default)


def args(op, x: torch.Tensor, other: torch.Tensor, with_weight: bool) -> list:
    pre = torch.rand(x.shape[-1]) + 0.5 if with_weight else None
    if op is f.silu_mul_quantize_int8.default:
        return [x, other, pre]
    if op is f.activation_quantize_int8.default:
        return [x, "gelu" if with_weight else "none", pre]
    wq, ws = quantize_weight_int8(torch.randn(5, x.shape[-1]))
    bias = torch.randn(5) if with_weight else None
    codes = ops.quantize_int8(x, pre, None, "token")
    out_pre = torch.rand(5) + 0.5 if with_weight else None  # the requantizer's pre-scale, over the 5 outputs
    if op in (f.int8_linear_swiglu.default, f.int8_linear_swiglu_quantize.default):
        wu, wsu = quantize_weight_int8(torch.randn(5, x.shape[-1]))
        requant = [out_pre] if op is f.int8_linear_swiglu_quantize.default else []
        return [*codes, *interleave_gate_up(wq, ws, bias, wu, wsu, None), *requant, x.dtype]
    if op is f.int8_linear_quantize.default:
        return [*codes, wq, ws, bias, "gelu" if with_weight else "none", out_pre, x.dtype]
    residual = torch.randn(*x.shape[:-1], 5).to(x.dtype) if with_weight else None
    return [*codes, wq, ws, bias, "silu" if with_weight else "none", residual, x.dtype]
