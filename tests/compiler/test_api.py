"""fxopt.optimize: capture, the verified pipeline, the report, and typed errors for bad input."""

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import nn

import fxopt
from fxopt import Pass, PassResult, Requirement
from fxopt.rewrite import Rewriter
from fxopt.testing import assert_within
from tests.models import toy

aten = torch.ops.aten


class TwoOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.proj = toy.BertStyleLayerNorm(8), nn.Linear(8, 8)

    def forward(self, x, scale=None):
        h = self.proj(self.norm(x))
        return (h * scale if scale is not None else h), {"pre": x.sum(-1)}


def test_output_structure_kwargs_and_other_shapes_are_preserved():
    model = TwoOutputs()
    x, scale = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    opt = fxopt.optimize(model, (x,), passes=["fuse_layernorm"], example_kwargs={"scale": scale})
    y, s = torch.randn(4, 6, 8), torch.randn(4, 6, 8)
    got, want = opt(y, scale=s), model(y, scale=s)
    assert isinstance(got, tuple) and isinstance(got[1], dict) and got[1].keys() == want[1].keys()
    assert_within(got[0], want[0])
    assert opt.report.capture.dynamic_dims["x"] == [0, 1]


def test_report_records_each_pass():
    opt = fxopt.optimize(toy.HandWrittenBlock(16), (torch.randn(2, 5, 16),),
                         passes=["stabilize_softmax", "fuse_layernorm", "stabilize_softmax"])
    names = [p.name for p in opt.report.passes]
    assert names == ["canonicalize", "stabilize_softmax", "fuse_layernorm", "stabilize_softmax"]
    canonical, first, fuse, again = opt.report.passes
    assert canonical.applied and canonical.numerics.ok and sum(canonical.stats.values()) > 0
    assert first.applied and first.stats["softmax_op"] == 1 and first.numerics.ok
    assert fuse.applied and fuse.numerics.max_abs <= fuse.numerics.bound and fuse.seconds > 0
    assert not again.applied and again.why_not  # nothing left to do, and it says so
    text = str(opt.report)
    assert "fuse_layernorm" in text and "not applied" in text


def test_a_pass_that_finds_nothing_says_why_and_leaves_the_graph_alone():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    opt = fxopt.optimize(model, (torch.randn(2, 4),), passes=["fuse_layernorm"])
    rep = opt.report["fuse_layernorm"]
    assert not rep.applied and "no candidate" in rep.why_not


def test_the_users_model_is_not_mutated():
    model = toy.HandWrittenLM()
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fxopt.optimize(model, (torch.randint(0, 50, (2, 5)),), passes=["stabilize_softmax", "fuse_layernorm"])
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_unknown_pass_lists_the_known_ones():
    with pytest.raises(fxopt.UnknownPassError, match="fuse_layernorm") as e:
        fxopt.optimize(nn.Linear(2, 2), (torch.randn(1, 2),), passes=["fuse_layer_norm"])
    assert "'fuse_layer_norm'" in str(e.value) and "stabilize_softmax" in str(e.value)


def test_pass_options_are_checked():
    with pytest.raises(fxopt.PassOptionError, match="'fuse_residual_add'"):
        fxopt.passes.get("fuse_layernorm", fuse_residual_add="yes")
    with pytest.raises(fxopt.PassOptionError, match="'epsilon' is unknown"):
        fxopt.passes.get("fuse_layernorm", epsilon=1e-5)


def test_missing_example_inputs():
    with pytest.raises(fxopt.MissingInputsError, match="example"):
        fxopt.optimize(nn.Linear(2, 2), passes=["fuse_layernorm"])


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # control flow on tensor values: neither export nor symbolic_trace can take it
            return x * 2
        return x - 1


def test_uncapturable_model_says_what_was_tried():
    with pytest.raises(fxopt.CaptureError) as e:
        fxopt.optimize(DataDependent(), (torch.randn(3),), passes=[])
    msg = str(e.value)
    assert "DataDependent" in msg and "torch.export" in msg and "symbolic_trace" in msg
    with pytest.raises(fxopt.CaptureError, match="nn.Module"):
        fxopt.optimize(lambda x: x, (torch.randn(3),), passes=[])


@dataclass(frozen=True)
class NeedsCalibration(Pass):
    name: ClassVar[str] = "needs_calibration"
    requires: ClassVar = frozenset({Requirement.SHAPES, Requirement.CALIBRATION})

    def run(self, gm, ctx):
        return PassResult(gm, False)


