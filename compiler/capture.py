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

Capture runs the user's forward (non-strict export runs its Python code), so forward's side effects land on the
user's objects; none may stay behind. Attributes forward assigns (`self.cache = x`) are put back as they were.
State forward changes in place is snapshotted first and put back in place (the same objects, so references the
user holds stay valid) after every attempt, only where it changed: in each module's `__dict__`, the mutable
containers (list, dict, set, bytearray, deque; nested ones and containers inside tuples too) and plain tensor
attributes. Tensors inside are cloned, except parameters and buffers (export never writes those, and models are
large), any tensor over `_LARGEST_SNAPSHOT` bytes and those past `_SNAPSHOT_BUDGET` bytes in all: such a tensor
is left as forward leaves it. A tensor is put back only where its version counter moved (it was written). Other objects
inside containers are kept by reference: their own attributes are not snapshotted. An attribute that cannot be
snapshotted (a tensor that cannot be cloned, nesting deeper than the recursion limit) is left alone. A plain tensor
attribute that forward writes cannot be captured (export takes it as a constant): that CaptureError names it and
says to register it as a buffer.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import io
import logging
import re
import sys
import warnings
from collections import deque
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

    _check_capturable(model, args, kwargs)
    name = type(model).__name__
    # what forward does to the model while it is traced (`self.cache = x`, `self.seen.append(x.shape[0])`) must
    # not stay behind: fake tensors and SymInts in the user's model. It is put back as it was.
    original = _ModelState.of(model)
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
        prepared = _ModelState(_attributes(model), original.in_place)  # as each attempt is to find the model
        how, functional = _first_capture(model, tries, attempts, progress, prepared)
        info = CaptureInfo(method=how, failed_attempts=attempts)
        gm = own_state(functional.module(), share_weights)
        _drop_unread_attributes(gm)
        gm.meta[SIGNATURE] = Signature.of(functional, forward=model.forward)
        _describe_dims(gm, info, dynamic_requested="dynamic" in how)
        info.seconds = time.perf_counter() - start
        return gm, info, dyn if "dynamic" in how else None
    finally:
        original.put_back()  # also the training flags and the instance `forward` for **kwargs


def _check_capturable(model: Any, args: tuple, kwargs: dict) -> None:
    if not isinstance(model, nn.Module):
        raise CaptureError(type(model).__name__, [("type check", "fxopt.optimize takes a torch.nn.Module")])
    if isinstance(model, torch.jit.ScriptModule):
        raise CaptureError(type(model).__name__, [("type check", "a TorchScript module (torch.jit.trace/script) "
                                                   "cannot be captured by torch.export; pass the nn.Module it was "
                                                   "made from")])
    if not args and not kwargs:
        raise MissingInputsError(
            "example inputs are required: pass example_inputs=(tensor, ...) and/or example_kwargs={...}")


def _first_capture(model: nn.Module, tries: list, attempts: list[tuple[str, str]], progress: bool | None,
                   state: _ModelState) -> tuple[str, Any]:
    """The first of `tries` that captures, as (how, functional ExportedProgram); each failure is recorded in
    `attempts`, and the last one is chained to the CaptureError when none captures. The model is put back to
    `state` after every attempt, so that each one runs forward on the user's state."""
    from tqdm.auto import tqdm

    from .calibration import show_progress

    name = type(model).__name__
    error: Exception | None = None
    with tqdm(total=len(tries), desc=f"fxopt capture {name}", unit="try", leave=False,
              disable=not show_progress(progress)) as bar:
        for how, fn in tries:
            bar.set_postfix_str(how)
            try:
                return how, _functional(_without_graph_dump(fn), model, how, attempts, state.in_place)
            except CaptureError:
                raise
            except Exception as e:
                log.debug("capture attempt %s failed", how, exc_info=True)
                attempts.append((how, _first_line(e)))
                error = e
                bar.update()
            finally:
                state.put_back()
    raise CaptureError(name, attempts) from error


_MUTATED_CONSTANT = re.compile(r"Constant (\S+) is mutated")  # torch.export's message (run_decompositions)


