"""The asymmetric per-tensor pair (fxopt/quant_asym.py): uint8 codes with a zero point over the tensor's own range
(which always holds 0), round half to even, DynamicQuantizeLinear's numerics; the linear's integer product exact.
Their ONNX lowering is ORT's DynamicQuantizeLinear + MatMulIntegerToFloat, checked bit for bit here."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxopt
from fxopt.quant_asym import U8_MAX
from fxopt.quant_ops import quantize_weight_int8

quantize_uint8, uint8_linear = torch.ops.fxopt.quantize_uint8.default, torch.ops.fxopt.uint8_linear.default
shapes = st.tuples(st.integers(1, 4), st.integers(1, 6), st.integers(1, 33))


def tensor(shape, seed: int, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * torch.exp(torch.randn(shape[-1], generator=g)) + shift


def dequantized(q, s, z) -> torch.Tensor:
    return (q.double() - z.double()) * s.double()


@settings(max_examples=40, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**16), shift=st.sampled_from([0.0, 3.0, -2.0]))
def test_every_value_dequantizes_within_half_a_scale(shape, seed, shift):
    x = tensor(shape, seed, shift)
    q, s, z = quantize_uint8(x, None)
    assert q.dtype == z.dtype == torch.uint8 and s.dim() == z.dim() == 0
    # one rounding of x / s: its float error is at most an ulp of the largest code, well below s/2 · 1e-4
    assert ((dequantized(q, s, z) - x.double()).abs() <= s.double() / 2 * (1 + 1e-4)).all()


@settings(max_examples=30, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**16), shift=st.sampled_from([0.0, 5.0]))
def test_the_levels_span_the_tensors_own_range_holding_zero(shape, seed, shift):
    x = tensor(shape, seed, shift)
    q, s, z = quantize_uint8(x, None)
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    assert float(s) == pytest.approx((hi - lo) / U8_MAX, rel=1e-6)
    assert float(dequantized(torch.tensor(0, dtype=torch.uint8), s, z)) <= lo + float(s) / 2  # code 0 at the bottom
    assert float(dequantized(torch.tensor(U8_MAX, dtype=torch.uint8), s, z)) >= hi - float(s) / 2
    zero = quantize_uint8(torch.cat([x.flatten(), torch.zeros(1)]), None)
    assert float(dequantized(zero[0][-1], zero[1], zero[2])) == 0.0  # 0.0 is a level: padding stays zero


def test_a_one_sided_activation_gets_twice_the_resolution_of_the_symmetric_quantizer():
    x = torch.nn.functional.gelu(tensor((4, 8, 64), 1)) + 0.2  # nearly all positive: a GELU output
    _, s, _ = quantize_uint8(x, None)
    _, s_sym = torch.ops.fxopt.quantize_int8.default(x, None, None, "tensor")
    assert float(s) < float(s_sym) * 0.6  # 255 levels over [~0, max] against 254 over [-max, max]


def test_a_pre_scale_multiplies_each_input_channel_before_quantizing():
    x, pre = tensor((2, 3, 8), 4), torch.rand(8) + 0.5
    assert all(torch.equal(a, b) for a, b in zip(quantize_uint8(x, pre), quantize_uint8(x * pre, None)))


def test_an_all_zero_tensor_quantizes_to_zero_without_inf_or_nan():
    q, s, z = quantize_uint8(torch.zeros(2, 5), None)
    assert int(q.sum()) == 0 and int(z) == 0 and float(s) == 1.0  # ORT's convention for an empty range
    wq, ws = quantize_weight_int8(torch.zeros(3, 5))
    y = uint8_linear(q, s, z, wq, ws, None, torch.float32)
    assert torch.isfinite(y).all() and int(y.abs().sum()) == 0


def test_fp16_inputs_are_quantized_in_fp32_and_the_linear_returns_the_asked_dtype():
    x = tensor((2, 4, 16), 5).half()
    q, s, z = quantize_uint8(x, torch.full((16,), 1e5))  # a dead channel's 1/s: x·pre overflows fp16, not fp32
    assert s.dtype == torch.float32 and torch.isfinite(s)
    wq, ws = quantize_weight_int8(tensor((3, 16), 6))
    assert uint8_linear(q, s, z, wq, ws, None, torch.float16).dtype == torch.float16


@settings(max_examples=30, deadline=None)
@given(shape=shapes, out=st.integers(1, 24), seed=st.integers(0, 2**16),
       wgran=st.sampled_from(["channel", "tensor"]), with_bias=st.booleans())
def test_the_linear_is_the_exact_integer_product_dequantized_in_fp32(shape, out, seed, wgran, with_bias):
    x, w = tensor(shape, seed, 1.0), tensor((out, shape[-1]), seed + 1)
    b = torch.randn(out) if with_bias else None
    q, s, z = quantize_uint8(x, None)
    wq, ws = quantize_weight_int8(w, wgran)
    y = uint8_linear(q, s, z, wq, ws, b, torch.float32)
    acc = (q.long() - z.long()) @ wq.long().t()  # the integer product, exactly
    ref = acc.double() * s.double() * ws.double() + (0 if b is None else b.double())
    # two fp32 multiplies and an add: a few ulps of the result (and of the bias, where it cancels)
    ulps = torch.finfo(torch.float32).eps * 4 * (ref.abs() + (0 if b is None else b.double().abs()))
    assert ((y.double() - ref).abs() <= ulps).all()


class AsymLinear(nn.Module):
    """quantize_uint8 then uint8_linear, the way smoothquant's act="tensor_asym" writes it."""

    def __init__(self, w: torch.Tensor, bias: torch.Tensor | None, pre: torch.Tensor | None = None):
        super().__init__()
        wq, ws = quantize_weight_int8(w)
        self.register_buffer("wq", wq)
        self.register_buffer("ws", ws)
        self.register_buffer("bias", bias)
        self.register_buffer("pre", pre)

    def forward(self, x):
        return uint8_linear(*quantize_uint8(x, self.pre), self.wq, self.ws, self.bias, x.dtype)


