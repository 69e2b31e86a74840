"""The pattern language: each construct matches what it should, and a failed match names the node and says why."""

from __future__ import annotations

import torch
from torch import fx, nn

from fxopt.pattern import (
    CASTS,
    AnyOf,
    Cast,
    Const,
    Match,
    MatchFailure,
    Multi,
    Op,
    Through,
    Var,
    explain,
    match_multi,
    maybe,
)
from fxopt.testing import capture_graph

aten = torch.ops.aten


class Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.register_buffer("scale", torch.tensor(2.0))

    def forward(self, *inputs):
        return self.fn(self, *inputs)


def graph(fn, *inputs):
    return capture_graph(Fn(fn), *inputs, canonical=False)


def only(gm, target) -> fx.Node:
    (node,) = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]
    return node


def failure(pattern, node) -> MatchFailure:
    found = explain(pattern, node)
    assert isinstance(found, MatchFailure), found
    return found


def success(pattern, node) -> Match:
    found = explain(pattern, node)
    assert isinstance(found, Match), str(found)
    return found


X = Var("x")
x3, y3 = torch.randn(2, 3, 4), torch.randn(2, 3, 4)  # distinct: export merges aliased inputs


def test_op_binds_its_arguments_with_keywords_and_defaults_folded_in():
    gm = graph(lambda s, x: x.mean(-1), x3)
    m = success(Op(aten.mean.dim, X, Var("dims"), False, None, name="mean"), only(gm, aten.mean.dim))
    assert m["dims"] == [-1] and m["x"].op == "placeholder" and m["mean"] is m.root and m.nodes == [m.root]


def test_op_with_another_target_fails_at_that_node():
    gm = graph(lambda s, x: torch.relu(x) + 1, x3)
    add = only(gm, aten.add.Tensor)
    f = failure(Op(aten.mul.Tensor, X, Var("k")), add)
    assert f.node is add and "expected aten.mul, found aten.add" in f.reason
    assert "expected a scaling" in failure(Op(aten.mul.Tensor, X, Var("k"), label="a scaling"), add).reason


def test_users_counts_the_readers_of_a_value():
    gm = graph(lambda s, x: (lambda h: (h + 1, h * 2))(torch.sin(x)), x3)
    sin = only(gm, aten.sin.default)
    f = failure(Op(aten.add.Tensor, Op(aten.sin.default, X, users=1), 1), only(gm, aten.add.Tensor))
    assert f.node is sin and "2 users where the pattern allows 1" in f.reason
    success(Op(aten.add.Tensor, Op(aten.sin.default, X, users=2), 1), only(gm, aten.add.Tensor))


def test_where_predicates_say_why_they_refuse():
    gm = graph(lambda s, x: torch.sin(x) + 1, x3)
    add, sin = only(gm, aten.add.Tensor), only(gm, aten.sin.default)

    def not_a_sine(v, m):
        return "reads a sine" if v.target is aten.sin.default else None

    def is_float_op(v, m):
        return m["x"].meta["val"].dtype == torch.float64

    f = failure(Op(aten.add.Tensor, Var("h", where=not_a_sine), 1), add)
    assert f.node is sin and f.reason == "reads a sine"
    f = failure(Op(aten.add.Tensor, X, 1, where=is_float_op), add)
    assert f.node is add and "is_float_op" in f.reason


def test_const_matches_numbers_only():
    gm = graph(lambda s, x, y: (x + 1, x - y), x3, y3)
    sub, add = only(gm, aten.sub.Tensor), only(gm, aten.add.Tensor)
    assert success(Op(aten.add.Tensor, X, Const("c")), add)["c"] == 1
    f = failure(Op(aten.sub.Tensor, X, Const("c")), sub)
    assert f.node is sub.args[1] and "expected a constant for c, got placeholder" in f.reason


def test_a_literal_float_matches_an_equal_int():
    gm = graph(lambda s, x: x + 1, x3)
    success(Op(aten.add.Tensor, X, 1.0), only(gm, aten.add.Tensor))
    assert "expected 2.0, got 1" in failure(Op(aten.add.Tensor, X, 2.0), only(gm, aten.add.Tensor)).reason


