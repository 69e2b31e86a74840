"""Legalize and export an optimized fxopt graph to an ONNX file.

    legalize(opt)                 every node without a translation, listed at once (UnsupportedOpError)
    export(opt, "model.onnx")     torch.export → dynamo ONNX exporter with fxopt's translation table →
                                  onnxscript's graph optimizer [→ onnxscript's ORT fusions] → file → onnx.checker

The exporter's own post-export step at opset 23 also runs onnxscript's ONNX-op fusions, whose RotaryEmbedding
fusion of Llama's RoPE yields a model ORT 1.31 rejects (cos/sin cache shape); we therefore run the
exporter with `optimize=False` and onnxscript's optimizer (constant folding, dead code, inlining) ourselves.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import operator
import re
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import fx

from fxopt import ops
from fxopt.api import OptimizedModule
from fxopt.backends.index_bounds import index_bounds
from fxopt.capture import export_graph_module, quiet
from fxopt.decompositions import backend_decompositions, for_backends, without_constant_outputs
from fxopt.errors import FxoptError, PassOptionError, UnsupportedOpError, first_line
from fxopt.signature import Signature
from fxopt.widen import NOTE as widen_note
from fxopt.widen import widened

from . import int8_gemm as int8_gemm_choice
from .masked_rows import zero_rows_without_keys
from .translations import INT8_GEMMS, RMS_NORMALIZATION_OPSET, translation_table

log = logging.getLogger(__name__)

BACKEND = "onnxruntime"
DEFAULT_OPSET = 20  # torch.onnx's default; 23 when the graph holds an RMSNorm (see default_opset)
# above this many bytes of weights the file is split (a protobuf file cannot exceed 2 GiB)
EXTERNAL_DATA_THRESHOLD = 1 << 30


class OnnxExportError(FxoptError):
    """The ONNX exporter failed; names the node it failed on and the fxopt pass that introduced it."""

    def __init__(self, message: str, node: str | None = None, pass_name: str | None = None):
        self.node, self.pass_name = node, pass_name
        super().__init__(message)


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """What `export` wrote: the file, the opset, ONNX op counts, and onnxscript's ORT fusion counts."""

    path: Path
    opset: int
    op_counts: Mapping[str, int]
    fusion_counts: Mapping[str, int] | None = None
    external_data: bool = False
    io: Signature | None = None  # how the model's inputs/outputs map onto the file's
    fusion_error: str | None = None  # why onnxscript's ORT fusions were dropped (ORT rejected their graph)
    notes: tuple[str, ...] = ()  # what the export chose (bfloat16 computed in float32: fxopt.widen)
    index_bounds: tuple = ()  # what the inputs must satisfy for embeddings to stay in their tables


# -- legalize ----------------------------------------------------------------------------------------------

def _graph_module(program: Any) -> fx.GraphModule:
    if isinstance(program, torch.export.ExportedProgram):
        return program.graph_module
    if isinstance(program, fx.GraphModule):
        return program
    if isinstance(getattr(program, "graph_module", None), fx.GraphModule):
        return program.graph_module
    raise TypeError(f"expected an fxopt OptimizedModule, an fx.GraphModule or an ExportedProgram, "
                    f"not {type(program).__name__}")


@functools.lru_cache(maxsize=4)
def _torchlib_registry(opset: int):
    """torch.onnx's own registry (torchlib) at `opset`. Building it takes seconds, so it is built once and
    copied for each export. Private torch.onnx API (torch 2.13): None where it is missing."""
    try:
        from torch.onnx._internal.exporter import _registration
    except ImportError:  # pragma: no cover - other torch versions
        return None
    return _registration.ONNXRegistry.from_torchlib(opset_version=max(opset, 18))


def _registry_with(opset: int, table: Mapping[Any, Callable]):
    base = _torchlib_registry(opset)
    if base is None:
        return None
    registry = copy.copy(base)
    registry.functions = {k: list(v) for k, v in base.functions.items()}
    for target, fn in table.items():
        registry.register_op(target, fn)
    return registry


def _torchlib_ops(opset: int) -> frozenset:
    """The ops (registry keys) torch.onnx translates at `opset`."""
    base = _torchlib_registry(opset)
    return frozenset(key for key, decomps in base.functions.items() if decomps) if base else frozenset()


