"""ZeroQuant graphs (W8A8, W4A8) on ONNX Runtime's CPU provider and TVM: the torch graph's fidelity (cosine to FP32
within 0.001 of the torch graph's), int4 weights stored as MatMulNBits' packed bytes."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

import fxopt  # noqa: E402
from fxopt.backends.onnxruntime.translations import int4_block_size  # noqa: E402
from fxopt.passes import FuseLayerNorm, ZeroQuant  # noqa: E402
from tests.models.hf_families import FAMILIES  # noqa: E402

FIDELITY = 1e-3  # acceptance: the exported model's cosine equals the torch graph's within this


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def main(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out[0]


@pytest.fixture(scope="module", params=[("bert", 8), ("llama_gqa", 4),  # the other two run with -m slow
                                        pytest.param(("bert", 4), marks=pytest.mark.slow),
                                        pytest.param(("llama_gqa", 8), marks=pytest.mark.slow)],
                ids=lambda p: f"{p[0]}-w{p[1]}")
def quantized(request):
    name, bits = request.param
    family = FAMILIES[name]
    model = family.build("sdpa")
    args, kwargs = family.inputs()
    opt = fxopt.optimize(model, args, passes=[FuseLayerNorm(), ZeroQuant(weight_bits=bits, group_size=2)],
                         example_kwargs=kwargs)
    fresh = family.inputs(seed=7, batch=3, seq=9)
    with torch.no_grad():
        ref = main(model(*fresh[0], **fresh[1]))
    return opt, bits, fresh, ref


@pytest.mark.parametrize("backend", ["onnxruntime", pytest.param("tvm", marks=pytest.mark.slow)])
def test_the_zeroquant_graph_runs_on_the_backend_with_the_torch_graphs_fidelity(quantized, backend):
    if backend == "tvm":
        pytest.importorskip("tvm")
    opt, _, (args, kwargs), ref = quantized
    in_torch = main(opt(*args, **kwargs))
    on_backend = main(fxopt.compile(opt, backend)(*args, **kwargs))
    assert abs(cosine(on_backend, ref) - cosine(in_torch, ref)) <= FIDELITY
    assert cosine(on_backend, in_torch) >= 1 - FIDELITY / 10  # and it is the same function, not only as good


def test_the_onnx_file_stores_int4_weights_as_matmulnbits_bytes_and_no_float_block_weights(quantized, tmp_path):
    opt, bits, _, _ = quantized
    graph = onnx.load(fxopt.export_onnx(opt, tmp_path / "zq.onnx")).graph
    n = opt.report["zeroquant"].stats[f"int{bits}_linear"]
    if bits == 4:
        nbits = [node for node in graph.node if node.op_type == "MatMulNBits"]
        assert len(nbits) == n
        attrs = [{a.name: a.i for a in node.attribute} for node in nbits]
        assert all(a["bits"] == 4 and a["block_size"] == int4_block_size(a["K"]) for a in attrs)
        packed = [i for i in graph.initializer if i.data_type == onnx.TensorProto.UINT8 and len(i.dims) == 3]
        assert len(packed) == n
        assert sorted(int(i.dims[0]) * int(i.dims[1]) * int(i.dims[2]) for i in packed) == \
            sorted(a["N"] * -(-a["K"] // a["block_size"]) * a["block_size"] // 2 for a in attrs)  # K/2 bytes a row
    else:
        assert sum(node.op_type == "MatMulIntegerToFloat" for node in graph.node) == n
    float_2d = [i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2]
    assert not [k for k in float_2d if any(r in k for r in ("query", "key", "value", "proj", "dense"))
                and "embed" not in k and "pooler" not in k], float_2d
