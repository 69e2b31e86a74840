"""One input/output signature for both backends: binding by name, typed errors naming the argument, the
manifest's JSON form, and the TVM artifact's calling-convention check."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import fxopt
import fxopt.testing
from fxopt.signature import InputMismatchError, Signature

pytest.importorskip("tvm")
pytest.importorskip("onnxruntime")


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, a, b, scale=1.0, use_cache=False):
        return {"out": self.proj(a) * scale - b, "cached": None if use_cache else b.sum(-1)}


@pytest.fixture(scope="module")
def optimized():
    a, b = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    return fxopt.optimize(TwoInputs().eval(), (a, b), example_kwargs={"scale": 2.0, "use_cache": False})


@pytest.fixture(scope="module")
def signature(optimized):
    return Signature.of_module(optimized.exported_program(), optimized)


def test_binding_is_by_name_whatever_the_keyword_order(signature):
    a, b = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    want = signature.bind((a, b), {"scale": 2.0})
    assert [t is x for t, x in zip(want, (a, b))] == [True, True]
    for args, kwargs in [((), {"b": b, "a": a, "scale": 2.0}), ((a,), {"b": b, "scale": 2.0, "use_cache": False})]:
        got = signature.bind(args, kwargs)
        assert len(got) == 2 and got[0] is a and got[1] is b


@pytest.mark.parametrize("args, kwargs, argument", [
    ((1, 2, 3), {}, None),                      # an extra positional argument
    ((1,), {"c": 2}, "c"),                      # an unknown name
    ((1,), {"a": 1, "b": 2}, "a"),               # given twice
    ((1,), {}, "b"),                            # missing
    ((1, 2), {"scale": 3.0}, "scale"),          # a captured constant that changed
    ((1, 2), {"use_cache": 0}, "use_cache"),    # False was captured: 0 is another value
])
def test_mismatches_raise_a_typed_error_naming_the_argument(signature, args, kwargs, argument):
    t = torch.randn(2, 3, 4)
    args = tuple(t if isinstance(x, int) else x for x in args)
    kwargs = {k: t if isinstance(v, int) and k in "ab" else v for k, v in kwargs.items()}
    with pytest.raises(InputMismatchError) as info:
        signature.bind(args, {"scale": 2.0, **kwargs})
    assert isinstance(info.value, fxopt.FxoptError) and info.value.argument == argument


def test_outputs_keep_their_structure_and_constants_through_json(signature):
    restored = Signature.from_json(json.loads(json.dumps(signature.to_json())))
    assert restored.input_names == signature.input_names == ["a", "b"]
    out, cached = torch.randn(2, 3, 4), torch.randn(2, 3)
    got = restored.unflatten([out, cached])
    assert list(got) == ["out", "cached"] and got["out"] is out and got["cached"] is cached


@pytest.mark.parametrize("backend", ["onnxruntime", "tvm"])
def test_each_backend_binds_keywords_by_name(optimized, backend):
    """Issue 10: the TVM runner fed `run(b=B, a=A)` as (B, A)."""
    run = fxopt.compile(optimized, backend=backend)
    a, b = torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    with torch.no_grad():
        want = optimized(a, b, scale=2.0, use_cache=False)["out"]
    torch.testing.assert_close(run(b=b, a=a, scale=2.0)["out"], want)
    with pytest.raises(InputMismatchError, match="'scale'"):
        run(a, b, scale=3.0)


LOAD = """
import json, sys
sys.path.insert(0, sys.argv[1])
import loader
try:
    loader.load(sys.argv[1])
except Exception as e:
    print(type(e).__name__, e)