def _key(target: Any) -> Any:
    """How torch.onnx's registry keys an op: the qualified name of an OpOverload, else the callable."""
    return target.name() if isinstance(target, torch._ops.OpOverload) else target


# runtime checks the exporter removes before translating
_ASSERTIONS = frozenset({torch.ops.aten.sym_constrain_range_for_size.default, torch.ops.aten._assert_async.default,
                         torch.ops.aten._assert_async.msg, torch.ops.aten._assert_scalar.default,
                         torch.ops.aten._assert_tensor_metadata.default})


def _decomposable(target: Any) -> bool:
    """The exporter decomposes these into ops it knows before translating (as torch.export would)."""
    if not isinstance(target, torch._ops.OpOverload):
        return False
    if target in torch.export.default_decompositions() or target in torch._decomp.decomposition_table:
        return True
    if target in backend_decompositions():  # fxopt.decompositions, applied before translating
        return True
    return torch._C._dispatch_has_kernel_for_dispatch_key(target.name(), "CompositeImplicitAutograd")


# higher-order ops that torch.export inlines when the exporter decomposes the program (their bodies are checked)
_INLINED_HOPS = frozenset({torch.ops.higher_order.wrap_with_set_grad_enabled,
                           torch.ops.higher_order.wrap_with_autocast})


def _call_nodes(gm: fx.GraphModule):
    """Every call_function node, including those in the subgraphs of higher-order ops, parents first."""
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        yield node
        if isinstance(node.target, torch._ops.HigherOrderOperator):
            for arg in node.args:
                if isinstance(arg, fx.Node) and arg.op == "get_attr":
                    sub = getattr(gm, arg.target, None)
                    if isinstance(sub, fx.GraphModule):
                        yield from _call_nodes(sub)


def _origin(node: fx.Node) -> str | None:
    return node.meta.get("fxopt_pass")


@quiet
def legalize(program: Any, *, opset: int | None = None,
             extra_translations: Mapping[Any, Callable] | None = None) -> list[str]:
    """Check that every node of the graph has an ONNX translation; raise `UnsupportedOpError` listing all
    that have none (with the pass that introduced each). Returns [] when everything translates."""
    gm = _graph_module(program)
    opset = opset or default_opset(gm)
    known = _torchlib_ops(opset) | {_key(t) for t in [*translation_table(opset), *(extra_translations or {})]}
    missing: list[str] = []
    origin: dict[str, str] = {}
    for node in _call_nodes(gm):
        if node.target is operator.getitem or node.target in _ASSERTIONS:
            continue
        if _key(node.target) in known or _decomposable(node.target) or node.target in _INLINED_HOPS:
            continue
        entry = f"{node.name}: {_target_name(node.target)}"
        if node.target in (torch.ops.aten.copy_.default, torch.ops.aten.copy.default):
            entry += " (the forward writes a buffer it keeps: model state, which an ONNX graph cannot hold)"
        missing.append(entry)
        if _origin(node):
            origin[entry] = _origin(node)
    missing += _foreign_code_readers(gm)
    if missing:
        raise UnsupportedOpError(BACKEND, missing, origin)
    return missing


def _foreign_code_readers(gm: fx.GraphModule) -> list[str]:
    """Nodes other than int8_linear / int4_linear that read quantize_int8's codes: the lowering carries the codes
    as uint8 q + 128 (translations.py), which only those linears read."""
    entries = []
    for node in _call_nodes(gm):
        if node.target is not ops.quantize_int8:
            continue
        for codes in (u for u in node.users if u.target is operator.getitem and u.args[1] == 0):
            for user in codes.users:
                if user.target not in (ops.int8_linear, torch.ops.fxopt.int4_linear.default) \
                        or user.args[0] is not codes:
                    entries.append(f"{user.name}: reads the int8 codes of {node.name} (in ONNX the codes are "
                                   f"uint8 q + 128, read only by fxopt.int8_linear)")
    return entries


def _target_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return f"torch.ops.{target.namespace}.{target._schema.name.split('::')[-1]}.{target._overloadname}"
    return getattr(target, "__qualname__", None) or str(target)


