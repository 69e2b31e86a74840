"""Conversion table: fx nodes the TVM importer lacks or gets wrong, as Relax.

Each converter has the importer's custom-op signature ``conv(node, importer) -> relax.Expr``.
The table that maps op overloads to them, and its translation to the importer's name keys, is
``table.py``.

Numerics contract (why these exist at all, not only for missing ops):
  * norms reduce in float32 whatever the input dtype (fp16 sums of squares overflow at 65504),
    inside one kernel (casts inline, not separate passes over memory);
  * GEMMs accumulate in float32 and round once to the input dtype, as cuBLAS does for torch;
  * attention takes its softmax in float32, and never forms ``-inf - -inf``.
With ``extern=True`` GEMMs (``call_dps_packed``) and attention (``call_pure_packed``, attention.py)
become calls to functions that the runtime registers at load time
(``runtime.register_torch_externs``); TVM generates everything else.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from tvm import relax, tirx

from . import convention
from .relax_util import any_along, arg, cast, dtype_of, emit, env_or_value, extern_call, promote, shape_of

Converter = Callable[[Any, Any], relax.Expr]

# names and argument layouts of the library calls: convention.py
EXTERN_LINEAR, EXTERN_ADDMM, EXTERN_MATMUL = convention.LINEAR, convention.ADDMM, convention.MATMUL


# ---- dynamic shapes --------------------------------------------------------------------------

def _tir_of(expr: Any, syms: dict[str, Any]) -> Any:
    """A torch symbolic size (int, SymInt or sympy expression) as a TIR expression, or None."""
    import sympy

    e = getattr(getattr(expr, "node", None), "expr", expr)
    if isinstance(e, int | sympy.Integer):
        return tirx.IntImm("int64", int(e))
    if isinstance(e, sympy.Symbol):
        return syms.get(str(e))
    args = [_tir_of(a, syms) for a in getattr(e, "args", ())]
    if not args or any(a is None for a in args):
        return None
    name = type(e).__name__
    ops = {"Add": lambda a, b: a + b, "Mul": lambda a, b: a * b, "Min": tirx.min, "Max": tirx.max,
           "FloorDiv": tirx.floordiv, "Mod": tirx.floormod, "PythonMod": tirx.floormod}
    if name not in ops:
        return None
    out = args[0]
    for a in args[1:]:
        out = ops[name](out, a)
    return out


def _symbols(imp: Any) -> dict[str, Any]:
    syms: dict[str, Any] = {}
    for v in imp.env.values():
        shape = getattr(getattr(v, "ty", None), "shape", None)
        for d in getattr(shape, "values", None) or []:
            if isinstance(d, tirx.Var):
                syms[d.name] = d
    return syms


def slice_tensor(node: Any, imp: Any) -> relax.Expr:
    """``x[start:end:step]`` along ``dim`` with the output length that torch proved (meta["val"]).

    The importer's version keeps ``min(end, dim)`` unsimplified for symbolic dims (TVM does not
    know the export's lower bounds), so two slices of one tensor stop broadcasting together (HF's
    packed-sequence check), and it passes negative axes that dynamic legalization rejects."""
    x = imp.env[node.args[0]]
    ndim = len(shape_of(x))
    dim = int(arg(node, 1, "dim", 0)) % ndim
    start, step = arg(node, 2, "start"), arg(node, 4, "step", 1)
    val = node.meta.get("val")
    length = _tir_of(val.shape[dim], _symbols(imp)) if val is not None else None
    if length is None or not isinstance(start, int | type(None)) or not isinstance(step, int):
        return type(imp)._slice(imp, node)
    size = shape_of(x)[dim]
    begin = tirx.IntImm("int64", start or 0) if (start or 0) >= 0 else tirx.max(size + start, 0)
    if isinstance(length, tirx.IntImm) and isinstance(size, tirx.IntImm) and length.value == size.value:
        if step == 1 and (start or 0) == 0:
            return x
    end = begin + length * step
    return emit(imp, relax.op.strided_slice(x, [dim], [begin], [end], [step], assume_inbound=True))


# ---- reductions and norms --------------------------------------------------------------------

def amax(node: Any, imp: Any) -> relax.Expr:
    x = imp.env[node.args[0]]
    dims = arg(node, 1, "dim", [])
    keep = bool(arg(node, 2, "keepdim", False))
    axes = None if not dims else [int(d) for d in (dims if isinstance(dims, list | tuple) else [dims])]
    top = emit(imp, relax.op.max(x, axes, keep))
    if "float" not in dtype_of(x):
        return top
    # TVM's max skips NaN, torch's returns it
    any_nan = any_along(imp, emit(imp, relax.op.isnan(x)), axes, keep)
    return emit(imp, relax.op.where(any_nan, relax.const(float("nan"), dtype_of(x)), top))


def cumsum(node: Any, imp: Any) -> relax.Expr:
    """torch sums bool/int inputs in int64; Relax would keep bool (and LLVM cannot add bools)."""
    x = imp.env[node.args[0]]
    dim = int(arg(node, 1, "dim"))
    dtype = node.kwargs.get("dtype")
    out = imp._convert_data_type(dtype) if dtype is not None else (
        "int64" if dtype_of(x) in ("bool", "int8", "int16", "int32", "uint8") else dtype_of(x))
    return emit(imp, relax.op.cumsum(cast(imp, x, out), axis=dim, dtype=out))


def pow_scalar(node: Any, imp: Any) -> relax.Expr:
    """x ** n for small integer n as products: CUDA fast-math pow is exp2(n*log2(x)), NaN for x < 0
    (GPT-2's gelu_new computes pow(x, 3.0); this was the source of its fp16 NaN logits)."""
    x, n = imp.env[node.args[0]], node.args[1]
    if float(n) != int(n) or not 1 <= int(n) <= 4:
        return emit(imp, relax.op.power(x, relax.const(n, dtype_of(x))))
    y = x
    for _ in range(int(n) - 1):
        y = emit(imp, relax.op.multiply(y, x))
    return y


def _rms_te(x: Any, w: Any, naxes: int, eps: float, out_dtype: str) -> Any:
    """One TE stage graph (so one fused kernel): float32 mean of squares, rsqrt, round to x's
    dtype, then ``weight * y`` in the promoted dtype, as torch's RMSNorm does."""
    from tvm import te, topi

    nd, in_dtype = len(x.shape), x.dtype
    red = list(range(nd - naxes, nd))
    sq = te.compute(x.shape, lambda *i: x(*i).astype("float32") * x(*i).astype("float32"), name="sq")
    ss = topi.sum(sq, axis=red, keepdims=True)
    n = 1.0
    for d in red:
        n = n * x.shape[d]

    def f(*i: Any) -> Any:
        j = [i[k] if k < nd - naxes else 0 for k in range(nd)]
        y = (x(*i).astype("float32") * te.rsqrt(ss(*j) / n.astype("float32") + eps)).astype(in_dtype)
        if w is None:
            return y
        return w(*i[nd - len(w.shape):]).astype(out_dtype) * y.astype(out_dtype)

    return te.compute(x.shape, f, name="rms_norm")


def _rms(imp: Any, x: relax.Expr, nshape: list[int], weight: Any, eps: float) -> relax.Expr:
    out = dtype_of(x) if weight is None else promote(dtype_of(x), dtype_of(weight))
    return imp.block_builder.emit_te(_rms_te, x, weight, len(nshape), eps, out, primfunc_name_hint="rms_norm")


def _layer_norm(imp: Any, x: relax.Expr, nshape: list[int], w: Any, b: Any, eps: float) -> relax.Expr:
    """TVM's layer_norm keeps its statistics in float32 for fp16/bf16 input (two-pass variance)."""
    dtype = dtype_of(x)
    axes = list(range(-len(nshape), 0))
    full = [int(s) for s in nshape]
    gamma = cast(imp, w, dtype) if w is not None else relax.const(np.ones(full, dtype))
    beta = cast(imp, b, dtype) if b is not None else relax.const(np.zeros(full, dtype))
    return emit(imp, relax.op.nn.layer_norm(x, gamma, beta, axes, eps))


def rms_norm(node: Any, imp: Any) -> relax.Expr:
    """``fxopt.rms_norm`` (eps given) and ``aten.rms_norm`` (eps None: the input dtype's epsilon)."""
    x = imp.env[node.args[0]]
    eps = arg(node, 3, "eps")
    eps = float(np.finfo(dtype_of(x)).eps) if eps is None and dtype_of(x) != "bfloat16" else (
        0.0078125 if eps is None else float(eps))  # bfloat16's epsilon (numpy has no bfloat16)
    return _rms(imp, x, list(node.args[1]), env_or_value(imp, arg(node, 2, "weight")), eps)


def add_rms_norm(node: Any, imp: Any) -> relax.Expr:
    s = emit(imp, relax.op.add(imp.env[node.args[0]], imp.env[node.args[1]]))
    out = _rms(imp, s, list(node.args[2]), env_or_value(imp, arg(node, 3, "weight")), float(arg(node, 4, "eps")))
    return emit(imp, relax.Tuple([out, s]))


def layer_norm(node: Any, imp: Any) -> relax.Expr:
    x = imp.env[node.args[0]]
    return _layer_norm(imp, x, list(node.args[1]), env_or_value(imp, arg(node, 2, "weight")),
                       env_or_value(imp, arg(node, 3, "bias")), float(arg(node, 4, "eps", 1e-5)))


def add_layer_norm(node: Any, imp: Any) -> relax.Expr:
    s = emit(imp, relax.op.add(imp.env[node.args[0]], imp.env[node.args[1]]))
    out = _layer_norm(imp, s, list(node.args[2]), env_or_value(imp, arg(node, 3, "weight")),
                      env_or_value(imp, arg(node, 4, "bias")), float(arg(node, 5, "eps")))
    return emit(imp, relax.Tuple([out, s]))


# ---- GEMMs -----------------------------------------------------------------------------------

def _tvm_matmul(imp: Any, a: relax.Expr, b: relax.Expr, bias: Any = None) -> relax.Expr:
    dtype = dtype_of(a)
    acc = "float32" if dtype in ("float16", "bfloat16") else dtype
    y = emit(imp, relax.op.matmul(a, b, out_dtype=acc))
    if bias is not None:
        y = emit(imp, relax.op.add(y, cast(imp, bias, acc)))
    return cast(imp, y, dtype)


def padded_output_width(node: Any) -> int | None:
    """N for a linear whose output is a graph output and whose N is not a multiple of 8 (GPT-2's
    50257-word head): cuBLAS then falls back to slow align-1 kernels. Such a linear is computed
    into an [..., round_up(N, 8)] buffer and the runtime returns the ``[..., :N]`` view, as
    Inductor's padding does; any other consumer would need a copy, so only outputs qualify."""
    if node.target is not torch.ops.aten.linear.default or not node.users:
        return None
    n = int(node.args[1].meta["val"].shape[0])
    return n if n % 8 and all(u.op == "output" for u in node.users) else None


def make_linear(extern: bool) -> Converter:
    def linear(node: Any, imp: Any) -> relax.Expr:
        x, w = imp.env[node.args[0]], imp.env[node.args[1]]
        bias = env_or_value(imp, arg(node, 2, "bias"))
        if not extern:
            return _tvm_matmul(imp, x, emit(imp, relax.op.permute_dims(w, [1, 0])), bias)
        # N-D in and out: the library flattens the leading dims as a free view (a reshape here
        # could become a copy kernel)
        args = [x, w] + ([bias] if bias is not None else [])
        n = shape_of(w)[0]
        if padded_output_width(node) is not None:
            n = (int(n) + 7) // 8 * 8
        return extern_call(imp, EXTERN_LINEAR, args, shape_of(x)[:-1] + [n], dtype_of(x))
    return linear


def make_addmm(extern: bool) -> Converter:
    def addmm(node: Any, imp: Any) -> relax.Expr:
        bias, x, w = (imp.env[a] for a in node.args[:3])
        beta, alpha = node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1)
        if beta != 1 or alpha != 1 or not extern:
            y = _tvm_matmul(imp, x, w)
            if alpha != 1:
                y = emit(imp, relax.op.multiply(y, relax.const(alpha, dtype_of(y))))
            b = bias if beta == 1 else emit(imp, relax.op.multiply(bias, relax.const(beta, dtype_of(bias))))
            return emit(imp, relax.op.add(y, b)) if beta != 0 else y
        return extern_call(imp, EXTERN_ADDMM, [bias, x, w], [shape_of(x)[0], shape_of(w)[1]], dtype_of(x))
    return addmm


def make_matmul(extern: bool) -> Converter:
    def matmul(node: Any, imp: Any) -> relax.Expr:
        a, b = imp.env[node.args[0]], imp.env[node.args[1]]
        if not extern or len(shape_of(a)) < 2 or len(shape_of(b)) < 2:
            return _tvm_matmul(imp, a, b)
        out_shape = shape_of(imp.block_builder.normalize(relax.op.matmul(a, b)))  # broadcast shape
        return extern_call(imp, EXTERN_MATMUL, [a, b], out_shape, dtype_of(a))
    return matmul
