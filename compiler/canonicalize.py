"""Canonical forms, so that patterns name one spelling of each computation.

Every rule is exact or exact up to float rounding, and local:

    to(x, x.dtype)                         => x                      (no-op cast)
    clone(x), no memory_format             => x                      (captured graphs are functional)
    dropout(x, p, train=False)             => x
    f(a..) , f(a..)                        => one node                (CSE of pure ops)
    square(x), mul(x, x)                   => pow(x, 2)
    pow(v, 0.5)                            => sqrt(v)
    pow(v, -0.5), reciprocal(sqrt(v))      => rsqrt(v)
    div(a, sqrt(v))                        => mul(a, rsqrt(v))
    div(sum(x, dims, k), N), N = |dims|    => mean(x, dims, k)
    mul(a, reciprocal(b))                  => div(a, b)
    mul(mul(k, a), b), k a constant        => mul(mul(a, b), k)      (constant factors applied last)
    mul(x, 1), div(x, 1), add(x, 0)        => x                      (when dtype and shape are unchanged)
    _assert_tensor_metadata(x, ...)        => (dropped: node.meta["val"] already records the dtype)
    var(x, dims, correction=0, keepdim)    => mean(pow(x - mean(x, dims, True), 2), dims, keepdim)
    var_mean(x, dims, correction=0, k)     => (that variance, mean(x, dims, k))
    std(x, dims, correction=0, keepdim)    => sqrt(that variance)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from .pattern import CAST_TARGETS, node_args
from .rewrite import Rewriter, is_impure

aten = torch.ops.aten
log = logging.getLogger(__name__)
Rule = Callable[[fx.Node, Rewriter], bool]


def _val(n):
    return n.meta.get("val") if isinstance(n, fx.Node) else None


def drop_noop_cast(n: fx.Node, rw: Rewriter) -> bool:
    if n.target not in CAST_TARGETS:
        return False
    src, out = _val(n.args[0]), _val(n)
    if not (isinstance(src, torch.Tensor) and isinstance(out, torch.Tensor)):
        return False
    if src.dtype != out.dtype or src.device != out.device or n.kwargs.get("memory_format") is not None:
        return False
    rw.replace(n, n.args[0], "drop_noop_cast")
    return True


def drop_clone(n: fx.Node, rw: Rewriter) -> bool:
    if n.target == aten.clone.default and n.kwargs.get("memory_format") is None:  # strides preserved
        rw.replace(n, n.args[0], "drop_clone")
        return True
    return False


def drop_eval_dropout(n: fx.Node, rw: Rewriter) -> bool:
    if n.target in (aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default):
        x, p, train = node_args(n)[:3]
        if not train or p == 0:
            rw.replace(n, x, "drop_eval_dropout")
            return True
    return False


def pow_forms(n: fx.Node, rw: Rewriter) -> bool:
    t, a = n.target, n.args
    if not (isinstance(_val(n), torch.Tensor) and _val(n).is_floating_point()):
        return False
    if t == aten.square.default or (t == aten.mul.Tensor and a[0] is a[1] and isinstance(a[0], fx.Node)):
        rw.replace(n, rw.call(aten.pow.Tensor_Scalar, (a[0], 2.0), before=n, like=n), "square_to_pow")
        return True
    if t == aten.pow.Tensor_Scalar and a[1] in (0.5, -0.5):
        op = aten.sqrt.default if a[1] == 0.5 else aten.rsqrt.default
        rw.replace(n, rw.call(op, (a[0],), before=n, like=n), "pow_to_root")
        return True
    if t == aten.reciprocal.default and _is(a[0], aten.sqrt.default):
        rw.replace(n, rw.call(aten.rsqrt.default, (a[0].args[0],), before=n, like=n), "reciprocal_sqrt")
        return True
    if t == aten.div.Tensor and _is(a[1], aten.sqrt.default) and not n.kwargs:
        inv = rw.call(aten.rsqrt.default, (a[1].args[0],), before=n, like=a[1])
        rw.replace(n, rw.call(aten.mul.Tensor, (a[0], inv), before=n, like=n), "div_sqrt_to_mul_rsqrt")
        return True
    return False


def sum_div_to_mean(n: fx.Node, rw: Rewriter) -> bool:
    if n.target != aten.div.Tensor or n.kwargs or not _is(n.args[0], aten.sum.dim_IntList):
        return False
    total, count = n.args
    x, dims, keepdim = node_args(total)[:3]
    vx = _val(x)
    if not (isinstance(vx, torch.Tensor) and vx.is_floating_point()) or not dims or isinstance(count, bool) \
            or not isinstance(count, (int, float)):
        return False
    reduced = [vx.shape[d] for d in dims]
    if not all(is_concrete_int(s) for s in reduced):  # a dynamic reduced dim: the count is not a constant
        return False
    size = math.prod(int(s) for s in reduced)
    if size != count or total.kwargs.get("dtype") is not None:
        return False
    rw.replace(n, rw.call(aten.mean.dim, (x, list(dims), keepdim), before=n, like=n), "sum_div_to_mean")
    return True


_MOMENTS = {aten.var.correction: "var", aten.var.dim: "var", aten.var_mean.correction: "var_mean",
            aten.var_mean.dim: "var_mean", aten.std.correction: "std", aten.std.dim: "std"}


def moment_correction(n: fx.Node) -> float:
    """The Bessel correction of a var/std/var_mean node (1 = unbiased, 0 = population)."""
    names = [a.name for a in n.target._schema.arguments]
    args = dict(zip(names, node_args(n)))
    if "unbiased" in args:
        return 1 if args["unbiased"] in (True, None) else 0
    return 1 if args.get("correction") is None else args["correction"]


def population_moments(n: fx.Node, rw: Rewriter) -> bool:
    kind = _MOMENTS.get(n.target)
    if kind is None:
        return False
    args = dict(zip([a.name for a in n.target._schema.arguments], node_args(n)))
    x, dims, keepdim = args["self"], args["dim"], bool(args["keepdim"])
    if moment_correction(n) != 0 or not dims:
        return False  # the unbiased estimator is a different function; left for passes to report
    if _val(x).dtype not in (torch.float32, torch.float64):
        return False  # torch accumulates half-precision moments in fp32; the decomposition would overflow
    dims = list(dims)
    mean_k = rw.call(aten.mean.dim, (x, dims, True), before=n, like=n)
    centered = rw.call(aten.sub.Tensor, (x, mean_k), before=n, like=n)
    sq = rw.call(aten.pow.Tensor_Scalar, (centered, 2.0), before=n, like=n)
    var = rw.call(aten.mean.dim, (sq, dims, keepdim), before=n, like=n)
    if kind == "var":
        rw.replace(n, var, "population_var")
    elif kind == "std":
        rw.replace(n, rw.call(aten.sqrt.default, (var,), before=n, like=n), "population_std")
    else:
        mean = mean_k if keepdim else rw.call(aten.mean.dim, (x, dims, False), before=n, like=n)
        for user in list(n.users):
            if user.target.__name__ == "getitem":
                rw.replace(user, (var, mean)[user.args[1]])
        rw.counts["population_var_mean"] += 1
    return True


_NOT_CSE = ("rand", "dropout", "bernoulli", "normal", "empty", "uniform", "multinomial", "assert", "sym_")


def cse(graph: fx.Graph, rw: Rewriter) -> None:
    seen: dict = {}
    for n in list(graph.nodes):
        if n.op != "call_function":
            continue
        if not isinstance(n.target, torch._ops.OpOverload):
            continue
        schema = n.target._schema
        if schema.is_mutable or any(w in schema.name for w in _NOT_CSE):
            continue
        try:
            key = (n.target, _key(n.args), _key(n.kwargs))
            hash(key)
        except TypeError:
            continue
        if key in seen and _same_meta(seen[key], n):
            rw.replace(n, seen[key], "cse")
        else:
            seen[key] = n


def _key(a):
    if isinstance(a, (list, tuple)):
        return tuple(_key(x) for x in a)
    if isinstance(a, dict):
        return tuple(sorted((k, _key(v)) for k, v in a.items()))
    if isinstance(a, torch.Tensor):
        raise TypeError
    return (type(a), a) if isinstance(a, (bool, int, float, complex)) else a


def _same_meta(a: fx.Node, b: fx.Node) -> bool:
    va, vb = _val(a), _val(b)
    if isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor):
        return va.dtype == vb.dtype and va.device == vb.device
    return type(va) is type(vb)


def _is(a, target) -> bool:
    return isinstance(a, fx.Node) and a.op == "call_function" and a.target == target


DEFAULT_RULES: tuple[Rule, ...] = (drop_noop_cast, drop_clone, drop_eval_dropout, population_moments, pow_forms,
                                   sum_div_to_mean)


def canonicalize(rw: Rewriter, rules: tuple[Rule, ...] | None = None, max_rounds: int = 32) -> None:
    """Apply `rules` to a fixed point, with CSE between sweeps. Every sweep leaves a correct graph, so after
    `max_rounds` sweeps it stops where it is (logged): matching then sees a partly canonical graph."""
    graph, rules = rw.graph, DEFAULT_RULES if rules is None else rules
    for _ in range(max_rounds):
        before = sum(rw.counts.values())
        cse(graph, rw)
        for n in list(graph.nodes):
            if n.op == "call_function" and (n.users or n.target == aten._assert_tensor_metadata.default):
                for rule in rules:
                    if rule(n, rw):
                        break
        graph.eliminate_dead_code(is_impure_node=is_impure)
        if sum(rw.counts.values()) == before:
            return
    log.warning("canonicalization stopped after %d sweeps without reaching a fixed point", max_rounds)


def mul_reciprocal_to_div(n: fx.Node, rw: Rewriter) -> bool:
    """mul(a, reciprocal(b)) => div(a, b)"""
    if n.target != aten.mul.Tensor:
        return False
    for a, b in ((n.args[0], n.args[1]), (n.args[1], n.args[0])):
        if _is(b, aten.reciprocal.default) and not _is(b.args[0], aten.sqrt.default):
            rw.replace(n, rw.call(aten.div.Tensor, (a, b.args[0]), before=n, like=n), "mul_reciprocal_to_div")
            return True
    return False


def is_constant(n) -> bool:
    return isinstance(n, fx.Node) and (n.op == "get_attr" or (n.target in CAST_TARGETS and is_constant(n.args[0])))


def constants_last(n: fx.Node, rw: Rewriter) -> bool:
    if n.target != aten.mul.Tensor or n.kwargs:
        return False
    for inner, other in ((n.args[0], n.args[1]), (n.args[1], n.args[0])):
        if not (_is(inner, aten.mul.Tensor) and len(inner.users) == 1 and isinstance(other, fx.Node)
                and not is_constant(other)):
            continue
        k, a = inner.args[:2]
        if not is_constant(k):
            k, a = a, k
        dtypes = {getattr(_val(t), "dtype", None) for t in (k, a, other)}
        if is_constant(k) and isinstance(a, fx.Node) and not is_constant(a) and len(dtypes) == 1:
            prod = rw.call(aten.mul.Tensor, (a, other), before=n, like=n)
            rw.replace(n, rw.call(aten.mul.Tensor, (prod, k), before=n, like=n), "constants_last")
            return True
    return False


_IDENTITY = {aten.mul.Tensor: 1, aten.div.Tensor: 1, aten.add.Tensor: 0, aten.sub.Tensor: 0}


def drop_identity_arithmetic(n: fx.Node, rw: Rewriter) -> bool:
    unit = _IDENTITY.get(n.target)
    if unit is None or n.kwargs or len(n.args) != 2:
        return False
    x, c = n.args
    if n.target in (aten.mul.Tensor, aten.add.Tensor) and not isinstance(x, fx.Node):
        x, c = c, x
    if isinstance(c, bool) or not isinstance(c, (int, float)) or c != unit or not isinstance(x, fx.Node):
        return False
    vx, vn = _val(x), _val(n)
    if not (isinstance(vx, torch.Tensor) and vx.dtype == vn.dtype and vx.shape == vn.shape):
        return False
    rw.replace(n, x, "drop_identity_arithmetic")
    return True


def drop_metadata_assert(n: fx.Node, rw: Rewriter) -> bool:
    if n.target == aten._assert_tensor_metadata.default:
        rw.graph.erase_node(n)
        rw.counts["drop_metadata_assert"] += 1
        return True
    return False


DEFAULT_RULES = (drop_metadata_assert, drop_identity_arithmetic) + DEFAULT_RULES + (mul_reciprocal_to_div,
                                                                                 constants_last)


def canonicalize_graph(gm: fx.GraphModule) -> dict[str, int]:
    """Canonicalize `gm` in place (its graph; parameters untouched) and return the count per rule.

    This is the entry point the pipeline runs as its own reported step; passes match on its output."""
    rw = Rewriter(gm, "canonicalize")
    canonicalize(rw)
    rw.finish()
    return {k: v for k, v in sorted(rw.counts.items()) if v}
