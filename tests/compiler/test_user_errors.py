"""Mistakes a user can make get a typed fxopt error with fxopt's own message (the cause chained), raised before
any long work: the model or inputs at fault are named, and what to do instead is said."""

import pytest
import torch

import fxopt
import fxopt.testing
from tests.models import toy

X = torch.randn(2, 5, 16)


def test_example_inputs_of_another_dtype_than_the_weights_are_named():
    with pytest.raises(fxopt.ExampleInputsError, match="does not run on its example inputs.*float32, float64") as e:
        fxopt.optimize(toy.HandWrittenBlock(16), (X.double(),), passes=["fuse_layernorm"])
    assert isinstance(e.value.__cause__, RuntimeError)


def test_meta_tensors_cannot_be_checked_and_the_way_out_is_said():
    with pytest.raises(fxopt.ExampleInputsError, match="meta device.*check_numerics=False"):
        fxopt.optimize(toy.HandWrittenBlock(16).to("meta"), (X.to("meta"),), passes=["stabilize_softmax"])


def test_a_torchscript_module_is_refused_with_the_reason():
    traced = torch.jit.trace(torch.nn.Linear(16, 16), (X,))
    with pytest.raises(fxopt.CaptureError, match="TorchScript"):
        fxopt.optimize(traced, (X,))


def test_an_already_exported_module_is_optimized():
    model = toy.HandWrittenBlock(16).eval()
    opt = fxopt.optimize(torch.export.export(model, (X,)).module(), (X,), passes=["fuse_layernorm"])
    assert opt.report["fuse_layernorm"].applied
    with torch.no_grad():
        fxopt.testing.assert_within(opt(X), model(X))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_compiling_for_cuda_without_a_gpu_is_refused_before_building():
    pytest.importorskip("tvm")
    opt = fxopt.optimize(torch.nn.Linear(16, 16), (X,))
    with pytest.raises(fxopt.DeviceUnavailableError, match="no CUDA device"):
        fxopt.compile(opt, backend="tvm", target="cuda")


def test_an_unknown_target_is_refused_before_anything_is_written(tmp_path):
    opt = fxopt.optimize(torch.nn.Linear(16, 16), (X,))
    with pytest.raises(fxopt.PassOptionError, match="target"):
        fxopt.export_tvm(opt, tmp_path / "out", target="gpu")
    assert not (tmp_path / "out").exists()


def test_training_mode_is_refused_with_a_typed_error():
    opt = fxopt.optimize(torch.nn.Linear(4, 4), (torch.randn(2, 4),))
    with pytest.raises(fxopt.FxoptError, match="no training mode"):
        opt.train()
    assert opt.eval() is opt and not opt.training
