"""The one rewriter: every graph edit of every pass goes through `Rewriter`.

It keeps `node.meta["val"]` (the single truth for shape and dtype) filled for the nodes it creates by
running the op on the fake tensors of its inputs, tags each new node with the pass that made it
(`meta["fxopt_pass"]`, so a backend can say which pass introduced a node it cannot lower), and never
changes a tensor in place: new constants become new attributes, and a replaced parameter is a new attribute
(the old one goes when nothing reads it), so the parameters shared with the graph before the pass stay intact.

Edits that change shapes (`replace_param` with a new shape, `set_arg`) re-propagate `meta["val"]` through
every node downstream (`repropagate`), so metadata never goes stale; `verify_graph` re-checks it.
"""

from __future__ import annotations

import logging
import operator
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import fx
from torch._guards import detect_fake_mode
from torch.utils._pytree import tree_map

log = logging.getLogger(__name__)


def fake_mode_of(gm: fx.GraphModule):
    vals = [n.meta.get("val") for n in gm.graph.nodes]
    return detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])


class Rewriter:
    def __init__(self, gm: fx.GraphModule, origin: str):
        self.gm, self.graph, self.origin = gm, gm.graph, origin
        self.fake_mode = fake_mode_of(gm)
        self.counts: Counter[str] = Counter()

    # -- creating nodes -------------------------------------------------------------------------------
    def call(self, target: Callable, args: tuple, kwargs: dict | None = None, *, before: fx.Node,
             like: fx.Node | None = None) -> fx.Node:
        kwargs = kwargs or {}
        with self.graph.inserting_before(before):
            node = self.graph.call_function(target, tuple(args), kwargs)
        self._annotate(node, like or before)
        return node

    def getitem(self, node: fx.Node, index: int, *, before: fx.Node) -> fx.Node:
        return self.call(operator.getitem, (node, index), before=before, like=node)

    def constant(self, name: str, tensor: torch.Tensor, *, before: fx.Node, parameter: bool = False) -> fx.Node:
        """A new buffer (or parameter) holding `tensor` (never an in-place edit of an existing one)."""
        attr = name.replace(".", "_")
        i = 0
        while hasattr(self.gm, f"{attr}_{i}"):
            i += 1
        attr = f"{attr}_{i}"
        if parameter:
            self.gm.register_parameter(attr, torch.nn.Parameter(tensor, requires_grad=False))
        else:
            self.gm.register_buffer(attr, tensor)
        with self.graph.inserting_before(before):
            node = self.graph.get_attr(attr)
        if self.fake_mode is not None:
            node.meta["val"] = self.fake_mode.from_tensor(tensor, static_shapes=True)
        node.meta["fxopt_pass"] = self.origin
        return node

    def hoist(self, constants: Iterable[fx.Node], *, before: fx.Node) -> None:
        """Move the get_attr nodes among `constants` that come after `before` to just ahead of it: a constant an
        earlier rewrite made, read again by a node that precedes it."""
        order = {n: i for i, n in enumerate(self.graph.nodes)}
        for node in constants:
            if node.op != "get_attr":
                raise ValueError(f"hoist moves constants only, not {node.op} {node.name}")
            if order[node] > order[before]:
                before.prepend(node)

    def _annotate(self, node: fx.Node, like: fx.Node) -> None:
        for key in ("stack_trace", "nn_module_stack", "source_fn_stack"):
            if key in like.meta:
                node.meta[key] = like.meta[key]
        node.meta["fxopt_pass"] = self.origin
        self._propagate(node)

    def _propagate(self, node: fx.Node) -> None:
        if self.fake_mode is not None:
            node.meta["val"] = propagate_meta(node, self.fake_mode)
            node.meta[META_BY] = self.origin

    # -- editing arguments and parameters ------------------------------------------------------------
    def set_arg(self, node: fx.Node, index: int, value: Any) -> None:
        """Set positional argument `index` of `node` (trailing defaults left out become None first) and
        re-propagate shapes downstream."""
        args = list(node.args) + [None] * (index + 1 - len(node.args))
        args[index] = value
        node.args = tuple(args)
        node.meta["fxopt_pass"] = self.origin
        self.repropagate([node])

    def set_kwarg(self, nodes: Iterable[fx.Node], key: str, value: Any) -> None:
        """Set keyword argument `key` of every one of `nodes` (at once: shapes may agree only after all are set),
        then re-propagate shapes downstream."""
        nodes = list(nodes)
        for node in nodes:
            node.update_kwarg(key, value)
            node.meta["fxopt_pass"] = self.origin
        self.repropagate(nodes)

    def replace_param(self, node: fx.Node, tensor: torch.Tensor) -> fx.Node:
        """Read `tensor` (any shape) where the get_attr `node` read its parameter or buffer; a new attribute,
        never an in-place edit. The old attribute is deleted from this module when nothing reads it any more."""
        if node.op != "get_attr":
            raise TypeError(f"replace_param expects a get_attr node, got {node.op} {node.name}")
        old = node.target
        was_param = isinstance(get_attr(self.gm, old), torch.nn.Parameter)
        new = self.constant(str(old), tensor.detach(), before=node, parameter=was_param)
        node.replace_all_uses_with(new)
        self.graph.erase_node(node)
        if not any(n.op == "get_attr" and n.target == old for n in self.graph.nodes):
            _delete_attr(self.gm, old)
        self.repropagate(list(new.users))
        return new

    def replace_constant_for(self, const: fx.Node, reader: fx.Node, tensor: torch.Tensor) -> fx.Node:
        """`reader` reads `tensor` where it read the get_attr `const` (directly, or through a transpose of it
        that it reads); every other reader keeps the old constant (a tied weight changes for one site only)."""
        user = next((u for u in const.users if u is reader or u in reader.args), None)
        if user is None:
            raise ValueError(f"{reader.name} does not read {const.name}")
        new = self.constant(str(const.target), tensor, before=user)
        new.meta[SOURCE] = const.meta.get(SOURCE, str(const.target))  # the parameter it stands in for, by name
        if user is not reader and len(user.users) > 1:  # a transpose shared with another reader: this one's own
            mine = self.call(user.target, (new, *user.args[1:]), before=reader, like=user)
            self.set_arg(reader, list(reader.args).index(user), mine)
        else:
            self.set_arg(user, list(user.args).index(const), new)
        return new

    def repropagate(self, nodes: Iterable[fx.Node]) -> None:
        """Recompute `meta["val"]` of `nodes` and of everything downstream of them, in graph order."""
        dirty = set(nodes)
        for node in self.graph.nodes:
            if node.op == "call_function" and (node in dirty or any(a in dirty for a in node.all_input_nodes)):
                self._propagate(node)
                dirty.add(node)

    # -- replacing and erasing -----------------------------------------------------------------------
    def replace(self, old: fx.Node, new: fx.Node | Any, rule: str | None = None, *,
                keep: Iterable[fx.Node] = ()) -> None:
        """Point every user of `old` (but those in `keep`) at `new`; count it under `rule`."""
        kept = set(keep)
        old.replace_all_uses_with(new, delete_user_cb=lambda user: user not in kept)
        if rule:
            self.counts[rule] += 1

    def erase_dead(self, nodes: Iterable[fx.Node]) -> None:
        """Erase the given nodes that no longer have users, consumers first."""
        pending = list(dict.fromkeys(nodes))
        changed = True
        while changed:
            changed = False
            for n in list(pending):
                if not getattr(n, "_erased", False) and not n.users and n.op == "call_function":
                    self.graph.erase_node(n)
                    pending.remove(n)
                    changed = True

    def drop_unread_attributes(self) -> list[str]:
        """Delete the parameters and buffers no get_attr reads any more (a weight replaced by its int8 codes),
        so the module does not carry them; the names dropped. Every name of a tied tensor counts on its own."""
        read = {n.target for n in self.graph.nodes if n.op == "get_attr"}
        names = [k for k, _ in (*self.gm.named_parameters(remove_duplicate=False),
                                *self.gm.named_buffers(remove_duplicate=False)) if k not in read]
        for k in names:
            _delete_attr(self.gm, k)
        return names

    def finish(self) -> fx.GraphModule:
        self.graph.eliminate_dead_code(is_impure_node=is_impure)
        self.graph.lint()
        self.gm.recompile()
        return self.gm


