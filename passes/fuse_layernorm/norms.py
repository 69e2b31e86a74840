"""The norm patterns of fuse_layernorm: LayerNorm and RMSNorm cores with optional affine tails, their checks
and builders, and the known near-misses (eps outside the root)."""

from __future__ import annotations

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from fxopt import ops
from fxopt.canonicalize import is_constant
from fxopt.pattern import AnyOf, Cast, Const, Op, Var, is_cast, node_args
from fxopt.rewrite import Rewriter, fake_mode_of

aten = torch.ops.aten


def _val(n):
    return n.meta.get("val") if isinstance(n, fx.Node) else None


def _population(var: fx.Node, m) -> str | None:
    c = node_args(var)[2]
    return None if c == 0 else f"unbiased variance (correction={c}) is not LayerNorm's population variance"


def _affine(role: str):
    """γ/β: a constant of the normalized shape (leading 1s allowed), in x's dtype for LayerNorm."""
    def check(v, m) -> str | None:
        if not is_constant(v):
            return f"{role} is not a constant"
        shape, normalized = list(_val(v).shape), list(_val(m["x"]).shape[min(m["dims"]):])
        if shape[len(shape) - len(normalized):] != normalized or any(s != 1 for s in shape[:-len(normalized)]):
            return f"{role} has shape {shape}, not the normalized shape {normalized}"
        if "centered" in m and _val(v).dtype != _val(m["x"]).dtype:
            return f"{role} dtype {_val(v).dtype} differs from the input's {_val(m['x']).dtype}"
        return None
    return check


_X, _DIMS, _EPS = Var("x"), Var("dims"), Const("eps")
_CENTERED = Op(aten.sub.Tensor, _X, Op(aten.mean.dim, _X, _DIMS, True, None), 1, name="centered")
_VAR = Op(aten.var.correction, _X, _DIMS, Var("correction"), True, where=_population, label="population variance")


def _inv_root(stat):
    return Op(aten.rsqrt.default, Op((aten.add.Tensor, aten.add.Scalar), stat, _EPS, 1, commutative=True))


def _ln_core(users=None):
    return Op(aten.mul.Tensor, _CENTERED, _inv_root(_VAR), commutative=True, users=users, name="core")


def _rms_core(users=None):
    # Llama casts x to fp32 for both the statistics and the product; T5 only for the statistics
    square_mean = Op(aten.mean.dim, Op(aten.pow.Tensor_Scalar, Cast(_X, name="x_pow"), 2.0), _DIMS, True, None)
    return Op(aten.mul.Tensor, Cast(_X, name="x_mul"), _inv_root(square_mean), commutative=True, users=users,
              name="core")


def _with_affine(core, bias: bool):
    """core [cast back] [* γ] [+ β], longest first; γ/β that do not fit leave the core to be fused alone."""
    weighted = Op(aten.mul.Tensor, Cast(core(1), name="core_out"), Var("weight", _affine("γ")), commutative=True,
                  users=1 if bias else None)
    alts = [weighted, Cast(core(), name="core_out")]
    if bias:
        beta = Var("bias", _affine("β"))
        alts[:0] = [Op(aten.add.Tensor, weighted, beta, 1, commutative=True),
                    Op(aten.add.Tensor, Cast(core(1), name="core_out"), beta, 1, commutative=True)]
    return AnyOf(*alts)


LAYER_NORM = _with_affine(_ln_core, bias=True)
RMS_NORM = _with_affine(_rms_core, bias=False)
_SIGMA = AnyOf(Op(aten.sqrt.default, Op((aten.var.correction, aten.var.dim), _X)),
               Op((aten.std.correction, aten.std.dim), _X))
EPS_OUTSIDE_LN = Op(aten.div.Tensor, _CENTERED, Op(aten.add.Tensor, _SIGMA, _EPS, commutative=True))
EPS_OUTSIDE_RMS = Op(aten.div.Tensor, _X, Op(aten.add.Tensor, Op(aten.sqrt.default, Op(
    aten.mean.dim, Op(aten.pow.Tensor_Scalar, _X, 2.0), _DIMS, True)), _EPS, commutative=True))


