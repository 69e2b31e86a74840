"""Fuse decomposed LayerNorm and RMSNorm into one op each, and a residual add into the norm after it.

    (x - mean(x)) * rsqrt(mean((x - mean(x))²) + eps) [* γ] [+ β]  =>  layer_norm(x, shape, γ, β, eps)
    x * rsqrt(mean(x²) + eps) [* γ]                                =>  fxopt.rms_norm(x, shape, γ, eps)
    norm(a + b)                                                    =>  out, s = fxopt.add_<norm>(a, b, ...)
                                                                       (s = a + b replaces the add's other uses)

The means run over the trailing dims (`shape` = those dims of x); γ and β are constants of exactly that
shape; eps is a Python number. Spellings (div by sqrt, var_mean with correction=0, x*x, commuted operands,
Llama's fp32 casts, eval dropout) are canonicalized first (compiler/canonicalize.py).

Near-misses left unchanged, each with its reason: unbiased variance, eps outside the root, reduction not over
the trailing dims, γ/β not of the normalized shape, an intermediate used elsewhere, an add with a constant
or broadcasting operand.

Requires: SHAPES.  Exactness: exact up to float rounding (tolerance ROUNDING). The residual fusion is
bit-exact; the norms differ from their decompositions only by reduction order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import is_concrete_int
from torch.utils._pytree import tree_leaves

from fxopt import ops
from fxopt.canonicalize import _MOMENTS as MOMENT_OPS
from fxopt.canonicalize import canonicalize, moment_correction
from fxopt.canonicalize import is_constant as _is_constant
from fxopt.pass_base import Pass, PassContext, PassResult, is_bool
from fxopt.pattern import Cast, Const, Op, Var, is_cast, match, node_args
from fxopt.rewrite import Rewriter

aten = torch.ops.aten
_ADD = (aten.add.Tensor, aten.add.Scalar)


def _mean(v, dims: str):
    return Op(aten.mean.dim, v, Var(dims), True, None)


def _inv_root(v):
    return Op(aten.rsqrt.default, Op(_ADD, v, Const("eps"), 1, commutative=True), name="inv")


_CENTERED = Op(aten.sub.Tensor, Var("x"), _mean(Var("x"), "dims"), 1, name="centered")
LAYER_NORM = Op(aten.mul.Tensor, _CENTERED,
                _inv_root(_mean(Op(aten.pow.Tensor_Scalar, _CENTERED, 2.0), "var_dims")),
                commutative=True, name="normed")
# Llama casts x to fp32 for both the statistics and the product; T5 only for the statistics
RMS_NORM = Op(aten.mul.Tensor, Cast(Var("x"), name="x_mul"),
              _inv_root(_mean(Op(aten.pow.Tensor_Scalar, Cast(Var("x"), name="x_pow"), 2.0), "dims")),
              commutative=True, name="normed")


@dataclass
class _Norm:
    kind: str  # "layer" | "rms"
    x: fx.Node  # the input of the fused op
    shape: list
    eps: float
    root: fx.Node  # the node the fused op replaces
    inner: list[fx.Node]
    weight: fx.Node | None = None
    bias: fx.Node | None = None


def _val(n):
    return n.meta.get("val") if isinstance(n, fx.Node) else None


def _trailing_shape(x: fx.Node, *dim_lists) -> list[int] | str:
    val = _val(x)
    normalized = [sorted(d % val.dim() for d in dims) for dims in dim_lists]
    if any(d != normalized[0] for d in normalized):
        return f"the two reductions run over different dims {list(dim_lists)}"
    dims = normalized[0]
    if dims != list(range(val.dim() - len(dims), val.dim())):
        return f"reduction over dims {dims} of a {val.dim()}-d input, not over its trailing dims"
    # dynamic dims stay SymInts: the fused op reads them from sym_size nodes
    return [int(s) if is_concrete_int(s) else s for s in val.shape[dims[0]:]]


def _match_core(inv: fx.Node) -> _Norm | str | None:
    """The normalization around one rsqrt node, or the reason it is not one (None: not a candidate)."""
    for user in inv.users:
        for kind, pattern in (("layer", LAYER_NORM), ("rms", RMS_NORM)):
            m = match(pattern, user)
            if m is None or m["inv"] is not inv:
                continue
            dims = (m["dims"], m["var_dims"]) if kind == "layer" else (m["dims"],)
            x = _rms_input(m) if kind == "rms" else m["x"]
            if isinstance(x, str):
                return f"{user.name}: {x}"
            shape = _trailing_shape(x, *dims)
            if isinstance(shape, str):
                return f"{user.name}: {shape}"
            return _Norm(kind, x, shape, float(m["eps"]), m["normed"], list(m.nodes))
    return _explain_root(inv.args[0], inv)


def _widens(cast: fx.Node) -> bool:
    src, dst = _val(cast.args[0]), _val(cast)
    return src.is_floating_point() and dst.is_floating_point() and dst.dtype.itemsize > src.dtype.itemsize


def _rms_input(m) -> fx.Node | str:
    """The fused op's input: x, or the widening cast of x its statistics are computed on."""
    x_pow, x_mul = m.get("x_pow"), m.get("x_mul")
    if x_pow is None:
        return m["x"] if x_mul is None else "statistics in x's own precision, product in a wider one"
    if not _widens(x_pow) or (x_mul is not None and _val(x_mul).dtype != _val(x_pow).dtype):
        return f"the cast {x_pow.name} before the statistics narrows or disagrees with the product's"
    return x_pow  # x * r with x narrow and r wide is computed in the wide type: the same values


