"""The backend protocol, lowering tables keyed by op overload, and TVM's constant-mask folding as a declared,
numerics-checked rewrite."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxopt
from fxopt.backends import BACKENDS, Backend
from fxopt.errors import LoweringTableError, NumericsError, UnsupportedOpError

pytest.importorskip("tvm")
transformers = pytest.importorskip("transformers")

from fxopt.backends.tvm import masks, table  # noqa: E402
from fxopt.backends.tvm.lower import decompose  # noqa: E402

aten = torch.ops.aten

_lib = torch.library.Library("fxopt_test_int8", "DEF")
_lib.define("linear(Tensor x, Tensor w) -> Tensor")  # importer key "linear.default", like aten.linear
_lib.impl("linear", lambda x, w: x @ w.t(), "CompositeExplicitAutograd")
torch.library.register_fake("fxopt_test_int8::linear", lambda x, w: x @ w.t(), lib=_lib)
INT8_LINEAR = torch.ops.fxopt_test_int8.linear.default


class UsesBothLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        return INT8_LINEAR(torch.nn.functional.linear(x, self.w), self.w)


def test_backends_are_an_explicit_table_of_protocol_objects():
    assert list(BACKENDS) == ["onnxruntime", "tvm"]
    for name, backend in BACKENDS.items():
        assert isinstance(backend, Backend) and backend.name == name and backend.targets == ("cpu", "cuda")
        assert all(isinstance(op, torch._ops.OpOverload) for op in backend.lowerings)


def test_unknown_backend_or_target_is_a_typed_error():
    opt = fxopt.optimize(nn.Linear(4, 4), (torch.randn(2, 4),))
    with pytest.raises(fxopt.PassOptionError, match="'backend' must be one of \\('onnxruntime', 'tvm'\\)"):
        fxopt.compile(opt, backend="tensorrt")
    with pytest.raises(fxopt.PassOptionError, match="'target' must be 'cpu' or 'cuda', got 'tpu'"):
        fxopt.compile(opt, backend="tvm", target="tpu")


def test_an_op_sharing_an_importer_name_is_not_lowered_as_the_other():
    ep = torch.export.export(UsesBothLinears(), (torch.randn(2, 4),))
    with pytest.raises(UnsupportedOpError) as info:
        BACKENDS["tvm"].legalize(ep)
    assert len(info.value.nodes) == 1 and "fxopt_test_int8.linear" in info.value.nodes[0]


def test_the_importer_map_routes_by_overload():
    calls = []
    lowered = {aten.linear.default: lambda node, imp: calls.append("aten") or "a",
               INT8_LINEAR: lambda node, imp: calls.append("int8") or "i"}
    convert = table.importer_map(lowered)
    assert list(convert) == ["linear.default"]

    class Node:
        def __init__(self, target):
            self.target, self.name = target, "n"

    assert convert["linear.default"](Node(INT8_LINEAR), None) == "i"
    assert convert["linear.default"](Node(aten.linear.default), None) == "a"
    assert calls == ["int8", "aten"]
    with pytest.raises(LoweringTableError, match="not an op overload"):
        table.importer_map({"linear.default": lambda node, imp: None})


def _gpt2():
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=32)
    return transformers.GPT2LMHeadModel(cfg).eval()


def test_mask_folding_is_checked_against_the_program_before_it():
    ids = torch.randint(0, 64, (2, 8))
    ep = decompose(torch.export.export(_gpt2(), (ids,), {"use_cache": False}, strict=False))
    report = masks.FoldConstantMasks().run_checked(ep)
    assert report.applied and report.stats == {"causal": 2}
    assert report.numerics.ok and report.numerics.bound > 0


def test_a_wrong_mask_folding_is_caught_by_its_numerics_check(monkeypatch):
    ids = torch.randint(0, 64, (2, 8))
    ep = decompose(torch.export.export(_gpt2(), (ids,), {"use_cache": False}, strict=False))
    monkeypatch.setattr(masks, "_classify", lambda mask, lq, lk: "none")  # drops the causal mask: wrong
    with pytest.raises(NumericsError, match="fold_constant_masks"):
        masks.FoldConstantMasks().run_checked(ep)


def test_the_compiled_module_reports_the_rewrite():
    model, ids = _gpt2(), torch.randint(0, 64, (2, 8))
    opt = fxopt.optimize(model, (ids,), example_kwargs={"use_cache": False})
    from fxopt.backends.tvm.lower import to_relax

    lowered = to_relax(opt.exported_program(dynamic=False))
    (rewrite,) = lowered.rewrites
    assert rewrite.name == "fold_constant_masks" and rewrite.applied and rewrite.numerics.ok
