"""Conversion table: fx nodes the TVM importer lacks or gets wrong, as Relax.

Each converter has the importer's custom-op signature ``conv(node, importer) -> relax.Expr``.
The importer keys its table by ``node.target.__name__`` ("rms_norm.default"), so the same entry
serves ``aten.rms_norm`` and ``fxopt.rms_norm``; both mean the same function.

Numerics contract (why these exist at all, not only for missing ops):
  * norms reduce in float32 whatever the input dtype (fp16 sums of squares overflow at 65504),
    inside one kernel (casts inline, not separate passes over memory);
  * GEMMs accumulate in float32 and round once to the input dtype, as cuBLAS does for torch;
  * attention takes its softmax in float32, and never forms ``-inf - -inf``.
With ``extern=True`` GEMMs and attention become ``call_dps_packed`` calls to functions that the
runtime registers at load time (``runtime.register_torch_externs``); TVM generates everything else.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from tvm import relax, tirx

Converter = Callable[[Any, Any], relax.Expr]

EXTERN_LINEAR = "fxopt.linear"        # (x[..., K], w[N,K], [bias]) -> x @ w.T + bias
EXTERN_ADDMM = "fxopt.addmm"          # (bias, x2d, w[K,N]) -> bias + x2d @ w
EXTERN_MATMUL = "fxopt.matmul"        # (a, b) -> a @ b (batched, broadcast)
EXTERN_SDPA = "fxopt.sdpa"            # (q, k, v, [mask], scale, is_causal, layout) -> attention
# layout bits: 1 q, 2 k, 4 v are given [B, S, H, D] (else [B, H, S, D]); 8 output is [B, S, H, D]


def _emit(imp: Any, expr: relax.Expr) -> relax.Var:
    return imp.block_builder.emit(expr)


def _arg(node: Any, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _val(imp: Any, a: Any) -> Any:
    return imp.env[a] if a is not None and hasattr(a, "op") else a


def _dtype(e: relax.Expr) -> str:
    return str(e.ty.dtype)


def _cast(imp: Any, e: relax.Expr, dtype: str) -> relax.Expr:
    return e if _dtype(e) == dtype else _emit(imp, relax.op.astype(e, dtype))


def _promote(a: str, b: str) -> str:
    order = ["bool", "int8", "int32", "int64", "bfloat16", "float16", "float32", "float64"]
    if {a, b} == {"bfloat16", "float16"}:
        return "float32"
    return max(a, b, key=order.index)


def _shape(e: relax.Expr) -> list[Any]:
    return list(e.ty.shape.values)


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
    ndim = len(_shape(x))
    dim = int(_arg(node, 1, "dim", 0)) % ndim
    start, step = _arg(node, 2, "start"), _arg(node, 4, "step", 1)
    val = node.meta.get("val")
    length = _tir_of(val.shape[dim], _symbols(imp)) if val is not None else None
    if length is None or not isinstance(start, int | type(None)) or not isinstance(step, int):
        return type(imp)._slice(imp, node)
    size = _shape(x)[dim]
    begin = tirx.IntImm("int64", start or 0) if (start or 0) >= 0 else tirx.max(size + start, 0)
    if isinstance(length, tirx.IntImm) and isinstance(size, tirx.IntImm) and length.value == size.value:
        if step == 1 and (start or 0) == 0:
            return x
    end = begin + length * step
    return _emit(imp, relax.op.strided_slice(x, [dim], [begin], [end], [step], assume_inbound=True))


# ---- reductions and norms --------------------------------------------------------------------

def amax(node: Any, imp: Any) -> relax.Expr:
    x = imp.env[node.args[0]]
    dims = _arg(node, 1, "dim", [])
    keep = bool(_arg(node, 2, "keepdim", False))
    axes = None if not dims else [int(d) for d in (dims if isinstance(dims, list | tuple) else [dims])]
    return _emit(imp, relax.op.max(x, axes, keep))


def cumsum(node: Any, imp: Any) -> relax.Expr:
    """torch sums bool/int inputs in int64; Relax would keep bool (and LLVM cannot add bools)."""
    x = imp.env[node.args[0]]
    dim = int(_arg(node, 1, "dim"))
    dtype = node.kwargs.get("dtype")
    out = imp._convert_data_type(dtype) if dtype is not None else (
        "int64" if _dtype(x) in ("bool", "int8", "int16", "int32", "uint8") else _dtype(x))
    return _emit(imp, relax.op.cumsum(_cast(imp, x, out), axis=dim, dtype=out))


def pow_scalar(node: Any, imp: Any) -> relax.Expr:
    """x ** n for small integer n as products: CUDA fast-math pow is exp2(n*log2(x)), NaN for x < 0
    (GPT-2's gelu_new computes pow(x, 3.0); this was the source of its fp16 NaN logits)."""
    x, n = imp.env[node.args[0]], node.args[1]
    if float(n) != int(n) or not 1 <= int(n) <= 4:
        return _emit(imp, relax.op.power(x, relax.const(n, _dtype(x))))
    y = x
    for _ in range(int(n) - 1):
        y = _emit(imp, relax.op.multiply(y, x))
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
    out = _dtype(x) if weight is None else _promote(_dtype(x), _dtype(weight))
    return imp.block_builder.emit_te(_rms_te, x, weight, len(nshape), eps, out, primfunc_name_hint="rms_norm")


def _layer_norm(imp: Any, x: relax.Expr, nshape: list[int], w: Any, b: Any, eps: float) -> relax.Expr:
    """TVM's layer_norm keeps its statistics in float32 for fp16/bf16 input (two-pass variance)."""
    dtype = _dtype(x)
    axes = list(range(-len(nshape), 0))
    full = [int(s) for s in nshape]
    gamma = _cast(imp, w, dtype) if w is not None else relax.const(np.ones(full, dtype))
    beta = _cast(imp, b, dtype) if b is not None else relax.const(np.zeros(full, dtype))
    return _emit(imp, relax.op.nn.layer_norm(x, gamma, beta, axes, eps))


def rms_norm(node: Any, imp: Any) -> relax.Expr:
    x = imp.env[node.args[0]]
    return _rms(imp, x, list(node.args[1]), _val(imp, _arg(node, 2, "weight")),
                float(_arg(node, 3, "eps") or 1e-6))


def add_rms_norm(node: Any, imp: Any) -> relax.Expr:
    s = _emit(imp, relax.op.add(imp.env[node.args[0]], imp.env[node.args[1]]))
    out = _rms(imp, s, list(node.args[2]), _val(imp, _arg(node, 3, "weight")), float(_arg(node, 4, "eps")))
    return _emit(imp, relax.Tuple([out, s]))


def layer_norm(node: Any, imp: Any) -> relax.Expr:
    x = imp.env[node.args[0]]
    return _layer_norm(imp, x, list(node.args[1]), _val(imp, _arg(node, 2, "weight")),
                       _val(imp, _arg(node, 3, "bias")), float(_arg(node, 4, "eps", 1e-5)))


def add_layer_norm(node: Any, imp: Any) -> relax.Expr:
    s = _emit(imp, relax.op.add(imp.env[node.args[0]], imp.env[node.args[1]]))
    out = _layer_norm(imp, s, list(node.args[2]), _val(imp, _arg(node, 3, "weight")),
                      _val(imp, _arg(node, 4, "bias")), float(_arg(node, 5, "eps")))
    return _emit(imp, relax.Tuple([out, s]))


# ---- GEMMs -----------------------------------------------------------------------------------

def _tvm_matmul(imp: Any, a: relax.Expr, b: relax.Expr, bias: Any = None) -> relax.Expr:
    dtype = _dtype(a)
    acc = "float32" if dtype in ("float16", "bfloat16") else dtype
    y = _emit(imp, relax.op.matmul(a, b, out_dtype=acc))
    if bias is not None:
        y = _emit(imp, relax.op.add(y, _cast(imp, bias, acc)))
    return _cast(imp, y, dtype)


def _extern(imp: Any, name: str, args: list[relax.Expr], shape: list[Any], dtype: str) -> relax.Expr:
    return _emit(imp, relax.op.call_dps_packed(name, relax.Tuple(args), relax.TensorType(shape, dtype)))


def make_linear(extern: bool) -> Converter:
    def linear(node: Any, imp: Any) -> relax.Expr:
        x, w = imp.env[node.args[0]], imp.env[node.args[1]]
        bias = _val(imp, _arg(node, 2, "bias"))
        if not extern:
            return _tvm_matmul(imp, x, _emit(imp, relax.op.permute_dims(w, [1, 0])), bias)
        # N-D in and out: the library flattens the leading dims as a free view (a reshape here
        # could become a copy kernel)
        args = [x, w] + ([bias] if bias is not None else [])
        return _extern(imp, EXTERN_LINEAR, args, _shape(x)[:-1] + [_shape(w)[0]], _dtype(x))
    return linear


def make_addmm(extern: bool) -> Converter:
    def addmm(node: Any, imp: Any) -> relax.Expr:
        bias, x, w = (imp.env[a] for a in node.args[:3])
        beta, alpha = node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1)
        if beta != 1 or alpha != 1 or not extern:
            y = _tvm_matmul(imp, x, w)
            if alpha != 1:
                y = _emit(imp, relax.op.multiply(y, relax.const(alpha, _dtype(y))))
            b = bias if beta == 1 else _emit(imp, relax.op.multiply(bias, relax.const(beta, _dtype(bias))))
            return _emit(imp, relax.op.add(y, b)) if beta != 0 else y
        return _extern(imp, EXTERN_ADDMM, [bias, x, w], [_shape(x)[0], _shape(w)[1]], _dtype(x))
    return addmm


