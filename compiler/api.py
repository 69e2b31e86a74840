"""Public entry points: optimize, export_onnx, export_tvm, compile."""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from .capture import SIGNATURE, capture, export_graph_module, quiet
from .errors import BackendMismatchError, ConversionError, InferenceOnlyError, MissingInputsError, PassOptionError
from .pass_base import Pass, PassContext
from .pipeline import run_pipeline
from .report import Report
from .signature import InputMismatchError

log = logging.getLogger(__name__)


class OptimizedModule(nn.Module):
    """Runs like the original model (same signature, same output structure), on the optimized graph."""

    def __init__(self, graph_module: fx.GraphModule, report: Report, example_args: tuple,
                 example_kwargs: dict, dynamic_shapes: dict | None):
        super().__init__()
        self.graph_module = graph_module
        self.report = report
        self.example_inputs = example_args
        self.example_kwargs = example_kwargs
        self.dynamic_shapes = dynamic_shapes
        self._runtime()  # built now, so torch.compile never traces the copies

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        # Eager: the fused ops' kernels called directly, shape-only masks folded (fxopt.torch_runtime). While
        # torch.compile traces: the ops' decompositions, so Inductor fuses through them. The exported graph
        # (what backends get) keeps the ops.
        if torch.compiler.is_compiling():
            return self._runtime()[2](*args, **kwargs)
        signature = self.graph_module.meta.get(SIGNATURE)
        if signature is not None:  # a typed error naming the argument, before anything runs
            # dtypes as captured, until a conversion (opt.half(), .to(dtype)) makes the module's own the contract
            signature.bind(args, kwargs, check_dtype=not self.__dict__.get("_converted", False))
            kwargs = signature.as_captured(args, kwargs)  # left-out or extra keywords at forward's defaults
        try:
            return self._runtime()[1](args, kwargs)
        except AssertionError as e:
            if "Guard failed" not in str(e):
                raise
            dims = ", ".join(f"{k}{v}" for k, v in self.report.capture.dynamic_dims.items())
            raise InputMismatchError(None, f"the input shapes are outside what the captured program accepts "
                                     f"({str(e).strip()}); dynamic dims at capture: {dims or 'none'}") from e

    def _runtime(self) -> tuple:
        from .torch_kernels import decomposed_graph
        from .torch_runtime import EagerRunner

        cached = self.__dict__.get("_runtime_cache")
        if cached is None or cached[0] is not self.graph_module:  # rebuilt if graph_module is replaced
            cached = (self.graph_module, EagerRunner(self.graph_module), decomposed_graph(self.graph_module))
            self.__dict__["_runtime_cache"] = cached  # not submodules: state_dict stays the graph's
        return cached

    def _apply(self, fn, recurse: bool = True):  # every conversion (half, double, to, cuda) goes through here
        fixed = _dtype_fixing_node(self.graph_module)
        if fixed is not None and _changes_float_dtype(fn, self.graph_module):
            raise ConversionError(f"this optimized module cannot change its float dtype: {fixed.name} "
                                  f"({fixed.target}) computes in the dtypes fixed when it was quantized, with fp32 "
                                  "scales; convert the model first (model.half()), then fxopt.optimize it")
        self.__dict__["_converted"] = True
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True) -> OptimizedModule:
        if mode:
            raise InferenceOnlyError("an fxopt OptimizedModule is an inference graph; it has no training mode "
                                     "(train the original model and optimize it again)")
        self.training = False
        return self

    def __reduce__(self):  # torch.save(opt) / pickle: the fxopt artifact format (fxopt.artifact)
        from .artifact import from_bytes, to_bytes

        return from_bytes, (to_bytes(self),)

    @quiet
    def exported_program(self, dynamic: bool = True) -> torch.export.ExportedProgram:
        """The optimized graph re-exported (for backends): with the capture's dynamic batch/seq dims, or with
        every dim static at the example inputs' sizes (`dynamic=False`)."""
        return export_graph_module(self.graph_module, self.example_inputs, self.example_kwargs,
                                   self.dynamic_shapes if dynamic else None)


def _dtype_fixing_node(gm: fx.GraphModule) -> fx.Node | None:
    """The first call of an fxopt op that takes a dtype (`out_dtype`: the quantized linears), if any."""
    for node in gm.graph.nodes:
        schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
        if schema is not None and node.target.namespace == "fxopt" and any(
                a.name.endswith("dtype") for a in schema.arguments):  # a ScalarType argument
            return node
    return None


