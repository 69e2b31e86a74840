"""How an OptimizedModule runs in eager torch: the fused ops' kernels called directly, and attention masks that
are functions of the input shapes alone folded into SDPA's fused paths, per input shape.

Why the masks: Hugging Face models skip building a causal mask in eager (SDPA gets `is_causal=True` and picks
flash attention) but build it under torch.export, so the captured graph computes arange/compare/cumsum and
hands SDPA an explicit (B, 1, S, S) mask, which keeps SDPA on a slower masked kernel (measured on an H200: the
captured GPT-2 b8 s512 graph 1.18x the original in eager). Such a mask depends on no input value (its graph
reads inputs only through `sym_size`), so it is the same for every call with the same input shapes. The first
call at new shapes runs the graph as captured and records each such mask; if the mask is all kept, or is the
causal triangle with Lq == Lk, later calls at those shapes run a copy where SDPA gets `attn_mask=None` (and
`is_causal=True`). Exact up to rounding: a fused kernel's causal path and its masked path sum in another order.
Masks that read an input's values (a padding `attention_mask`) are left alone.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import fx
from torch.utils import _pytree as pytree

from .capture import torch_quiet
from .torch_kernels import decomposed_graph, eager_table

log = logging.getLogger(__name__)

SDPA = torch.ops.aten.scaled_dot_product_attention.default
MAX_MASK_NODES = 400
MAX_SHAPES = 16  # folded copies kept; calls at further shapes run the captured masks


def _mask_arg(node: fx.Node) -> Any:
    return node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")


def _shape_only_ancestors(mask: fx.Node) -> list[fx.Node] | None:
    """The mask's ancestors if they read inputs only through sym_size (the mask is a function of shapes)."""
    seen: dict[fx.Node, None] = {}
    todo = [mask]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        if n.op == "placeholder" or len(seen) > MAX_MASK_NODES:
            return None
        seen[n] = None
        if n.op == "call_function" and n.target == torch.ops.aten.sym_size.int:
            continue  # the input's shape, not its values
        if n.op not in ("call_function", "get_attr"):
            return None
        todo.extend(n.all_input_nodes)
    return list(seen)


def foldable_sdpa(gm: fx.GraphModule) -> list[fx.Node]:
    """SDPA calls whose explicit mask is a function of the input shapes alone (no dropout, not yet causal)."""
    found = []
    for node in gm.graph.find_nodes(op="call_function", target=SDPA):
        mask, causal = _mask_arg(node), node.args[5] if len(node.args) > 5 else node.kwargs.get("is_causal")
        dropout = node.args[4] if len(node.args) > 4 else node.kwargs.get("dropout_p", 0.0)
        if isinstance(mask, fx.Node) and not causal and not dropout and _shape_only_ancestors(mask) is not None:
            found.append(node)
    return found


def classify(mask: torch.Tensor, lq: int, lk: int) -> str | None:
    """"none" (all kept), "causal" (tril, Lq == Lk), or None. A float mask keeps 0 and must drop the rest."""
    if mask.dtype == torch.bool:
        kept = mask
    elif mask.is_floating_point() and bool(((mask == 0) | (mask <= torch.finfo(mask.dtype).min / 2)).all()):
        kept = mask == 0
    else:
        return None
    if tuple(mask.shape[-2:]) != (lq, lk):
        return None
    if bool(kept.all()):
        return "none"
    tril = torch.ones(lq, lk, dtype=torch.bool, device=mask.device).tril()
    return "causal" if lq == lk and torch.equal(kept, tril.expand_as(kept)) else None


class _Recorder:
    def __init__(self):
        self.masks: dict[int, torch.Tensor] = {}

    def record(self, mask: torch.Tensor, slot: int) -> torch.Tensor:
        self.masks[slot] = mask
        return mask


class EagerRunner:
    """Runs `gm` in eager with the fused ops' kernels called directly, masks folded per input shapes."""

    def __init__(self, gm: fx.GraphModule):
        self.graph = decomposed_graph(gm, eager_table())
        self.sdpa = [n.name for n in foldable_sdpa(self.graph)]
        self.recorder = _Recorder()
        self.observing = self._observing_copy() if self.sdpa else self.graph
        self.by_shape: dict[tuple, fx.GraphModule] = {}

    def __call__(self, args: tuple, kwargs: dict) -> Any:
        if not self.sdpa:
            return self.graph(*args, **kwargs)
        key = _shape_key(args, kwargs)
        known = self.by_shape.get(key)
        if known is not None:
            return known(*args, **kwargs)
        self.recorder.masks.clear()
        out = self.observing(*args, **kwargs)
        if len(self.by_shape) < MAX_SHAPES:
            self.by_shape[key] = self._folded(self._kinds())
        return out

    def _kinds(self) -> dict[str, str]:
        kinds = {}
        for slot, name in enumerate(self.sdpa):
            mask = self.recorder.masks.get(slot)
            kind = None if mask is None or mask.dim() < 2 else classify(mask, *mask.shape[-2:])
            if kind is not None:
                kinds[name] = kind
        self.recorder.masks.clear()
        return kinds

    def _observing_copy(self) -> fx.GraphModule:
        gm = decomposed_graph(self.graph, {})
        nodes = {n.name: n for n in gm.graph.nodes}
        for slot, name in enumerate(self.sdpa):
            node = nodes[name]
            with gm.graph.inserting_before(node):
                seen = gm.graph.call_function(self.recorder.record, (_mask_arg(node), slot))
            _set_mask(node, seen, causal=False)
        gm.recompile()
        return gm

    def _folded(self, kinds: dict[str, str]) -> fx.GraphModule:
        if not kinds:
            return self.graph
        with torch_quiet():  # the copy deep-copies pytree specs (torch's LeafSpec deprecation warning)
            return self._folded_graph(kinds)

    def _folded_graph(self, kinds: dict[str, str]) -> fx.GraphModule:
        gm = decomposed_graph(self.graph, {})
        nodes = {n.name: n for n in gm.graph.nodes}
        for name, kind in kinds.items():
            node = nodes[name]
            mask = _mask_arg(node)
            _set_mask(node, None, causal=kind == "causal")
            _drop_unused(gm.graph, _shape_only_ancestors(mask) or [])
        gm.recompile()
        log.info("eager runtime: %d SDPA masks folded (%s)", len(kinds), sorted(set(kinds.values())))
        return gm


def _set_mask(node: fx.Node, mask: Any, causal: bool) -> None:
    kwargs = {k: v for k, v in node.kwargs.items() if k not in ("attn_mask", "is_causal")}
    rest = {"dropout_p": node.args[4]} if len(node.args) > 4 else {}
    node.args = tuple(node.args[:3])
    node.kwargs = {**kwargs, **rest, "attn_mask": mask, "is_causal": causal}


def _drop_unused(graph: fx.Graph, nodes: list[fx.Node]) -> None:
    """Erase the nodes of `nodes` that nothing uses any more (the folded mask's own subgraph)."""
    alive = dict.fromkeys(nodes)
    changed = True
    while changed:
        changed = False
        for n in list(alive):
            if not n.users:
                graph.erase_node(n)
                del alive[n]
                changed = True


def _shape_key(args: tuple, kwargs: dict) -> tuple:
    leaves = pytree.tree_leaves((args, kwargs))
    return tuple((tuple(v.shape), v.dtype, v.device) if isinstance(v, torch.Tensor) else repr(v) for v in leaves)
