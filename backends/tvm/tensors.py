"""Tensor ops whose importer conversion fails or is missing: arithmetic in the result's dtype (true division of
integers, ``bool * 1.0``), ``clamp`` of integers with one bound, ``repeat`` by a symbolic count, ``any``,
``histc``.

* ``a / b`` on integer tensors is a float in torch; the importer divides in the integer dtype (so a following
  ``log`` is refused), ``a // 2`` on int64 meets an int32 constant, and ``bool_tensor * 1.0`` stays bool.
  Here both operands of ``+ - * /`` are cast to the dtype torch computed (``meta["val"]``) first.
* ``clamp(i, min=1)`` on an integer tensor: the importer clips to ``[1, inf]`` and the build cannot cast inf
  to an integer. Here: ``maximum``/``minimum`` with the bounds that are given (floats: the importer's).
* ``x.repeat(r_0, .., r_k)`` with a count that is a size of the input (``x.repeat(1, x.shape[1], 1)``): the
  importer's ``tile`` takes integers only. Here: ``x`` viewed as ``(1, d_0, 1, d_1, ..)``, broadcast to
  ``(r_0, d_0, r_1, d_1, ..)`` and flattened to ``(r_0·d_0, r_1·d_1, ..)`` — the same tiling, any count.
* ``empty_permuted`` (what ``torch.empty_like`` becomes) of a symbolic shape: the importer takes integers
  only. Here: zeros of the shape torch inferred (``meta["val"]``; an empty tensor's values are unspecified).
* ``any``/``all`` over all dims (``aten.any.default``): no translation; written as max/min over the values as
  int32, for every form (all dims, one, several).
* NaN: TVM's ``max``/``min`` (relu, clamp, maximum, amax) return the other operand where torch returns NaN, and
  its simplifier folds ``x != x`` to False. Here NaN is passed through (``where(isnan(x), x, ...)``) and
  ``x != x`` / ``x == x`` become ``isnan(x)`` / its negation.
* ``histc(x, bins, lo, hi)``: bin ``⌊(v − lo)·bins / (hi − lo)⌋`` of each ``v`` in ``[lo, hi]`` (``hi`` itself
  in the last bin), counted by comparing with ``arange(bins)``; ``lo = hi`` takes the data's min and max (and
  widens them by 1 where they are equal), as torch does.
"""

from __future__ import annotations

import operator
from typing import Any

from tvm import relax, tirx

from .convert import _symbols, _tir_of
from .relax_util import any_along, arg, cast, dtype_of, emit, shape_of


def _in_result_dtype(node: Any, imp: Any) -> list[relax.Expr] | None:
    """The two operands of a binary op cast to the dtype torch gave its result (None where that is unknown or an
    operand is neither a tensor nor a Python number, e.g. a size)."""
    val = node.meta.get("val")
    if not hasattr(val, "dtype"):
        return None
    dtype = str(val.dtype).removeprefix("torch.")
    operands = []
    for a in node.args[:2]:
        a = imp.env[a] if hasattr(a, "op") else a
        if isinstance(a, relax.Expr) and hasattr(a.ty, "dtype"):
            operands.append(cast(imp, a, dtype))
        elif isinstance(a, bool | int | float):
            operands.append(relax.const(float(a) if val.is_floating_point() else int(a), dtype))
        else:
            return None
    return operands


def arithmetic(op: Any, python_op: Any) -> Any:
    """``a + b``, ``a - b``, ``a * b`` (``alpha`` scaling ``b``) in the result's dtype: the importer keeps the
    first operand's (``bool_tensor * 1.0`` stayed bool and the build failed)."""

    def convert(node: Any, imp: Any) -> relax.Expr:
        operands = _in_result_dtype(node, imp)
        alpha = node.kwargs.get("alpha", 1)
        if operands is None or not isinstance(alpha, int | float):
            return type(imp)._binary_op(imp, op, python_op)(node)  # sizes (SymInt arithmetic): the importer's
        lhs, rhs = operands
        if alpha != 1:
            rhs = emit(imp, relax.op.multiply(rhs, relax.const(alpha, dtype_of(rhs))))
        return emit(imp, op(lhs, rhs))

    return convert


def divide(node: Any, imp: Any) -> relax.Expr:
    """``a / b`` and ``div(a, b, rounding_mode=...)`` computed in the dtype torch gave the result."""
    operands = _in_result_dtype(node, imp)
    if operands is None:
        return type(imp)._binary_op(imp, relax.op.divide, operator.truediv)(node)
    lhs, rhs = operands
    mode = node.kwargs.get("rounding_mode", node.args[2] if len(node.args) > 2 else None)
    if mode == "floor":
        return emit(imp, relax.op.floor_divide(lhs, rhs))
    quotient = emit(imp, relax.op.divide(lhs, rhs))  # integers: truncating, as C (and torch's "trunc")
    return emit(imp, relax.op.trunc(quotient)) if mode == "trunc" and node.meta["val"].is_floating_point() \
        else quotient


def _keeps_nan(imp: Any, x: relax.Expr, y: relax.Expr) -> relax.Expr:
    """`y` computed from `x` by max/min, with NaN where `x` is NaN (as torch has it)."""
    if "float" not in dtype_of(x):
        return y
    return emit(imp, relax.op.where(relax.op.isnan(x), cast(imp, x, dtype_of(y)), y))


def relu(node: Any, imp: Any) -> relax.Expr:
    x = imp.env[node.args[0]]
    return _keeps_nan(imp, x, emit(imp, relax.op.nn.relu(x)))


