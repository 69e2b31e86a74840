"""Int8 embedding tables (weight-only): the gathered rows are dequantized, so the table is stored as int8.

    embedding(E, ids) ≈ embedding(Q(E), ids) · embedding(s, ids)      s[v] = max_j |E[v, j]| / 127 (one per row)

Per-row symmetric codes with the op family's convention (compiler/quant_ops.py); every element is within s[v]/2 of
the float table. A table is quantized only when every reader of it is an embedding lookup, or a linear this pass
quantizes: a table tied to a float LM head would otherwise be stored twice, once int8 and once float.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from fxopt.quant_ops import quantize_weight_int8
from fxopt.rewrite import Rewriter, get_attr
from fxopt.sites import val

_EMBEDDING = torch.ops.aten.embedding.default


@dataclass(frozen=True)
class Table:
    weight: fx.Node  # the get_attr of the [rows, dim] table
    lookups: tuple[fx.Node, ...]  # the aten.embedding nodes reading it


_TRANSPARENT = (torch.ops.aten.t.default, torch.ops.aten.permute.default, torch.ops.aten._to_copy.default)


def _readers(node: fx.Node) -> set[fx.Node]:
    """The nodes that read `node`'s tensor, seen through casts and transposes (as a linear reads its weight)."""
    out: set[fx.Node] = set()
    for user in node.users:
        transparent = user.op == "call_function" and user.target in _TRANSPARENT and user.args[0] is node
        out |= _readers(user) if transparent else {user}
    return out


def plan_tables(gm: fx.GraphModule, quantized_linears: set[fx.Node]) -> tuple[list[Table], list[str]]:
    """The tables to quantize, and a note for each embedding table left in float (with why)."""
    tables, notes = [], []
    attrs = [n for n in gm.graph.nodes if n.op == "get_attr" and isinstance(get_attr(gm, n.target), torch.Tensor)]
    for node in attrs:
        lookups = [u for u in node.users if u.op == "call_function" and u.target is _EMBEDDING and u.args[0] is node]
        if not lookups:
            continue
        table = get_attr(gm, node.target)
        if not table.is_floating_point() or table.dim() != 2:
            notes.append(f"{node.target}: embedding table left float (not a 2-d float table)")
            continue
        tied = [n for n in attrs if get_attr(gm, n.target).untyped_storage().data_ptr()
                == table.untyped_storage().data_ptr()]  # the same tensor under other names (a tied LM head)
        others = set().union(*(_readers(n) for n in tied)) - set(lookups) - quantized_linears
        if others:
            names = ", ".join(sorted(u.name for u in others))
            notes.append(f"{node.target}: embedding table left float (also read by {names}, which stays float: an "
                         f"int8 copy would store it twice)")
            continue
        tables.append(Table(node, tuple(lookups)))
    return tables, notes


def quantize_table(rw: Rewriter, table: Table) -> None:
    """Each lookup of `table` becomes a lookup of the int8 codes times a lookup of the row scales."""
    first = table.lookups[0]
    codes, scales = quantize_weight_int8(get_attr(rw.gm, table.weight.target).detach(), "channel")
    name = str(table.weight.target)
    codes_node = rw.constant(f"{name}_int8", codes, before=first)
    scales_node = rw.constant(f"{name}_scale", scales[:, None], before=first)
    for lookup in table.lookups:
        dtype = val(lookup).dtype
        rows = rw.call(_EMBEDDING, (codes_node, *lookup.args[1:]), lookup.kwargs, before=lookup, like=lookup)
        wide = rw.call(torch.ops.aten._to_copy.default, (rows,), {"dtype": dtype}, before=lookup, like=lookup)
        row_scale = rw.call(_EMBEDDING, (scales_node, *lookup.args[1:]), lookup.kwargs, before=lookup, like=lookup)
        if row_scale.meta.get("val") is not None and val(row_scale).dtype != dtype:
            row_scale = rw.call(torch.ops.aten._to_copy.default, (row_scale,), {"dtype": dtype}, before=lookup,
                                like=lookup)
        out = rw.call(torch.ops.aten.mul.Tensor, (wide, row_scale), before=lookup, like=lookup)
        rw.replace(lookup, out, "int8_embedding")
