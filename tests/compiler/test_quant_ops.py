"""The int8 op family's convention (fxopt/quant_ops.py): symmetric absmax/127 scales, round half to even,
codes in [-127, 127], exact int32 products, fp32 dequantization."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxopt import ops
from fxopt.quant_ops import QMAX, pack_int4, qmax_of, quantize_weight_groups, quantize_weight_int8, unpack_int4

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


@pytest.mark.parametrize("granularity", ["token", "tensor", "asym"])
def test_an_empty_batch_quantizes_to_empty_codes_with_a_finite_scale_and_an_empty_product(granularity):
    x = torch.zeros(0, 7, 8)  # no sequences: what a dynamic batch dimension allows
    wq, ws = quantize_weight_int8(torch.randn(4, 8))
    if granularity == "asym":
        q, s, z = torch.ops.fxopt.quantize_uint8(x, None)
        y = torch.ops.fxopt.uint8_linear(q, s, z, wq, ws, None, torch.float32)
    else:
        q, s = ops.quantize_int8(x, None, None, granularity)
        y = ops.int8_linear(q, s, wq, ws, None, torch.float32)
    assert q.shape == x.shape and torch.isfinite(s).all() and y.shape == (0, 7, 4)


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


# --- ZeroQuant's row groups and int4 storage (quantize_weight_groups, pack_int4, fxopt.int4_linear) ---------------

INT4_LINEAR = torch.ops.fxopt.int4_linear.default


def _rows_and_group(draw_rows: int, draw_group: int) -> tuple[int, int]:
    divisors = [g for g in range(1, draw_rows + 1) if draw_rows % g == 0]
    return draw_rows, divisors[draw_group % len(divisors)]


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 24), pick=st.integers(0, 100), cols=st.integers(1, 33), seed=st.integers(0, 2**16),
       bits=st.sampled_from([8, 4]))
def test_group_codes_round_trip_within_half_a_step_and_every_group_reaches_qmax(rows, pick, cols, seed, bits):
    rows, group = _rows_and_group(rows, pick)
    w = tensor((rows, cols), seed, spread=2.0)
    wq, ws = quantize_weight_groups(w, bits, group)
    qmax = qmax_of(bits)
    assert wq.dtype == torch.int8 and ws.shape == (rows,) and int(wq.abs().max()) <= qmax  # -2^(b-1) unused
    assert ((wq.double() * ws.double()[:, None] - w.double()).abs() <= ws.double()[:, None] / 2 * (1 + 1e-6)).all()
    per_group = ws.view(-1, group)
    assert torch.equal(per_group, per_group[:, :1].expand_as(per_group))  # one scale per group of rows
    assert torch.equal(wq.abs().view(-1, group * cols).amax(1), torch.full((rows // group,), qmax, dtype=torch.int8))


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 16), cols=st.integers(1, 20), seed=st.integers(0, 2**16))
def test_one_row_per_group_is_per_channel_and_one_group_is_per_tensor_bitwise(rows, cols, seed):
    w = tensor((rows, cols), seed, spread=2.0)
    channel, tensor_ = quantize_weight_int8(w, "channel"), quantize_weight_int8(w, "tensor")
    g1, gall = quantize_weight_groups(w, 8, 1), quantize_weight_groups(w, 8, rows)
    assert torch.equal(g1[0], channel[0]) and torch.equal(g1[1], channel[1])
    assert torch.equal(gall[0], tensor_[0]) and torch.equal(gall[1], tensor_[1].expand(rows))


def test_a_group_size_that_does_not_divide_the_rows_is_refused():
    with pytest.raises(ValueError, match="does not divide"):
        quantize_weight_groups(torch.randn(6, 4), 8, 4)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 8), cols=st.integers(1, 21), seed=st.integers(0, 2**16))
def test_int4_packing_round_trips_and_stores_two_codes_a_byte(rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    wq = torch.randint(-7, 8, (rows, cols), generator=g, dtype=torch.int8)
    packed = pack_int4(wq)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, (cols + 1) // 2)
    assert torch.equal(unpack_int4(packed, cols), wq)


def test_the_int4_byte_layout_is_low_nibble_first_with_zero_point_8():
    """MatMulNBits' layout (bits=4, default zero point 8): its lowering only reshapes these bytes."""
    packed = pack_int4(torch.tensor([[-7, 7, 0]], dtype=torch.int8))
    assert packed.tolist() == [[(7 + 8) << 4 | (-7 + 8), 0x88]]  # an odd column is padded with code 0 (nibble 8)


def test_int4_linear_is_the_int8_linear_of_its_unpacked_codes():
    x, w = tensor((2, 5, 19), 0), tensor((6, 19), 1)
    q, s = ops.quantize_int8(x, None, None, "token")
    wq, ws = quantize_weight_groups(w, 4, 2)
    b = torch.randn(6)
    assert torch.equal(INT4_LINEAR(q, s, pack_int4(wq), ws, b, torch.float32),
                       ops.int8_linear(q, s, wq, ws, b, torch.float32))


@pytest.mark.parametrize("bits", [8, 4])
def test_integer_accumulation_is_exact_where_a_float_sum_would_round(bits):
    """Σ_k q·w over 32768 inputs of large same-sign codes: sums of 2.6e7 (int4) to 5e8 (int8), odd, beyond fp32's
    exact integers (2^24) and within int32 (127·127·32768 < 2^31). With unit fp64 scales (the epilogue then runs in
    fp64) the op returns the exact integer sum: its accumulation is exact, not a float sum."""
    k, qmax = 32768, qmax_of(bits)
    g = torch.Generator().manual_seed(0)
    q = torch.randint(100, 128, (3, k), generator=g).to(torch.int8)
    wq = torch.randint(qmax - 2, qmax + 1, (2, k), generator=g).to(torch.int8)
    wq[1] = -wq[1]
    exact = q.long() @ wq.long().t()
    assert int(exact.abs().max()) > 2**24 and int(exact.abs().max()) < 2**31
    one, ws = torch.ones(3, 1, dtype=torch.float64), torch.ones(2)
    y = INT4_LINEAR(q, one, pack_int4(wq), ws, None, torch.float64) if bits == 4 else \
        ops.int8_linear(q, one, wq, ws, None, torch.float64)
    assert torch.equal(y, exact.double())