def test_a_failure_on_a_constant_argument_names_the_op_node_holding_it():
    gm = graph(lambda s, x: x + 1, x3)
    add = only(gm, aten.add.Tensor)
    assert failure(Op(aten.add.Tensor, X, 2.0), add).node is add
    assert failure(Op(aten.add.Tensor, X, Const("c", where=lambda v, m: "too small")), add).node is add


def test_a_variable_bound_twice_must_be_the_same_node():
    gm = graph(lambda s, x, y: (x * x, x * y), x3, y3)
    square, product = [n for n in gm.graph.nodes if n.target is aten.mul.Tensor]
    success(Op(aten.mul.Tensor, X, X), square)
    f = failure(Op(aten.mul.Tensor, X, X), product)
    assert f.node is product.args[1] and "x must be the same value in both places" in f.reason


def _is(op):
    return lambda v, m: None if v.op == op else f"{v.name} is not a {op}"


def test_commutative_tries_the_operands_swapped():
    gm = graph(lambda s, x: s.scale * x, x3)
    mul = only(gm, aten.mul.Tensor)
    ordered = Op(aten.mul.Tensor, Var("x", where=_is("placeholder")), Var("k", where=_is("get_attr")))
    assert "is not a placeholder" in failure(ordered, mul).reason
    swapped = Op(aten.mul.Tensor, Var("x", where=_is("placeholder")), Var("k", where=_is("get_attr")),
                 commutative=True)
    m = success(swapped, mul)
    assert m["x"].op == "placeholder" and m["k"].op == "get_attr"


def test_anyof_backtracks_and_the_failed_alternative_leaves_no_bindings():
    gm = graph(lambda s, x, y: x + torch.sin(y), x3, y3)
    add = only(gm, aten.add.Tensor)
    first = Op(aten.add.Tensor, Var("a"), Op(aten.mul.Tensor, Var("b"), Var("c")))
    second = Op(aten.add.Tensor, Var("lhs"), Op(aten.sin.default, Var("rhs")))
    m = success(AnyOf(first, second, name="sum"), add)
    assert set(m.bindings) == {"lhs", "rhs", "sum"} and m.nodes == [only(gm, aten.sin.default), add]


def test_the_furthest_failure_is_reported_whatever_the_order_of_alternatives():
    gm = graph(lambda s, x: torch.sin(x) * 2 + 1, x3)
    add, sin = only(gm, aten.add.Tensor), only(gm, aten.sin.default)
    shallow = Op(aten.sub.Tensor, X, 1)
    deep = Op(aten.add.Tensor, Op(aten.mul.Tensor, Op(aten.cos.default, X), 2), 1)
    for pattern in (AnyOf(shallow, deep), AnyOf(deep, shallow)):
        f = failure(pattern, add)
        assert f.node is sin and "expected aten.cos, found aten.sin" in f.reason and f.depth == 2


def test_through_looks_through_views_up_to_max():
    gm = graph(lambda s, x: torch.sin(x).reshape(-1, 4).view(-1).view(6, 4), x3)
    out = gm.graph.output_node().all_input_nodes[0]
    m = success(Through(Op(aten.sin.default, X), name="seen"), out)
    assert m["seen"] is out and [n.target for n in m.nodes][-1] is aten.sin.default
    success(Through(Op(aten.sin.default, X), max=3), out)
    f = failure(Through(Op(aten.sin.default, X), max=2), out)
    assert f.node.args[0].target is aten.sin.default and "expected aten.sin, found aten.view" in f.reason
    success(Through(Op(aten.sin.default, X)), only(gm, aten.sin.default))  # nothing to look through


