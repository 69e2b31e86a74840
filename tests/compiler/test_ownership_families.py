"""The user's model is bit-identical (parameters, buffers, dtype, device, training flags) after `optimize`, after
the optimized module's methods (conversions, in-place edits of its own weights), and after both backends ran it:
a property of every Hugging Face family we build and of the stateful toy models (issue 10, acceptance 3)."""

from __future__ import annotations

import pytest
import torch

import fxopt
from fxopt.passes import EXACT_PIPELINE
from tests.compiler.test_ownership import Stateful, assert_unchanged, snapshot
from tests.models.hf_families import FAMILIES


def _built(name: str):
    family = FAMILIES[name]
    model = family.build("sdpa" if "sdpa" in family.attn else family.attn[0])
    (args, kwargs) = family.inputs()
    return model, args, kwargs


def _exercise(opt: fxopt.OptimizedModule, args: tuple, kwargs: dict) -> None:
    """What a user does with the optimized module: call it, convert it, edit its own weights."""
    with torch.no_grad():
        opt(*args, **kwargs)
    opt.eval().requires_grad_(False)
    with torch.no_grad():  # in place, before any conversion gives the module new tensors
        for p in opt.parameters():
            p.mul_(2)
        for b in opt.buffers():
            if b.is_floating_point():
                b.add_(1)
    opt.load_state_dict(opt.state_dict())
    opt.double()
    opt.float()
    opt.half()
    opt.to(torch.float32)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_optimize_and_the_modules_methods_leave_the_users_model_bit_identical(name):
    model, args, kwargs = _built(name)
    model.train()  # a flag the capture must put back
    before = snapshot(model)
    opt = fxopt.optimize(model, args, passes=list(EXACT_PIPELINE), example_kwargs=kwargs)
    assert_unchanged(model, before)
    _exercise(opt, args, kwargs)
    assert_unchanged(model, before)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_running_on_both_backends_leaves_the_users_model_bit_identical(name):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("tvm")
    model, args, kwargs = _built(name)
    before = snapshot(model)
    opt = fxopt.optimize(model, args, passes=list(EXACT_PIPELINE), example_kwargs=kwargs)
    for backend in ("onnxruntime", "tvm"):
        fxopt.compile(opt, backend=backend)(*args, **kwargs)  # checked against opt on the example inputs
        assert_unchanged(model, before)


@pytest.mark.parametrize("backend", ["onnxruntime", "tvm"])
def test_a_stateful_toy_model_is_left_as_it_was_by_the_backends(backend):
    pytest.importorskip(backend)
    model, x = Stateful().eval(), torch.randn(2, 3, 8)
    before = snapshot(model)
    opt = fxopt.optimize(model, (x,), passes=list(EXACT_PIPELINE))
    if backend == "onnxruntime":  # an ONNX graph holds no state: refused, naming the buffer write
        with pytest.raises(fxopt.UnsupportedOpError, match="writes a buffer it keeps"):
            fxopt.compile(opt, backend=backend)
    else:
        fxopt.compile(opt, backend=backend, check_numerics=False)(x)  # its counter makes every call differ
    _exercise(opt, (x,), {})
    assert_unchanged(model, before)