def maximum(node: Any, imp: Any) -> relax.Expr:
    operands = _in_result_dtype(node, imp)
    if operands is None:
        return type(imp)._binary_op(imp, relax.op.maximum, max)(node)
    a, b = operands
    op = relax.op.maximum if node.target._schema.name.endswith("maximum") else relax.op.minimum
    y = emit(imp, op(a, b))
    if "float" not in dtype_of(y):
        return y
    either = relax.op.logical_or(relax.op.isnan(a), relax.op.isnan(b))
    return emit(imp, relax.op.where(either, relax.op.add(a, b), y))  # a + b: NaN where either is


def self_compare(node: Any, imp: Any) -> relax.Expr:
    """``x != x`` is ``isnan(x)``, ``x == x`` its negation; other comparisons: the importer's."""
    a, b = node.args[:2]
    if a is not b or "float" not in dtype_of(imp.env[a]):
        name = node.target._schema.name.split("::")[-1]
        op = relax.op.not_equal if name == "ne" else relax.op.equal
        return type(imp)._binary_op(imp, op, operator.ne if name == "ne" else operator.eq)(node)
    nan = emit(imp, relax.op.isnan(imp.env[a]))
    return nan if node.target._schema.name.endswith("ne") else emit(imp, relax.op.logical_not(nan))


def clamp(node: Any, imp: Any) -> relax.Expr:
    x = imp.env[node.args[0]]
    low, high = arg(node, 1, "min"), arg(node, 2, "max")
    val = node.meta.get("val")
    same_dtype = val is not None and str(val.dtype).removeprefix("torch.") == dtype_of(x)
    if "int" not in dtype_of(x) or not same_dtype or not all(b is None or isinstance(b, int) for b in (low, high)):
        return _keeps_nan(imp, x, type(imp)._clamp(imp, node))
    for bound, op in ((low, relax.op.maximum), (high, relax.op.minimum)):
        if bound is not None:
            x = emit(imp, op(x, relax.const(int(bound), dtype_of(x))))
    return x


def empty(node: Any, imp: Any) -> relax.Expr:
    val = node.meta.get("val")
    shape = [_tir_of(d, _symbols(imp)) for d in val.shape] if val is not None else [None]
    if any(d is None for d in shape):
        return type(imp)._empty(imp, node)
    return emit(imp, relax.op.zeros(shape, str(val.dtype).removeprefix("torch.")))


def repeat(node: Any, imp: Any) -> relax.Expr:
    x = imp.env[node.args[0]]
    syms = _symbols(imp)
    counts = [_tir_of(r.meta["val"] if hasattr(r, "meta") else r, syms) for r in node.args[1]]
    if any(c is None for c in counts):
        return type(imp)._repeat(imp, node)
    dims = [tirx.IntImm("int64", 1)] * (len(counts) - len(shape_of(x))) + shape_of(x)
    interleaved = [v for d in dims for v in (tirx.IntImm("int64", 1), d)]
    spread = [v for c, d in zip(counts, dims) for v in (c, d)]
    x = emit(imp, relax.op.reshape(x, interleaved))
    x = emit(imp, relax.op.broadcast_to(x, spread))
    return emit(imp, relax.op.reshape(x, [c * d for c, d in zip(counts, dims)]))


def histc(node: Any, imp: Any) -> relax.Expr:
    x = imp.env[node.args[0]]
    bins, lo, hi = int(arg(node, 1, "bins", 100)), float(arg(node, 2, "min", 0)), float(arg(node, 3, "max", 0))
    dtype = dtype_of(x)
    flat = emit(imp, relax.op.reshape(x, [-1]))
    if lo == hi:  # the data's range
        low, high = emit(imp, relax.op.min(flat)), emit(imp, relax.op.max(flat))
        same = emit(imp, relax.op.equal(low, high))
        one = relax.const(1.0, dtype)
        low = emit(imp, relax.op.where(same, relax.op.subtract(low, one), low))
        high = emit(imp, relax.op.where(same, relax.op.add(high, one), high))
    else:
        low, high = relax.const(lo, dtype), relax.const(hi, dtype)
    inside = emit(imp, relax.op.logical_and(relax.op.greater_equal(flat, low), relax.op.less_equal(flat, high)))
    scaled = relax.op.divide(relax.op.multiply(relax.op.subtract(flat, low), relax.const(float(bins), dtype)),
                             relax.op.subtract(high, low))
    index = emit(imp, relax.op.minimum(relax.op.astype(relax.op.floor(scaled), "int64"),
                                       relax.const(bins - 1, "int64")))
    hits = relax.op.logical_and(
        relax.op.equal(relax.op.expand_dims(index, 1), relax.op.arange(0, bins, 1, "int64")),
        relax.op.expand_dims(inside, 1))
    return emit(imp, relax.op.sum(relax.op.astype(emit(imp, hits), dtype), axis=0))


def any_all(node: Any, imp: Any) -> relax.Expr:
    x = imp.env[node.args[0]]
    dims = arg(node, 1, "dim")
    axes = None if dims is None else [int(d) for d in (dims if isinstance(dims, list | tuple) else [dims])]
    keep = bool(arg(node, 2, "keepdim", False))
    values = emit(imp, relax.op.not_equal(x, relax.const(0, dtype_of(x)))) if dtype_of(x) != "bool" else x
    return any_along(imp, values, axes, keep, every=not node.target._schema.name.endswith("any"))