def test_through_casts_and_cast_is_optional():
    gm = graph(lambda s, x: (torch.sin(x).float(), torch.sin(x).float().half(), torch.cos(x)), x3.half())
    once, twice = [n for n in gm.graph.output_node().all_input_nodes[:2]]
    cos = only(gm, aten.cos.default)
    success(Cast(Op(aten.sin.default, X)), once)
    success(Cast(Op(aten.cos.default, X)), cos)
    assert "found aten._to_copy" in failure(Cast(Op(aten.sin.default, X)), twice).reason
    success(Through(Op(aten.sin.default, X), CASTS), twice)


def test_maybe_takes_the_optional_tail_where_it_is():
    gm = graph(lambda s, x, w: (torch.sin(x) * w, torch.cos(x)), x3, torch.randn(4))
    scaled, cos = gm.graph.output_node().all_input_nodes
    pattern = maybe(lambda p: Op(aten.mul.Tensor, p, Var("w")), Op((aten.sin.default, aten.cos.default), X))
    assert success(pattern, scaled)["w"].op == "placeholder"
    m = success(pattern, cos)
    assert "w" not in m and m.nodes == [cos]


class TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x, y):
        return self.q(x), self.k(x), self.k(y)


def _linear(w, b):
    return Op(aten.linear.default, X, Var(w), Var(b))


def test_multi_matches_two_roots_sharing_their_input():
    gm = capture_graph(TwoLinears(), x3, y3, canonical=False)
    q, k, k_of_y = [n for n in gm.graph.nodes if n.target is aten.linear.default]
    pattern = Multi(_linear("wq", "bq"), _linear("wk", "bk"))
    m = match_multi(pattern, q, lambda m, i: list(m["x"].users))
    assert isinstance(m, Match) and m["x"] is q.args[0] and m["wk"] is k.args[1] and set(m.nodes) == {q, k}
    alone = match_multi(pattern, k_of_y, lambda m, i: list(m["x"].users))
    assert isinstance(alone, MatchFailure) and {"x", "wq"} <= alone.bound


def test_multi_with_no_second_root_says_so():
    gm = capture_graph(TwoLinears(), x3, y3, canonical=False)
    k_of_y = [n for n in gm.graph.nodes if n.target is aten.linear.default][-1]
    alone = match_multi(Multi(_linear("wq", "bq"), _linear("wk", "bk")), k_of_y, lambda m, i: list(m["x"].users))
    assert "no node matches root 1" in alone.reason and alone.node is k_of_y


def test_multi_backtracks_over_candidates_and_shares_variables():
    gm = capture_graph(TwoLinears(), x3, y3, canonical=False)
    q, k, k_of_y = [n for n in gm.graph.nodes if n.target is aten.linear.default]
    same_weight = Multi(_linear("w", "b"), Op(aten.linear.default, Var("y"), Var("w"), Var("b")))
    m = match_multi(same_weight, k, lambda m, i: [q, k_of_y])  # q reads another weight: skipped
    assert isinstance(m, Match) and m["y"] is k_of_y.args[0]


def _users(gm):
    return {n.name: [u.name for u in n.users] for n in gm.graph.nodes}


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.norm = nn.Linear(4, 4), nn.Linear(4, 4), nn.LayerNorm(4)

    def forward(self, x):
        scores = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2) * 0.5, dim=-1)
        return self.norm(x + (scores @ x).float())


def test_matching_never_mutates_the_graph():
    gm = capture_graph(Block(), x3, canonical=False)
    code, users = gm.code, _users(gm)
    patterns = [_linear("w", "b"), Through(Op(aten.softmax.int, X, Var("d"), False)),
                Op(aten.add.Tensor, X, Cast(Op(aten.matmul.default, Var("p"), X)), commutative=True),
                AnyOf(_linear("w", "b"), Op(aten.mul.Tensor, X, Const("k"), commutative=True)),
                maybe(lambda p: Op(aten.mul.Tensor, p, Var("s")), _linear("w", "b"))]
    for node in list(gm.graph.nodes):
        for p in patterns:
            explain(p, node)
        match_multi(Multi(_linear("wq", "bq"), _linear("wk", "bk")), node,
                    lambda m, i: list(m["x"].users) if "x" in m else [])
    assert gm.code == code and _users(gm) == users
