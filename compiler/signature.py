"""The input/output signature of a captured program, shared by every backend's runner.

    sig = Signature.of(exported_program, forward=opt.graph_module.forward)
    flat = sig.bind(args, kwargs)     # the graph's flat inputs, in order (tensors and SymInts; constants dropped)
    out = sig.unflatten(results)      # the model's own output structure from the graph's tensor outputs
    sig.to_json() / Signature.from_json(d)

Binding is by name, as Python binds a call: arguments captured positionally may be passed positionally (in
order) or by keyword, those captured by keyword by keyword. Every mismatch is an `InputMismatchError` naming
the argument: an unknown keyword, an extra positional argument, one given twice, a missing one, a nested
argument structured differently, or a Python value (`use_cache=False`) that torch.export captured as a
constant and that now differs. A keyword argument may be left out, or one not given at capture passed, only
where its value is forward's own default (`defaults`, read from the model's forward at capture): the graph
computes the captured value, so any other value needs a new capture.

This file is also copied into every TVM artifact (as `fxopt_signature.py`, beside `loader.py`), where fxopt
is not installed: it imports only the standard library at module level and torch inside functions, and its
error derives from `FxoptError` only when it is imported as part of fxopt.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

log = logging.getLogger(__name__)

FORMAT = 1  # of to_json()
META_KEY = "fxopt_signature"  # gm.meta key: the signature captured from the user's model

if __package__ == "fxopt":
    from .errors import FxoptError as _Base
else:  # the copy inside a TVM artifact

    class _Base(Exception):  # type: ignore[no-redef]
        """Stands in for fxopt.errors.FxoptError where fxopt is not installed."""


class InputMismatchError(_Base, TypeError):
    """The call's arguments do not bind to the captured signature; `argument` names the one at fault."""

    def __init__(self, argument: str | None, problem: str):
        self.argument = argument
        super().__init__(f"input {argument!r}: {problem}" if argument else problem)


def check_index_bounds(bounds: Sequence[Sequence[Any]], flat: Sequence[Any]) -> None:
    """torch's IndexError where an embedding would read outside its table, as InputMismatchError naming the input:
    `bounds` from fxopt.backends.index_bounds (["values", i, rows, name] or ["size", i, dim, rows, name]), `flat`
    the bound tensors. For runners whose backend clamps or wraps such ids instead of refusing them."""
    import torch

    for kind, i, *rest in bounds:
        t, rows, name = flat[i], rest[-2], rest[-1]
        if kind == "size" and t.shape[rest[0]] > rows:
            raise InputMismatchError(name, f"dim {rest[0]} is {t.shape[rest[0]]}, and the model indexes a table of "
                                     f"{rows} rows by position along it (torch raises IndexError)")
        if kind == "values" and t.numel():
            low, high = (int(v) for v in torch.aminmax(t))  # one reduction (one device sync on a GPU)
            if low < 0 or high >= rows:
                raise InputMismatchError(name, f"holds ids from {low} to {high}, outside the {rows} rows of the "
                                         "embedding table it indexes (torch raises IndexError)")