META_BY = "fxopt_meta_by"  # the pass whose rewriter last computed this node's meta["val"]
SOURCE = "fxopt_source"  # on a constant made by replace_constant_for: the parameter name it stands in for


def propagate_meta(node: fx.Node, fake_mode) -> Any:
    """`node`'s value on the fake values of its inputs (their `meta["val"]`)."""
    def fake(a: Any) -> Any:
        return a.meta.get("val") if isinstance(a, fx.Node) else a

    # no autograd: an in-place op on a buffer (a KV cache's index_copy_) would be refused on a leaf that needs grad
    with fake_mode, torch.no_grad():
        return node.target(*tree_map(fake, node.args), **tree_map(fake, node.kwargs))


def get_attr(gm: fx.GraphModule, qualname: str) -> Any:
    """The module attribute (parameter, buffer, constant) a get_attr node reads."""
    owner = gm
    for part in qualname.split("."):
        owner = getattr(owner, part)
    return owner


def _delete_attr(gm: fx.GraphModule, qualname: str) -> None:
    *path, leaf = qualname.split(".")
    owner = gm
    for part in path:
        owner = getattr(owner, part)
    for table in ("_parameters", "_buffers"):
        getattr(owner, table).pop(leaf, None)
    if hasattr(owner, leaf):
        delattr(owner, leaf)


def is_impure(node: fx.Node) -> bool:
    if node.op in ("placeholder", "output"):
        return True
    if node.op in ("call_module", "get_attr"):
        return node.op == "call_module"
    schema = getattr(node.target, "_schema", None) if isinstance(node.target, torch._ops.OpOverload) else None
    if schema is not None and (schema.is_mutable or "assert" in schema.name or "check" in schema.name):
        return True
    return node.is_impure()
