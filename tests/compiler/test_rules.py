"""The rule driver: counts per rule, fixed point, users-first, the sweep cap, near-misses, anchors, exclusivity."""

from __future__ import annotations

import logging

import torch
from torch import nn

from fxopt.numerics import compare
from fxopt.pass_base import ROUNDING
from fxopt.pattern import Const, Op, Var
from fxopt.pipeline import clone_graph_module
from fxopt.rewrite import Rewriter
from fxopt.rules import Rule, apply_rules
from fxopt.testing import capture_graph, count_ops

aten = torch.ops.aten
X = Var("x")


class Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *inputs):
        return self.fn(*inputs)


def graph(fn, *inputs):
    return capture_graph(Fn(fn), *inputs, canonical=False)


def run(gm, rules, **options):
    rw = Rewriter(gm, "test")
    result = apply_rules(rw, rules, **options)
    if result.changed:  # an unchanged graph is not even recompiled: what it holds is what the driver left
        rw.finish()
    return result


def _scaled_add(rw, m):
    return rw.call(aten.add.Tensor, (m["c"], m["a"]), {"alpha": m["k"]}, before=m.root)


def _twice(rw, m):
    return rw.call(aten.add.Tensor, (m["x"], m["x"]), before=m.root)


def _doubled(rw, m):
    return rw.call(aten.mul.Tensor, (m["x"], 2), before=m.root)


SCALED_ADD = Rule("a * k + c => add(c, a, alpha=k)",
                  Op(aten.add.Tensor, Op(aten.mul.Tensor, Var("a"), Const("k")), Var("c")), _scaled_add)
TWICE = Rule("x * 2 => x + x", Op(aten.mul.Tensor, X, 2), _twice)
DOUBLED = Rule("x + x => x * 2", Op(aten.add.Tensor, X, X), _doubled)
RELU_RELU = Rule("relu(relu(x)) => relu(x)", Op(aten.relu.default, Op(aten.relu.default, X)),
                 lambda rw, m: m.nodes[0])
x3, y3 = torch.randn(2, 3, 4), torch.randn(2, 3, 4)


def test_counts_per_rule_until_a_fixed_point():
    model = Fn(lambda x: torch.relu(torch.relu(torch.relu(torch.relu(x)))))
    gm = capture_graph(model, x3, canonical=False)
    result = run(gm, [RELU_RELU])
    assert result.counts == {RELU_RELU.name: 3} and result.converged and result.changed
    assert count_ops(gm)["aten.relu"] == 1 and torch.equal(gm(x3), model(x3))
    assert run(gm, [RELU_RELU]).counts == {}


def test_stat_names_the_count_key():
    gm = graph(lambda x: torch.relu(torch.relu(x)), x3)
    result = run(gm, [Rule(RELU_RELU.name, RELU_RELU.pattern, RELU_RELU.rewrite, stat="relu")])
    assert result.counts == {"relu": 1}


def test_users_first_the_outer_pattern_wins_over_the_inner_one():
    model = Fn(lambda x, y: x * 2 + y)
    gm = capture_graph(model, x3, y3, canonical=False)
    result = run(gm, [TWICE, SCALED_ADD])  # the inner rule is listed first: order of visit decides
    assert result.counts == {SCALED_ADD.name: 1}
    assert count_ops(gm)["aten.mul"] == 0 and count_ops(gm)["aten.add"] == 1
    assert compare(model(x3, y3), gm(x3, y3), ROUNDING).ok


def test_rules_that_undo_each_other_stop_at_max_sweeps_with_a_warning(caplog):
    model = Fn(lambda x: torch.sin(x) * 2)
    gm = capture_graph(model, x3, canonical=False)
    with caplog.at_level(logging.WARNING, logger="fxopt.rules"):
        result = run(gm, [TWICE, DOUBLED], max_sweeps=3)
    assert not result.converged and result.sweeps == 3
    assert result.counts == {TWICE.name: 2, DOUBLED.name: 1}
    assert any("without reaching a fixed point" in r.getMessage() for r in caplog.records)
    assert compare(model(x3), gm(x3), ROUNDING).ok  # every sweep leaves a correct graph


def _code(gm):
    return gm.graph.python_code("self").src


