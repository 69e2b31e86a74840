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


@pytest.mark.parametrize("passes", [None, 5])
def test_passes_that_are_not_a_list_are_named(passes):
    with pytest.raises(fxopt.PassOptionError, match="'passes' must be a list"):
        fxopt.optimize(toy.HandWrittenBlock(16), (X,), passes=passes)


@pytest.mark.parametrize("option", ["check_numerics", "share_weights"])
def test_a_flag_that_is_not_a_bool_is_refused_not_read_as_truthy(option):
    with pytest.raises(fxopt.PassOptionError, match=f"'{option}' must be True or False, got 'no'"):
        fxopt.optimize(toy.HandWrittenBlock(16), (X,), passes=["fuse_layernorm"], **{option: "no"})


@pytest.mark.parametrize("call", ["compile", "export_onnx", "export_tvm"])
def test_backends_take_the_optimized_module_and_say_so_when_given_the_original(call, tmp_path):
    model = toy.HandWrittenBlock(16).eval()
    args = () if call == "compile" else (tmp_path / "out",)
    with pytest.raises(fxopt.PassOptionError, match="'opt' must be the module fxopt.optimize.*HandWrittenBlock"):
        getattr(fxopt, call)(model, *args)


def test_an_unknown_export_option_is_named_with_the_options_there_are(tmp_path):
    pytest.importorskip("onnx")
    opt = fxopt.optimize(toy.HandWrittenBlock(16).eval(), (X,), passes=["fuse_layernorm"])
    with pytest.raises(fxopt.PassOptionError, match="'opset_version' is not an option of export_onnx.*opset"):
        fxopt.export_onnx(opt, tmp_path / "m.onnx", opset_version=17)
    with pytest.raises(fxopt.PassOptionError, match="'thread' is not an option of compile.*intra_op_num_threads"):
        fxopt.compile(opt, thread=2)
    assert not (tmp_path / "m.onnx").exists()


def test_a_quantized_module_refuses_a_dtype_conversion_and_still_runs():
    from fxopt.passes import ZeroQuant

    model = toy.HandWrittenBlock(16).eval()
    opt = fxopt.optimize(model, (X,), passes=[ZeroQuant()])
    before = opt(X)
    for convert in (lambda m: m.half(), lambda m: m.to(torch.bfloat16), lambda m: m.double()):
        with pytest.raises(fxopt.ConversionError, match="int8_linear.*convert the model first"):
            convert(opt)
    assert opt.to("cpu")(X).dtype == torch.float32  # a device move is no dtype change
    assert torch.equal(opt(X), before)


def test_an_exact_pipeline_follows_a_dtype_conversion():
    model = toy.HandWrittenBlock(16).eval()
    opt = fxopt.optimize(model, (X,), passes=["fuse_layernorm"]).double()
    fxopt.testing.assert_within(opt(X.double()), model.double()(X.double()))


def test_a_bfloat16_quantized_module_moves_but_keeps_its_fp32_scales():
    from fxopt.passes import ZeroQuant

    model = toy.HandWrittenBlock(16).to(torch.bfloat16).eval()
    x = X.to(torch.bfloat16)
    opt = fxopt.optimize(model, (x,), passes=[ZeroQuant()])
    torch.set_default_dtype(torch.float64)  # the probe follows the module's dtypes, not the default one
    try:
        assert opt.cpu().to("cpu")(x).dtype == torch.bfloat16
    finally:
        torch.set_default_dtype(torch.float32)
    for convert in (lambda m: m.float(), lambda m: m.bfloat16(), lambda m: m.to("cpu", torch.bfloat16)):
        with pytest.raises(fxopt.ConversionError):  # .bfloat16() too: it would make the fp32 scales bfloat16
            convert(opt)
