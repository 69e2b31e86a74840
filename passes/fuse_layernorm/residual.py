"""The residual fusion of fuse_layernorm: norm(a + b), also through a token-flattening view, becomes one
add+norm op whose second output (the sum) replaces the add's other uses."""

from __future__ import annotations

import torch
from torch import fx
from torch.utils._pytree import tree_leaves

from fxopt import ops
from fxopt.canonicalize import is_constant
from fxopt.pattern import VIEWS, Op, Through, Var, node_args
from fxopt.rewrite import Rewriter

aten = torch.ops.aten


def _val(n):
    return n.meta.get("val") if isinstance(n, fx.Node) else None


def check_residual(m) -> str | None:
    a, b, add, norm = m["a"], m["b"], m["add"], m.root
    if not all(isinstance(t, fx.Node) and not is_constant(t) for t in (a, b)):
        return f"the add {add.name} before {norm.name} has a constant operand"
    va, vb = _val(a), _val(b)
    if va.shape != vb.shape or va.dtype != vb.dtype:
        return f"the add {add.name} before {norm.name} broadcasts or mixes dtypes"
    viewed = m["norm_in"] is not add
    if viewed and any(len(v.users) != 1 for v in _views_below(m)):
        return f"the sum {add.name} is also read in its own shape before the view that {norm.name} normalizes"
    order = {n: i for i, n in enumerate(norm.graph.nodes)}
    rest = [r for r in tree_leaves(node_args(norm)[1:]) if isinstance(r, fx.Node)]
    if any(order[r] > order[add] for r in rest):
        return f"γ/β or the normalized shape of {norm.name} are computed after the residual add {add.name}"
    return None


def _views_below(m) -> list[fx.Node]:
    """The add and the views between it and the one the norm reads (each must have a single reader)."""
    chain, cur = [], m["norm_in"]
    while cur is not m["add"]:
        cur = cur.args[0]
        chain.append(cur)
    return chain


_RESIDUAL = {aten.layer_norm.default: ops.add_layer_norm, ops.rms_norm: ops.add_rms_norm}
RESIDUAL = Op(tuple(_RESIDUAL), Through(Op(aten.add.Tensor, Var("a"), Var("b"), 1, name="add"), VIEWS,
                                        name="norm_in"))


def rewrite_residual(rw: Rewriter, m) -> None:
    norm, add, a, b = m.root, m["add"], m["a"], m["b"]
    fused_op = _RESIDUAL[norm.target]
    rest = node_args(norm)[1:len(fused_op._schema.arguments) - 1]
    at = m["norm_in"].next  # the sum's other readers (in the shape the norm reads) read the fused op's sum
    if m["norm_in"] is not add:  # norm(view(a + b)) == norm(view(a) + view(b)): the add is elementwise
        shape = m["norm_in"].args[1]
        a, b = (rw.call(aten.reshape.default, (t, shape), before=at, like=m["norm_in"]) for t in (a, b))
    fused = rw.call(fused_op, (a, b, *rest), before=at, like=norm)
    out, total = rw.getitem(fused, 0, before=fused.next), rw.getitem(fused, 1, before=fused.next.next)
    rw.replace(m["norm_in"], total, keep=[norm])
    rw.replace(norm, out)
