"""W8A8 graphs (smoothquant) on both backends: ONNX Runtime and TVM run the int8 op family with the torch graph's
fidelity (cosine to FP32 within 0.001 of the torch int8 graph's), and the ONNX file stores 8-bit weights."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

import fxopt  # noqa: E402
from fxopt.passes import FuseLayerNorm, SmoothQuant  # noqa: E402
from tests.models.hf_families import FAMILIES  # noqa: E402

FIDELITY = 1e-3  # acceptance: the exported int8 model's cosine equals the torch int8 graph's within this


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def main(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out[0]


@pytest.fixture(scope="module", params=[("bert", "token"), ("llama_gqa", "token"), ("bert", "tensor_asym"),
                                        ("llama_gqa", "tensor_asym")], ids="-".join)
def quantized(request):
    name, act = request.param
    family = FAMILIES[name]
    model = family.build("sdpa")
    args, kwargs = family.inputs()
    opt = fxopt.optimize(model, args, passes=[FuseLayerNorm(), SmoothQuant(act=act)], example_kwargs=kwargs,
                         calibration=[family.inputs(seed=i) for i in range(1, 5)])
    fresh = family.inputs(seed=7, batch=3, seq=9)
    with torch.no_grad():
        ref = main(model(*fresh[0], **fresh[1]))
    return opt, fresh, ref


@pytest.mark.parametrize("backend", ["onnxruntime", pytest.param("tvm", marks=pytest.mark.slow)])
def test_the_int8_graph_runs_on_the_backend_with_the_torch_graphs_fidelity(quantized, backend):
    if backend == "tvm":
        pytest.importorskip("tvm")
    opt, (args, kwargs), ref = quantized
    in_torch = cosine(main(opt(*args, **kwargs)), ref)
    on_backend = cosine(main(fxopt.compile(opt, backend)(*args, **kwargs)), ref)
    assert abs(on_backend - in_torch) <= FIDELITY, (on_backend, in_torch)


def test_the_onnx_file_stores_the_block_weights_as_int8(quantized, tmp_path):
    opt, _, _ = quantized
    path = fxopt.export_onnx(opt, tmp_path / "int8.onnx")
    graph = onnx.load(path).graph
    # 8-bit: int8 codes, or (the linears' weights where the ORT lowering multiplies uint8·uint8) the same codes
    # + 128 as uint8 with zero point 128, once the exporter has folded the constant shift
    int8 = [i for i in graph.initializer if i.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
            and len(i.dims) == 2]
    stats = opt.report["smoothquant"].stats
    assert len(int8) == stats["quantized_linear"] + stats.get("int8_embedding", 0)
    asym = any(n.target is torch.ops.fxopt.quantize_uint8.default for n in opt.graph_module.graph.nodes)
    quantizer = "DynamicQuantizeLinear" if asym else "QuantizeLinear"
    assert {n.op_type for n in graph.node} >= {quantizer, "MatMulIntegerToFloat"}
    float_2d = [i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2]
    assert not [n for n in float_2d if any(r in n for r in ("query", "key", "value", "proj", "dense"))
                and "embed" not in n and "pooler" not in n], float_2d
