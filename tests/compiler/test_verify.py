"""Verification: fresh graphs pass; metadata a pass computed must equal a re-propagation from the node's inputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fxopt.canonicalize import canonicalize_graph
from fxopt.errors import FxoptError, VerificationError
from fxopt.rewrite import META_BY, Rewriter, fake_mode_of
from fxopt.testing import capture_graph
from fxopt.verify import output_signature, stale_metadata, verify_graph

aten = torch.ops.aten
x3 = torch.randn(2, 3, 8)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj, self.drop = nn.Linear(8, 8), nn.Dropout(0.1)

    def forward(self, x):
        h = self.drop(torch.relu(self.proj(x)))
        return h / torch.sqrt(torch.var(h, -1, keepdim=True, unbiased=False) + 1e-5)


def fresh():
    return capture_graph(Block(), x3, canonical=False)


def verify(gm, expected=None):
    verify_graph(gm, expected if expected is not None else output_signature(gm), "test_pass")


def test_fresh_and_canonicalized_graphs_pass():
    gm = fresh()
    signature = output_signature(gm)
    verify(gm)
    assert canonicalize_graph(gm)  # edits made through the Rewriter carry metadata that re-propagates
    assert any(META_BY in n.meta for n in gm.graph.nodes)
    verify(gm, signature)


def _sine_of_mean(gm):
    """A node made by a pass's rewriter: sin(mean(x, [-1])) inserted before the output."""
    rw = Rewriter(gm, "test_pass")
    out = gm.graph.output_node()
    x = next(iter(gm.graph.find_nodes(op="placeholder")))
    mean = rw.call(aten.mean.dim, (x, [-1], True), before=out)
    sin = rw.call(aten.sin.default, (mean,), before=out)
    return rw, mean, sin


def test_an_argument_edited_by_hand_leaves_stale_shapes_that_verification_names():
    gm = fresh()
    signature = output_signature(gm)
    _, mean, _ = _sine_of_mean(gm)
    verify(gm, signature)
    mean.update_arg(1, [1])  # bypasses Rewriter.set_arg: meta["val"] still says the last dim was reduced
    with pytest.raises(VerificationError, match=rf"test_pass.*{mean.name} .*carries .*but its inputs give") as e:
        verify(gm, signature)
    assert isinstance(e.value, FxoptError)


def test_a_wrong_dtype_on_a_pass_made_node_is_named():
    gm = fresh()
    _, _, sin = _sine_of_mean(gm)
    with fake_mode_of(gm):
        sin.meta["val"] = sin.meta["val"].to(torch.float16)
    (problem,) = stale_metadata(gm)
    assert problem.startswith(sin.name) and "float16" in problem
    with pytest.raises(VerificationError, match=sin.name):
        verify(gm)


def test_a_node_that_no_longer_runs_on_its_inputs_is_stale():
    gm = fresh()
    _, mean, sin = _sine_of_mean(gm)
    mean.update_arg(1, [5])  # no such dim
    assert any(p.startswith(mean.name) and "no longer runs" in p for p in stale_metadata(gm))


def test_only_metadata_a_pass_computed_is_rechecked():
    gm = fresh()
    relu = next(n for n in gm.graph.nodes if n.target is aten.relu.default)
    with fake_mode_of(gm):
        relu.meta["val"] = relu.meta["val"].to(torch.float16)  # capture's own metadata: not re-derived
    assert stale_metadata(gm) == []
    relu.meta[META_BY] = "test_pass"
    assert [p.split(" ")[0] for p in stale_metadata(gm)] == [relu.name]


def test_missing_metadata_and_a_changed_output_signature_are_errors():
    gm = fresh()
    signature = output_signature(gm)
    _, _, sin = _sine_of_mean(gm)
    del sin.meta["val"]
    with pytest.raises(VerificationError, match=rf"{sin.name} .*no shape/dtype metadata"):
        verify(gm, signature)
    with pytest.raises(VerificationError, match="output signature changed"):
        verify(fresh(), signature[:-1] + ["(1,):torch.float16"])
