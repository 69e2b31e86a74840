"""The fused int8 ops equal the unfused op sequences they stand for, bit for bit (the same arithmetic), in every
dtype; the epilogue GEMM's integer sums are exact at the codes' extremes. (The Triton kernels are checked against
these references on the GPU by benchmarks/int8_gpu.py's `check` part.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from fxopt import ops
from fxopt.quant_fused import ACTIVATIONS, activate, interleave_gate_up
from fxopt.quant_ops import quantize_weight_int8

f = torch.ops.fxopt
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _quant(y, pre):
    return ops.quantize_int8(y, pre, None, "token")


def _inputs(dtype, n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(2, 5, n, generator=g) * 3).to(dtype)
    r = torch.randn(2, 5, n, generator=g).to(dtype)
    w = (torch.rand(n, generator=g) + 0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    pre = torch.rand(n, generator=g) + 0.5
    return x, r, w, b, pre


def _equal(got, want):
    got, want = (got if isinstance(got, tuple) else (got,)), (want if isinstance(want, tuple) else (want,))
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_pre", [False, True])
def test_norm_quantizers_equal_norm_then_quantize(dtype, with_pre):
    x, r, w, b, pre = _inputs(dtype)
    pre = pre if with_pre else None
    n = [x.shape[-1]]
    _equal(f.rms_norm_quantize_int8(x, n, w, 1e-6, pre), _quant(ops.rms_norm(x, n, w, 1e-6), pre))
    _equal(f.layer_norm_quantize_int8(x, n, w, b, 1e-5, pre), _quant(F.layer_norm(x, n, w, b, 1e-5), pre))
    y, s = ops.add_rms_norm(x, r, n, w, 1e-6)
    _equal(f.add_rms_norm_quantize_int8(x, r, n, w, 1e-6, pre), (*_quant(y, pre), s))
    y, s = ops.add_layer_norm(x, r, n, None, b, 1e-5)
    _equal(f.add_layer_norm_quantize_int8(x, r, n, None, b, 1e-5, pre), (*_quant(y, pre), s))
    y = ops.rms_norm(x, n, w, 1e-6)
    _equal(f.rms_norm_and_quantize_int8(x, n, w, 1e-6, pre), (*_quant(y, pre), y))
    y = F.layer_norm(x, n, w, b, 1e-5)
    _equal(f.layer_norm_and_quantize_int8(x, n, w, b, 1e-5, pre), (*_quant(y, pre), y))


@pytest.mark.parametrize("dtype", DTYPES)
def test_activation_quantizers_equal_activation_then_quantize(dtype):
    x, r, _, _, pre = _inputs(dtype)
    _equal(f.silu_mul_quantize_int8(x, r, pre), _quant(F.silu(x) * r, pre))
    for name, fn in (("none", lambda v: v), ("relu", torch.relu), ("silu", F.silu), ("gelu", F.gelu),
                     ("gelu_tanh", lambda v: F.gelu(v, approximate="tanh"))):
        _equal(f.activation_quantize_int8(x, name, None), _quant(fn(x), None))
    with pytest.raises(ValueError, match="activation must be one of"):
        activate(x, "tanh")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_the_epilogue_equals_int8_linear_then_activation_then_residual(dtype, activation):
    x, _, _, _, _ = _inputs(dtype)
    q, s = _quant(x, None)
    wq, ws = quantize_weight_int8(torch.randn(7, x.shape[-1]))
    bias, res = torch.randn(7).to(dtype), torch.randn(2, 5, 7).to(dtype)
    y = ops.int8_linear(q, s, wq, ws, bias, dtype)
    _equal(f.int8_linear_epilogue(q, s, wq, ws, bias, activation, None, dtype), activate(y, activation))
    _equal(f.int8_linear_epilogue(q, s, wq, ws, bias, activation, res, dtype), activate(y, activation) + res)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_swiglu_gemm_equals_silu_of_the_gate_linear_times_the_up_linear(dtype):
    x, _, _, _, _ = _inputs(dtype)
    q, s = _quant(x, None)
    (wg, wsg), (wu, wsu) = (quantize_weight_int8(torch.randn(7, x.shape[-1])) for _ in range(2))
    bias = torch.randn(7).to(dtype)
    per_tensor = wsg.amax().reshape(1)
    for bg, bu, sg in ((None, None, wsg), (bias, None, wsg), (None, bias, per_tensor), (bias, -bias, per_tensor)):
        want = F.silu(ops.int8_linear(q, s, wg, sg, bg, dtype)) * ops.int8_linear(q, s, wu, wsu, bu, dtype)
        _equal(f.int8_linear_swiglu(q, s, *interleave_gate_up(wg, sg, bg, wu, wsu, bu), dtype), want)


def test_the_swiglu_gemm_refuses_operands_that_are_not_row_pairs():
    q, s = _quant(torch.randn(2, 4), None)
    w, ws = quantize_weight_int8(torch.randn(6, 4))
    with pytest.raises(ValueError, match="wq_gate_up must be"):
        f.int8_linear_swiglu(q, s, w[:5], ws[:5], None, torch.float32)  # an odd row count
    with pytest.raises(ValueError, match="ws_gate_up must hold one value per row"):
        f.int8_linear_swiglu(q, s, w, ws[:1], None, torch.float32)  # one scale for gate and up alike


def test_interleaved_gate_up_operands_alternate_gate_and_up_rows():
    (wg, wsg), (wu, wsu) = (quantize_weight_int8(torch.randn(3, 4)) for _ in range(2))
    w, ws, b = interleave_gate_up(wg, wsg.amax().reshape(()), None, wu, wsu, torch.ones(3))
    assert torch.equal(w[0::2], wg) and torch.equal(w[1::2], wu) and w.is_contiguous()
    assert torch.equal(ws[0::2], wsg.amax().expand(3)) and torch.equal(ws[1::2], wsu)
    assert torch.equal(b, torch.tensor([0.0, 1, 0, 1, 0, 1]))
    assert interleave_gate_up(wg, wsg, None, wu, wsu, None)[2] is None


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_requantizing_gemms_equal_their_gemm_then_the_per_token_quantizer(dtype):
    x, _, _, _, _ = _inputs(dtype)
    q, s = _quant(x, None)
    (wg, wsg), (wu, wsu) = (quantize_weight_int8(torch.randn(7, x.shape[-1])) for _ in range(2))
    bias, pre = torch.randn(7).to(dtype), torch.rand(7) + 0.5
    for act, p in (("none", None), ("gelu", pre), ("silu", None)):
        want = _quant(activate(ops.int8_linear(q, s, wg, wsg, bias, dtype), act), p)
        _equal(f.int8_linear_quantize(q, s, wg, wsg, bias, act, p, dtype), want)
    packed = interleave_gate_up(wg, wsg, bias, wu, wsu, None)
    for p in (None, pre):
        want = _quant(f.int8_linear_swiglu(q, s, *packed, dtype), p)
        _equal(f.int8_linear_swiglu_quantize(q, s, *packed, p, dtype), want)


def test_the_epilogue_sums_are_exact_at_the_codes_extremes():
    # 127 · 127 · k = 2 080 768 000 < 2^31 for k = 129 000: an fp32 sum would round (beyond 2^24)
    k = 129_000
    q = torch.full((2, k), 127, dtype=torch.int8)
    q[1, ::2] = -127
    wq = torch.full((3, k), 127, dtype=torch.int8)
    wq[2] = -127
    one = torch.ones((), dtype=torch.float64)  # an fp64 epilogue: the sum itself, unrounded
    got = f.int8_linear_epilogue(q, one, wq, one, None, "none", None, torch.float64)
    exact = (q.to(torch.int64) @ wq.to(torch.int64).t()).double()
    assert torch.equal(got, exact)
    assert exact.abs().max() > 2 ** 31 - 2 ** 28


def test_gemm_tiles_give_every_sm_work_and_persistent_tiles_several_each():
    from fxopt import triton_int8 as ti

    sms = 132
    for m, n in ((2048, 2048), (2048, 5632), (1024, 768), (1024, 3072), (512, 5632), (300, 64), (4096, 11008)):
        for cfg, cols in ((ti.gemm_config(m, n, 2048, sms), n),
                          (ti.gemm_config(m, 2 * n, 2048, sms, swiglu=True), 2 * n)):  # gate/up interleaved
            tiles = -(-m // cfg[0]) * -(-cols // cfg[1])
            if len(cfg) > 7 and cfg[7]:  # a persistent kernel overlaps a tile's epilogue with the next one's loads
                assert tiles >= ti.PERSISTENT_MIN_TILES_PER_SM * sms, (m, n, cfg)
            elif cfg not in (ti.TILE_CONFIGS[-1], ti.SWIGLU_TILE_CONFIGS[-1], ti.SMALL_M_CONFIGS[-1][1]):
                assert tiles >= ti.MIN_TILES_PER_SM * sms, (m, n, cfg)
    assert ti.gemm_config(2048, 5632, 2048, sms)[:2] == (256, 128)  # 352 tiles: persistent
    assert ti.gemm_config(2048, 2 * 5632, 2048, sms, swiglu=True)[:2] == (128, 256)  # the SwiGLU's own sweep
    assert ti.gemm_config(16, 5632, 2048, sms) == ti.SMALL_M_CONFIGS[0][1]  # decode rows: by M
