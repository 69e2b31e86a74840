"""The TVM lowering table, keyed by op overload, and its translation to the importer's keys.

``lowerings(extern)`` is the public table: ``{op overload: converter}``. TVM's
``from_exported_program(custom_convert_map=...)`` keys converters by ``node.target.__name__``
("linear.default"), which names ``aten.linear.default`` and an ``fxopt.linear.default`` (an int8 linear) alike.
``importer_map`` is the one place that translates: each name gets one dispatcher that routes a node by its
overload, so ``fxopt.linear`` can never reach ``aten.linear``'s converter; a core (aten/prims) overload that
shares the name but is not in the table goes to the importer's own converter, and any other overload is
refused (`UnsupportedOpError`), as ``supported`` already refuses it at legalize time.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from typing import Any

import torch
from tvm import relax

from fxopt import ops
from fxopt.errors import LoweringTableError, UnsupportedOpError

from . import convert as cv
from . import quant, quant_asym, quant_fused
from .attention import make_sdpa, permute_passthrough, view_passthrough
from .indexing import embedding, index_tensor, select_int
from .tensors import any_all, arithmetic, clamp, divide, empty, histc, maximum, relu, repeat, self_compare

aten = torch.ops.aten
Converter = Callable[[Any, Any], Any]
_CORE_NAMESPACES = ("aten", "prims")


def lowerings(extern: bool = False) -> dict[torch._ops.OpOverload, Converter]:
    """{op overload: converter} for ops the importer lacks or gets wrong, and fxopt's fused ops."""
    matmul = cv.make_matmul(extern)
    return {
        aten.amax.default: cv.amax,
        aten.cumsum.default: cv.cumsum,
        aten.slice.Tensor: cv.slice_tensor,
        aten.index.Tensor: index_tensor,
        aten.select.int: select_int,
        aten.embedding.default: embedding,
        **{getattr(getattr(aten, name), form): arithmetic(op, python_op) for name, op, python_op in (
            ("add", relax.op.add, operator.add), ("sub", relax.op.subtract, operator.sub),
            ("mul", relax.op.multiply, operator.mul)) for form in ("Tensor", "Scalar")},
        aten.div.Tensor: divide,
        aten.div.Scalar: divide,
        aten.div.Tensor_mode: divide,
        aten.div.Scalar_mode: divide,
        aten.repeat.default: repeat,
        aten.clamp.default: clamp,
        aten.relu.default: relu,
        aten.maximum.default: maximum,
        aten.minimum.default: maximum,
        aten.ne.Tensor: self_compare,
        aten.eq.Tensor: self_compare,
        aten.histc.default: histc,
        aten.empty_permuted.default: empty,
        **{getattr(op, form): any_all for op in (aten.any, aten.all) for form in ("default", "dim", "dims")
           if hasattr(op, form)},
        aten.pow.Tensor_Scalar: cv.pow_scalar,
        aten.rms_norm.default: cv.rms_norm,
        aten.layer_norm.default: cv.layer_norm,
        ops.rms_norm: cv.rms_norm,
        ops.add_rms_norm: cv.add_rms_norm,
        ops.add_layer_norm: cv.add_layer_norm,
        ops.quantize_int8: quant.quantize_int8,
        ops.int8_linear: quant.int8_linear,
        torch.ops.fxopt.int4_linear.default: quant.int4_linear,
        **quant_asym.converters(),
        **quant_fused.converters(),
        aten.linear.default: cv.make_linear(extern),
        aten.addmm.default: cv.make_addmm(extern),
        aten.mm.default: matmul,
        aten.bmm.default: matmul,
        aten.matmul.default: matmul,
        aten.scaled_dot_product_attention.default: make_sdpa(extern),
        **({aten.view.default: view_passthrough, aten.permute.default: permute_passthrough} if extern else {}),
    }


def importer_key(target: Any) -> str:
    return getattr(target, "__name__", str(target))


def is_core(target: Any) -> bool:
    """Targets the importer's own table is written for: aten/prims overloads and Python callables."""
    return not isinstance(target, torch._ops.OpOverload) or target.namespace in _CORE_NAMESPACES


def supported(target: Any, table: Mapping[Any, Converter], builtin: Mapping[str, Any]) -> bool:
    return target in table or (is_core(target) and importer_key(target) in builtin)


def builtin_map() -> dict[str, Any]:
    """The importer's own converters, by name."""
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

    return ExportedProgramImporter().convert_map


def importer_map(table: Mapping[Any, Converter]) -> dict[str, Converter]:
    """``table`` as ``custom_convert_map``: one dispatcher per importer key (see the module docstring)."""
    groups: dict[str, dict[Any, Converter]] = {}
    for target, conv in table.items():
        if not isinstance(target, torch._ops.OpOverload):
            raise LoweringTableError(f"tvm lowering table: key {target!r} is not an op overload; the importer "
                                     f"would match it by name ({importer_key(target)!r}) alone")
        groups.setdefault(importer_key(target), {})[target] = conv
    return {name: _dispatcher(name, group) for name, group in groups.items()}


def _dispatcher(name: str, group: Mapping[Any, Converter]) -> Converter:
    def dispatch(node: Any, imp: Any) -> Any:
        conv = group.get(node.target)
        if conv is not None:
            return conv(node, imp)
        if is_core(node.target):
            builtin = imp.__dict__.setdefault("_fxopt_builtin", imp.create_convert_map())
            if name in builtin:
                return builtin[name](node)
        raise UnsupportedOpError("tvm", [f"{node.name}: {node.target} (no lowering; the importer key {name!r} "
                                         f"is lowered for {sorted(str(t) for t in group)} only)"])

    dispatch.__name__ = f"dispatch_{name}"
    return dispatch