def test_requirements_are_checked_before_anything_runs():
    with pytest.raises(fxopt.RequirementError, match="needs_calibration.*calibration data"):
        fxopt.optimize(DataDependent(), (torch.randn(3),), passes=[NeedsCalibration()])


@dataclass(frozen=True)
class WrongGelu(Pass):
    """A broken 'exact' pass: relu for gelu."""

    name: ClassVar[str] = "wrong_gelu"

    def run(self, gm, ctx):
        rw = Rewriter(gm, self.name)
        for n in list(gm.graph.nodes):
            if n.target == aten.gelu.default:
                rw.replace(n, rw.call(aten.relu.default, (n.args[0],), before=n), "gelu")
        return PassResult(rw.finish(), True, dict(rw.counts))


@dataclass(frozen=True)
class Crashes(Pass):
    name: ClassVar[str] = "crashes"

    def run(self, gm, ctx):
        raise ValueError("boom")


def test_a_pass_breaking_its_contract_is_caught_and_named():
    model = nn.Sequential(nn.Linear(4, 4), nn.GELU())
    with pytest.raises(fxopt.NumericsError, match="wrong_gelu"):
        fxopt.optimize(model, (torch.randn(2, 4),), passes=["fuse_layernorm", WrongGelu()])
    ran_before = r"'crashes' failed \(passes run before it: canonicalize, fuse_layernorm\)"
    with pytest.raises(fxopt.PassError, match=ran_before):
        fxopt.optimize(model, (torch.randn(2, 4),), passes=["fuse_layernorm", Crashes()])


def test_batch_of_one_is_reported_static():
    opt = fxopt.optimize(nn.Linear(4, 4), (torch.randn(1, 4),), passes=[])
    (static,) = opt.report.capture.static_dims.values()
    assert static == [0, 1]  # batch 1 is specialized; the feature dim is forced by the Linear
    assert any("static" in n for n in opt.report.capture.notes)


def test_the_report_does_not_claim_an_error_it_could_not_measure():
    """A NaN weight makes every output NaN: the report says nothing was compared instead of 'max|err| 0'."""
    model = toy.HandWrittenBlock(16)
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    opt = fxopt.optimize(model, (torch.randn(2, 5, 16),), passes=["fuse_layernorm"])
    fused = opt.report["fuse_layernorm"]
    assert fused.applied and fused.numerics.compared == 0 and fused.numerics.nonfinite_before > 0
    line = next(ln for ln in str(opt.report).splitlines() if ln.startswith("fuse_layernorm"))
    assert " 0 " not in line and "not checked: all" in str(opt.report)


class KeywordsOnly(nn.Module):
    """forward(**kwargs), the way wrappers and pipelines write it."""

    def __init__(self):
        super().__init__()
        self.proj, self.norm = nn.Linear(8, 8), nn.LayerNorm(8)

    def forward(self, **kwargs):
        return self.norm(self.proj(kwargs["hidden"]) + kwargs["residual"])


def test_inputs_passed_through_var_keyword_arguments_keep_dynamic_dims():
    x, r = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    model = KeywordsOnly()
    opt = fxopt.optimize(model, example_kwargs={"hidden": x, "residual": r}, passes=["fuse_layernorm"])
    assert "dynamic" in opt.report.capture.method and not opt.report.capture.failed_attempts
    assert opt.report.capture.dynamic_dims == {"hidden": [0, 1], "residual": [0, 1]}
    x, r = torch.randn(5, 7, 8), torch.randn(5, 7, 8)
    with torch.no_grad():
        assert_within(opt(hidden=x, residual=r), model(hidden=x, residual=r))
    assert "forward" not in vars(model)  # the signature used for capture was the model's only while capturing


def test_a_forward_taking_star_args_saves_loads_and_runs_on_both_backends(tmp_path):
    """Review finding: forward(*xs) optimized, but the re-export (save, backends) refused the dynamic-shape spec
    keyed by `xs` ("top-level keys must be ['xs_0', 'xs_1']")."""

    class Pair(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

        def forward(self, *xs):
            return self.proj(xs[0]) + xs[1]

    opt = fxopt.optimize(Pair(), (torch.randn(2, 3, 4), torch.randn(2, 3, 4)))
    other = (torch.randn(5, 7, 4), torch.randn(5, 7, 4))  # other batch and length: dynamic dims kept
    with torch.no_grad():
        want = opt(*other)
    assert torch.equal(fxopt.load(fxopt.save(opt, tmp_path / "pair.pt2"))(*other), want)
    for backend in ("onnxruntime", "tvm"):
        pytest.importorskip(backend)
        assert_within(fxopt.compile(opt, backend=backend)(*other), want)
