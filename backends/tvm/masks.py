"""Attention masks that are constants of the compiled shapes.

Hugging Face models build their attention mask inside the graph (arange, comparisons, the
packed-sequence cumsum) and hand it to ``scaled_dot_product_attention``. With static shapes and
no ``attention_mask`` input that mask does not depend on any input value: it is a constant, and
usually an all-true or a causal one. An explicit mask keeps fused attention on its masked
(slower) path and reads B·S² mask elements per layer; ``is_causal=True`` lets flash attention
skip the upper triangle. So we evaluate such masks once at lowering time and

    all kept            -> attn_mask=None
    kept == tril(ones)  -> attn_mask=None, is_causal=True     (only for Lq == Lk)

which is exact. Masks that depend on inputs (a padding ``attention_mask``, dynamic shapes) are
left alone.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch.export import ExportedProgram
from torch.fx.node import map_arg

log = logging.getLogger(__name__)

MAX_MASK_NODES = 400  # evaluating the mask subgraph must stay cheap


def _ancestors(node: torch.fx.Node) -> set[torch.fx.Node] | None:
    seen: set[torch.fx.Node] = set()
    todo = [node]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if len(seen) > MAX_MASK_NODES:
            return None
        todo.extend(n.all_input_nodes)
    return seen


def _constant_value(ep: ExportedProgram, mask: torch.fx.Node) -> torch.Tensor | None:
    """The mask's value if it depends on parameters/buffers/constants only, else None."""
    nodes = _ancestors(mask)
    if nodes is None:
        return None
    sig = ep.graph_signature
    state = {**sig.inputs_to_parameters, **sig.inputs_to_buffers, **sig.inputs_to_lifted_tensor_constants}
    tensors = {**ep.state_dict, **ep.constants}
    env: dict[torch.fx.Node, Any] = {}
    for n in ep.graph.nodes:
        if n not in nodes:
            continue
        if n.op == "placeholder":
            if n.name not in state:
                return None  # a user input
            env[n] = tensors[state[n.name]]
        elif n.op == "call_function":
            env[n] = n.target(*map_arg(n.args, env.__getitem__), **map_arg(n.kwargs, env.__getitem__))
        else:
            return None
    value = env[mask]
    return value if isinstance(value, torch.Tensor) else None


def _classify(mask: torch.Tensor, lq: int, lk: int) -> str | None:
    keep = mask if mask.dtype == torch.bool else mask == 0
    if mask.dtype != torch.bool and not bool(((mask == 0) | (mask <= -1e4)).all()):
        return None  # a real additive bias, not a mask
    if bool(keep.all()):
        return "none"
    causal = torch.ones(lq, lk, dtype=torch.bool).tril()
    if lq == lk and bool((keep == causal).all()):
        return "causal"
    return None


def simplify_constant_masks(ep: ExportedProgram) -> int:
    """Rewrite constant all-true/causal masks of SDPA nodes in ``ep`` in place; returns how many."""
    changed = 0
    cache: dict[torch.fx.Node, str | None] = {}
    for node in ep.graph.nodes:
        if node.op != "call_function" or node.target is not torch.ops.aten.scaled_dot_product_attention.default:
            continue
        args, kwargs = list(node.args), dict(node.kwargs)
        mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
        causal = args[5] if len(args) > 5 else kwargs.get("is_causal", False)
        if not isinstance(mask, torch.fx.Node) or causal:
            continue
        if mask not in cache:
            q, k = node.args[0].meta["val"], node.args[1].meta["val"]
            lq, lk = q.shape[-2], k.shape[-2]
            value = _constant_value(ep, mask) if isinstance(lq, int) and isinstance(lk, int) else None
            cache[mask] = _classify(value, lq, lk) if value is not None else None
        kind = cache[mask]
        if kind is None:
            continue
        if len(args) > 3:
            args[3] = None
        kwargs.pop("attn_mask", None)
        if kind == "causal":
            if len(args) > 5:
                args[5] = True
            else:
                kwargs["is_causal"] = True
        node.args, node.kwargs = tuple(args), kwargs
        changed += 1
    if changed:
        ep.graph.eliminate_dead_code()
        ep.graph_module.recompile()
        log.info("attention masks: %d constant masks folded (%s)", changed, sorted(set(cache.values()) - {None}))
    return changed
