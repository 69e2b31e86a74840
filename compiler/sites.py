"""Linear sites and norm → linear groups over a canonical graph: plain data, found once, shared by passes.

A *linear site* is one matrix product with a constant weight, in one uniform view whatever its spelling:

    aten.linear(x, W[, b])                                   layout "out_in"
    view(addmm(b, view(x, (-1, in)), W), x.shape[:-1]+(out,)) layout "in_out"   (GPT-2's Conv1D)
    matmul(x, W) / mm / bmm                                  layout "in_out"
    matmul(x, t(W)) / permute(W, [1, 0]) / transpose(W)      layout "out_in"   (+ a bias add when present)

`input` and `output` are in token layout (the flattening views around a 2-d `addmm`/`mm` are looked through
and listed in `reshapes`). A *norm group* is a norm (aten.layer_norm, fxopt.rms_norm, output 0 of
fxopt.add_layer_norm / fxopt.add_rms_norm) with every linear that reads its output through views/casts, and every
other reader (a post-LN model's norm output is also the next residual: a smoothing scale must not be folded there).
Nothing here mutates the graph.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

from . import ops
from .pattern import CAST_TARGETS, VIEWS
from .rewrite import SOURCE

aten = torch.ops.aten

# eval-mode dropout is already gone (canonicalization), so a dropout left in the graph is not looked through
LOOK_THROUGH = (*VIEWS, *CAST_TARGETS, aten.clone.default, aten.contiguous.default, aten.alias.default)
_TRANSPOSES = (aten.t.default, aten.permute.default, aten.transpose.int)
_MATMULS = (aten.matmul.default, aten.mm.default, aten.bmm.default)
NORMS = {aten.layer_norm.default: "layer_norm", ops.rms_norm: "rms_norm",
         ops.add_layer_norm: "layer_norm", ops.add_rms_norm: "rms_norm"}


@dataclass(frozen=True, eq=False)
class LinearSite:
    """One product with a constant weight. `in_features`/`out_features` are the product's; `weight_name` is the
    parameter's qualified name in the captured module (the model's own `named_parameters()` name)."""

    node: fx.Node
    input: fx.Node
    weight: fx.Node
    weight_name: str
    layout: str  # "out_in": W is (out, in) as nn.Linear keeps it; "in_out": W is (in, out) (Conv1D, x @ W)
    bias: fx.Node | None
    output: fx.Node
    in_features: int
    out_features: int
    reshapes: tuple[fx.Node, ...] = ()

    def __str__(self) -> str:
        return f"{self.weight_name} [{self.layout}] {self.in_features}→{self.out_features}"

    __repr__ = __str__


@dataclass(frozen=True, eq=False)
class NormGroup:
    """A norm, the linears reading its output, and its other readers (views and casts looked through)."""

    norm: fx.Node
    kind: str  # "layer_norm" | "rms_norm"
    output: fx.Node  # the normalized value: the op, or getitem 0 of a fused add+norm
    weight: fx.Node | None
    bias: fx.Node | None
    linears: tuple[LinearSite, ...]
    other_readers: tuple[fx.Node, ...]
    residual: fx.Node | None = None  # getitem 1 of a fused add+norm: the residual stream's sum

    def __repr__(self) -> str:
        return (f"NormGroup({self.norm.name} {self.kind}: linears [{', '.join(s.weight_name for s in self.linears)}]"
                f", other readers [{', '.join(n.name for n in self.other_readers)}])")

    @property
    def fused_residual(self) -> bool:
        return self.norm.target in (ops.add_layer_norm, ops.add_rms_norm)


def val(n):
    return n.meta.get("val") if isinstance(n, fx.Node) else None


def is_call(n, targets) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target in targets


def through(n: fx.Node, targets=LOOK_THROUGH) -> fx.Node:
    """`n` with the declared look-through ops above it peeled off."""
    while is_call(n, targets):
        n = n.args[0]
    return n


def _param(n) -> fx.Node | None:
    return n if isinstance(n, fx.Node) and n.op == "get_attr" else None


def _weight(arg) -> tuple[fx.Node, bool] | None:
    """(get_attr node, transposed) for a 2-d constant weight, seen through one transpose of its two dims."""
    if _param(arg) is not None and val(arg) is not None and val(arg).dim() == 2:
        return arg, False
    if is_call(arg, _TRANSPOSES) and _param(arg.args[0]) is not None and val(arg.args[0]).dim() == 2:
        if arg.target is aten.permute.default and list(arg.args[1]) != [1, 0]:
            return None
        return arg.args[0], True
    return None


def _tokens_out(node: fx.Node, x: fx.Node) -> fx.Node:
    """The single user of a 2-d product that restores x's token dims, else the product itself."""
    users = list(node.users)
    if len(users) == 1 and is_call(users[0], VIEWS):
        shape, xs = val(users[0]).shape, val(x).shape
        if len(shape) == len(xs) and all(a == b for a, b in zip(shape[:-1], xs[:-1])):
            return users[0]
    return node