def _functional(ep: Any, model: nn.Module, how: str, attempts: list[tuple[str, str]],
                in_place: list[_SavedAttribute]) -> Any:
    """`ep` functionalized (in-place ops made out-of-place, nothing decomposed). A tensor that is neither a
    parameter nor a buffer and that forward writes in place fails here, for every attempt alike: a CaptureError
    naming it, at once."""
    try:
        return ep.run_decompositions({})
    except RuntimeError as e:
        mutated = _MUTATED_CONSTANT.search(str(e))
        if mutated is None:
            raise
        tensor = ep.constants.get(mutated[1])
        where, name = _locate(tensor, model, in_place) or (f"the tensor constant {mutated[1]!r}", "name")
        why = (f"forward writes in place {where}: torch.export captures a tensor that is neither a parameter nor a "
               f"buffer as a constant, which a graph cannot write; register it as a buffer instead "
               f"(`self.register_buffer({name!r}, tensor, persistent=False)` in __init__)")
        raise CaptureError(type(model).__name__, [*attempts, (how, why)]) from e


def _locate(tensor: Any, model: nn.Module, in_place: list[_SavedAttribute]) -> tuple[str, str] | None:
    """Where the snapshot saw `tensor`, in words, and the attribute that holds it."""
    for attribute in in_place:
        path = _find(attribute.saved, tensor, attribute.name, set())
        if path is None:
            continue
        owner = type(model.get_submodule(attribute.module)).__name__
        of = f"submodule {attribute.module!r} ({owner})" if attribute.module else f"the model ({owner})"
        if path == attribute.name:
            return f"the plain tensor attribute {path!r} of {of}", attribute.name
        return f"the tensor held at {path!r} of {of}", "name"
    return None


def _find(saved: Any, tensor: Any, path: str, seen: set[int]) -> str | None:
    if not isinstance(saved, _Saved) or id(saved.obj) in seen:
        return None
    seen.add(id(saved.obj))
    if saved.obj is tensor:
        return path
    if isinstance(saved.obj, torch.Tensor) or saved.held is None:
        return None
    elements = saved.held if isinstance(saved.obj, dict) else enumerate(saved.held)
    return next((p for k, v in elements if (p := _find(v, tensor, f"{path}[{k!r}]", seen)) is not None), None)


_MODULE_INTERNALS = frozenset(vars(nn.Module()))  # _parameters, _buffers, _modules, the hooks, training
_LARGEST_SNAPSHOT = 64 * 2**20  # bytes: a larger plain tensor is not cloned, and not put back if forward writes it
_SNAPSHOT_BUDGET = 512 * 2**20  # bytes cloned at most per capture; tensors beyond it are left alone likewise
_SPENT = "fxopt bytes cloned"  # the memo's entry that counts them


@dataclass
class _Saved:
    """A container or tensor forward could change in place, and what it held: for a container its elements
    (`_Saved` where they are containers or tensors themselves, else the element), for a tensor its clone. `held` is
    None where nothing is to be put back (a parameter, a buffer, a tensor too large or that cannot be cloned)."""

    obj: Any
    held: Any = None
    version: int | None = None  # a tensor's version counter when saved: unchanged means not written


@dataclass
class _SavedAttribute:
    module: str
    name: str
    saved: _Saved


@dataclass
class _ModelState:
    """What capture puts back in the user's model: each module's attributes as they were (forward reassigned
    them), and the state forward changed in place."""

    attributes: dict[nn.Module, dict[str, Any]]
    in_place: list[_SavedAttribute]

    @classmethod
    def of(cls, model: nn.Module) -> _ModelState:
        return cls(_attributes(model), _save_in_place_state(model))

    def put_back(self) -> None:
        _restore_in_place_state(self.in_place)
        for module, saved in self.attributes.items():
            now = vars(module)
            for key in [k for k in now if k not in saved]:
                del now[key]
            now.update({k: v for k, v in saved.items() if now.get(k) is not v})


def _attributes(model: nn.Module) -> dict[nn.Module, dict[str, Any]]:
    return {m: dict(vars(m)) for m in model.modules()}


def _save_in_place_state(model: nn.Module) -> list[_SavedAttribute]:
    """Snapshot of the state in `model`'s modules that forward could change in place (module docstring)."""
    owned = {id(t) for t in (*model.parameters(), *model.buffers())}
    memo: dict[int, _Saved] = {}  # shared and self-containing containers are snapshotted once
    saved = []
    for path, module in model.named_modules(remove_duplicate=True):
        for name, value in vars(module).items():
            if name in _MODULE_INTERNALS or not _may_change_in_place(value):
                continue
            try:
                saved.append(_SavedAttribute(path, name, _save(value, owned, memo)))
            except Exception:  # noqa: BLE001 - what cannot be snapshotted is left alone
                log.debug("%s of %r is not snapshotted for capture", name, path, exc_info=True)
    return saved