def test_a_failed_check_is_reported_and_leaves_the_graph_byte_identical():
    gm = graph(lambda x, y: torch.sin(x) * 2 + y, x3, y3)
    before = _code(gm)
    rule = Rule(SCALED_ADD.name, SCALED_ADD.pattern, _scaled_add, check=lambda m: "the scale is a power of two")
    result = run(gm, [rule])
    assert not result.changed and result.reasons() == [f"{m.name}: the scale is a power of two"
                                                       for m in gm.graph.nodes if m.target is aten.add.Tensor]
    assert _code(gm) == before


def test_a_near_miss_rule_reports_its_reason_or_name_and_rewrites_nothing():
    gm = graph(lambda x, y: x * 2 + y, x3, y3)
    before = _code(gm)
    with_reason = Rule("a * k + c (refused)", SCALED_ADD.pattern, None, check=lambda m: "k is a power of two")
    without = Rule("a * k + c is known and left alone", SCALED_ADD.pattern, None)
    assert [f.reason for f in run(gm, [with_reason]).failures] == ["k is a power of two"]
    assert [f.reason for f in run(gm, [without]).failures] == [without.name]
    assert _code(gm) == before


def test_matcher_failures_are_reported_only_once_the_anchor_is_bound():
    gm = graph(lambda x, y: x + torch.sin(y), x3, y3)
    pattern = Op(aten.add.Tensor, Var("c"), Op(aten.mul.Tensor, Var("a"), Const("k")))
    anchored = run(clone_graph_module(gm), [Rule("c + a * k", pattern, _scaled_add, anchor="c")])
    (failure,) = anchored.failures
    assert failure.node.target is aten.sin.default and "expected aten.mul, found aten.sin" in failure.reason
    assert run(clone_graph_module(gm), [Rule("c + a * k", pattern, _scaled_add)]).failures == []
    assert run(clone_graph_module(gm), [Rule("c + a * k", pattern, _scaled_add, anchor="a")]).failures == []


def test_an_inner_node_read_outside_the_match_blocks_the_rewrite():
    gm = graph(lambda x, y: (lambda h: (h + y, torch.sin(h)))(x * 2), x3, y3)
    before = _code(gm)
    result = run(gm, [SCALED_ADD])
    (failure,) = result.failures
    assert not result.changed and failure.node.target is aten.mul.Tensor and "is used elsewhere" in failure.reason
    assert _code(gm) == before
    shared = Rule(SCALED_ADD.name, SCALED_ADD.pattern, _scaled_add, exclusive=False)
    assert run(gm, [shared]).counts == {SCALED_ADD.name: 1}


def test_an_inner_node_shared_by_two_matches_of_one_rule_is_rewritten_in_both():
    model = Fn(lambda x, y, z: (lambda h: (h + y, h + z))(x * 2))
    inputs = (x3, y3, torch.randn(2, 3, 4))
    gm = capture_graph(model, *inputs, canonical=False)
    assert run(gm, [SCALED_ADD]).counts == {SCALED_ADD.name: 2} and count_ops(gm)["aten.mul"] == 0
    assert compare(model(*inputs), gm(*inputs), ROUNDING).ok


def test_a_failure_whose_nodes_a_later_rule_took_is_still_reported_and_one_its_own_rule_fixed_is_not():
    # x * 2 + y: the scaled-add rule's check refuses; then TWICE rewrites x * 2 (inside that match) into x + x, so
    # the last sweep no longer sees a * k + c at all. The refusal still says why the add stayed an add.
    gm = graph(lambda x, y: x * 2 + y, x3, y3)
    refused = Rule(SCALED_ADD.name, SCALED_ADD.pattern, _scaled_add, check=lambda m: "k is a power of two")
    result = run(gm, [refused, TWICE])
    assert result.counts == {TWICE.name: 1}
    assert [f.reason for f in result.failures] == ["k is a power of two"]
    # a refusal that a later sweep resolves at the same root (the rule applies once the inner node is rewritten)
    # is not reported: after x * 3 => x * 3.0, the check passes
    gm = graph(lambda x, y: x * 3 + y, x3, y3)
    floats = Rule("x * int => x * float", Op(aten.mul.Tensor, X, Const("k", where=lambda k, m: type(k) is int)),
                  lambda rw, m: rw.call(aten.mul.Tensor, (m["x"], float(m["k"])), before=m.root))
    later = Rule(SCALED_ADD.name, SCALED_ADD.pattern, _scaled_add,
                 check=lambda m: None if isinstance(m["k"], float) else "k is an int")
    result = run(gm, [later, floats])
    assert result.counts == {floats.name: 1, later.name: 1} and not result.failures
