"""scaled_dot_product_attention: TVM-generated, or handed to a fused library kernel (``extern``).

TVM path: softmax(q kᵀ · scale + mask) v in float32, GQA by repeating kv heads. It forms the
full score matrix, so it is the portable/CPU path, not the fast one.

Library path (``fxopt.sdpa``, registered by runtime.py): torch's fused attention (cuDNN / flash /
memory-efficient), which never materializes the scores. Transformers feed it
``permute(view(getitem(split(qkv, ...)), [B, S, H, D]), [0, 2, 1, 3])``; each step would be a
copy kernel in TVM, while the library takes strided views. So for each of q, k, v we pass the
tensor before those steps and describe the view (``spec`` below); the output is written as
[B, S, H, D] so that the model's own permute back becomes a no-op (``permute_passthrough``).
Unused producers are removed by dead-code elimination in the build pipeline.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
from torch import fx
from tvm import relax, tirx

from fxopt.pattern import VIEWS, AnyOf, Match, Op, Var, explain

from . import convention
from .convention import SdpaCall, View
from .relax_util import any_along, arg, cast, dtype_of, emit, env_or_value, shape_of

# the library call's names and argument layout: convention.py
_SWAP = [0, 2, 1, 3]
aten = torch.ops.aten


_SPLIT = Op((aten.split_with_sizes.default, aten.split.Tensor), Var("packed"), Var("sizes"), Var("dim"))
# permute(view(x, [B, S, H, D]), [0, 2, 1, 3]), x one chunk of a packed [B, S, 3·H·D] projection or any tensor
_HEADS_FIRST = Op(aten.permute.default, AnyOf(
    Op(VIEWS, Op(operator.getitem, _SPLIT, Var("index")), Var("shape"), name="bshd"), Var("bshd")), _SWAP)


def qkv_view(node: fx.Node) -> tuple[fx.Node, View]:
    """The tensor to hand the library for the q/k/v operand `node`, and how to read it (convention.View)."""
    val = node.meta.get("val")
    m = explain(_HEADS_FIRST, node) if val is not None and val.dim() == 4 else None
    if not isinstance(m, Match):
        return node, View()
    heads, width = int(val.shape[1]), int(val.shape[1] * val.shape[3])
    if "packed" in m:
        packed, sizes, index = m["packed"], m["sizes"], m["index"]
        ndim = packed.meta["val"].dim()
        offset = index * sizes if isinstance(sizes, int) else sum(sizes[:index])
        if ndim == 3 and int(m["dim"]) % ndim == ndim - 1 and isinstance(offset, int):
            return packed, View(convention.VIEW_PACKED, offset, heads, width)
    return m["bshd"], View(convention.VIEW_BSHD, 0, heads, width)


def _source(node: Any, imp: Any) -> tuple[relax.Expr, View]:
    src, view = qkv_view(node)
    return imp.env[src], view


def _float_mask(imp: Any, node: Any, mask: relax.Expr, dtype: str) -> relax.Expr:
    """Boolean masks become additive ones once per graph (torch would convert per layer)."""
    cache = imp.__dict__.setdefault("_fxopt_masks", {})
    if node not in cache:
        neg = {"float16": -65504.0, "bfloat16": -3.38e38}.get(dtype, -3.4028234663852886e38)
        cache[node] = emit(imp, relax.op.where(mask, relax.const(0.0, dtype), relax.const(neg, dtype)))
    return cache[node]


def _tvm_sdpa(imp: Any, q: relax.Expr, k: relax.Expr, v: relax.Expr, mask: Any, causal: bool,
              scale: float) -> relax.Expr:
    dtype = dtype_of(q)
    hq, hk = shape_of(q)[-3], shape_of(k)[-3]
    if isinstance(hq, int | tirx.IntImm) and isinstance(hk, int | tirx.IntImm) and int(hq) != int(hk):
        k = emit(imp, relax.op.repeat(k, int(hq) // int(hk), axis=-3))
        v = emit(imp, relax.op.repeat(v, int(hq) // int(hk), axis=-3))
    qf, kf = cast(imp, q, "float32"), cast(imp, k, "float32")
    kt = emit(imp, relax.op.permute_dims(kf, list(range(len(shape_of(k)) - 2)) + [-1, -2]))
    s = emit(imp, relax.op.multiply(relax.op.matmul(qf, kt), relax.const(scale, "float32")))
    lq, lk = shape_of(q)[-2], shape_of(k)[-2]
    neg = relax.const(-1e30, "float32")  # finite: no -inf - -inf inside the softmax
    ones = None
    if causal:
        ones = emit(imp, relax.op.ones(relax.ShapeExpr([lq, lk]), "bool"))
        s = emit(imp, relax.op.where(relax.op.tril(ones, 0), s, neg))
    allowed = None  # where a key may be attended to, if the mask can forbid a whole row
    if mask is not None:
        if dtype_of(mask) == "bool":
            s = emit(imp, relax.op.where(mask, s, neg))
            allowed = mask
        else:
            s = emit(imp, relax.op.add(s, cast(imp, mask, "float32")))
            allowed = emit(imp, relax.op.not_equal(mask, relax.const(float("-inf"), dtype_of(mask))))
        if causal:
            allowed = emit(imp, relax.op.logical_and(allowed, relax.op.tril(ones, 0)))
    p = emit(imp, relax.op.nn.softmax(s, axis=-1))
    if allowed is not None:  # torch's SDPA gives a row with no allowed key zeros (its safe softmax)
        p = emit(imp, relax.op.where(any_along(imp, allowed, [-1], True), p, relax.const(0.0, "float32")))
    o = emit(imp, relax.op.matmul(p, cast(imp, v, "float32")))
    return cast(imp, o, dtype)


def _marks(imp: Any) -> dict[Any, relax.Expr]:
    return imp.__dict__.setdefault("_fxopt_bshd", {})


def make_sdpa(extern: bool) -> Any:
    def sdpa(node: Any, imp: Any) -> relax.Expr:
        q, k, v = (imp.env[a] for a in node.args[:3])
        mask_node = arg(node, 3, "attn_mask")
        mask = env_or_value(imp, mask_node)
        if arg(node, 4, "dropout_p", 0.0):
            raise ValueError("scaled_dot_product_attention with dropout_p > 0 is training-only")
        causal = bool(arg(node, 5, "is_causal", False))
        scale = arg(node, 6, "scale")
        scale = float(scale) if scale is not None else 1.0 / math.sqrt(int(shape_of(q)[-1]))
        if not extern:
            return _tvm_sdpa(imp, q, k, v, mask, causal, scale)
        if mask is not None and dtype_of(mask) == "bool":
            mask = _float_mask(imp, mask_node, mask, dtype_of(q))
        sources = [_source(a, imp) for a in node.args[:3]]
        qs, vs = shape_of(q), shape_of(v)
        out_bshd = len(qs) == 4
        args = [src for src, _ in sources] + ([mask] if mask is not None else [])
        call = SdpaCall(scale, causal, out_bshd, tuple(view for _, view in sources))
        prims = convention.sdpa_scalars(call)
        args += [relax.prim_value(tirx.FloatImm("float64", prims[0]))] + [relax.prim_value(p) for p in prims[1:]]
        # not destination-passing: the library allocates its output (torch's caching allocator),
        # which saves copying it into a VM-allocated buffer
        shape = [qs[0], qs[2], qs[1], vs[-1]] if out_bshd else qs[:-1] + [vs[-1]]
        out = emit(imp, relax.op.call_pure_packed(convention.SDPA, *args, ty_args=relax.TensorType(shape, dtype_of(q))))
        if not out_bshd:
            return out
        _marks(imp)[node] = out
        return emit(imp, relax.op.permute_dims(out, _SWAP))
    return sdpa


def view_passthrough(node: Any, imp: Any) -> relax.Expr:
    """``view``, remembering identity views of an attention output written [B, S, H, D]."""
    src, marks, val = node.args[0], _marks(imp), node.meta.get("val")
    if src in marks and val is not None and tuple(val.shape) == tuple(src.meta["val"].shape):
        marks[node] = marks[src]
    return type(imp)._reshape(imp, node)


def permute_passthrough(node: Any, imp: Any) -> relax.Expr:
    """``permute(attention_out, [0, 2, 1, 3])`` is the [B, S, H, D] tensor the library wrote."""
    marks = _marks(imp)
    if node.args[0] in marks and list(node.args[1]) == _SWAP:
        return marks[node.args[0]]
    return type(imp)._permute(imp, node)