def _bias_add(out: fx.Node, features: int) -> fx.Node | None:
    users = list(out.users)
    if len(users) == 1 and is_call(users[0], (aten.add.Tensor,)):
        other = [a for a in users[0].args[:2] if a is not out]
        if len(other) == 1 and _param(other[0]) is not None and tuple(val(other[0]).shape) == (features,):
            return users[0]
    return None


def linear_site(node: fx.Node) -> LinearSite | None:
    """The site of one product node, or None when it is not a product with a constant 2-d weight."""
    if is_call(node, (aten.linear.default,)):
        w = _weight(node.args[1])
        if w is None:
            return None
        (weight, transposed), x = w, node.args[0]
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        return _site(node, x, weight, not transposed, bias, node, ())  # linear reads W as (out, in)
    if is_call(node, (aten.addmm.default, aten.mm.default)):
        flat, warg = (node.args[1], node.args[2]) if node.target is aten.addmm.default else node.args[:2]
        w = _weight(warg)
        if w is None:
            return None
        x = flat.args[0] if is_call(flat, VIEWS) else flat
        reshapes = (flat,) if x is not flat else ()
        out = _tokens_out(node, x) if reshapes else node
        reshapes += (out,) if out is not node else ()
        bias = node.args[0] if node.target is aten.addmm.default else None
        return _site(node, x, w[0], w[1], bias, out, reshapes)
    if is_call(node, _MATMULS):
        w = _weight(node.args[1])
        if w is None:
            return None
        features = val(w[0]).shape[0 if w[1] else 1]
        add = _bias_add(node, features)
        bias = None if add is None else next(a for a in add.args[:2] if a is not node)
        return _site(node, node.args[0], w[0], w[1], bias, add or node, ())
    return None


def _site(node, x, weight, out_in: bool, bias, out, reshapes) -> LinearSite:
    rows, cols = val(weight).shape
    return LinearSite(node=node, input=x, weight=weight, weight_name=weight.meta.get(SOURCE, str(weight.target)),
                      layout="out_in" if out_in else "in_out", bias=bias, output=out,
                      in_features=int(cols if out_in else rows), out_features=int(rows if out_in else cols),
                      reshapes=reshapes)


def find_linear_sites(gm: fx.GraphModule) -> list[LinearSite]:
    """Every linear site, in graph order."""
    return [s for s in map(linear_site, gm.graph.nodes) if s is not None]


def _norm_output(norm: fx.Node) -> tuple[fx.Node | None, fx.Node | None]:
    if norm.target not in (ops.add_layer_norm, ops.add_rms_norm):
        return norm, None
    items = {u.args[1]: u for u in norm.users if u.target is operator.getitem}
    return items.get(0), items.get(1)


def _readers(out: fx.Node, by_op: dict[fx.Node, LinearSite]) -> tuple[list[LinearSite], list[fx.Node]]:
    linears, others, stack, seen = [], [], [out], set()
    while stack:
        n = stack.pop(0)
        for u in n.users:
            site = by_op.get(u)
            if site is not None and (site.input is n or (site.reshapes and site.reshapes[0] is n)):
                linears.append(site)
            elif is_call(u, LOOK_THROUGH) and u.args[0] is n:
                if u not in seen:
                    seen.add(u)
                    stack.append(u)
            else:
                others.append(u)
    return linears, others


def find_norm_groups(gm: fx.GraphModule, sites: list[LinearSite]) -> list[NormGroup]:
    """Every norm op with its consumer linears and other readers, in graph order."""
    by_op = {s.node: s for s in sites}
    groups = []
    for n in gm.graph.nodes:
        if not is_call(n, NORMS):
            continue
        out, residual = _norm_output(n)
        fused = n.target in (ops.add_layer_norm, ops.add_rms_norm)
        args = list(n.args) + [None] * 6
        weight, bias = (args[3], args[4]) if fused else (args[2], args[3])
        if NORMS[n.target] == "rms_norm":
            bias = None
        linears, others = _readers(out, by_op) if out is not None else ([], [])
        groups.append(NormGroup(norm=n, kind=NORMS[n.target], output=out if out is not None else n,
                                weight=weight, bias=bias, linears=tuple(linears), other_readers=tuple(others),
                                residual=residual))
    return groups
