"""Canonical forms, so that patterns name one spelling of each computation. Each rule is data (compiler/rules.py),
exact or exact up to float rounding, and local:

    _assert_tensor_metadata(x, ...)        => (dropped: node.meta["val"] already records the dtype)
    mul(x, 1), div(x, 1), add(x, 0), sub(x, 0) => x                  (when dtype and shape are unchanged)
    to(x, x.dtype)                         => x                      (no-op cast)
    clone(x), no memory_format             => x                      (captured graphs are functional)
    dropout(x, p, train=False)             => x
    mean/sum/amax/var(x, dims)             => the same over sorted non-negative dims
    var(x, dims, unbiased=False)           => var(x, dims, correction=0)
    var_mean(x, dims, correction=c, k)     => (var(x, dims, correction=c, k), mean(x, dims, k))
    std(x, dims, correction=0, k)          => sqrt(var(x, dims, correction=0, k))
    mean(pow(x - mean(x, dims), 2), dims)  => var(x, dims, correction=0)   (population variance, any dtype)
    square(x), mul(x, x)                   => pow(x, 2)
    pow(v, 0.5) ; pow(v, -0.5)             => sqrt(v) ; rsqrt(v)
    reciprocal(sqrt(v))                    => rsqrt(v)
    div(a, sqrt(v))                        => mul(a, rsqrt(v))
    div(sum(x, dims, k), N), N = |dims|    => mean(x, dims, k)
    div(sum(x, [d], k), y.size(d))         => mean(x, [d], k)       (a dynamic reduced dim, y.size(d) == x.size(d))
    mul(a, reciprocal(b))                  => div(a, b)
    mul(mul(k, a), b), k a constant        => mul(mul(a, b), k)      (constant factors applied last)
    f(a..), f(a..)                         => one node                (CSE of pure ops, between sweeps)

Population variance is kept as `aten.var` with correction 0: torch accumulates it in fp32 for fp16/bf16 inputs,
where the squared deviations written out would overflow.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import operator

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import is_concrete_int, statically_known_true

from .pattern import CAST_TARGETS, Const, Op, Var, is_call, node_args
from .rewrite import Rewriter, get_attr
from .rules import Rule, apply_rules

aten = torch.ops.aten
log = logging.getLogger(__name__)


def _val(n):
    return n.meta.get("val") if isinstance(n, fx.Node) else None


def arg(node: fx.Node, name: str):
    """An argument of `node` by its schema name (keywords and defaults folded in)."""
    names = [a.name for a in node.target._schema.arguments]
    return dict(zip(names, node_args(node))).get(name)


def _call(rw: Rewriter, m, target, *args):
    return rw.call(target, args, before=m.root, like=m.root)


def is_constant(n) -> bool:
    return isinstance(n, fx.Node) and (n.op == "get_attr" or (n.target in CAST_TARGETS and is_constant(n.args[0])))


def _is_float(v) -> bool:
    return isinstance(v, torch.Tensor) and v.is_floating_point()


# -- no-ops ------------------------------------------------------------------------------------------------
def _unchanged(m) -> str | None:
    vx, vn = _val(m["x"]), _val(m.root)
    ok = isinstance(vx, torch.Tensor) and isinstance(vn, torch.Tensor) and vx.dtype == vn.dtype \
        and vx.shape == vn.shape and vx.device == vn.device
    return None if ok else "changes dtype, shape or device"


def _unit(u):
    return lambda v, m: isinstance(v, (int, float)) and not isinstance(v, bool) and v == u


def _noop_cast(m) -> str | None:
    return _unchanged(m) or ("sets a memory format" if arg(m.root, "memory_format") is not None else None)


def _eval_dropout(m) -> str | None:
    return None if not m["train"] or m["p"] == 0 else "dropout in training mode"


_DROPOUTS = (aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default)
_X = Var("x")
NOOPS = (
    Rule("_assert_tensor_metadata(x) => ()", Op(aten._assert_tensor_metadata.default, _X), lambda rw, m: None),
    Rule("x * 1 => x", Op(aten.mul.Tensor, _X, Const("one", _unit(1)), commutative=True), lambda rw, m: m["x"],
         _unchanged),
    Rule("x / 1 => x", Op(aten.div.Tensor, _X, Const("one", _unit(1))), lambda rw, m: m["x"], _unchanged),
    Rule("x + 0 => x", Op(aten.add.Tensor, _X, Const("zero", _unit(0)), commutative=True), lambda rw, m: m["x"],
         _unchanged),
    Rule("x - 0 => x", Op(aten.sub.Tensor, _X, Const("zero", _unit(0))), lambda rw, m: m["x"], _unchanged),
    Rule("to(x, x.dtype) => x", Op(CAST_TARGETS, _X), lambda rw, m: m["x"], _noop_cast),
    Rule("type_as(x, y) => x (y of x's dtype)", Op(aten.type_as.default, _X, Var("like")), lambda rw, m: m["x"],
         _unchanged),
    Rule("clone(x) => x", Op(aten.clone.default, _X, None), lambda rw, m: m["x"]),
    Rule("dropout(x, p, train=False) => x", Op(_DROPOUTS, _X, Var("p"), Var("train")), lambda rw, m: m["x"],
         _eval_dropout),
)


# -- reductions and moments ----------------------------------------------------------------------------------
_REDUCTIONS = (aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.var.correction, aten.var.dim,
               aten.std.correction, aten.std.dim)


def _normal_dims(m) -> list[int] | None:
    dims, ndim = m["dims"], _val(m["x"]).dim() if isinstance(_val(m["x"]), torch.Tensor) else None
    if ndim is None or not isinstance(dims, (list, tuple)) or not dims or not all(isinstance(d, int) for d in dims):
        return None
    normal = sorted({d % ndim for d in dims}) if ndim else list(dims)
    return None if normal == list(dims) else normal


def _renormalize(rw, m):
    args = list(m.root.args)
    args[1] = _normal_dims(m)
    return rw.call(m.root.target, tuple(args), dict(m.root.kwargs), before=m.root, like=m.root)


def _moment_args(n: fx.Node) -> tuple:
    """(x, dims, correction, keepdim) of a var/std/var_mean node in any overload."""
    args = dict(zip([a.name for a in n.target._schema.arguments], node_args(n)))
    if "unbiased" in args:
        correction = 1 if args["unbiased"] in (True, None) else 0
    else:
        correction = 1 if args.get("correction") is None else args["correction"]
    return args["self"], list(args["dim"] or []), correction, bool(args["keepdim"])


def moment_correction(n: fx.Node) -> float:
    """The Bessel correction of a var/std/var_mean node (1 = unbiased, 0 = population)."""
    return _moment_args(n)[2]


def _var(rw, m, keepdim=None):
    x, dims, c, k = _moment_args(m.root)
    return rw.call(aten.var.correction, (x, dims), {"correction": c, "keepdim": k if keepdim is None else keepdim},
                   before=m.root, like=m.root)


def _has_dims(m) -> str | None:
    return None if _moment_args(m.root)[1] else "a moment over all dims"


def _var_mean(rw, m):
    x, dims, _, keepdim = _moment_args(m.root)
    return _var(rw, m), _call(rw, m, aten.mean.dim, x, dims, keepdim)


def _std(rw, m):
    return _call(rw, m, aten.sqrt.default, _var(rw, m))


def _population(m) -> str | None:
    return _has_dims(m) or (None if _moment_args(m.root)[2] == 0 else "unbiased")


_CENTERED = Op(aten.sub.Tensor, _X, Op(aten.mean.dim, _X, Var("dims"), True, None), 1)
MOMENTS = (
    Rule("var(x, unbiased) => var(x, correction)", Op(aten.var.dim, _X), _var, _has_dims),
    Rule("var_mean(x) => (var(x), mean(x))", Op((aten.var_mean.correction, aten.var_mean.dim), _X), _var_mean,
         _has_dims),
    Rule("std(x, correction=0) => sqrt(var(x))", Op((aten.std.correction, aten.std.dim), _X), _std, _population),
    Rule("mean((x - mean(x))², dims) => var(x, dims, correction=0)",
         Op(aten.mean.dim, Op(aten.pow.Tensor_Scalar, _CENTERED, 2.0, users=1), Var("dims"), Var("keepdim"), None),
         lambda rw, m: rw.call(aten.var.correction, (m["x"], list(m["dims"])),
                               {"correction": 0, "keepdim": m["keepdim"]}, before=m.root, like=m.root)),
    Rule("reduce(x, dims) => reduce(x, sorted non-negative dims)", Op(_REDUCTIONS, _X, Var("dims")), _renormalize,
         lambda m: None if _normal_dims(m) else "already normal"),
)


# -- roots and powers ---------------------------------------------------------------------------------------
def _float_out(m) -> str | None:
    return None if _is_float(_val(m.root)) else "not a floating-point value"


def _sum_count(m) -> str | None:
    x, dims, n = m["x"], m["dims"], m["n"]
    vx = _val(x)
    if not _is_float(vx) or not dims or m.get("dtype") is not None:
        return "not a float sum over given dims"
    reduced = [vx.shape[d] for d in dims]
    if not all(is_concrete_int(s) for s in reduced):
        return "a dynamic reduced dim: the count is not a constant"
    return None if math.prod(int(s) for s in reduced) == n else "divides by something else than the count"


def _sum_over_size(m) -> str | None:
    vx = _val(m["x"])
    if not _is_float(vx) or m.get("dtype") is not None:
        return "not a float sum"
    vy, d = _val(m["y"]), m["d"]
    if not isinstance(vy, torch.Tensor) or [d % vy.dim()] != [e % vx.dim() for e in m["dims"]]:
        return "divides by another dim's size"
    same = statically_known_true(vy.shape[d] == vx.shape[d % vx.dim()])
    return None if same else "divides by the size of another tensor's dim"


def _count(n):
    """A divisor built from sizes as a (symbolic) int: constants, x.size(d) and their products; None otherwise."""
    if isinstance(n, int) and not isinstance(n, bool):
        return n
    if is_call(n, [aten.sym_size.int]) and isinstance(_val(n.args[0]), torch.Tensor):
        return _val(n.args[0]).shape[n.args[1]]
    if isinstance(n, fx.Node) and n.op == "call_function" and n.target is operator.mul:
        a, b = (_count(x) for x in n.args[:2])
        return None if a is None or b is None else a * b
    return None


def _sum_over_sizes(m) -> str | None:
    vx, n = _val(m["x"]), _count(m["n"])
    if not _is_float(vx) or m.get("dtype") is not None or not m["dims"]:
        return "not a float sum over given dims"
    if n is None:
        return "divides by something other than a product of sizes"
    count = math.prod(vx.shape[d] for d in m["dims"])
    return None if statically_known_true(n == count) else "divides by something else than the count"


def _constants_last(m) -> str | None:
    k, a, b = m["k"], m["a"], m["b"]
    if not is_constant(k) or is_constant(a) or not isinstance(a, fx.Node) or is_constant(b):
        return "no constant factor to move"
    return None if len({getattr(_val(t), "dtype", None) for t in (k, a, b)}) == 1 else "mixed dtypes"


_SQRT = Op(aten.sqrt.default, Var("v"))
ARITHMETIC = (
    Rule("square(x) => pow(x, 2)", Op(aten.square.default, _X),
         lambda rw, m: _call(rw, m, aten.pow.Tensor_Scalar, m["x"], 2.0), _float_out),
    Rule("x * x => pow(x, 2)", Op(aten.mul.Tensor, _X, _X),
         lambda rw, m: _call(rw, m, aten.pow.Tensor_Scalar, m["x"], 2.0), _float_out),
    Rule("pow(v, 0.5) => sqrt(v)", Op(aten.pow.Tensor_Scalar, _X, 0.5),
         lambda rw, m: _call(rw, m, aten.sqrt.default, m["x"]), _float_out),
    Rule("pow(v, -0.5) => rsqrt(v)", Op(aten.pow.Tensor_Scalar, _X, -0.5),
         lambda rw, m: _call(rw, m, aten.rsqrt.default, m["x"]), _float_out),
    Rule("reciprocal(sqrt(v)) => rsqrt(v)", Op(aten.reciprocal.default, _SQRT),
         lambda rw, m: _call(rw, m, aten.rsqrt.default, m["v"])),
    Rule("a / sqrt(v) => a * rsqrt(v)", Op(aten.div.Tensor, Var("a"), _SQRT),
         lambda rw, m: _call(rw, m, aten.mul.Tensor, m["a"], _call(rw, m, aten.rsqrt.default, m["v"])), _float_out),
    Rule("sum(x, dims) / |dims| => mean(x, dims)",
         Op(aten.div.Tensor, Op(aten.sum.dim_IntList, _X, Var("dims"), Var("keepdim"), Var("dtype")),
            Const("n")),
         lambda rw, m: _call(rw, m, aten.mean.dim, m["x"], list(m["dims"]), m["keepdim"]), _sum_count),
    Rule("sum(x, [d]) / x.size(d) => mean(x, [d])",
         Op(aten.div.Tensor, Op(aten.sum.dim_IntList, _X, Var("dims"), Var("keepdim"), Var("dtype")),
            Op(aten.sym_size.int, Var("y"), Var("d"))),
         lambda rw, m: _call(rw, m, aten.mean.dim, m["x"], list(m["dims"]), m["keepdim"]), _sum_over_size),
    Rule("sum(x, dims) / (x.size(d1) * x.size(d2) ...) => mean(x, dims)",
         Op(aten.div.Tensor, Op(aten.sum.dim_IntList, _X, Var("dims"), Var("keepdim"), Var("dtype")),
            Op(operator.mul, Var("a"), Var("b"), name="n")),
         lambda rw, m: _call(rw, m, aten.mean.dim, m["x"], list(m["dims"]), m["keepdim"]), _sum_over_sizes),
    Rule("a * reciprocal(b) => a / b",
         Op(aten.mul.Tensor, Var("a"), Op(aten.reciprocal.default, Var("b")), commutative=True),
         lambda rw, m: _call(rw, m, aten.div.Tensor, m["a"], m["b"]),
         lambda m: "reciprocal of a sqrt (rsqrt form)" if is_call(m["b"], [aten.sqrt.default]) else None),
    Rule("(k * a) * b => (a * b) * k",
         Op(aten.mul.Tensor, Op(aten.mul.Tensor, Var("k"), Var("a"), users=1, commutative=True), Var("b"),
            commutative=True),
         lambda rw, m: _call(rw, m, aten.mul.Tensor, _call(rw, m, aten.mul.Tensor, m["a"], m["b"]), m["k"]),
         _constants_last),
)

# canonical rewrites are valid whatever else reads their inner nodes (those stay; the rule that cares says users=)
RULES: tuple[Rule, ...] = tuple(dataclasses.replace(r, exclusive=False) for r in NOOPS + MOMENTS + ARITHMETIC)

_NOT_CSE = ("rand", "dropout", "bernoulli", "normal", "empty", "uniform", "multinomial", "assert", "sym_")


def cse(rw: Rewriter) -> int:
    """Merge identical pure op nodes (same target, arguments and dtype); returns how many were merged."""
    seen: dict = {}
    merged = 0
    for n in list(rw.graph.nodes):
        if n.op != "call_function" or not isinstance(n.target, torch._ops.OpOverload):
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
            rw.replace(n, seen[key], "f(a..), f(a..) => one node")
            rw.graph.erase_node(n)
            merged += 1
        else:
            seen[key] = n
    return merged


FOLD_MAX_NUMEL = 1 << 16


def fold_constants(rw: Rewriter) -> int:
    """Replace each vector computed from parameters alone (Gemma's RMSNorm weight `1 + w`, a weight cast to fp32)
    by a new constant holding its value, computed by the same op on the same tensors; returns how many. Buffers
    (forward may update them: a counter, a cache) and parameters the graph writes are not constants here. Only
    results of at most one dimension: a matrix stays as the graph computes it, so every linear keeps its own
    parameter (and name)."""
    params = {name for name, _ in rw.gm.named_parameters(remove_duplicate=False)}
    written = {a.target for n in rw.graph.nodes if n.op == "call_function"
               and isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable
               for a in n.all_input_nodes if a.op == "get_attr"}
    values: dict[fx.Node, torch.Tensor] = {}
    folded = 0
    for n in list(rw.graph.nodes):
        if n.op == "get_attr":  # parameters only, and none the graph writes: a buffer may be state (a counter)
            v = get_attr(rw.gm, n.target)
            if isinstance(v, torch.Tensor) and n.target in params and n.target not in written:
                values[n] = v
            continue
        if n.op != "call_function" or not isinstance(n.target, torch._ops.OpOverload):
            continue
        schema = n.target._schema
        inputs = n.all_input_nodes
        if schema.is_mutable or any(w in schema.name for w in _NOT_CSE) or not inputs \
                or not all(i in values for i in inputs):
            continue
        try:
            with torch.no_grad():
                out = n.target(*fx.node.map_arg(n.args, values.__getitem__),
                               **fx.node.map_arg(n.kwargs, values.__getitem__))
        except Exception:  # noqa: BLE001 - what cannot be evaluated here stays in the graph
            continue
        if not isinstance(out, torch.Tensor):
            continue
        values[n] = out
        # fold where the constant part ends: at a vector read by something that is not itself all constant
        if out.dim() <= 1 and out.numel() <= FOLD_MAX_NUMEL and any(
                u.op == "output" or not all(i in values or i is n for i in u.all_input_nodes) for u in n.users):
            const = rw.constant(f"{n.name}_folded", out.detach().clone(), before=n)
            rw.replace(n, const, "f(constants) => constant")
            rw.graph.erase_node(n)
            values[const] = out
            folded += 1
    return folded


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


def canonicalize(rw: Rewriter, rules: tuple[Rule, ...] = RULES, max_rounds: int = 16) -> None:
    """Apply `rules` to a fixed point, with CSE between rounds. Every round leaves a correct graph, so after
    `max_rounds` it stops where it is (logged): matching then sees a partly canonical graph."""
    for _ in range(max_rounds):
        merged = cse(rw) + fold_constants(rw)
        if not apply_rules(rw, rules).changed and not merged:
            return
    log.warning("canonicalization stopped after %d rounds without reaching a fixed point", max_rounds)


def canonicalize_graph(gm: fx.GraphModule) -> dict[str, int]:
    """Canonicalize `gm` in place (its graph; parameters untouched) and return the count per rule.

    This is the entry point the pipeline runs as its own reported step; passes match on its output."""
    rw = Rewriter(gm, "canonicalize")
    canonicalize(rw)
    rw.finish()
    return {k: v for k, v in sorted(rw.counts.items()) if v}

