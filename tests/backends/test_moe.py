"""Mixture-of-experts models on both backends: `transformers`' default experts path (a grouped matmul custom op,
sorted token rows, `histc` for the per-expert counts) is written in core ATen before lowering
(fxopt.decompositions); issue 10, finding 12."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fxopt  # noqa: E402
from fxopt.decompositions import grouped_mm_dense  # noqa: E402
from fxopt.testing import assert_within  # noqa: E402


def grouped_mm_loop(x, w, offs):
    """The grouped matmul as its definition reads: each expert's rows times its weight."""
    out, start = torch.zeros(x.shape[0], w.shape[2]), 0
    for e, end in enumerate(offs.tolist()):
        out[start:end] = x[start:end] @ w[e]
        start = end
    return out


@pytest.mark.parametrize("counts", [[3, 0, 2, 4], [0, 0, 9, 0], [1, 1, 1, 1]])
def test_the_dense_grouped_matmul_is_each_rows_own_experts_product(counts):
    x, w = torch.randn(10, 6), torch.randn(4, 6, 5)  # 10 rows: those past offs[-1] belong to no expert
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    assert_within(grouped_mm_dense(x, w, offs), grouped_mm_loop(x, w, offs))


def mixtral():
    config = transformers.MixtralConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                        num_experts_per_tok=2, max_position_embeddings=64)
    return transformers.MixtralForCausalLM(config).eval()


@pytest.mark.parametrize("backend", ["onnxruntime", "tvm"])
def test_a_mixtral_with_the_default_experts_path_runs_on_the_backend(backend):
    pytest.importorskip("onnxruntime" if backend == "onnxruntime" else "tvm")
    model = mixtral()
    opt = fxopt.optimize(model, (torch.randint(0, 128, (2, 8)),), example_kwargs={"use_cache": False})
    run = fxopt.compile(opt, backend=backend)  # checked against torch on the example inputs
    assert getattr(run, "notes", []) == []  # dynamic dims kept
    ids = torch.randint(0, 128, (3, 5))
    with torch.no_grad():
        assert_within(run(ids, use_cache=False).logits, model(ids, use_cache=False).logits)


@pytest.mark.parametrize("backend", ["onnxruntime", "tvm"])
def test_a_bfloat16_mixtral_runs_on_the_backend(backend):
    """Review finding: bf16 takes `aten._grouped_mm` (a bf16-only kernel on CPU), which the float32 copy of the
    program could not re-export; it is written in core ATen first."""
    pytest.importorskip("onnxruntime" if backend == "onnxruntime" else "tvm")
    model = mixtral().to(torch.bfloat16)
    opt = fxopt.optimize(model, (torch.randint(0, 128, (2, 8)),), example_kwargs={"use_cache": False})
    run = fxopt.compile(opt, backend=backend)  # checked against the bf16 module on the example inputs
    ids = torch.randint(0, 128, (3, 5))
    with torch.no_grad():
        got = run(ids, use_cache=False).logits
        assert got.dtype == torch.bfloat16
        assert_within(got, opt(ids, use_cache=False).logits)