TENSOR, SYMINT, CONSTANT = "tensor", "symint", "constant"
_JSON_SCALARS = (type(None), bool, int, float, str)


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One flat input of the graph: a tensor or SymInt placeholder (by name), or a captured constant."""

    name: str
    kind: str  # TENSOR | SYMINT | CONSTANT
    value: Any = None
    dtype: str | None = None  # a tensor's dtype at capture ("float32"); None: not checked
    shape: tuple | None = None  # a tensor's dims at capture: an int where static, None where dynamic
    # per dim, the (min, max) a dynamic dim may take (max None: unbounded); None where static or unknown
    ranges: tuple | None = None
    # per dim, the name of torch.export's size symbol (dims sharing one must be equal); None where static
    symbols: tuple | None = None


@dataclasses.dataclass(frozen=True)
class Argument:
    name: str
    keyword: bool  # passed by keyword at capture
    leaves: tuple[Leaf, ...]
    spec: Any = None  # pytree spec of a nested argument (None: one leaf, or unknown after a JSON round trip)

    @property
    def constant(self) -> bool:
        return all(leaf.kind == CONSTANT for leaf in self.leaves)


@dataclasses.dataclass(frozen=True)
class Signature:
    arguments: tuple[Argument, ...]
    outputs: tuple[Leaf, ...]  # per output leaf: TENSOR (name = index among tensor outputs) or CONSTANT
    out_spec: Any = None  # pytree spec of the output (None: outputs are returned flat)
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # forward's scalar defaults, by name
    widened: bool = False  # bfloat16 leaves computed in float32 (fxopt.widen): cast on the way in and out

    @property
    def input_names(self) -> list[str]:
        """Names of the flat inputs `bind` returns, in order."""
        return [leaf.name for a in self.arguments for leaf in a.leaves if leaf.kind != CONSTANT]

    @classmethod
    def of_module(cls, ep: Any, opt: Any) -> Signature:
        """For `ep` re-exported from an fxopt OptimizedModule (or a GraphModule) `opt`: names from the graph
        module's forward, defaults from the signature captured from the user's model."""
        gm = getattr(opt, "graph_module", opt)
        captured = getattr(gm, "meta", {}).get(META_KEY)
        sig = cls.of(ep, getattr(gm, "forward", None), defaults=getattr(captured, "defaults", None))
        if captured is None or not captured.widened:
            return sig
        # a float32 copy of a bfloat16 program: the call keeps the captured dtypes
        arguments = tuple(dataclasses.replace(a, leaves=tuple(dataclasses.replace(x, dtype=c.dtype)
                                                              for x, c in zip(a.leaves, b.leaves)))
                          for a, b in zip(sig.arguments, captured.arguments))
        outputs = tuple(dataclasses.replace(x, dtype=c.dtype) for x, c in zip(sig.outputs, captured.outputs))
        return dataclasses.replace(sig, arguments=arguments, outputs=outputs, widened=True)

    @classmethod
    def of(cls, ep: Any, forward: Callable | None = None, defaults: Mapping[str, Any] | None = None) -> Signature:
        """From a torch.export ExportedProgram; `forward` (the module's) supplies names of nested arguments and,
        unless `defaults` is given (a re-exported graph's forward has none), the defaults of its parameters."""
        sig = _from_exported_program(ep, forward)
        return dataclasses.replace(sig, defaults=dict(_scalar_defaults(forward) if defaults is None else defaults))

    # -- binding ---------------------------------------------------------------------------------------------

    def bind(self, args: Sequence[Any], kwargs: Mapping[str, Any], check_dtype: bool = True) -> list[Any]:
        values = self._match(tuple(args), dict(kwargs))
        flat: list[Any] = []
        for a in self.arguments:
            if a.name not in values:
                continue  # a constant keyword left out
            flat += _check_leaves(a, values[a.name], check_dtype)
        self._check_shared_sizes(values)
        if self.widened:
            flat = [_widen(v) for v in flat]
        return flat

    def _check_shared_sizes(self, values: Mapping[str, Any]) -> None:
        """Dims torch.export proved equal (one size symbol: `x + y`, a mask as long as the ids) must be equal."""
        from torch.utils import _pytree as pytree

        seen: dict[str, tuple[int, str, int]] = {}
        for a in self.arguments:
            if a.name not in values:
                continue
            for got, leaf in zip(pytree.tree_leaves(values[a.name]), a.leaves):
                for d, symbol in enumerate(leaf.symbols or ()):
                    if symbol is None or d >= got.dim():
                        continue
                    size = int(got.shape[d])
                    first = seen.setdefault(symbol, (size, a.name, d))
                    if first[0] != size:
                        raise InputMismatchError(a.name, f"has size {size} in dim {d}, but the captured program "
                                                 f"has it equal to dim {first[2]} of {first[1]!r}, which is "
                                                 f"{first[0]} in this call")

    def as_captured(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """The keyword arguments of a call (already bound) as the captured graph takes them: those not in the
        graph (at forward's default) dropped, captured constants left out (at forward's default) filled in."""
        names = {a.name for a in self.arguments}
        given = {k: v for k, v in kwargs.items() if k in names}
        for a in self.arguments:
            if a.keyword and a.constant and a.name not in given:
                given[a.name] = pytree_unflatten([leaf.value for leaf in a.leaves], a.spec)
        return given

    def _match(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        positional = [a for a in self.arguments if not a.keyword]
        if len(args) > len(positional):
            raise InputMismatchError(None, f"{len(args)} positional arguments given, the graph takes "
                                     f"{len(positional)} ({', '.join(a.name for a in positional) or 'none'}); "
                                     f"pass the others by keyword as at capture")
        values = {a.name: v for a, v in zip(positional, args)}
        known = {a.name for a in self.arguments}
        for key, value in kwargs.items():
            if key not in known:
                self._check_default(key, value)  # not an input of the graph: only forward's default is computed
                continue
            if key in values:
                raise InputMismatchError(key, "given both positionally and by keyword")
            values[key] = value
        for a in self.arguments:
            if a.name in values:
                continue
            if not (a.keyword and a.constant):
                raise InputMismatchError(a.name, "missing")
            captured = (pytree_unflatten([leaf.value for leaf in a.leaves], a.spec) if a.spec is not None
                        else a.leaves[0].value)
            if a.name not in self.defaults or not _same_constant(self.defaults[a.name], captured):
                default = (f"forward's default is {self.defaults[a.name]!r}" if a.name in self.defaults
                           else "forward declares no default for it")
                raise InputMismatchError(a.name, f"left out, but the graph was captured with {a.name}={captured!r} "
                                         f"and {default}; pass {a.name}={captured!r}, or capture again")
        return values

    def _check_default(self, key: str, value: Any) -> None:
        import torch

        known = sorted(a.name for a in self.arguments)
        if key not in self.defaults:
            raise InputMismatchError(key, f"unexpected keyword argument; the graph takes {known} (where forward "
                                     f"takes it through **kwargs, capture with {key} in the example inputs)")
        if isinstance(value, torch.Tensor) or not _same_constant(value, self.defaults[key]):
            raise InputMismatchError(key, f"was not given at capture, so the graph computes forward's default "
                                     f"{self.defaults[key]!r}; capture (fxopt.optimize) with {key} in the "
                                     f"example inputs to pass another value")

    def unflatten(self, tensors: Sequence[Any]) -> Any:
        n = sum(leaf.kind != CONSTANT for leaf in self.outputs)
        if len(tensors) != n:
            raise InputMismatchError(None, f"the backend returned {len(tensors)} outputs, the graph has {n}")
        leaves = [leaf.value if leaf.kind == CONSTANT else _as_captured(tensors[int(leaf.name)], leaf, self.widened)
                  for leaf in self.outputs]
        if self.out_spec is None:
            return leaves[0] if len(leaves) == 1 else tuple(leaves)
        from torch.utils import _pytree as pytree

        return pytree.tree_unflatten(leaves, self.out_spec)

    # -- JSON (the TVM manifest) -----------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "arguments": [
            {"name": a.name, "keyword": a.keyword, "spec": _dumps(a.spec), "leaves": [_leaf_json(x) for x in a.leaves]}
            for a in self.arguments], "outputs": [_leaf_json(x) for x in self.outputs],
            "out_spec": _dumps(self.out_spec), "defaults": {k: _encode(v) for k, v in self.defaults.items()},
            "widened": self.widened}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Signature:
        if data.get("format") != FORMAT:
            raise ValueError(f"signature format {data.get('format')!r}; this loader reads format {FORMAT}")
        arguments = tuple(Argument(a["name"], a["keyword"], tuple(_leaf(x) for x in a["leaves"]), _loads(a["spec"]))
                          for a in data["arguments"])
        return cls(arguments, tuple(_leaf(x) for x in data["outputs"]), _loads(data["out_spec"]),
                   {k: _decode(v) for k, v in data.get("defaults", {}).items()}, bool(data.get("widened", False)))


def pytree_unflatten(leaves: list[Any], spec: Any) -> Any:
    if spec is None:
        return leaves[0]
    from torch.utils import _pytree as pytree

    return pytree.tree_unflatten(leaves, spec)


def _check_leaves(a: Argument, value: Any, check_dtype: bool = True) -> list[Any]:
    import torch
    from torch.utils import _pytree as pytree

    leaves, spec = pytree.tree_flatten(value)
    if (a.spec is not None and spec != a.spec) or len(leaves) != len(a.leaves):
        raise InputMismatchError(a.name, f"structured as {spec}, but captured with {len(a.leaves)} leaves"
                                 + (f" as {a.spec}" if a.spec is not None else ""))
    flat = []
    for got, leaf in zip(leaves, a.leaves):
        if leaf.kind == CONSTANT:
            if isinstance(got, torch.Tensor) or not _same_constant(got, leaf.value):
                raise InputMismatchError(a.name, f"was the constant {leaf.value!r} at capture and is {got!r} now; "
                                         f"capture (fxopt.optimize) again to change it")
        elif leaf.kind == TENSOR and not isinstance(got, torch.Tensor):
            raise InputMismatchError(a.name, f"must be a tensor, got {type(got).__name__}")
        elif leaf.kind == TENSOR:
            _check_tensor(a.name, got, leaf, check_dtype)
            flat.append(got)
        else:
            flat.append(got)
    return flat


def _widen(value: Any) -> Any:
    import torch

    return value.float() if isinstance(value, torch.Tensor) and value.dtype == torch.bfloat16 else value


def _as_captured(value: Any, leaf: Leaf, widened: bool = False) -> Any:
    """A backend's output in the form the model returned it: a SymInt output as an int, a 0-d tensor as 0-d
    (runtimes hand both back as 1-element arrays), bfloat16 where a widened program computed it in float32."""
    if leaf.kind == SYMINT and hasattr(value, "numel") and value.numel() == 1:
        return int(value.reshape(()).item())
    if widened and leaf.dtype == "bfloat16" and hasattr(value, "dtype"):
        import torch

        value = value.to(torch.bfloat16)
    if leaf.shape == () and hasattr(value, "numel") and value.numel() == 1 and value.dim() != 0:
        return value.reshape(())
    return value


def _check_tensor(name: str, got: Any, leaf: Leaf, check_dtype: bool = True) -> None:
    dtype = str(got.dtype).removeprefix("torch.")
    if check_dtype and leaf.dtype is not None and dtype != leaf.dtype:
        raise InputMismatchError(name, f"has dtype {dtype}; the graph was captured for {leaf.dtype}")
    if leaf.shape is None:
        return
    if got.dim() != len(leaf.shape):
        raise InputMismatchError(name, f"has {got.dim()} dims; the graph was captured for {len(leaf.shape)} "
                                 f"(shape {_shape_text(leaf.shape)})")
    for d, (size, want) in enumerate(zip(got.shape, leaf.shape)):
        if want is not None and size != want:
            raise InputMismatchError(name, f"has size {size} in dim {d}, which the graph has static at {want} "
                                     f"(shape {_shape_text(leaf.shape)}; '?' dims are dynamic)")
        low, high = (leaf.ranges[d] if leaf.ranges and leaf.ranges[d] else (None, None))
        # a lower bound of 2 is torch.export's 0/1 specialization at capture, which any size may pass at run time
        if (low is not None and low > 2 and size < low) or (high is not None and size > high):
            raise InputMismatchError(name, f"has size {size} in dim {d}, outside the range the captured program "
                                     f"accepts there ({low} to {'any' if high is None else high}; the model "
                                     f"requires it, e.g. by indexing that dim)")


def _shape_text(shape: tuple) -> str:
    return "(" + ", ".join("?" if s is None else str(s) for s in shape) + ")"


def _same_constant(got: Any, captured: Any) -> bool:
    if isinstance(captured, tuple | list):
        return (type(got) is type(captured) and len(got) == len(captured)
                and all(_same_constant(g, c) for g, c in zip(got, captured)))
    if isinstance(captured, bool) or isinstance(got, bool):
        return type(got) is type(captured) and got == captured
    if isinstance(captured, int | float) and isinstance(got, int | float):
        # 3 and 3.0 compute different dtypes, -0.0 and 0.0 different signs: the same value only by type and repr
        return type(got) is type(captured) and repr(got) == repr(captured)
    if isinstance(captured, str) and not isinstance(got, str):
        return repr(got) == captured  # a non-JSON constant, stored as its repr
    try:
        return bool(got == captured)
    except Exception:  # noqa: BLE001 - values that do not compare
        return False


def _leaf_json(leaf: Leaf) -> dict[str, Any]:
    value = leaf.value if isinstance(leaf.value, _JSON_SCALARS) else repr(leaf.value)
    return {"name": leaf.name, "kind": leaf.kind, "value": value, "dtype": leaf.dtype,
            "shape": None if leaf.shape is None else list(leaf.shape),
            "ranges": None if leaf.ranges is None else [None if r is None else list(r) for r in leaf.ranges],
            "symbols": None if leaf.symbols is None else list(leaf.symbols)}


def _leaf(data: Mapping[str, Any]) -> Leaf:
    shape = data.get("shape")
    ranges = data.get("ranges")
    return Leaf(data["name"], data["kind"], data.get("value"), data.get("dtype"),
                None if shape is None else tuple(shape),
                None if ranges is None else tuple(None if r is None else tuple(r) for r in ranges),
                None if data.get("symbols") is None else tuple(data["symbols"]))


def _dumps(spec: Any) -> str | None:
    if spec is None:
        return None
    from torch.utils._pytree import treespec_dumps

    try:
        return treespec_dumps(spec)
    except Exception as err:  # noqa: BLE001 - output types without a serialized name (some ModelOutputs)
        log.info("pytree spec not serializable (%s); the artifact returns flat outputs", err)
        return None


def _loads(text: str | None) -> Any:
    if text is None:
        return None
    from torch.utils._pytree import treespec_loads

    try:
        return treespec_loads(text)
    except Exception as err:  # noqa: BLE001 - the output type may not be importable here
        log.warning("output structure not restored (%s); returning flat outputs", err)
        return None


def _from_exported_program(ep: Any, forward: Callable | None) -> Signature:
    from torch.export.graph_signature import ConstantArgument, SymIntArgument

    placeholders = {n.name: n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder"}

    def leaf(spec: Any) -> Leaf:
        if isinstance(spec.arg, ConstantArgument):
            return Leaf(spec.arg.name, CONSTANT, spec.arg.value)
        if isinstance(spec.arg, SymIntArgument):
            return Leaf(spec.arg.name, SYMINT)
        return _tensor_leaf(spec.arg.name, placeholders.get(spec.arg.name), ep.range_constraints)

    flat = [leaf(s) for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    in_spec = ep.call_spec.in_spec
    args_spec, kwargs_spec = in_spec.child(0), in_spec.child(1)
    names = _positional_names(forward, args_spec.num_children)
    arguments, start = [], 0
    for i, child in enumerate(args_spec.children()):
        leaves = tuple(flat[start:start + child.num_leaves])
        name = leaves[0].name if child.is_leaf() and names is None else (names[i] if names else f"args[{i}]")
        arguments.append(Argument(name, False, leaves, None if child.is_leaf() else child))
        start += child.num_leaves
    for key, child in zip(kwargs_spec.context or [], kwargs_spec.children()):
        arguments.append(Argument(key, True, tuple(flat[start:start + child.num_leaves]),
                                  None if child.is_leaf() else child))
        start += child.num_leaves
    outputs, k = [], 0
    output_node = next(n for n in ep.graph.nodes if n.op == "output")
    for s, value in zip(ep.graph_signature.output_specs, output_node.args[0]):
        if s.kind.name != "USER_OUTPUT":
            continue
        if isinstance(s.arg, ConstantArgument):
            outputs.append(Leaf(s.arg.name, CONSTANT, s.arg.value))
            continue
        val = value.meta.get("val") if hasattr(value, "meta") else None
        if isinstance(s.arg, SymIntArgument):  # a size the model returns: an int, not a tensor of one
            outputs.append(Leaf(str(k), SYMINT))
        else:
            outputs.append(_tensor_leaf(str(k), val))
        k += 1
    return Signature(tuple(arguments), tuple(outputs), ep.call_spec.out_spec)


def _tensor_leaf(name: str, val: Any, range_constraints: Mapping | None = None) -> Leaf:
    """A tensor leaf with the dtype and dims of its fake value (None where a dim is a SymInt: dynamic), and the
    range torch.export proved for each dynamic dim that is a plain symbol."""
    if val is None or not hasattr(val, "shape"):
        return Leaf(name, TENSOR)
    ranges = tuple(_range(d, range_constraints or {}) for d in val.shape)
    # a dim is static where it is an int, a SymInt a guard fixed to a constant, or one whose range is one value
    shape = tuple(_static_size(d, r) for d, r in zip(val.shape, ranges))
    ranges = tuple(None if size is not None else r for size, r in zip(shape, ranges))
    symbols = tuple(None if size is not None else _symbol(d) for d, size in zip(val.shape, shape))
    return Leaf(name, TENSOR, None, str(val.dtype).removeprefix("torch."), shape,
                ranges if any(r is not None for r in ranges) else None,
                symbols if any(x is not None for x in symbols) else None)


def _symbol(dim: Any) -> str | None:
    expr = getattr(getattr(dim, "node", None), "expr", None)
    return str(expr) if expr is not None and getattr(expr, "is_Symbol", False) else None


def _static_size(dim: Any, bounds: tuple | None) -> int | None:
    if isinstance(dim, int):
        return dim
    expr = getattr(getattr(dim, "node", None), "expr", None)
    if expr is not None and getattr(expr, "is_number", False):
        return int(expr)
    if bounds is not None and bounds[1] is not None and bounds[0] == bounds[1]:
        return int(bounds[0])
    return None


def _range(dim: Any, range_constraints: Mapping) -> tuple[int, int | None] | None:
    expr = getattr(getattr(dim, "node", None), "expr", None)
    bounds = range_constraints.get(expr) if expr is not None else None
    if bounds is None:
        return None
    low, high = bounds.lower, bounds.upper
    finite = getattr(high, "is_finite", True) and str(high) not in ("int_oo", "oo")
    return int(low), (int(high) if finite else None)


def _scalar_defaults(forward: Callable | None) -> dict[str, Any]:
    """forward's parameters whose default is a JSON scalar (None, bool, int, float, str): the values a call
    that leaves them out computes."""
    import inspect

    try:
        params = inspect.signature(forward).parameters.values() if forward is not None else ()
    except (TypeError, ValueError):
        return {}
    return {p.name: p.default for p in params if p.default is not p.empty and _plain(p.default)}


def _plain(value: Any) -> bool:
    """A JSON scalar, or a tuple or list of them (`window=(4, 4)`)."""
    if isinstance(value, tuple | list):
        return all(_plain(v) for v in value)
    return isinstance(value, _JSON_SCALARS)


def _encode(value: Any) -> Any:  # JSON has no tuples
    if isinstance(value, tuple):
        return {"tuple": [_encode(v) for v in value]}
    return [_encode(v) for v in value] if isinstance(value, list) else value


def _decode(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"tuple"}:
        return tuple(_decode(v) for v in value["tuple"])
    return [_decode(v) for v in value] if isinstance(value, list) else value


def _positional_names(forward: Callable | None, count: int) -> list[str] | None:
    import inspect

    if forward is None:
        return None
    try:
        params = list(inspect.signature(forward).parameters.values())
    except (TypeError, ValueError):
        return None
    plain = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return plain[:count] if len(plain) >= count else None
