"""The int8 op family's convention (fxopt/quant_ops.py): symmetric absmax/127 scales, round half to even,
codes in [-127, 127], exact int32 products, fp32 dequantization."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxopt import ops
from fxopt.quant_ops import QMAX, quantize_weight_int8

shapes = st.tuples(st.integers(1, 4), st.integers(1, 6), st.integers(1, 33))


def tensor(shape, seed: int, spread: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * torch.exp(torch.randn(shape[-1], generator=g) * spread)


@settings(max_examples=40, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**16), granularity=st.sampled_from(["token", "tensor"]))
def test_dequantized_codes_are_within_half_a_scale_of_the_input(shape, seed, granularity):
    x = tensor(shape, seed)
    q, s = ops.quantize_int8(x, None, None, granularity)
    assert q.dtype == torch.int8 and int(q.abs().max()) <= QMAX
    assert ((q.float() * s - x).abs() <= s / 2 * (1 + 1e-6)).all()
    again, s2 = ops.quantize_int8(q.float() * s, None, None, granularity)
    assert torch.equal(again, q) and torch.allclose(s2, s)  # Q(dQ(Q(x))) == Q(x)


@settings(max_examples=25, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**16))
def test_per_token_codes_do_not_depend_on_the_rest_of_the_batch(shape, seed):
    x = tensor(shape, seed, spread=2.0)
    q, s = ops.quantize_int8(x, None, None, "token")
    for i in range(x.shape[0]):
        qi, si = ops.quantize_int8(x[i : i + 1], None, None, "token")
        assert torch.equal(qi, q[i : i + 1]) and torch.equal(si, s[i : i + 1])


def test_a_pre_scale_multiplies_each_input_channel_before_quantizing():
    x, pre = tensor((3, 4, 16), 0), torch.rand(16) + 0.5
    assert all(torch.equal(a, b) for a, b in zip(ops.quantize_int8(x, pre, None, "token"),
                                                 ops.quantize_int8(x * pre, None, None, "token")))


def test_a_static_scale_saturates_what_lies_beyond_it():
    x = torch.tensor([[-3.0, -1.0, 0.5, 2.0]])
    q, s = ops.quantize_int8(x, None, torch.tensor(1.0 / QMAX), "tensor")
    assert q.tolist() == [[-127, -127, 64, 127]] and float(s) == pytest.approx(1 / QMAX)  # 63.5 -> 64 (even)


def test_all_zero_rows_and_weights_quantize_to_zero_without_inf_or_nan():
    x = torch.zeros(2, 5, 8)
    x[1, 2] = torch.randn(8)
    q, s = ops.quantize_int8(x, None, None, "token")
    wq, ws = quantize_weight_int8(torch.zeros(4, 8))
    assert torch.isfinite(s).all() and torch.isfinite(ws).all() and int(q[0].abs().sum()) == 0
    y = ops.int8_linear(q, s, wq, ws, None, torch.float32)
    assert torch.isfinite(y).all() and int(y.abs().sum()) == 0


@settings(max_examples=30, deadline=None)
@given(shape=shapes, out=st.integers(1, 24), seed=st.integers(0, 2**16),
       wgran=st.sampled_from(["channel", "tensor"]), agran=st.sampled_from(["token", "tensor"]),
       with_bias=st.booleans())
def test_the_int8_linear_equals_the_fake_quant_reference_within_two_output_scales(shape, out, seed, wgran, agran,
                                                                                  with_bias):
    x, w = tensor(shape, seed), tensor((out, shape[-1]), seed + 1)
    b = torch.randn(out) if with_bias else None
    q, s = ops.quantize_int8(x, None, None, agran)
    wq, ws = quantize_weight_int8(w, wgran)
    y = ops.int8_linear(q, s, wq, ws, b, torch.float32)
    dq_w = wq.double() * (ws.double()[:, None] if ws.dim() else ws.double())
    ref = (q.double() * s.double()) @ dq_w.t() + (0 if b is None else b.double())
    out_scale = ref.abs().amax() / QMAX  # the scale the output would be quantized with
    assert (y.double() - ref).abs().max() <= 2 * out_scale


def test_weight_codes_have_one_scale_per_output_row():
    w = tensor((6, 10), 3)
    wq, ws = quantize_weight_int8(w, "channel")
    assert ws.shape == (6,) and wq.dtype == torch.int8
    assert torch.equal(wq.abs().amax(1), torch.full((6,), QMAX, dtype=torch.int8))  # each row reaches ±127
    _, wt = quantize_weight_int8(w, "tensor")
    assert wt.dim() == 0 and float(wt) == pytest.approx(float(w.abs().max()) / QMAX)