def _changes_float_dtype(fn, gm: fx.GraphModule) -> bool:
    """Whether a module conversion function changes the dtype of a float tensor the module holds (half, double,
    to(dtype); not a device move, nor a no-op such as .bfloat16() on a bfloat16 module)."""
    dtypes = {t.dtype for t in (*gm.parameters(), *gm.buffers()) if t.is_floating_point()}
    try:
        return any(fn(torch.zeros(1, dtype=d)).dtype != d for d in dtypes)
    except Exception:  # noqa: BLE001 - a probe: the conversion itself will raise what it raises
        return False


@quiet
def optimize(model: nn.Module, example_inputs: Any = None, passes: Sequence[str | Pass] = (), *,
             example_kwargs: Mapping[str, Any] | None = None, calibration: Iterable | None = None,
             check_numerics: bool = True, progress: bool | None = None,
             share_weights: bool = False) -> OptimizedModule:
    """Capture `model` on the example inputs, run `passes` in order, and return the optimized module.

    The graph is canonicalized first (a reported step; not with `passes=[]`). After every step it is verified
    and its outputs are compared with the graph before it on the example inputs, by that pass's tolerance (or
    the bound the pass stated for its run); the report records every step. `calibration`: an iterable (a list,
    a DataLoader) of inputs, iterated once per pass that calibrates and never held in memory as a whole (see
    fxopt.calibration for the item forms and what is refused before anything runs). `progress`: bars over the
    capture attempts, the passes and each calibration (None: when stderr is a terminal).

    The optimized module owns its tensors; `model` is left as it was (parameters, buffers, flags). Parameters
    are copied unless `share_weights=True` (then they share storage: no memory doubled, conversions such as
    `.half()` stay apart, in-place writes to weights are seen by both; see fxopt.capture.own_state).
    """
    from fxopt import passes as registry

    if example_inputs is None and not example_kwargs:
        raise MissingInputsError("fxopt.optimize needs example inputs: example_inputs=(tensor, ...) "
                                 "and/or example_kwargs={...}")
    args = example_inputs if isinstance(example_inputs, tuple) else (
        () if example_inputs is None else tuple(example_inputs) if isinstance(example_inputs, list)
        else (example_inputs,))
    kwargs = dict(example_kwargs or {})
    if isinstance(passes, (str, Pass)):
        passes = [passes]
    if not isinstance(passes, Iterable):
        raise PassOptionError("optimize", "passes", f"must be a list of pass names or Pass instances, got {passes!r}")
    for name, flag in (("check_numerics", check_numerics), ("share_weights", share_weights)):
        if not isinstance(flag, bool):
            raise PassOptionError("optimize", name, f"must be True or False, got {flag!r}")
    resolved = [registry.get(p) if isinstance(p, str) else p for p in passes]
    for p in resolved:
        if not isinstance(p, Pass):
            raise PassOptionError("optimize", "passes", f"must hold pass names or Pass instances, got {p!r}")
    ctx = PassContext(args, kwargs, calibration)
    from .pipeline import check_requirements

    check_requirements(resolved, ctx)  # refuse before the (slow) capture
    gm, info, dynamic_shapes = capture(model, args, kwargs, share_weights, progress)
    gm, pass_reports = run_pipeline(gm, resolved, ctx, check_numerics=check_numerics, progress=progress)
    report = Report(info, pass_reports)
    log.info("fxopt report\n%s", report)
    return OptimizedModule(gm, report, args, kwargs, dynamic_shapes)


def _backend(function: str, name: str):
    from fxopt.backends import BACKENDS

    if name not in BACKENDS:
        raise PassOptionError(function, "backend", f"must be one of {tuple(BACKENDS)}, got {name!r}")
    return BACKENDS[name]


def _check_opt(function: str, opt: Any) -> None:
    if not isinstance(opt, OptimizedModule):
        raise PassOptionError(function, "opt", f"must be the module fxopt.optimize (or fxopt.load) returned, got "
                              f"{type(opt).__name__}")