def _normalized_shape(m) -> list:
    x = _val(m["x"])
    return [int(s) if is_concrete_int(s) else s for s in x.shape[min(m["dims"]):]]


def _rms_input(m) -> fx.Node:
    """x, or the widening cast of x when the statistics and product are wide and the result is not cast back."""
    cast_back = is_cast(m["core_out"]) and _val(m["core_out"]).dtype == _val(m["x"]).dtype
    return m["x"] if not is_cast(m["x_pow"]) or cast_back else m["x_pow"]


def _fused_args(m, op) -> tuple:
    if op is aten.layer_norm.default:
        return m["x"], _normalized_shape(m), m.get("weight"), m.get("bias"), float(m["eps"])
    return _rms_input(m), _normalized_shape(m), m.get("weight"), float(m["eps"])


def check_norm(m, op) -> str | None:
    x, dims = _val(m["x"]), list(m["dims"])
    if dims != list(range(x.dim() - len(dims), x.dim())):
        return f"reduction over dims {dims} of a {x.dim()}-d input, not over its trailing dims"
    if op is ops.rms_norm and (why := _check_rms_precision(m)):
        return why
    args = [_val(a) if isinstance(a, fx.Node) else a for a in _fused_args(m, op)]
    with fake_mode_of(m.root.graph.owning_module):
        args[2:-1] = [p if p is None else p.reshape(args[1]) for p in args[2:-1]]  # γ/β as the op gets them
        fresh = op(*args)
    old = _val(m.root)
    if fresh.dtype != old.dtype or (old.dim() > 1 and fresh.stride() != old.stride()):
        return (f"the fused op would return {fresh.dtype} with strides {tuple(fresh.stride())} where the norm "
                f"gives {old.dtype} with strides {tuple(old.stride())} (a later view may rely on that layout)")
    return None


def _widens(cast: fx.Node) -> bool:
    src, dst = _val(cast.args[0]), _val(cast)
    return src.is_floating_point() and dst.is_floating_point() and dst.dtype.itemsize > src.dtype.itemsize


def _check_rms_precision(m) -> str | None:
    x_pow, x_mul, x = m["x_pow"], m["x_mul"], _val(m["x"]).dtype
    if is_cast(x_pow):
        # x * r with x narrow and r wide is computed in the wide type (T5): what matters is the product's dtype
        if not _widens(x_pow) or _val(m["core"]).dtype != _val(x_pow).dtype:
            return f"the cast {x_pow.name} before the statistics narrows or disagrees with the product's"
    elif is_cast(x_mul):
        return "statistics in x's own precision, product in a wider one"
    elif x in (torch.float16, torch.bfloat16) and _val(m.root).dtype != x:
        return (f"RMSNorm statistics in {x} with a {_val(m.root).dtype} output: the fused op's fp32 statistics "
                f"would differ by more than that output's rounding")
    return None


def rewrite_norm(op):
    def rewrite(rw: Rewriter, m) -> fx.Node:
        args = _fused_args(m, op)
        x, shape, weight, eps = args[0], args[1], args[2], args[-1]
        bias = args[3] if op is aten.layer_norm.default else None
        first = _val(x).dim() - len(shape)
        shape = [s if isinstance(s, int) else rw.call(aten.sym_size.int, (x, first + i), before=m.root)
                 for i, s in enumerate(shape)]
        weight, bias = (p if p is None or list(_val(p).shape) == list(_val(x).shape[first:]) else
                        rw.call(aten.view.default, (p, shape), before=m.root) for p in (weight, bias))
        args = (x, shape, weight, bias, eps) if op is aten.layer_norm.default else (x, shape, weight, eps)
        return rw.call(op, args, before=m.root, like=m.root)
    return rewrite
