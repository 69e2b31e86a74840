"""Capture: nn.Module + example inputs -> an ATen-level torch.fx.GraphModule with shape metadata.

Tried in order, each failure recorded for the error message:
  1. torch.export (non-strict) with batch and sequence dims (dims 0 and 1 of every input tensor) marked
     `Dim.AUTO`: dynamic unless the model forces them static;
  2. torch.export (non-strict), all dims static;
  3. torch.fx.symbolic_trace, then torch.export of the traced module (for modules export cannot take).
The program is then functionalized (`run_decompositions({})`: in-place ops become out-of-place, nothing is
decomposed), so that passes may assume pure nodes. The result is `ExportedProgram.module()`: parameters are
get_attr nodes, the forward has the model's own signature and returns the model's own output structure
(ModelOutput, tuple, dict).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import io
import logging
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.export import Dim
from torch.fx.experimental.symbolic_shapes import is_concrete_int
from torch.utils import _pytree as pytree

from .errors import CaptureError, MissingInputsError, first_line
from .signature import META_KEY, Signature

log = logging.getLogger(__name__)

SIGNATURE = META_KEY  # gm.meta key: the captured call signature (fxopt.signature.Signature)


@dataclass
class CaptureInfo:
    method: str
    seconds: float = 0.0
    dynamic_dims: dict[str, list[int]] = field(default_factory=dict)
    static_dims: dict[str, list[int]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    failed_attempts: list[tuple[str, str]] = field(default_factory=list)


def dynamic_shapes_for(model: nn.Module, args: tuple, kwargs: dict) -> dict | None:
    """Dim.AUTO on dims 0 and 1 of every tensor input, keyed the way torch.export expects."""
    def spec(value: Any) -> Any:
        return pytree.tree_map(
            lambda v: {d: Dim.AUTO for d in range(min(v.dim(), 2))} if isinstance(v, torch.Tensor) else None,
            value)

    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except TypeError:
        return None
    shapes: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = inspect.signature(model.forward).parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            shapes[name] = {k: spec(v) for k, v in value.items()}  # nested under the **kwargs parameter
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            shapes[name] = tuple(spec(v) for v in value)
        else:
            shapes[name] = spec(value)
    return shapes


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {first_line(e)}"[:300]


def capture(model: nn.Module, args: tuple, kwargs: dict, share_weights: bool = False, progress: bool | None = False
            ) -> tuple[fx.GraphModule, CaptureInfo, dict | None]:
    """`progress`: a bar over the capture attempts (None: when stderr is a terminal)."""
    import time

    from tqdm.auto import tqdm

    from .calibration import show_progress

    if not isinstance(model, nn.Module):
        raise CaptureError(type(model).__name__, [("type check", "fxopt.optimize takes a torch.nn.Module")])
    if isinstance(model, torch.jit.ScriptModule):
        raise CaptureError(type(model).__name__, [("type check", "a TorchScript module (torch.jit.trace/script) "
                                                   "cannot be captured by torch.export; pass the nn.Module it was "
                                                   "made from")])
    if not args and not kwargs:
        raise MissingInputsError(
            "example inputs are required: pass example_inputs=(tensor, ...) and/or example_kwargs={...}")
    name = type(model).__name__
    # what forward assigns to the model while it is traced (`self.cache = x`) must not stay behind: fake
    # tensors and SymInts in the user's model. Each module's attributes are put back as they were.
    attributes = {m: dict(vars(m)) for m in model.modules()}
    attempts: list[tuple[str, str]] = []
    start = time.perf_counter()
    named = _named_var_kwargs(model, kwargs)
    try:
        try:
            model.eval()  # inference capture; the flags are restored below
        except NotImplementedError:  # an ExportedProgram.module(): already a captured graph, its mode fixed
            log.info("%s refuses eval(); captured in the mode it was exported in", name)
        if named is not None:
            model.forward = named  # the instance attribute as it was is put back below
        dyn = dynamic_shapes_for(model, args, kwargs)
        tries = [("torch.export(strict=False, dynamic batch/seq)", lambda: _export(model, args, kwargs, dyn)),
                 ("torch.export(strict=False, static shapes)", lambda: _export(model, args, kwargs, None)),
                 ("torch.fx.symbolic_trace + torch.export", lambda: _export_traced(model, args, kwargs))]
        if dyn is None:
            attempts.append(("dynamic shapes", "could not bind the example inputs to forward's signature"))
            tries = tries[1:]
        with tqdm(total=len(tries), desc=f"fxopt capture {name}", unit="try", leave=False,
                  disable=not show_progress(progress)) as bar:
            for how, fn in tries:
                bar.set_postfix_str(how)
                try:
                    ep = _without_graph_dump(fn)
                except Exception as e:
                    log.debug("capture attempt %s failed", how, exc_info=True)
                    attempts.append((how, _first_line(e)))
                    bar.update()
                    continue
                info = CaptureInfo(method=how, failed_attempts=attempts)
                functional = ep.run_decompositions({})
                gm = own_state(functional.module(), share_weights)
                _drop_unread_attributes(gm)
                gm.meta[SIGNATURE] = Signature.of(functional, forward=model.forward)
                _describe_dims(gm, info, dynamic_requested="dynamic" in how)
                info.seconds = time.perf_counter() - start
                return gm, info, dyn if "dynamic" in how else None
    finally:
        for m, saved in attributes.items():  # also the training flags and the instance `forward` for **kwargs
            now = vars(m)
            for key in [k for k in now if k not in saved]:
                del now[key]
            now.update({k: v for k, v in saved.items() if now.get(k) is not v})
    raise CaptureError(name, attempts)


def _without_graph_dump(fn):
    """`fn()` with stderr held back: a failed torch.export prints the partial graph's code there (kilobytes),
    which is kept at DEBUG; what the model itself wrote is passed on when the attempt succeeds."""
    held = io.StringIO()
    ok = False
    try:
        with contextlib.redirect_stderr(held):
            result = fn()
        ok = True
        return result
    finally:
        if ok:
            sys.stderr.write(held.getvalue())
        elif held.getvalue():
            log.debug("torch.export wrote to stderr:\n%s", held.getvalue())


def _drop_unread_attributes(gm: fx.GraphModule) -> None:
    """Erase get_attr nodes nothing reads: torch.export reads a tied weight under one of its names and leaves a
    dead read of the other, which the first edit's dead-code sweep would otherwise remove behind a pass's back."""
    dead = [n for n in gm.graph.nodes if n.op == "get_attr" and not n.users]
    for n in dead:
        gm.graph.erase_node(n)
    if dead:
        gm.recompile()


def _named_var_kwargs(model: nn.Module, kwargs: dict) -> Any:
    """For `forward(..., **kwargs)` called with keyword inputs that land in `**kwargs`: a forward whose signature
    names them as keyword-only parameters. torch.export cannot mark dims of inputs inside `**kwargs` dynamic
    (its constraint solver fails on the nesting), but it can for named parameters; the call is the same."""
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return None
    params = list(sig.parameters.values())
    extra = [k for k in kwargs if k not in sig.parameters]
    if not extra or not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    original = model.forward

    def forward(*args: Any, **kw: Any) -> Any:
        return original(*args, **kw)

    kept = [p for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD]
    forward.__signature__ = sig.replace(  # type: ignore[attr-defined]
        parameters=kept + [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY) for k in extra])
    return forward


def own_state(gm: fx.GraphModule, share_weights: bool = False) -> fx.GraphModule:
    """Give the captured graph tensors of its own, so that neither it nor the user's model can change the other.

    torch.export's module holds the user's own Parameter and buffer objects: `opt.half()` would convert the
    user's model, and a buffer the forward mutates (a counter, a KV cache) would be written in the user's model
    by every run of the graph. Buffers and tensor constants are always copied. Parameters are copied too
    (`share_weights=False`), so in-place edits on either side (`load_state_dict`, an optimizer step) stay on that
    side; with `share_weights=True` they are new Parameter objects over the same storage: conversions
    (`.half()`, `.to()`) stay apart and no memory is doubled, but in-place writes are seen by both. Tied weights
    stay tied (one copy per original tensor).
    """
    copies: dict[int, torch.Tensor] = {}

    def own(t: torch.Tensor, parameter: bool) -> torch.Tensor:
        if id(t) not in copies:
            data = t.detach() if parameter and share_weights else t.detach().clone()
            copies[id(t)] = nn.Parameter(data, requires_grad=t.requires_grad) if parameter else data
        return copies[id(t)]

    for module in gm.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[name] = own(p, parameter=True)
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = own(b, parameter=False)
        for name, value in list(vars(module).items()):
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
                setattr(module, name, own(value, parameter=False))
    return gm


def _export(model, args, kwargs, dynamic_shapes):
    return torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)


def _export_traced(model, args, kwargs):
    traced = torch.fx.symbolic_trace(model)
    return torch.export.export(traced, args, kwargs, strict=False)


def _describe_dims(gm: fx.GraphModule, info: CaptureInfo, dynamic_requested: bool) -> None:
    for node in gm.graph.find_nodes(op="placeholder"):
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        dyn = [d for d, s in enumerate(val.shape) if not is_concrete_int(s)]
        static = [d for d in range(min(val.dim(), 2)) if d not in dyn]
        info.dynamic_dims[node.name] = dyn
        if static:
            info.static_dims[node.name] = static
            why = ("the model forces them or their example size is 0 or 1" if dynamic_requested
                   else "dynamic capture failed")
            info.notes.append(f"input {node.name!r}: dims {static} are static ({why})")
    signature = gm.meta.get(SIGNATURE)
    for leaf in (x for a in (signature.arguments if signature else ()) for x in a.leaves if x.ranges):
        for d, bounds in enumerate(leaf.ranges):
            low, high = bounds or (None, None)
            if (low is not None and low > 2) or high is not None:  # 2: torch.export's 0/1 specialization
                info.notes.append(f"input {leaf.name!r}: dim {d} accepts sizes {low} to "
                                  f"{'any' if high is None else high} (the model requires it; calls outside "
                                  f"are refused)")


@contextlib.contextmanager
def torch_quiet():
    """Silences what torch's own internals print and a user of fxopt cannot act on: torch.export's deprecation
    warning (it deep-copies its module call graph through `isinstance(spec, LeafSpec)`), and the ONNX
    exporter's note that torchvision's ops are not registered, and the ONNX IR's note on the exporter's empty
    attribute lists."""
    loggers = [logging.getLogger(name) for name in _CHATTY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg, level in zip(loggers, levels):
        lg.setLevel(max(level, logging.ERROR))
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


_CHATTY_LOGGERS = ("torch.onnx._internal.exporter._registration",  # "torchvision is not installed. Skipping"
                   "onnx_ir._convenience",  # "Attribute type is ambiguous" (torchlib's empty attribute lists)
                   "torch.fx.experimental.symbolic_shapes")  # "Unable to find user code corresponding to {u0}"


def quiet(function):
    """`function` run under torch_quiet()."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with torch_quiet():
            return function(*args, **kwargs)

    return wrapper


def export_graph_module(gm: fx.GraphModule, args: tuple, kwargs: dict, dynamic_shapes: dict | None):
    """Re-export an optimized graph (for the backends), with the capture's dynamic dims. The spec is keyed by
    the user's forward; where the graph's forward names its inputs otherwise (`forward(*xs)` becomes
    `forward(xs_0, xs_1)`), the same specs are given in input order."""
    try:
        return torch.export.export(gm, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    except torch._dynamo.exc.UserError as e:
        if dynamic_shapes is None or "top-level keys" not in str(e):
            raise
    in_order: list[Any] = []
    for value in dynamic_shapes.values():
        in_order += list(value) if isinstance(value, tuple) else [value]
    return torch.export.export(gm, args, kwargs, dynamic_shapes=tuple(in_order), strict=False)