def default_opset(gm: fx.GraphModule) -> int:
    """RMSNormalization is an ONNX op from opset 23; below it RMSNorm is written in primitive ops."""
    has_rms = any(n.op == "call_function" and n.target is ops.rms_norm for n in gm.graph.nodes)
    return RMS_NORMALIZATION_OPSET if has_rms else DEFAULT_OPSET


# -- export --------------------------------------------------------------------------------------------------

def _param_bytes(gm: fx.GraphModule) -> int:
    seen = {id(t): t for t in [*gm.parameters(), *gm.buffers()]}
    return sum(t.numel() * t.element_size() for t in seen.values())


def _output_names(ep: torch.export.ExportedProgram) -> list[str] | None:
    """ONNX output names from the model's output structure ("logits", "hidden_states.0", ...)."""
    from torch.export.graph_signature import TensorArgument
    from torch.utils import _pytree as pytree

    specs = [s for s in ep.graph_signature.output_specs if s.kind.name == "USER_OUTPUT"]
    inputs = {s.arg.name for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"}
    if any(getattr(s.arg, "name", None) in inputs for s in specs):
        return None  # naming an output that is an input would rename the input ("x" -> "1_orig")
    try:
        tree = pytree.tree_unflatten(list(range(len(specs))), ep.call_spec.out_spec)
        paths = [path for path, _ in pytree.tree_flatten_with_path(tree)[0]]
    except Exception:  # noqa: BLE001 - output types that do not rebuild from placeholders
        return None
    names = []
    for path, spec in zip(paths, specs):
        if not isinstance(spec.arg, TensorArgument):
            continue
        name = ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)
        names.append(re.sub(r"[^A-Za-z0-9_.]", "_", name) or "output")
    if len(set(names)) != len(names) or len(names) != len(specs):
        return None
    return names


def _find_failed_node(error: BaseException, ep: torch.export.ExportedProgram,
                      gm: fx.GraphModule) -> tuple[str | None, str | None]:
    """(node, pass) for an exporter failure: the node named in the message, traced back to `gm`."""
    text = "\n".join(str(e) for e in _chain(error))
    m = re.search(r"Error when translating node %(\w+)", text)
    gm_nodes = {n.name: n for n in gm.graph.nodes}
    if m:
        ep_node = next((n for n in ep.graph.nodes if n.name == m.group(1)), None)
        for source in _sources(ep_node):
            if source in gm_nodes:
                return source, _origin(gm_nodes[source])
    t = re.search(r"target=torch\.ops\.([\w.]+)", text)
    if t:
        for n in gm.graph.nodes:
            if n.op == "call_function" and _target_name(n.target) == f"torch.ops.{t.group(1)}":
                return n.name, _origin(n)
    return (m.group(1) if m else None), None


def _chain(error: BaseException):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _sources(node: fx.Node | None) -> list[str]:
    """The names this node was made from (torch.export's `from_node` provenance), nearest first, then its
    own name (re-export may reuse a name for another node, so provenance goes first)."""
    if node is None:
        return []
    names, stack = [], list(node.meta.get("from_node") or [])
    while stack:
        source = stack.pop(0)
        names.append(source.name)
        stack.extend(getattr(source, "from_node", None) or [])
    return [*names, node.name]


def _translate(ep: torch.export.ExportedProgram, gm: fx.GraphModule, opset: int, table: Mapping[Any, Callable]):
    registry = _registry_with(opset, table)
    try:
        if registry is None:  # pragma: no cover - the public path (builds torchlib's registry each time)
            return torch.onnx.export(ep, (), dynamo=True, custom_translation_table=dict(table),
                                     opset_version=opset, optimize=False, verbose=False,
                                     output_names=_output_names(ep))
        from torch.onnx._internal.exporter import _core

        # what torch.onnx.export(ExportedProgram, dynamo=True, ...) runs, with the registry built once
        return _core.export(ep, registry=registry, output_names=_output_names(ep), optimize=False,
                            verbose=False, opset_version=opset)
    except Exception as e:  # noqa: BLE001 - re-raised naming the node and the pass
        node, pass_name = _find_failed_node(e, ep, gm)
        where = (f" at node {node!r}" if node else "") + (
            f" (introduced by pass {pass_name!r})" if pass_name else " (not introduced by an fxopt pass)"
            if node else "")
        summary = next((ln for ln in str(e).splitlines() if ln.startswith("<class")), "")
        raise OnnxExportError(f"ONNX export failed{where}: {type(e).__name__}: {summary or str(e)[:500]}",
                              node, pass_name) from e


