"""The pipeline: requirements refused before anything runs, canonicalization as its own reported step, failures
named with the steps before them, a pass that finds nothing leaves the graph as it was, and the numerics check
uses the pass's own tolerance or the bound the pass stated for its run."""

import json
from dataclasses import dataclass, field
from typing import ClassVar

import pytest
import torch
from torch import nn

import fxopt
from fxopt import Exactness, Pass, PassContext, PassResult, Requirement, Tolerance
from fxopt.canonicalize import canonicalize_graph
from fxopt.pipeline import run_pipeline
from fxopt.rewrite import Rewriter
from fxopt.testing import capture_graph, count_ops

aten = torch.ops.aten


class ScaledProjection(nn.Module):
    """A projection scaled to unit RMS, spelled as people write it (y * y, / sqrt)."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        y = self.proj(x)
        return y / torch.sqrt((y * y).mean(-1, keepdim=True) + 1e-6)


def code(gm) -> str:
    return gm.graph.python_code(root_module="self").src


@dataclass(frozen=True)
class Records(Pass):
    """Finds nothing; records that it ran and the context it got."""

    name: ClassVar[str] = "records"
    calls: list = field(default_factory=list, compare=False)

    def run(self, gm, ctx):
        self.calls.append(ctx)
        return PassResult(gm, False, reasons=("output: nothing to rewrite here",))


@dataclass(frozen=True)
class NeedsExamples(Records):
    name: ClassVar[str] = "needs_examples"
    requires: ClassVar = frozenset({Requirement.SHAPES, Requirement.EXAMPLE_INPUTS})


@dataclass(frozen=True)
class Crashes(Pass):
    name: ClassVar[str] = "crashes"

    def run(self, gm, ctx):
        raise ValueError("boom")


@dataclass(frozen=True)
class SaysUnchangedButEdits(Pass):
    name: ClassVar[str] = "says_unchanged"

    def run(self, gm, ctx):
        _wrap_output(gm, self.name, aten.clone.default)
        return PassResult(gm, False)


def _wrap_output(gm, origin: str, target, *extra) -> Rewriter:
    """Apply `target(y, *extra)` to the graph's first output `y`."""
    rw = Rewriter(gm, origin)
    out = gm.graph.output_node()
    y = out.args[0][0]
    wrapped = rw.call(target, (y, *extra), before=out, like=y)
    rw.replace(y, wrapped, origin, keep=[wrapped])
    return rw


@dataclass(frozen=True)
class AddOffset(Pass):
    """Shifts the output by `offset`, an error it knows exactly; states `claim * offset` as its bound (plus the
    rounding of one fp32 add: eps/2 of |y + offset| <= eps * max|y| for offset <= max|y|); `claim=None`: states
    nothing, so the class's tolerance (ROUNDING) applies."""

    name: ClassVar[str] = "add_offset"
    exactness: ClassVar = Exactness.APPROXIMATE
    offset: float = 1e-2
    claim: float | None = 1.0

    def run(self, gm, ctx):
        rw = _wrap_output(gm, self.name, aten.add.Tensor, self.offset)
        stated = None if self.claim is None else Tolerance(
            rtol={torch.float32: torch.finfo(torch.float32).eps}, atol=self.claim * self.offset)
        return PassResult(rw.finish(), True, dict(rw.counts), tolerance=stated)


@dataclass(frozen=True)
class LeavesClone(Pass):
    """Leaves a non-canonical clone behind, and says so."""

    name: ClassVar[str] = "leaves_clone"
    leaves_noncanonical: ClassVar[bool] = True

    def run(self, gm, ctx):
        rw = _wrap_output(gm, self.name, aten.clone.default)
        return PassResult(rw.finish(), True, dict(rw.counts))


@dataclass(frozen=True)
class LeavesCloneSilently(LeavesClone):
    name: ClassVar[str] = "leaves_clone_silently"
    leaves_noncanonical: ClassVar[bool] = False


X = torch.randn(2, 5, 8)


def test_unmet_requirements_are_refused_before_any_step_runs():
    gm = capture_graph(ScaledProjection(), X, canonical=False)
    before, first = code(gm), Records()
    with pytest.raises(fxopt.RequirementError, match="'needs_examples' requires example inputs"):
        run_pipeline(gm, [first, NeedsExamples()], PassContext(), check_numerics=False)
    assert first.calls == [] and code(gm) == before


def test_a_failing_pass_is_named_with_the_steps_before_it():
    with pytest.raises(fxopt.PassError) as e:
        fxopt.optimize(ScaledProjection(), (X,), passes=[Records(), Crashes()])
    assert e.value.pass_name == "crashes" and e.value.before == ["canonicalize", "records"]
    assert "'crashes' failed (passes run before it: canonicalize, records)" in str(e.value)
    assert isinstance(e.value.__cause__, ValueError)


def test_a_pass_that_finds_nothing_leaves_the_graph_as_it_was():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU())  # nothing to canonicalize, nothing to fuse
    opt = fxopt.optimize(model, (X,), passes=["fuse_layernorm", Records()])
    assert code(opt.graph_module) == code(capture_graph(model, X, canonical=False))
    assert [(p.name, p.applied) for p in opt.report.passes] == [
        ("canonicalize", False), ("fuse_layernorm", False), ("records", False)]
    assert opt.report["records"].why_not == "output: nothing to rewrite here"
    assert opt.report["canonicalize"].why_not == "the graph is already canonical"


def test_a_pass_saying_unchanged_must_not_change_the_graph():
    with pytest.raises(fxopt.PassError, match="says_unchanged.*modified=False but changed the graph"):
        fxopt.optimize(ScaledProjection(), (X,), passes=[SaysUnchangedButEdits()])