assert "fxopt" not in sys.modules, "the loader imported fxopt"
"""


def test_the_loader_refuses_another_convention_or_a_missing_requirement(optimized, tmp_path):
    path = fxopt.export_tvm(optimized, tmp_path / "art", target="cpu", extern=True)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["library_calls"]["convention"] >= 1 and manifest["library_calls"]["requires"] == ["torch"]
    env = dict(os.environ, TVM_USE_RUNTIME_LIB="1")
    for edit, message in [({"convention": 999}, "convention version 999"),
                          ({"requires": ["no_such_package_here"]}, "no_such_package_here is not installed")]:
        (path / "manifest.json").write_text(json.dumps({**manifest, "library_calls": {
            **manifest["library_calls"], **edit}}))
        res = subprocess.run([sys.executable, "-c", LOAD, str(path)], env=env, capture_output=True, text=True,
                             cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        assert res.stdout.startswith("ConventionError") and message in res.stdout, res.stdout


def _runner(optimized, name):
    return optimized if name == "torch" else fxopt.compile(optimized, backend=name)


BAD_CALLS = {  # what is wrong -> (args, kwargs, the argument named)
    "an extra positional argument": (("a", "b", "b"), {}, None),
    "an unknown keyword": (("a", "b"), {"c": "b"}, "c"),
    "a missing input": (("a",), {}, "b"),
    "a changed captured constant": (("a", "b"), {"scale": 3.0}, "scale"),
    "another dtype": (("a64", "b"), {}, "a"),
    "another rank": (("a", "b2d"), {}, "b"),
    "another size in a static dim": (("a", "b_wide"), {}, "b"),
    # scale=2.0 was captured; forward's default is 1.0, which the graph does not compute
    "a captured constant left out that forward defaults otherwise": (("a", "b"), {"scale": None}, "scale"),
    "a captured float passed as an int": (("a", "b"), {"scale": 2}, "scale"),  # another dtype of result
    "a dim a guard made static (Linear's in_features)": (("a_narrow", "b"), {}, "a"),
    "sizes the program has equal that differ (a - b)": (("a", "b_short"), {}, "b"),
}


@pytest.fixture(scope="module", params=["torch", "onnxruntime", "tvm"])
def runner(request, optimized):
    return request.param, _runner(optimized, request.param)


def test_every_runner_binds_by_name_and_refuses_the_same_bad_calls_the_same_way(runner, optimized):
    name, run = runner
    values = {"a": torch.randn(3, 5, 4), "b": torch.randn(3, 5, 4)}
    values.update(a64=values["a"].double(), b2d=torch.randn(3, 4), b_wide=torch.randn(3, 5, 6),
                  a_narrow=torch.randn(3, 5, 3), b_short=torch.randn(3, 2, 4))
    with torch.no_grad():
        want = optimized(values["a"], values["b"], scale=2.0, use_cache=False)["out"]
        fxopt.testing.assert_within(run(b=values["b"], a=values["a"], scale=2.0, use_cache=False)["out"], want)
        for what, (args, kwargs, argument) in BAD_CALLS.items():
            kwargs = {"scale": 2.0, "use_cache": False,
                      **{k: values.get(v, v) if isinstance(v, str) else v for k, v in kwargs.items()}}
            kwargs = {k: v for k, v in kwargs.items() if v is not None}  # None: the argument left out
            with pytest.raises(InputMismatchError) as info:
                run(*(values[x] for x in args), **kwargs)
            assert info.value.argument == argument, (name, what, str(info.value))


class FifthToken(nn.Module):
    def forward(self, x):
        return x[:, 4] * 2


@pytest.mark.parametrize("name", ["torch", "onnxruntime", "tvm"])
def test_every_runner_names_a_dim_outside_the_captured_range(name):
    """Issue 10: TVM read out of bounds and returned a result; ORT raised its own Gather error."""
    opt = fxopt.optimize(FifthToken(), (torch.randn(2, 6, 3),))
    assert "input 'x': dim 1 accepts sizes 5 to any" in str(opt.report)  # the report shows the range
    run = _runner(opt, name)
    with pytest.raises(InputMismatchError, match=r"size 3 in dim 1, outside the range .* \(5 to any") as info:
        run(torch.randn(2, 3, 3))
    assert info.value.argument == "x"
    assert run(torch.randn(1, 9, 3)).shape == (1, 3)  # batch 1: torch.export's 0/1 specialization is not a bound


class Total(nn.Module):
    def forward(self, x):
        return (x * 2).sum()


class ScalarAndSize(nn.Module):
    def forward(self, x):
        return x.sum(), x.shape[0] * 2


@pytest.mark.parametrize("backend", ["onnxruntime", "tvm"])
def test_a_0d_output_comes_back_0d(backend):
    x = torch.randn(2, 3)
    for model in (Total(), ScalarAndSize()):
        opt = fxopt.optimize(model, (x,))
        got = fxopt.compile(opt, backend=backend)(x)
        want = opt(x)
        got, want = (got, want) if isinstance(want, tuple) else ((got,), (want,))
        assert got[0].shape == want[0].shape == torch.Size([])


@pytest.mark.parametrize("backend", ["onnxruntime", "tvm"])
def test_a_returned_size_comes_back_as_an_int(backend):
    """Issue 10: the TVM runner raised "from_dlpack received an invalid capsule" on a returned size."""
    x = torch.randn(3, 4)
    opt = fxopt.optimize(ScalarAndSize(), (torch.randn(2, 4),))
    total, size = fxopt.compile(opt, backend=backend)(x)
    assert type(size) is int and size == 6 and total.dim() == 0


@pytest.mark.parametrize("backend", ["onnxruntime", "tvm"])
def test_an_output_that_is_an_input_comes_back(backend):
    class Passthrough(nn.Module):
        def forward(self, x):
            return x * 2, x

    x = torch.randn(3, 4)
    opt = fxopt.optimize(Passthrough(), (torch.randn(2, 4),))
    doubled, same = fxopt.compile(opt, backend=backend)(x)
    assert torch.equal(same, x)
    fxopt.testing.assert_within(doubled, x * 2)


class OptionalMask(nn.Module):
    def forward(self, x, mask=None, temperature=1.0):
        y = x.softmax(-1) / temperature
        return y if mask is None else y * mask


@pytest.mark.parametrize("name", ["torch", "onnxruntime", "tvm"])
def test_keywords_at_forwards_default_may_be_passed_or_left_out_and_no_other_value(name):
    """Issue 10: `mask=None` passed explicitly was refused when absent at capture; a left-out captured
    constant silently ran with the captured value on ONNX Runtime and TVM."""
    x = torch.randn(2, 3)
    opt = fxopt.optimize(OptionalMask(), (x,))
    run = _runner(opt, name)
    want = OptionalMask()(x)
    for kwargs in [{}, {"mask": None}, {"temperature": 1.0}, {"mask": None, "temperature": 1.0}]:
        fxopt.testing.assert_within(run(x, **kwargs), want)
    for kwargs, argument in [({"mask": torch.ones(2, 3)}, "mask"), ({"temperature": 2.0}, "temperature"),
                             ({"mask": 0}, "mask")]:
        with pytest.raises(InputMismatchError, match="not given at capture") as info:
            run(x, **kwargs)
        assert info.value.argument == argument


@pytest.mark.parametrize("backend", ["onnxruntime", "tvm"])
def test_python_constants_among_the_outputs_come_back_where_the_model_returned_them(backend):
    """Review finding: `return {"y": x * 2, "k": k}` failed on both backends ('int' object has no attribute
    'name'; TVM: Unsupported output type)."""

    class ReturnsAConstant(nn.Module):
        def forward(self, x, k=3):
            return {"y": x * 2, "k": k, "nothing": None}

    opt = fxopt.optimize(ReturnsAConstant(), (torch.randn(2, 3),), example_kwargs={"k": 3})
    x = torch.randn(4, 3)
    got = fxopt.compile(opt, backend=backend)(x, k=3)
    assert list(got) == ["y", "k", "nothing"] and got["k"] == 3 and got["nothing"] is None
    fxopt.testing.assert_within(got["y"], x * 2)


class TupleDefaults(nn.Module):
    def forward(self, x, window=(1, 2), pair=(5, 6)):
        return x * window[0] + pair[1]


def test_tuple_defaults_bind_like_scalar_ones_and_survive_the_json_form():
    """Review finding: `window=(1, 2)`, forward's own default, was refused as an unexpected keyword."""
    x = torch.randn(2, 3)
    opt = fxopt.optimize(TupleDefaults(), (x,), example_kwargs={"pair": (7, 8)})
    signature = Signature.from_json(json.loads(json.dumps(opt.graph_module.meta["fxopt_signature"].to_json())))
    assert signature.defaults == {"window": (1, 2), "pair": (5, 6)}
    for sig_bind in (opt.graph_module.meta["fxopt_signature"].bind, signature.bind):
        sig_bind((x,), {"window": (1, 2), "pair": (7, 8)})
        for kwargs, argument in [({}, "pair"), ({"pair": (7, 8), "window": [1, 2]}, "window"),
                                 ({"pair": (7, 8), "window": (1.0, 2)}, "window")]:  # items compared by type too
            with pytest.raises(InputMismatchError) as info:
                sig_bind((x,), kwargs)  # pair=(7, 8) was captured, forward defaults (5, 6); a list is not a tuple
            assert info.value.argument == argument
