"""What a call's inputs must satisfy so that no embedding row is read out of its table.

torch raises IndexError for an id outside an embedding's table; TVM's ``take`` clamps it (tvm/indexing.py) and
ONNX's Gather wraps a negative id: a wrong row, silently. So both runners check, before the backend runs
(fxopt.signature.check_index_bounds), the inputs that reach an embedding's ids directly (through views and
casts):

    ids = input i                        every value of input i in [0, rows)         ("values", i, rows)
    ids = arange(input i's dim d) [+ c]  input i's dim d at most rows - c (positions)  ("size", i, d, rows - c)

Ids computed otherwise (offsets into a cache, gathered ids) are not checked. TVM's manifest carries the bounds
(with the input's name), so an exported artifact's loader checks them too.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.export import ExportedProgram

aten = torch.ops.aten
_PASS_THROUGH = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unsqueeze.default,
                 aten.expand.default, aten.clone.default, aten._to_copy.default, aten.flatten.using_ints,
                 aten.alias.default, aten.contiguous.default}


def _source(node: Any) -> Any:
    """The node `node` is a view or cast of, through any number of them."""
    while node.op == "call_function" and node.target in _PASS_THROUGH and node.args:
        node = node.args[0]
    return node


def _offset(node: Any) -> tuple[Any, int]:
    """(x, c) where `node` is x + c for a constant int c >= 0 (GPT-2's `arange(length) + past_length`, with 0
    past), through views and casts; else (node, 0)."""
    node = _source(node)
    if node.op == "call_function" and node.target in (aten.add.Tensor, aten.add.Scalar) and len(node.args) == 2:
        x, c = node.args
        if isinstance(c, int) and not isinstance(c, bool) and c >= 0:
            return _source(x), c
    return node, 0


def _arange_of_dim(node: Any) -> tuple[Any, int] | None:
    """(input node, dim) where `node` is arange(0, that input's size at dim)."""
    if node.op != "call_function" or node.target not in (aten.arange.default, aten.arange.start,
                                                         aten.arange.start_step):
        return None
    args = node.args if node.target != aten.arange.default else (0, *node.args[:1])
    if args[0] != 0 or (len(args) > 2 and args[2] != 1):
        return None
    end = args[1]
    if getattr(end, "op", None) == "call_function" and end.target == aten.sym_size.int:
        return end.args[0], int(end.args[1])
    return None


def index_bounds(ep: ExportedProgram, input_names: list[str]) -> list[list]:
    """The bounds of module docstring's table, for the user inputs `input_names` (in the VM's order)."""
    bounds: dict[tuple, int] = {}
    for node in ep.graph.find_nodes(op="call_function", target=aten.embedding.default):
        table = node.args[0].meta.get("val")
        if table is None:
            continue
        ids, offset = _offset(node.args[1])
        rows = int(table.shape[0]) - offset  # ids + offset < rows
        if ids.op == "placeholder" and ids.name in input_names and offset == 0:
            key = ("values", input_names.index(ids.name))
        elif (dim := _arange_of_dim(ids)) is not None and _source(dim[0]).name in input_names:
            key = ("size", input_names.index(_source(dim[0]).name), dim[1])
        else:
            continue
        bounds[key] = min(bounds.get(key, rows), rows)
    return [[*key, rows, input_names[key[1]]] for key, rows in sorted(bounds.items())]