def _explain_root(arg, inv: fx.Node) -> str | None:
    if not (isinstance(arg, fx.Node) and arg.target in _ADD):
        return None
    var, eps = arg.args[0], arg.args[1]
    if isinstance(var, fx.Node) and var.target in MOMENT_OPS:
        c = moment_correction(var)
        return f"{inv.name}: unbiased variance (correction={c}) is not LayerNorm's population variance"
    if isinstance(eps, fx.Node) or isinstance(var, (int, float)):
        return f"{inv.name}: eps is a tensor, not a constant"
    return f"{inv.name}: rsqrt(v + eps) where v is not a mean of squares over the normalized dims"


def _explain_div(div: fx.Node) -> str | None:
    """(x - μ) / (σ + eps): eps outside the root is a different function."""
    den = div.args[1] if len(div.args) > 1 else None
    if isinstance(den, fx.Node) and den.target in _ADD and isinstance(den.args[0], fx.Node) and \
            (den.args[0].target == aten.sqrt.default or den.args[0].target in MOMENT_OPS):
        return f"{div.name}: eps is added outside the square root ((x-μ)/(σ+eps) is not LayerNorm)"
    return None


def _take_affine(norm: _Norm) -> str | None:
    """Extend the match over a trailing cast, `* γ` and `+ β` where they are constants; reason if malformed."""
    def only_user(n):
        return next(iter(n.users)) if len(n.users) == 1 else None

    x_dtype = _val(norm.x).dtype
    user = only_user(norm.root)
    if norm.kind == "rms" and is_cast(norm.x) and _widens(norm.x) and user is not None and is_cast(user) \
            and _val(user).dtype == _val(norm.x.args[0]).dtype:
        norm.inner += [norm.root, norm.x]
        norm.x, norm.root, user = norm.x.args[0], user, only_user(user)  # Llama: fp32 stats, cast back
        x_dtype = _val(norm.x).dtype
    for role, target in (("weight", aten.mul.Tensor), ("bias", aten.add.Tensor)):
        if role == "bias" and norm.kind == "rms":
            break
        if user is None or user.target != target or (target == aten.add.Tensor and node_args(user)[2] != 1):
            continue
        other = user.args[1] if user.args[0] is norm.root else user.args[0]
        if not _is_constant(other):
            continue
        shape = list(_val(other).shape)
        if shape != norm.shape and not (len(shape) >= len(norm.shape) and shape[-len(norm.shape):] == norm.shape
                                        and all(s == 1 for s in shape[:-len(norm.shape)])):
            return (f"{user.name}: {'γ' if role == 'weight' else 'β'} has shape {shape}, "
                    f"not the normalized shape {norm.shape}")
        if norm.kind == "layer" and _val(other).dtype != x_dtype:
            return f"{user.name}: {'γ' if role == 'weight' else 'β'} dtype {_val(other).dtype} != input {x_dtype}"
        norm.inner.append(norm.root)
        setattr(norm, role, other)
        norm.root, user = user, only_user(user)
    return None


def _check_precision(norm: _Norm) -> str | None:
    """An RMSNorm written in fp16/bf16 without casts computes its statistics in that type, the fused op in
    fp32. That is within the rounding of the output when the output is as narrow; not when the weight widens it."""
    x, out = _val(norm.x).dtype, _val(norm.root).dtype
    if norm.kind == "rms" and x in (torch.float16, torch.bfloat16) and out != x:
        return (f"{norm.root.name}: RMSNorm statistics in {x} with a {out} output: the fused op's fp32 statistics "
                f"would differ by more than {out} rounding")
    return None


def _fuse_norm(rw: Rewriter, norm: _Norm) -> None:
    first = _val(norm.x).dim() - len(norm.shape)
    shape = [s if isinstance(s, int) else rw.call(aten.sym_size.int, (norm.x, first + i), before=norm.root)
             for i, s in enumerate(norm.shape)]
    weight, bias = (p if p is None or list(_val(p).shape) == norm.shape else
                    rw.call(aten.view.default, (p, norm.shape), before=norm.root) for p in (norm.weight, norm.bias))
    if norm.kind == "layer":
        fused = rw.call(aten.layer_norm.default, (norm.x, shape, weight, bias, norm.eps),
                        before=norm.root, like=norm.root)
    else:
        fused = rw.call(ops.rms_norm, (norm.x, shape, weight, norm.eps), before=norm.root, like=norm.root)
    rw.replace(norm.root, fused, f"{norm.kind}_norm")
    rw.erase_dead([norm.root, *reversed(norm.inner)])