def op_counts(model: Any) -> Counter[str]:
    """ONNX op counts keyed "op_type" (ONNX domain) or "domain.op_type", for a path, ModelProto or ir.Model."""
    import onnx
    import onnx_ir as ir

    if isinstance(model, (str, Path)):
        model = onnx.load(str(model), load_external_data=False)
    nodes = model.graph.node if isinstance(model, onnx.ModelProto) else list(ir.traversal.RecursiveGraphIterator(
        model.graph))
    counts: Counter[str] = Counter()
    for n in nodes:
        domain = n.domain if n.domain not in ("", "ai.onnx") else ""
        counts[f"{domain}.{n.op_type}" if domain else n.op_type] += 1
    return counts


MIN_OPSET = 18  # the dynamo exporter writes no lower opset (it would silently raise a lower request to 18)


def _checked_opset(opset: Any) -> int:
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= newest:
        raise PassOptionError("export_onnx", "opset", f"must be an int from {MIN_OPSET} (the lowest the exporter "
                              f"writes) to {newest} (the newest this onnx knows), got {opset!r}")
    return opset


def _reads_int8_weights(target) -> bool:
    """An fxopt op with an integer weight operand (`wq`): an int8 linear, in whichever form, whose GEMM
    the `int8_gemm` choice decides."""
    return isinstance(target, torch._ops.OpOverload) and target.namespace == ops.NAMESPACE and \
        any(a.name == "wq" for a in target._schema.arguments)


@quiet
def export_file(opt: Any, path: str | Path, *, dynamic: bool = True, opset: int | None = None,
                external_data: bool | None = None, ort_fusions: bool = False, optimize: bool = True,
                check: bool = True, extra_translations: Mapping[Any, Callable] | None = None,
                int8_gemm: str = "auto") -> ExportResult:
    """Write `opt` (an fxopt OptimizedModule) as an ONNX file; see `export` in __init__ for the options."""
    import onnx_ir.passes.common
    import onnxscript.optimizer

    path = Path(path)
    if int8_gemm not in ("auto", *INT8_GEMMS):
        raise PassOptionError("export_onnx", "int8_gemm", f"must be 'auto' or one of {INT8_GEMMS}, got {int8_gemm!r}")
    notes: tuple[str, ...] = ()
    if (wide := widened(opt) if isinstance(opt, OptimizedModule) else None) is not None:
        opt, notes = wide, (widen_note,)  # ONNX Runtime's CPU provider has no bfloat16 MatMul
        log.info("onnxruntime: %s", widen_note)
    gm = _graph_module(opt)
    opset = default_opset(gm) if opset is None else _checked_opset(opset)
    gemm = None
    if any(_reads_int8_weights(n.target) for n in _call_nodes(gm)):
        gemm = int8_gemm_choice.resolve(int8_gemm)
        notes += (f"int8 linears as ORT {'uint8·int8' if gemm == 'u8s8' else 'uint8·uint8'} GEMMs"
                  + (" (uint8·int8 probed exact on this CPU)" if int8_gemm == "auto" and gemm == "u8s8" else ""),)
    table = {**translation_table(opset, int8_gemm=gemm or "u8u8"), **(extra_translations or {})}
    legalize(gm, opset=opset, extra_translations=extra_translations)
    if isinstance(opt, torch.export.ExportedProgram):
        ep = opt  # its own dynamic dims
    elif not hasattr(opt, "exported_program"):
        raise TypeError(f"export takes an fxopt OptimizedModule or an ExportedProgram, not {type(opt).__name__}")
    elif dynamic:
        if getattr(opt, "dynamic_shapes", None) is None:
            log.info("the model was captured with static shapes; the ONNX file has static shapes too")
        ep = opt.exported_program()
    else:
        ep = export_graph_module(gm, opt.example_inputs, opt.example_kwargs, None)
    ep = for_backends(ep)
    signature = Signature.of_module(ep, opt)  # with the constant outputs, which the file does not have
    bounds = tuple(index_bounds(ep, list(signature.input_names)))
    if ep is not opt:  # a program fxopt re-exported (not the caller's own): torch's zeros for keyless rows
        ep = without_constant_outputs(zero_rows_without_keys(ep))
    program = _translate(ep, gm, opset, table)
    if gemm is not None:
        program.model.metadata_props[int8_gemm_choice.METADATA_KEY] = gemm
    if optimize:
        # common subexpressions first: an int8 weight read by several GEMMs (blocks tied across depth) gets one
        # Transpose, which then folds into the file (onnxscript folds a large input's only reader, not one of many)
        onnx_ir.passes.common.CommonSubexpressionEliminationPass()(program.model)
        onnxscript.optimizer.optimize_ir(program.model)
    if external_data is None:
        external_data = _param_bytes(gm) > EXTERNAL_DATA_THRESHOLD
    path.parent.mkdir(parents=True, exist_ok=True)
    fusion_counts, fusion_error = None, None
    if ort_fusions:
        fusion_counts, fusion_error = _fuse_for_ort(program, path, external_data)
    else:
        _save(program, path, external_data)
    if check:
        try:
            _check(path, ort_fusions and fusion_error is None)
        except Exception as e:  # noqa: BLE001 - onnx.checker's ValidationError / InferenceError
            raise OnnxExportError(f"the exported file fails onnx.checker ({type(e).__name__}: {first_line(e, 400)}); "
                                  f"export with check=False to write it anyway") from e
    counts = op_counts(path)
    log.info("exported %s (opset %d): %s", path, opset, dict(counts))
    return ExportResult(path, opset, dict(counts), fusion_counts, external_data, signature, fusion_error, notes,
                        bounds)