def with_ties(shift: float) -> torch.Tensor:
    """[2, 3, 16] whose range is exactly [0, 255]·(1/1): s = 1, z = 0, halves that round to even."""
    x = tensor((2, 3, 16), 7).abs() * 20 + shift
    x[0, 0, :4] = torch.tensor([0.0, 255.0, 2.5, 3.5])
    x[0, 1, :4] = torch.tensor([0.5, 1.5, 100.5, 253.5])
    return x


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("gemm", ["u8u8", "u8s8"])
@pytest.mark.parametrize("pre", [False, True])
def test_ort_runs_dynamic_quantize_linear_with_the_ops_codes_and_an_exact_product(gemm, pre):
    from fxopt.backends import onnxruntime as ort_backend
    from fxopt.backends.onnxruntime import int8_gemm

    if gemm == "u8s8" and not int8_gemm.u8s8_exact():
        pytest.skip("this CPU's ORT uint8·int8 kernel saturates (no VNNI)")
    x = with_ties(0.0)
    module = AsymLinear(torch.eye(16) * 127, None, torch.rand(16) + 0.5 if pre else None)  # wq = I·127, ws = 1
    opt = fxopt.optimize(module, (x,), progress=False)
    run = ort_backend.compile(opt, int8_gemm=gemm)
    assert torch.equal(run(x), opt(x))  # identity weights: the outputs are (q - z)·s·127, equal iff codes are
    counts = run.op_counts
    assert counts.get("DynamicQuantizeLinear") == 1 and counts.get("com.microsoft.MatMulIntegerToFloat") == 1
    y = with_ties(-40.0)  # a range holding 0 inside: a zero point strictly between 0 and 255
    w, b = tensor((5, 16), 8), torch.randn(5)
    dense = fxopt.optimize(AsymLinear(w, b), (y,), progress=False)
    ours, theirs = dense(y), ort_backend.compile(dense, int8_gemm=gemm)(y)
    # the same integer sums, its epilogue multiplies in another order: a few fp32 ulps of the result and bias
    assert ((theirs - ours).abs() <= torch.finfo(torch.float32).eps * 4 * (ours.abs() + b.abs())).all()