def make_matmul(extern: bool) -> Converter:
    def matmul(node: Any, imp: Any) -> relax.Expr:
        a, b = imp.env[node.args[0]], imp.env[node.args[1]]
        if not extern or len(_shape(a)) < 2 or len(_shape(b)) < 2:
            return _tvm_matmul(imp, a, b)
        out = _emit(imp, relax.op.matmul(a, b))  # only to get the broadcast output shape
        return _extern(imp, EXTERN_MATMUL, [a, b], _shape(out), _dtype(a))
    return matmul


# ---- attention -------------------------------------------------------------------------------

def _tvm_sdpa(imp: Any, q: relax.Expr, k: relax.Expr, v: relax.Expr, mask: Any, causal: bool,
              scale: float) -> relax.Expr:
    dtype = _dtype(q)
    hq, hk = _shape(q)[-3], _shape(k)[-3]
    if isinstance(hq, int) and isinstance(hk, int) and hq != hk:  # GQA: repeat kv heads
        k = _emit(imp, relax.op.repeat(k, hq // hk, axis=-3))
        v = _emit(imp, relax.op.repeat(v, hq // hk, axis=-3))
    qf, kf = _cast(imp, q, "float32"), _cast(imp, k, "float32")
    kt = _emit(imp, relax.op.permute_dims(kf, list(range(len(_shape(k)) - 2)) + [-1, -2]))
    s = _emit(imp, relax.op.multiply(relax.op.matmul(qf, kt), relax.const(scale, "float32")))
    lq, lk = _shape(q)[-2], _shape(k)[-2]
    neg = relax.const(-1e30, "float32")  # finite: a fully masked row softmaxes to uniform, not NaN
    if causal:
        ones = _emit(imp, relax.op.ones(relax.ShapeExpr([lq, lk]), "bool"))
        s = _emit(imp, relax.op.where(relax.op.tril(ones, 0), s, neg))
    if mask is not None:
        if _dtype(mask) == "bool":
            s = _emit(imp, relax.op.where(mask, s, neg))
        else:
            s = _emit(imp, relax.op.add(s, _cast(imp, mask, "float32")))
    p = _emit(imp, relax.op.nn.softmax(s, axis=-1))
    o = _emit(imp, relax.op.matmul(p, _cast(imp, v, "float32")))
    return _cast(imp, o, dtype)


_BHSD_SWAP = [0, 2, 1, 3]


def _bshd_source(node: Any, imp: Any) -> Any:
    """The [B, S, H, D] tensor that ``node`` (a q/k/v argument) permutes to [B, H, S, D], if any."""
    if getattr(node, "op", None) == "call_function" and getattr(node.target, "__name__", "") == "permute.default" \
            and list(node.args[1]) == _BHSD_SWAP:
        return imp.env[node.args[0]]
    return None


def _bshd_marks(imp: Any) -> dict[Any, relax.Expr]:
    return imp.__dict__.setdefault("_fxopt_bshd", {})


def view_passthrough(node: Any, imp: Any) -> relax.Expr:
    """``view``, remembering identity views of a [B, S, H, D]-producing attention (see permute)."""
    src = node.args[0]
    marks = _bshd_marks(imp)
    val = node.meta.get("val")
    if src in marks and val is not None and tuple(val.shape) == tuple(src.meta["val"].shape):
        marks[node] = marks[src]
    return type(imp)._reshape(imp, node)


def permute_passthrough(node: Any, imp: Any) -> relax.Expr:
    """``permute(attention_out, [0, 2, 1, 3])`` is the [B, S, H, D] tensor the library wrote."""
    marks = _bshd_marks(imp)
    if node.args[0] in marks and list(node.args[1]) == _BHSD_SWAP:
        return marks[node.args[0]]
    return type(imp)._permute(imp, node)


def make_sdpa(extern: bool) -> Converter:
    def sdpa(node: Any, imp: Any) -> relax.Expr:
        q, k, v = (imp.env[a] for a in node.args[:3])
        mask = _val(imp, _arg(node, 3, "attn_mask"))
        if _arg(node, 4, "dropout_p", 0.0):
            raise ValueError("scaled_dot_product_attention with dropout_p > 0 is training-only")
        causal = bool(_arg(node, 5, "is_causal", False))
        scale = _arg(node, 6, "scale")
        scale = float(scale) if scale is not None else 1.0 / math.sqrt(int(_shape(q)[-1]))
        if not extern:
            return _tvm_sdpa(imp, q, k, v, mask, causal, scale)
        # Heads-major q/k/v and output are usually transposes of [B, S, H, D] tensors: hand the
        # library those (it takes strided views) instead of materializing each transpose.
        layout, qkv = 0, []
        for bit, (arg, val) in enumerate(zip(node.args[:3], (q, k, v))):
            src = _bshd_source(arg, imp) if len(_shape(val)) == 4 else None
            layout |= (1 << bit) if src is not None else 0
            qkv.append(src if src is not None else val)
        args = qkv + ([mask] if mask is not None else [])
        args += [relax.prim_value(tirx.FloatImm("float64", scale)), relax.prim_value(int(causal))]
        qs, vs = _shape(q), _shape(v)
        if len(qs) != 4:
            return _extern(imp, EXTERN_SDPA, args + [relax.prim_value(layout)], qs[:-1] + [vs[-1]], _dtype(q))
        layout |= 1 << 3  # output written as [B, S, H, D]
        out = _extern(imp, EXTERN_SDPA, args + [relax.prim_value(layout)], [qs[0], qs[2], qs[1], vs[-1]],
                      _dtype(q))
        _bshd_marks(imp)[node] = out
        return _emit(imp, relax.op.permute_dims(out, _BHSD_SWAP))
    return sdpa


def conversion_table(extern: bool = False) -> dict[str, Converter]:
    """The table passed to ``from_exported_program(custom_convert_map=...)``."""
    return {
        "amax.default": amax,
        "cumsum.default": cumsum,
        "slice.Tensor": slice_tensor,
        "pow.Tensor_Scalar": pow_scalar,
        "rms_norm.default": rms_norm,
        "add_rms_norm.default": add_rms_norm,
        "layer_norm.default": layer_norm,
        "add_layer_norm.default": add_layer_norm,
        "linear.default": make_linear(extern),
        "addmm.default": make_addmm(extern),
        "mm.default": make_matmul(extern),
        "bmm.default": make_matmul(extern),
        "matmul.default": make_matmul(extern),
        "scaled_dot_product_attention.default": make_sdpa(extern),
        **({"view.default": view_passthrough, "permute.default": permute_passthrough} if extern else {}),
    }
