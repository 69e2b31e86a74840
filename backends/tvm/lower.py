"""torch.export graph -> Relax IRModule, with parameters kept as function inputs.

The ExportedProgram is decomposed to core ATen *except* for the ops that ``convert.py`` lowers
whole (linear, layer_norm, scaled_dot_product_attention, fxopt's fused norms): keeping them whole
lets the CUDA build hand GEMMs and attention to a library and keeps norm numerics in float32.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind

from fxopt.backends.index_bounds import index_bounds
from fxopt.decompositions import backend_decompositions, without_constant_outputs
from fxopt.errors import FxoptError, UnsupportedOpError, first_line
from fxopt.signature import Signature

from .convert import padded_output_width
from .masks import FoldConstantMasks
from .table import builtin_map, importer_map, lowerings, supported

log = logging.getLogger(__name__)

_KEEP_WHOLE = (
    "aten.linear.default",
    "aten.layer_norm.default",
    "aten.rms_norm.default",
    "aten.scaled_dot_product_attention.default",
    "aten.matmul.default",
)


class ImporterError(UnsupportedOpError):
    """TVM's importer failed on a node that has a translation (a symbolic size it cannot take, a dtype it
    keeps): found before anything is built, by ``legalize`` as by ``compile``."""

    def __init__(self, node: str, error: BaseException):
        self.backend, self.nodes = "tvm", [f"{node}: the TVM importer failed ({type(error).__name__}: "
                                           f"{first_line(error)})"]
        FxoptError.__init__(self, f"tvm: the importer could not convert {self.nodes[0]}")


def _failed_node(error: BaseException) -> str:
    """``name: target`` of the node the importer was converting when it raised (from its loop's frame)."""
    tb, found = error.__traceback__, None
    while tb is not None:
        node = tb.tb_frame.f_locals.get("node") if tb.tb_frame.f_code.co_name == "_translate_fx_graph" else None
        found = node if node is not None else found
        tb = tb.tb_next
    return f"{found.name}: {found.target}" if found is not None else "(the graph)"


@dataclasses.dataclass(frozen=True)
class Lowered:
    """A Relax module plus what the runtime needs to call it with torch inputs."""

    mod: Any                         # tvm.IRModule; main(*user_inputs, *params)
    input_names: list[str]           # user tensor inputs, in flat pytree order
    input_positions: list[int]       # their positions in the flat (args, kwargs) leaves
    param_names: list[str]           # state_dict keys, in the order main takes them
    params: dict[str, torch.Tensor]
    in_spec: Any                     # pytree spec of (args, kwargs)
    out_spec: Any                    # pytree spec of the model's output
    narrow_outputs: dict[int, int]   # output index -> true last-dim size (computed padded)
    signature: Signature | None = None  # binds the model's (args, kwargs); shapes its outputs
    rewrites: tuple = ()             # PassReports of the rewrites run before import (masks.FoldConstantMasks)
    notes: tuple[str, ...] = ()      # what the lowering chose (static shapes after a failed dynamic import)
    index_bounds: tuple = ()         # what the inputs must satisfy for embeddings to stay in their tables


def decompose(ep: ExportedProgram) -> ExportedProgram:
    """Core-ATen decomposition that leaves the ops of ``_KEEP_WHOLE`` intact."""
    table = torch.export.default_decompositions()
    table.update(backend_decompositions())  # grouped matmuls (fxopt.decompositions)
    for name in _KEEP_WHOLE:
        ns, op, overload = name.split(".")
        table.pop(getattr(getattr(getattr(torch.ops, ns), op), overload), None)
    return ep.run_decompositions(table)


def unsupported_nodes(ep: ExportedProgram, *, decomposed: bool = False,
                      table: dict | None = None) -> list[str]:
    """Names (``node: target``) of call_function nodes with no lowering, in graph order."""
    ep = ep if decomposed else decompose(ep)
    table = lowerings() if table is None else table
    builtin = builtin_map()
    return [f"{n.name}: {n.target}" for n in ep.graph.nodes
            if n.op == "call_function" and not supported(n.target, table, builtin)]


def _drop_constant_inputs(ep: ExportedProgram) -> tuple[ExportedProgram, list[int], list[str]]:
    """Positions/names of user inputs that are tensors; non-tensor inputs (use_cache=False) were
    specialized by torch.export and only need removing from the placeholder list."""
    positions, names = [], []
    user = [s for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    gm = ep.graph_module
    kept = []
    for i, spec in enumerate(user):
        node = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.name == spec.arg.name)
        if isinstance(node.meta.get("val"), torch.Tensor):
            positions.append(i)
            names.append(spec.arg.name)
            kept.append(spec)
        elif not node.users:
            gm.graph.erase_node(node)
        else:
            raise UnsupportedOpError("tvm", [f"{node.name}: non-tensor input used in the graph"])
    specs = [s for s in ep.graph_signature.input_specs if s.kind != InputKind.USER_INPUT or s in kept]
    ep.graph_signature.input_specs[:] = specs
    gm.recompile()
    return ep, positions, names


def to_relax(ep: ExportedProgram, *, extern: bool = False, module: Any = None) -> Lowered:
    """Decompose, fold constant attention masks (masks.py), check and import ``ep``. ``extern``
    routes GEMMs and attention to runtime-registered packed functions (``convention.py``). ``module``: the
    OptimizedModule or GraphModule ``ep`` was exported from (argument names and defaults for the signature)."""
    from tvm.relax.frontend.torch import from_exported_program

    in_spec, out_spec = ep.call_spec.in_spec, ep.call_spec.out_spec
    signature = Signature.of_module(ep, module) if module is not None else Signature.of(ep)
    ep = without_constant_outputs(decompose(ep))  # the signature above puts them back
    masks = FoldConstantMasks().run_checked(ep)
    log.info("tvm rewrite %s: %s", masks.name, masks.stats if masks.applied else masks.why_not)
    table = lowerings(extern)
    missing = unsupported_nodes(ep, decomposed=True, table=table)
    if missing:
        raise UnsupportedOpError("tvm", missing)
    ep, positions, names = _drop_constant_inputs(ep)
    bounds = index_bounds(ep, names)
    try:
        mod = from_exported_program(ep, keep_params_as_input=True, run_ep_decomposition=False,
                                    custom_convert_map=importer_map(table))
    except Exception as e:  # noqa: BLE001 - the importer's own TypeError/ValueError/AssertionError
        raise ImporterError(_failed_node(e), e) from e
    mod["main"] = mod["main"].without_attr("params")  # the weights live in our params file
    by_arg = {s.arg.name: s.target for s in ep.graph_signature.input_specs if s.kind == InputKind.PARAMETER}
    num_input = int(mod["main"].attrs["num_input"])
    param_names = [by_arg[p.name] for p in mod["main"].params[num_input:]]
    state = ep.state_dict
    narrow = {}
    if extern:
        outputs, _ = torch.utils._pytree.tree_flatten(next(iter(ep.graph.find_nodes(op="output"))).args[0])
        narrow = {i: n for i, o in enumerate(outputs) if (n := padded_output_width(o)) is not None}
    log.info("imported %d user inputs, %d params", num_input, len(param_names))
    return Lowered(mod, names, positions, param_names, {k: state[k] for k in param_names},
                   in_spec, out_spec, narrow, signature, (masks,), index_bounds=tuple(bounds))
