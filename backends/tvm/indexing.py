"""``aten.index.Tensor`` (advanced indexing, ``x[:, idx]``, ``x[..., [-2], :]``) and ``aten.select.int``
(``x[..., -2, :]``) as Relax, with torch's semantics.

The importer's own conversions are wrong in two ways: they hand negative indices to ``take``, which reads out
of bounds (Falcon's head split selects ``qkv[..., -2, :]``), and with two or more index tensors beside a
sliced dim the importer takes them one after another, an outer product, where torch broadcasts them together.

torch's rule, for index tensors i_1..i_k at dims d_1..d_k (the rest ``:``), broadcast to one shape B:
    out.shape = x.shape[:d_1] + B + x.shape[d_k+1:]      where d_1..d_k are adjacent,
    out.shape = B + (the other dims of x, in order)        where they are not;
each index is first wrapped, i ↦ i + x.shape[d] where i < 0. Here: the indexed dims are moved to the
front, ``index_tensor`` (NumPy's zipped indexing) takes them, and for adjacent dims B moves back to d_1.

Indices still outside the tensor after wrapping (which torch refuses with an IndexError) are clamped to it
(``take(mode="clip")``, also for ``embedding``): never a read out of bounds, and no "fast mode" warning. The
runner refuses, before the VM runs, the calls whose embedding ids it can see are outside their tables
(index_bounds.py: token ids that are an input, positions that are an input's length).
"""

from __future__ import annotations

from typing import Any

from tvm import relax, te, tirx

from .relax_util import emit


def _wrapped(imp: Any, x: relax.Expr, index: relax.Expr, dim: int) -> relax.Expr:
    """``where(i < 0, i + x.shape[dim], i)``, in one kernel, for static and symbolic sizes."""

    def wrap(data: Any, i: Any) -> Any:
        size = data.shape[dim].astype(i.dtype)
        return te.compute(i.shape, lambda *p: tirx.if_then_else(i(*p) < 0, i(*p) + size, i(*p)),
                          name="wrap_index")

    return imp.block_builder.emit_te(wrap, x, index)


def index_tensor(node: Any, imp: Any) -> relax.Expr:
    x = imp.env[node.args[0]]
    given = node.args[1]
    if any(i is not None and str(imp.env[i].ty.dtype) == "bool" for i in given):
        return type(imp)._index_tensor(imp, node)  # a boolean mask: the importer's conversion
    dims = [d for d, i in enumerate(given) if i is not None]
    indices = [_wrapped(imp, x, imp.env[given[d]], d) for d in dims]
    if len(dims) == 1:
        return emit(imp, relax.op.take(x, indices[0], axis=dims[0], mode="clip"))
    ndim = len(x.ty.shape.values)
    rest = [d for d in range(ndim) if d not in dims]
    front = x if dims == list(range(len(dims))) else emit(imp, relax.op.permute_dims(x, dims + rest))
    out = emit(imp, relax.op.index_tensor(front, indices))
    adjacent = dims == list(range(dims[0], dims[-1] + 1))
    if not adjacent or dims[0] == 0:
        return out
    k = len(out.ty.shape.values) - len(rest)  # the broadcast index dims, now leading
    before = dims[0]  # the dims of x ahead of the first index, now just after B
    order = list(range(k, k + before)) + list(range(k)) + list(range(k + before, k + len(rest)))
    return emit(imp, relax.op.permute_dims(out, order))


def select_int(node: Any, imp: Any) -> relax.Expr:
    """``x.select(dim, i)``: ``take`` of the wrapped index, a 0-d index, so the dim goes away."""
    x, dim, index = imp.env[node.args[0]], int(node.args[1]), node.args[2]
    if not isinstance(index, int):
        return type(imp)._select(imp, node)
    dim %= len(x.ty.shape.values)
    return emit(imp, relax.op.take(x, _wrapped(imp, x, relax.const(index, "int64"), dim), axis=dim, mode="clip"))


def embedding(node: Any, imp: Any) -> relax.Expr:
    """Rows of the table; an id outside it is clamped to the table (torch raises), never read out of bounds."""
    weight, ids = imp.env[node.args[0]], imp.env[node.args[1]]
    return emit(imp, relax.op.take(weight, ids, axis=0, mode="clip"))