def _check_options(function: str, options: Mapping[str, Any], *functions: Any) -> None:
    """Every keyword in `options` is a keyword-only option of one of `functions` (the backend's own), else a
    PassOptionError naming it and listing the options there are."""
    known = [name for f in functions for name, p in inspect.signature(f).parameters.items()
             if p.kind is inspect.Parameter.KEYWORD_ONLY]
    for name in options:
        if name not in known:
            raise PassOptionError(function, name, f"is not an option of {function} (its options: "
                                  f"{', '.join(dict.fromkeys(known))})")


@quiet
def export_onnx(opt: OptimizedModule, path: str | Path, **options: Any) -> Path:
    """Write `opt` as an ONNX file (see fxopt.backends.onnxruntime.export for the options); returns the path."""
    from fxopt.backends import onnxruntime

    _check_opt("export_onnx", opt)
    _check_options("export_onnx", options, onnxruntime.export)
    return _backend("export_onnx", "onnxruntime").export(opt, path, **options)


@quiet
def export_tvm(opt: OptimizedModule, path: str | Path, target: str = "cpu", **options: Any) -> Path:
    """Write a TVM artifact directory for `target` (see fxopt.backends.tvm.export); returns the path."""
    chosen = _backend("export_tvm", "tvm")
    _check_target("export_tvm", chosen, target)
    _check_opt("export_tvm", opt)
    return chosen.export(opt, path, target=target, **options)


def _check_target(function: str, backend: Any, target: str) -> None:
    if target not in backend.targets:
        raise PassOptionError(function, "target", f"must be {' or '.join(map(repr, backend.targets))}, "
                              f"got {target!r}")


@quiet
def compile(opt: OptimizedModule, backend: str = "onnxruntime", target: str = "cpu", *,
            check_numerics: bool = True, **options: Any):
    """A callable running `opt` on `backend` for `target`, taking and returning torch tensors.

    With `check_numerics` (the default) the compiled model is run once on the example inputs and its outputs
    compared with `opt`'s: within the rounding of their dtype (ROUNDING; bfloat16's where the model computes in
    bfloat16 and the backend in float32, fxopt.widen) where every applied pass is exact;
    where a pass approximates (quantizers, where one rounding flips a code), within the strictest cosine any
    such pass promised. A difference raises `BackendMismatchError` naming the backend and the first output."""
    chosen = _backend("compile", backend)
    _check_target("compile", chosen, target)
    _check_opt("compile", opt)
    if backend == "onnxruntime":  # TVM passes the rest on to its build
        from fxopt.backends import onnxruntime

        _check_options("compile", options, onnxruntime.compile, onnxruntime.export)
    run = chosen.compile(opt, target, **options)
    if check_numerics:
        _check_compiled(opt, run, backend, target)
    return run


def _check_compiled(opt: OptimizedModule, run: Any, backend: str, target: str) -> None:
    from torch.utils import _pytree as pytree

    from . import widen
    from .numerics import compare, run_graph
    from .pass_base import ROUNDING, Tolerance

    def on(device: Any, tree: Any) -> Any:
        return pytree.tree_map_only(torch.Tensor, lambda t: t.to(device), tree)

    args, kwargs = on("cuda" if target == "cuda" else "cpu", (opt.example_inputs, opt.example_kwargs))
    want = run_graph(opt, opt.example_inputs, opt.example_kwargs)
    with torch.no_grad():
        got = on("cpu", run(*args, **kwargs))
    leaves, spec = pytree.tree_flatten_with_path(on("cpu", want))
    got_leaves, got_spec = pytree.tree_flatten(got)
    if got_spec != spec:
        raise BackendMismatchError(backend, target, "structure", f"returned {got_spec}, the module {spec}")
    cosines = [p.tolerance.min_cosine for p in opt.report.passes
               if p.applied and p.tolerance is not None and p.tolerance.min_cosine is not None]
    rounding = widen.TOLERANCE if widen.has_bfloat16(opt.graph_module, args, kwargs) else ROUNDING
    tolerance = rounding if not cosines else Tolerance({dt: math.inf for dt in ROUNDING.rtol}, math.inf,
                                                       max(cosines))
    for (path, w), g in zip(leaves, got_leaves):
        result = compare(w, g, tolerance)
        if not result.ok:
            raise BackendMismatchError(backend, target, pytree.keystr(path) or "(the output)",
                                       result.detail.removeprefix("output 0: "))