def _restore_in_place_state(saved: list[_SavedAttribute]) -> None:
    """Put back in place, where it changed, what `_save_in_place_state` saw. Never raises: it runs in `finally`."""
    done: set[int] = set()
    for attribute in saved:
        try:
            _restore(attribute.saved, done)
        except Exception:  # noqa: BLE001 - a failure must not hide the capture's own outcome
            log.warning("could not put back %s of module %r after capture; forward changed it in place",
                        attribute.name, attribute.module, exc_info=True)


def _may_change_in_place(value: Any) -> bool:
    return isinstance(value, (list, dict, set, bytearray, deque, tuple, torch.Tensor))


def _save(value: Any, owned: set[int], memo: dict[int, _Saved]) -> Any:
    if not _may_change_in_place(value):
        return value
    if id(value) in memo:
        return memo[id(value)]
    saved = memo[id(value)] = _Saved(value)
    if isinstance(value, torch.Tensor):
        saved.held = None if id(value) in owned else _clone(value, memo)
        saved.version = _version(value)
    elif isinstance(value, dict):
        saved.held = [(k, _save(v, owned, memo)) for k, v in value.items()]
    elif isinstance(value, (list, tuple, deque)):
        saved.held = [_save(v, owned, memo) for v in value]
    elif isinstance(value, set):
        saved.held = list(value)  # hashable elements: immutable in practice
    else:
        saved.held = bytes(value)
    return saved


def _clone(t: torch.Tensor, memo: dict) -> torch.Tensor | None:
    size = t.numel() * t.element_size()
    spent = memo.setdefault(_SPENT, [0])  # bytes cloned so far for this capture
    if size > _LARGEST_SNAPSHOT or spent[0] + size > _SNAPSHOT_BUDGET:
        log.debug("a plain tensor attribute of %s is too large to snapshot for capture", tuple(t.shape))
        return None
    try:
        copy = t.detach().clone()
    except Exception:  # noqa: BLE001 - a tensor subclass that cannot be cloned is left alone
        return None
    spent[0] += size
    return copy


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except Exception:  # noqa: BLE001 - an inference tensor has no version counter
        return None


def _original(element: Any) -> Any:
    return element.obj if isinstance(element, _Saved) else element


def _restore(saved: _Saved, done: set[int]) -> None:
    """`saved.obj` and, first, what it held, put back in place where they changed."""
    if saved.held is None or id(saved.obj) in done:
        return
    done.add(id(saved.obj))
    if isinstance(saved.obj, torch.Tensor):
        _restore_tensor(saved.obj, saved.held, saved.version)
        return
    elements = [v for _, v in saved.held] if isinstance(saved.obj, dict) else saved.held
    for element in elements:
        if isinstance(element, _Saved):
            _restore(element, done)
    _refill(saved.obj, saved.held)


def _refill(value: Any, held: Any) -> None:
    """A container cleared and filled with what it held, unless it holds those very objects still. A tuple is
    not refilled: it cannot change, only what it holds can."""
    if isinstance(value, dict):
        items = [(k, _original(v)) for k, v in held]
        if not _same([x for kv in value.items() for x in kv], [x for kv in items for x in kv]):
            value.clear()
            value.update(items)
    elif isinstance(value, (list, deque)):
        elements = [_original(v) for v in held]
        if not _same(list(value), elements):
            value.clear()
            value.extend(elements)
    elif isinstance(value, set):
        if {id(v) for v in value} != {id(v) for v in held}:
            value.clear()
            value.update(held)
    elif isinstance(value, bytearray) and value != held:
        value[:] = held


def _same(now: list, then: list) -> bool:
    return len(now) == len(then) and all(a is b for a, b in zip(now, then))


def _restore_tensor(t: torch.Tensor, held: torch.Tensor, version: int | None) -> None:
    same_layout = (t.shape, t.dtype, t.device) == (held.shape, held.dtype, held.device)
    if same_layout and version is not None and _version(t) == version:
        return  # not written (no comparison: meta tensors and NaNs compare as they are)
    with torch.inference_mode() if t.is_inference() else torch.no_grad():
        if not same_layout:
            t.data = held  # reshaped or retyped through `.data`: the same Python object, its data as it was
        elif version is not None or not torch.equal(t, held):
            t.copy_(held)


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
