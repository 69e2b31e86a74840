"""The one rewriter: every graph edit of every pass goes through `Rewriter`.

It keeps `node.meta["val"]` (the single truth for shape and dtype) filled for the nodes it creates by
running the op on the fake tensors of its inputs, tags each new node with the pass that made it
(`meta["fxopt_pass"]`, so a backend can say which pass introduced a node it cannot lower), and never
changes a tensor in place: new constants become new attributes.
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

    def constant(self, name: str, tensor: torch.Tensor, *, before: fx.Node) -> fx.Node:
        """A new buffer holding `tensor` (never an in-place edit of an existing one)."""
        attr = name.replace(".", "_")
        i = 0
        while hasattr(self.gm, f"{attr}_{i}"):
            i += 1
        attr = f"{attr}_{i}"
        self.gm.register_buffer(attr, tensor)
        with self.graph.inserting_before(before):
            node = self.graph.get_attr(attr)
        if self.fake_mode is not None:
            node.meta["val"] = self.fake_mode.from_tensor(tensor, static_shapes=True)
        node.meta["fxopt_pass"] = self.origin
        return node

    def _annotate(self, node: fx.Node, like: fx.Node) -> None:
        for key in ("stack_trace", "nn_module_stack", "source_fn_stack"):
            if key in like.meta:
                node.meta[key] = like.meta[key]
        node.meta["fxopt_pass"] = self.origin
        if self.fake_mode is None:
            return

        def fake(a: Any) -> Any:
            return a.meta.get("val") if isinstance(a, fx.Node) else a

        with self.fake_mode:
            node.meta["val"] = node.target(*tree_map(fake, node.args), **tree_map(fake, node.kwargs))

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

    def finish(self) -> fx.GraphModule:
        self.graph.eliminate_dead_code(is_impure_node=is_impure)
        self.graph.lint()
        self.gm.recompile()
        return self.gm


def is_impure(node: fx.Node) -> bool:
    if node.op in ("placeholder", "output"):
        return True
    if node.op in ("call_module", "get_attr"):
        return node.op == "call_module"
    schema = getattr(node.target, "_schema", None) if isinstance(node.target, torch._ops.OpOverload) else None
    if schema is not None and (schema.is_mutable or "assert" in schema.name or "check" in schema.name):
        return True
    return node.is_impure()
