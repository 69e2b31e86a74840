"""The int8 op family's ONNX lowering (backends/onnxruntime/translations.py, int8_gemm.py) against its convention
(compiler/quant_ops.py): the codes ORT computes are the op's codes bit for bit (round half to even, clamped to
±127, the all-zero row), the integer product is exact at the codes' extremes, and the uint8·int8 GEMM is used
only where the probe proves ORT's kernel exact on this CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import fxopt
from fxopt import ops
from fxopt.errors import UnsupportedOpError

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from fxopt.backends import onnxruntime as ort_backend  # noqa: E402
from fxopt.backends.onnxruntime import int8_gemm  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")
GEMMS = ["u8u8", pytest.param("u8s8", marks=pytest.mark.skipif(
    not int8_gemm.u8s8_exact(), reason="this CPU's ORT uint8·int8 kernel saturates (no VNNI)"))]


class IdentityInt8Linear(nn.Module):
    """quantize_int8 then int8_linear with an identity weight of scale 1: the output is code × s, so ORT's
    output equals torch's bit for bit exactly when every code does."""

    def __init__(self, granularity: str, static_scale: float | None, k: int = 16):
        super().__init__()
        self.granularity = granularity
        self.register_buffer("wq", torch.eye(k, dtype=torch.int8))
        self.register_buffer("ws", torch.ones(k))
        self.register_buffer("scale", None if static_scale is None else torch.tensor(static_scale))

    def forward(self, x):
        q, s = ops.quantize_int8(x, None, self.scale, self.granularity)
        return ops.int8_linear(q, s, self.wq, self.ws, None, torch.float32)


def rows_with_ties() -> torch.Tensor:
    """[2, 3, 16]: random rows; a row whose absmax is 127 (s = 1) holding halves, which round to even; an
    all-zero row (its scale is SCALE_MIN, its codes 0)."""
    x = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(0)) * 3
    x[0, 1] = torch.tensor([127, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 126.5, -126.5, 4.5, 5.5, -7.5, 0.25, 0.75, 9.5])
    x[1, 2] = 0.0
    return x


def compiled(module: nn.Module, x: torch.Tensor, **export_options):
    opt = fxopt.optimize(module, (x,), progress=False)
    return opt, ort_backend.compile(opt, **export_options)


@pytest.mark.parametrize("gemm", GEMMS)
@pytest.mark.parametrize(("granularity", "static_scale"), [("token", None), ("tensor", None), ("tensor", 0.02)])
def test_ort_codes_are_the_ops_codes_bit_for_bit(granularity, static_scale, gemm):
    x = rows_with_ties()  # with a static scale of 0.02, |x| > 127 × 0.02 saturates: codes ±127, never -128
    opt, run = compiled(IdentityInt8Linear(granularity, static_scale), x, int8_gemm=gemm)
    assert torch.equal(run(x), opt(x))
    assert run.op_counts.get("com.microsoft.MatMulIntegerToFloat") == 1 and run.op_counts.get("QuantizeLinear") == 1
    assert not {"Round", "Clip", "MatMulInteger"} & set(run.op_counts) or static_scale is not None


@pytest.mark.parametrize("gemm", GEMMS)
def test_the_integer_product_is_exact_at_the_codes_extremes(gemm):
    # codes ±127 (static scale 1) against weights ±127, pairs of products summing to ±2·127² (beyond int16 as
    # uint8·int8: 2·255·127); K = 512 keeps every sum exact in fp32, so the output is the exact integer product
    k, n = 512, 32
    signs = torch.where(torch.arange(k) % 4 < 2, 1.0, -1.0)

    class Extreme(nn.Module):
        def __init__(self):
            super().__init__()
            w = torch.where((torch.arange(k)[None, :] + torch.arange(n)[:, None]) % 3 == 0, -127, 127)
            self.register_buffer("wq", w.to(torch.int8))
            self.register_buffer("ws", torch.ones(n))
            self.register_buffer("scale", torch.tensor(1.0))

        def forward(self, x):
            q, s = ops.quantize_int8(x, None, self.scale, "tensor")
            return ops.int8_linear(q, s, self.wq, self.ws, None, torch.float32)

    x = torch.stack([127 * signs, 127 * torch.ones(k), -127 * signs, torch.zeros(k)])[None]
    module = Extreme()
    exact = (x[0].double() @ module.wq.double().t()).float()
    opt, run = compiled(module, x, int8_gemm=gemm)
    assert torch.equal(run(x)[0], exact)


def saturating_pair_sums(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """uint8·int8 as AVX2's vpmaddubsw computes it: each pair of products added in a saturating int16 lane."""
    a64, b64 = a.astype(np.int64), b.astype(np.int64)
    pairs = a64[:, 0::2, None] * b64[None, 0::2, :] + a64[:, 1::2, None] * b64[None, 1::2, :]
    return np.clip(pairs, -(2**15), 2**15 - 1).sum(1) - 128 * b64.sum(0)


def test_the_probe_refuses_a_kernel_that_saturates_pair_sums():
    assert not int8_gemm.exact_on(saturating_pair_sums)
    assert int8_gemm.exact_on(lambda a, b: (a.astype(np.int64) - 128) @ b.astype(np.int64))


@pytest.mark.parametrize(("exact", "weights", "recorded"), [(False, onnx.TensorProto.UINT8, "u8u8"),
                                                            (True, onnx.TensorProto.INT8, "u8s8")])
def test_auto_multiplies_uint8_int8_only_where_the_probe_finds_it_exact(monkeypatch, tmp_path, exact, weights,
                                                                         recorded):
    monkeypatch.setattr(int8_gemm, "u8s8_exact", lambda: exact)
    x = rows_with_ties()
    opt = fxopt.optimize(IdentityInt8Linear("token", None), (x,), progress=False)
    result = ort_backend.export_file(opt, tmp_path / "m.onnx")
    model = onnx.load(str(result.path))
    weight = next(i for i in model.graph.initializer if len(i.dims) == 2)
    assert weight.data_type == weights
    assert {p.key: p.value for p in model.metadata_props}[int8_gemm.METADATA_KEY] == recorded
    assert any(("uint8·int8" if exact else "uint8·uint8") in note for note in result.notes)


def test_codes_read_by_anything_but_int8_linear_are_refused():
    class CodesOut(nn.Module):
        def forward(self, x):
            q, s = ops.quantize_int8(x, None, None, "token")
            return q.float() * s

    opt = fxopt.optimize(CodesOut(), (rows_with_ties(),), progress=False)
    with pytest.raises(UnsupportedOpError, match="reads the int8 codes"):
        ort_backend.legalize(opt)
