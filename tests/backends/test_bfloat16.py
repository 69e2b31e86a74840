"""bfloat16 models on backends without bfloat16 kernels (ONNX Runtime's CPU provider, TVM's layer_norm): computed
in float32, inputs and outputs bfloat16, the runner saying so (issue 10, finding 5: both backends failed inside
the runtime)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxopt
from fxopt import widen
from fxopt.testing import assert_within
from tests.models.hf_families import FAMILIES

BACKENDS = ["onnxruntime", "tvm"]


class HalfwayInBfloat16(nn.Module):
    """A float32 model that computes one step in bfloat16, as some `transformers` code does."""

    def __init__(self):
        super().__init__()
        self.proj, self.norm = nn.Linear(16, 16), nn.LayerNorm(16)

    def forward(self, x):
        h = self.proj(x).to(torch.bfloat16)
        return self.norm((h * h.sigmoid()).float())


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_bfloat16_model_runs_with_bfloat16_inputs_and_outputs(backend):
    pytest.importorskip(backend)
    model = FAMILIES["llama_gqa"].build("sdpa").to(torch.bfloat16)
    (ids,), kwargs = FAMILIES["llama_gqa"].inputs()
    opt = fxopt.optimize(model, (ids,), example_kwargs=kwargs, passes=["fuse_layernorm", "stabilize_softmax"])
    run = fxopt.compile(opt, backend=backend)  # checked against the bf16 torch module on the example inputs
    assert run.notes and "bfloat16 computed in float32" in run.notes[0]
    (other,), _ = FAMILIES["llama_gqa"].inputs(batch=3, seq=5, seed=1)
    got = run(other, **kwargs).logits
    assert got.dtype == torch.bfloat16
    with torch.no_grad():
        assert_within(got, opt(other, **kwargs).logits)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_float32_model_with_a_bfloat16_step_runs(backend):
    pytest.importorskip(backend)
    x = torch.randn(2, 5, 16)
    opt = fxopt.optimize(HalfwayInBfloat16().eval(), (x,))
    run = fxopt.compile(opt, backend=backend)
    x2 = torch.randn(3, 4, 16)
    out = run(x2)
    assert out.dtype == torch.float32 and run.notes
    with torch.no_grad():
        assert_within(out, opt(x2), widen.TOLERANCE)  # torch rounds the step to bfloat16, the backend does not


def test_a_model_without_bfloat16_is_exported_as_it_is():
    opt = fxopt.optimize(nn.Sequential(nn.Linear(4, 4)), (torch.randn(2, 4),))
    assert fxopt.compile(opt, backend="onnxruntime").notes == []


def test_a_model_onnx_runtime_cannot_load_raises_a_backend_error_naming_it(monkeypatch):
    """Without the widening ORT has no bfloat16 Gemm: its own NOT_IMPLEMENTED comes back typed, chained."""
    import importlib

    export = importlib.import_module("fxopt.backends.onnxruntime.export")

    monkeypatch.setattr(export, "widened", lambda opt: None)
    model = nn.Sequential(nn.Linear(4, 4)).to(torch.bfloat16)
    opt = fxopt.optimize(model, (torch.randn(2, 4, dtype=torch.bfloat16),))
    refused = r"onnxruntime: opening .*\.onnx on cpu failed .*NOT_IMPLEMENTED"
    with pytest.raises(fxopt.BackendError, match=refused) as info:
        fxopt.compile(opt, backend="onnxruntime")
    assert info.value.__cause__ is not None
