"""Small helpers shared by the converters (importer-side Relax emission)."""

from __future__ import annotations

from typing import Any

from tvm import relax


def emit(imp: Any, expr: relax.Expr) -> relax.Var:
    return imp.block_builder.emit(expr)


def arg(node: Any, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def env_or_value(imp: Any, a: Any) -> Any:
    return imp.env[a] if a is not None and hasattr(a, "op") else a


def dtype_of(e: relax.Expr) -> str:
    return str(e.ty.dtype)


def cast(imp: Any, e: relax.Expr, dtype: str) -> relax.Expr:
    return e if dtype_of(e) == dtype else emit(imp, relax.op.astype(e, dtype))


def promote(a: str, b: str) -> str:
    order = ["bool", "int8", "int32", "int64", "bfloat16", "float16", "float32", "float64"]
    if {a, b} == {"bfloat16", "float16"}:
        return "float32"
    return max(a, b, key=order.index)


def shape_of(e: relax.Expr) -> list[Any]:
    return list(e.ty.shape.values)


def extern_call(imp: Any, name: str, args: list[relax.Expr], shape: list[Any], dtype: str) -> relax.Expr:
    return emit(imp, relax.op.call_dps_packed(name, relax.Tuple(args), relax.TensorType(shape, dtype)))


def any_along(imp: Any, flags: relax.Expr, axes: Any, keepdims: bool, every: bool = False) -> relax.Expr:
    """`any` (or, with `every`, `all`) of a boolean tensor along `axes` (None: all), as bool: Relax reduces no
    bools, so the flags are folded as int32 by max (min)."""
    fold = relax.op.min if every else relax.op.max
    folded = emit(imp, fold(relax.op.astype(flags, "int32"), axes, keepdims))
    return emit(imp, relax.op.astype(folded, "bool"))