_RESIDUAL = {aten.layer_norm.default: (ops.add_layer_norm, "add_layer_norm"),
             ops.rms_norm: (ops.add_rms_norm, "add_rms_norm")}


_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def _sink_reshape_into_add(rw: Rewriter, norm: fx.Node) -> None:
    """norm(reshape(a + b)) => norm(reshape(a) + reshape(b)): the add is elementwise (OPT flattens tokens
    between the residual add and its final_layer_norm)."""
    view = norm.args[0]
    if not (isinstance(view, fx.Node) and view.target in _VIEWS and isinstance(view.args[0], fx.Node)):
        return
    add = view.args[0]
    if add.target != aten.add.Tensor or len(add.users) != 1 or node_args(add)[2] != 1:
        return
    a, b = add.args[:2]
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node) and _val(a).shape == _val(b).shape):
        return
    ra, rb = (rw.call(aten.reshape.default, (t, view.args[1]), before=view, like=view) for t in (a, b))
    rw.replace(view, rw.call(aten.add.Tensor, (ra, rb), before=view, like=add), "sink_reshape_into_add")


def _fuse_residual(rw: Rewriter, norm: fx.Node) -> str | None:
    _sink_reshape_into_add(rw, norm)
    add = norm.args[0]
    if not (isinstance(add, fx.Node) and add.target == aten.add.Tensor):
        return None
    a, b = add.args[:2]
    if node_args(add)[2] != 1 or not all(isinstance(t, fx.Node) and not _is_constant(t) for t in (a, b)):
        return f"{add.name}: the add before {norm.name} has a constant or scaled operand"
    va, vb = _val(a), _val(b)
    if not (isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor)) or \
            va.shape != vb.shape or va.dtype != vb.dtype:
        return f"{add.name}: the add before {norm.name} broadcasts or mixes dtypes"
    fused_op, rule = _RESIDUAL[norm.target]
    rest = node_args(norm)[1:len(fused_op._schema.arguments) - 1]
    order = {n: i for i, n in enumerate(rw.graph.nodes)}
    if any(isinstance(r, fx.Node) and order[r] > order[add] for r in tree_leaves(rest)):
        return f"{add.name}: γ/β of {norm.name} are computed after the residual add"
    # right after the add, so that the add's earlier users can read the fused op's sum
    fused = rw.call(fused_op, (a, b, *rest), before=add.next, like=norm)
    rw.replace(norm, rw.getitem(fused, 0, before=fused.next), rule)
    if len(add.users) > 1:  # the residual stream goes on: its users read the fused op's sum
        rw.replace(add, rw.getitem(fused, 1, before=fused.next.next), keep=[norm])
    rw.erase_dead([norm, add])
    return None


@dataclass(frozen=True)
class FuseLayerNorm(Pass):
    """Decomposed LayerNorm/RMSNorm -> one op; residual add + norm -> one fused add+norm op."""

    fuse_residual_add: bool = True
    rms_norm: bool = True

    name: ClassVar[str] = "fuse_layernorm"
    option_checks: ClassVar = {"fuse_residual_add": (is_bool, "a bool"), "rms_norm": (is_bool, "a bool")}

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        rw = Rewriter(gm, self.name)
        canonicalize(rw)
        reasons: list[str] = []
        candidates: list[_Norm] = []
        for node in list(gm.graph.nodes):
            if node.target == aten.div.Tensor and (why := _explain_div(node)):
                reasons.append(why)
            if node.target != aten.rsqrt.default:
                continue
            norm = _match_core(node)
            if norm is None or isinstance(norm, str):
                reasons += [norm] if norm else []
            elif norm.kind == "layer" or self.rms_norm:
                why = _take_affine(norm) or _check_precision(norm)
                reasons += [why] if why else []
                candidates += [] if why else [norm]
        # norms may share statistics (CSE); an intermediate used only by other norms is not a reason to stop
        in_norms = {n for norm in candidates for n in (*norm.inner, norm.root)}
        for norm in candidates:
            leaked = [n for n in norm.inner if n not in (norm.root, norm.x) and any(u not in in_norms for u in n.users)]
            if leaked:
                reasons.append(f"{leaked[0].name}: intermediate of the norm at {norm.root.name} is used elsewhere")
            else:
                _fuse_norm(rw, norm)
        if self.fuse_residual_add:
            for node in list(gm.graph.nodes):
                if node.target in _RESIDUAL and (why := _fuse_residual(rw, node)):
                    reasons.append(why)
        fused = {k: v for k, v in rw.counts.items() if k.endswith("norm")}
        stats = dict(rw.counts)
        rw.finish()
        return PassResult(gm, bool(fused), stats, reasons)