def test_canonicalization_is_the_first_reported_step():
    expected = canonicalize_graph(capture_graph(ScaledProjection(), X, canonical=False))
    assert expected  # the model is spelled non-canonically
    opt = fxopt.optimize(ScaledProjection(), (X,), passes=[Records()])
    step = opt.report.passes[0]
    assert step.name == "canonicalize" and step.applied and step.numerics.ok and dict(step.stats) == expected
    assert code(opt.graph_module) == code(capture_graph(ScaledProjection(), X))


def test_no_passes_means_no_canonicalization():
    opt = fxopt.optimize(ScaledProjection(), (X,), passes=[])
    assert opt.report.passes == []
    assert code(opt.graph_module) == code(capture_graph(ScaledProjection(), X, canonical=False))


def test_a_pass_leaving_noncanonical_forms_is_followed_by_canonicalization():
    opt = fxopt.optimize(ScaledProjection(), (X,), passes=[LeavesClone()])
    assert [p.name for p in opt.report.passes] == ["canonicalize", "leaves_clone", "canonicalize"]
    again = opt.report.passes[2]
    assert again.applied and dict(again.stats) == {"clone(x) => x": 1}
    assert count_ops(opt.graph_module)["aten.clone"] == 0
    silent = fxopt.optimize(ScaledProjection(), (X,), passes=[LeavesCloneSilently()])
    assert [p.name for p in silent.report.passes] == ["canonicalize", "leaves_clone_silently"]
    assert count_ops(silent.graph_module)["aten.clone"] == 1


def test_the_numerics_check_uses_the_bound_a_pass_states_for_its_run():
    opt = fxopt.optimize(ScaledProjection(), (X,), passes=[AddOffset(offset=1e-2, claim=1.0)])
    rep = opt.report["add_offset"]
    assert rep.tolerance.atol == 1e-2 and rep.numerics.ok and rep.numerics.max_abs == pytest.approx(1e-2, rel=1e-3)
    with pytest.raises(fxopt.NumericsError, match="'add_offset'.*the bound it stated"):
        fxopt.optimize(ScaledProjection(), (X,), passes=[AddOffset(offset=1e-2, claim=0.5)])


def test_a_pass_breaking_its_declared_tolerance_is_named():
    with pytest.raises(fxopt.NumericsError, match="pass 'add_offset'") as e:
        fxopt.optimize(ScaledProjection(), (X,), passes=[Records(), AddOffset(claim=None)])
    assert "the bound it stated" not in str(e.value)  # the class's ROUNDING was the contract


def test_only_calibrating_passes_get_statistics():
    p = Records()
    fxopt.optimize(ScaledProjection(), (X,), passes=[p], calibration=[X])
    (ctx,) = p.calls
    assert ctx.stats is None and ctx.example_args[0] is X


def test_report_is_machine_readable_and_keeps_its_text_form():
    opt = fxopt.optimize(ScaledProjection(), (X,), passes=[AddOffset(), Records()])
    data = json.loads(opt.report.to_json())
    assert [p["name"] for p in data["passes"]] == ["canonicalize", "add_offset", "records"]
    offset = data["passes"][1]
    assert offset["applied"] and offset["tolerance"]["atol"] == 1e-2 and offset["numerics"]["ok"]
    assert data["passes"][2]["why_not"] == "output: nothing to rewrite here"
    assert data["capture"]["method"] == opt.report.capture.method
    text = str(opt.report)
    assert "add_offset" in text and "not applied: output: nothing to rewrite here" in text


def test_each_step_is_compared_with_the_graph_just_before_it():
    opt = fxopt.optimize(ScaledProjection(), (X,), passes=[AddOffset(offset=1e-2), AddOffset(offset=1e-2)])
    first, second = opt.report.passes[1:]
    assert first.numerics.ok and second.numerics.ok  # 2e-2 from the capture, 1e-2 from each step's input
    assert second.numerics.max_abs == pytest.approx(1e-2, rel=1e-3)


@dataclass(frozen=True)
class KernelsMoveACode(AddOffset):
    """Its ops' device kernels differ from their references (the offset stands for a code moved by one); it
    declares that, so on a device the pipeline checks it on the references."""

    name: ClassVar[str] = "kernels_move_a_code"
    exactness: ClassVar = Exactness.EXACT
    check_on_references: ClassVar[bool] = True
    claim: float | None = None


def test_on_a_device_a_pass_declaring_kernel_rounding_is_checked_on_the_references(monkeypatch):
    from fxopt import pipeline

    with pytest.raises(fxopt.NumericsError, match="kernels_move_a_code"):  # on the CPU the kernels are checked
        fxopt.optimize(ScaledProjection(), (X,), passes=[KernelsMoveACode()])
    monkeypatch.setattr(pipeline, "_on_a_device", lambda gm, args, kwargs: True)
    seen = []

    def references(gm, args, kwargs):  # the reference implementations agree before and after the pass
        seen.append(gm)
        return torch.zeros(3)
    monkeypatch.setattr(pipeline, "_on_references", references)
    rep = fxopt.optimize(ScaledProjection(), (X,), passes=[KernelsMoveACode()]).report["kernels_move_a_code"]
    assert len(seen) == 2 and seen[0] is not seen[1]  # the graph before the pass and the one after it
    assert rep.numerics.ok and "the device kernels: max|err| 0.01" in rep.numerics.detail

    def differing(gm, args, kwargs):
        seen.append(gm)
        return torch.zeros(3) if gm is seen[0] else torch.ones(3)
    seen.clear()
    monkeypatch.setattr(pipeline, "_on_references", differing)
    with pytest.raises(fxopt.NumericsError, match="on the ops' reference implementations"):
        fxopt.optimize(ScaledProjection(), (X,), passes=[KernelsMoveACode()])