def _save(program: Any, path: Path, external_data: bool) -> None:
    data_file = path.with_name(path.name + ".data")
    if data_file.exists():
        data_file.unlink()  # the exporter appends to an existing data file
    program.save(path, external_data=external_data)


def _fuse_for_ort(program: Any, path: Path, external_data: bool) -> tuple[dict[str, int], str | None]:
    """onnxscript's ORT fusions, kept only if ORT accepts the fused graph (onnxscript 0.7.2 leaves a Gemm
    on a 3-d input in HF GPT-2, which ORT refuses at session creation); else the unfused export is kept."""
    import onnx_ir as ir
    import onnxruntime as ort
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    unfused = ir.to_proto(program.model)
    program.model, counts = optimize_for_ort(program.model)
    fusion_counts = {k: v for k, v in counts.items() if v}
    _save(program, path, external_data)
    try:  # at ORT's default (full) optimization level: with none, ORT accepts that graph
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - reported and recorded; the unfused graph is kept
        reason = f"{type(e).__name__}: {str(e).strip()[:300]}"
        log.warning("onnxruntime rejects the graph after onnxscript's ORT fusions (%s); keeping the export "
                    "without them", reason)
        program.model = ir.from_proto(unfused)
        _save(program, path, external_data)
        return fusion_counts, reason
    log.info("onnxscript ORT fusions: %s", fusion_counts or "none applied")
    return fusion_counts, None


# ORT registers these in the ONNX domain although ONNX does not define them; onnxscript's ORT fusions emit them
_ORT_ONLY_ONNX_DOMAIN_OPS = frozenset({"SimplifiedLayerNormalization"})


def _check(path: Path, ort_fusions: bool) -> None:
    import onnx

    if ort_fusions and _ORT_ONLY_ONNX_DOMAIN_OPS & set(op_counts(path)):
        # the file targets ORT: check everything but those ops' registration (onnx.checker has no switch)
        log.warning("%s holds ORT-only ops in the ONNX domain (%s); checked without them", path,
                    sorted(_ORT_ONLY_ONNX_DOMAIN_OPS & set(op_counts(path))))
        model = onnx.load(str(path), load_external_data=False)
        for n in model.graph.node:
            if n.domain in ("", "ai.onnx") and n.op_type in _ORT_ONLY_ONNX_DOMAIN_OPS:
                n.domain = "com.microsoft"
        if "com.microsoft" not in {o.domain for o in model.opset_import}:
            model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
        onnx.checker.check_model(model, full_check=False)
        return
    onnx.checker.check_model(str(path), full_check=True)
