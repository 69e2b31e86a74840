"""The Rewriter: new nodes carry metadata, argument and parameter edits re-propagate shapes, tensors are never
edited in place, constants never overwrite an attribute."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fxopt.numerics import compare
from fxopt.pass_base import ROUNDING
from fxopt.pipeline import clone_graph_module
from fxopt.rewrite import META_BY, Rewriter
from fxopt.testing import capture_graph
from fxopt.verify import stale_metadata

aten = torch.ops.aten
x3 = torch.randn(2, 3, 8)


class Pooled(nn.Module):
    def forward(self, x):
        return torch.relu(x.mean(-1)) * 2


class Projection(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 6, bias=False)

    def forward(self, x):
        return torch.tanh(self.proj(x)) + 1


def only(gm, target):
    (node,) = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]
    return node


def downstream(node):
    seen, todo = [], list(node.users)
    while todo:
        n = todo.pop(0)
        if n.op == "call_function" and n not in seen:
            seen.append(n)
            todo.extend(n.users)
    return seen


def test_call_gives_the_new_node_its_metadata_and_origin():
    gm = capture_graph(Pooled(), x3, canonical=False)
    mean = only(gm, aten.mean.dim)
    rw = Rewriter(gm, "test_pass")
    new = rw.call(aten.sin.default, (mean,), before=only(gm, aten.relu.default), like=mean)
    assert new.meta["val"].shape == mean.meta["val"].shape and new.meta["fxopt_pass"] == "test_pass"
    assert new.meta[META_BY] == "test_pass" and new.meta["stack_trace"] == mean.meta["stack_trace"]


def test_set_arg_repropagates_shapes_downstream():
    model = Pooled()
    gm = capture_graph(model, x3, canonical=False)
    mean = only(gm, aten.mean.dim)
    rw = Rewriter(gm, "test")
    rw.set_arg(mean, 1, [1])  # average over the sequence instead of the features
    rw.finish()
    for node in [mean, *downstream(mean)]:
        assert node.meta["val"].dim() == 2 and node.meta["val"].shape[-1] == 8, node.name
    assert stale_metadata(gm) == []
    assert torch.equal(gm(x3), torch.relu(x3.mean(1)) * 2)


def _half_the_rows(model):
    gm = capture_graph(model, x3, canonical=False)
    original = clone_graph_module(gm)  # shares the parameters with gm
    (weight,) = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == "proj.weight"]
    rw = Rewriter(gm, "test")
    new = rw.replace_param(weight, model.proj.weight.detach()[:3].clone())
    rw.finish()
    return gm, original, new


def test_replace_param_with_a_new_shape_makes_a_new_attribute_and_repropagates():
    model = Projection()
    kept = model.proj.weight.detach().clone()
    gm, original, new = _half_the_rows(model)
    assert new.target != "proj.weight" and getattr(gm, new.target).shape == (3, 8)
    assert isinstance(getattr(gm, new.target), nn.Parameter)
    assert not hasattr(gm.proj, "weight")  # nothing reads the old attribute any more
    assert all(n.meta["val"].shape[-1] == 3 for n in downstream(new))
    assert stale_metadata(gm) == []
    assert compare(torch.tanh(F.linear(x3, kept[:3])) + 1, gm(x3), ROUNDING).ok


def test_replace_param_never_edits_the_original_tensor():
    model = Projection()
    kept = model.proj.weight.detach().clone()
    want = model(x3)
    gm, original, _ = _half_the_rows(model)
    assert torch.equal(model.proj.weight, kept)
    assert torch.equal(original(x3), want) and torch.equal(model(x3), want)
    assert gm(x3).shape[-1] == 3


def test_constant_never_overwrites_an_existing_attribute():
    gm = capture_graph(Pooled(), x3, canonical=False)
    gm.register_buffer("table_0", torch.zeros(3))
    rw = Rewriter(gm, "test")
    relu = only(gm, aten.relu.default)
    first = rw.constant("table", torch.ones(3), before=relu)
    second = rw.constant("table", torch.full((3,), 2.0), before=relu)
    assert len({"table_0", first.target, second.target}) == 3
    assert torch.equal(gm.table_0, torch.zeros(3)) and torch.equal(getattr(gm, first.target), torch.ones(3))
    assert first.meta["val"].shape == (3,) and first.meta["fxopt_pass"] == "test"
    assert "." not in rw.constant("proj.weight", torch.ones(2), before=relu).target


def test_erase_dead_erases_only_nodes_without_users():
    gm = capture_graph(Pooled(), x3, canonical=False)
    mean, relu = only(gm, aten.mean.dim), only(gm, aten.relu.default)
    rw = Rewriter(gm, "test")
    unused = rw.call(aten.cos.default, (rw.call(aten.sin.default, (mean,), before=relu),), before=relu)
    rw.erase_dead([unused.args[0], unused, relu])  # producers listed first: still erased, consumers first
    names = [n.name for n in gm.graph.nodes]
    assert unused.name not in names and "sin" not in " ".join(names) and relu.name in names
