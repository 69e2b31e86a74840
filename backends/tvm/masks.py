"""Attention masks that are constants of the compiled shapes.

Hugging Face models build their attention mask inside the graph (arange, comparisons, the
packed-sequence cumsum) and hand it to ``scaled_dot_product_attention``. With static shapes and
no ``attention_mask`` input that mask does not depend on any input value: it is a constant, and
usually an all-true or a causal one. An explicit mask keeps fused attention on its masked
(slower) path and reads B·S² mask elements per layer; ``is_causal=True`` lets flash attention
skip the upper triangle. So we evaluate such masks once at lowering time and

    all kept            -> attn_mask=None
    kept == tril(ones)  -> attn_mask=None, is_causal=True     (only for Lq == Lk)

which is exact up to rounding (a fused kernel's causal path and its masked path sum in another order).
Masks that depend on inputs (a padding ``attention_mask``, dynamic shapes) are left alone.

``FoldConstantMasks`` declares the rewrite like a pass (exactness, tolerance); the TVM backend runs it through
``run_checked``, which compares the program's outputs before and after on its example inputs with
``fxopt.numerics.compare`` and the declared tolerance, and returns the report (``lower.Lowered.rewrites``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch.export import ExportedProgram
from torch.fx.node import map_arg

from fxopt.errors import NumericsError
from fxopt.numerics import compare
from fxopt.pass_base import ROUNDING, Exactness, Tolerance
from fxopt.report import PassReport

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


def _mask_kind(ep: ExportedProgram, node: torch.fx.Node, mask: torch.fx.Node) -> str | None:
    q, k = node.args[0].meta["val"], node.args[1].meta["val"]
    lq, lk = q.shape[-2], k.shape[-2]
    value = _constant_value(ep, mask) if isinstance(lq, int) and isinstance(lk, int) else None
    return _classify(value, lq, lk) if value is not None else None


def _fold(node: torch.fx.Node, kind: str) -> None:
    args, kwargs = list(node.args), dict(node.kwargs)
    if len(args) > 3:
        args[3] = None
    kwargs.pop("attn_mask", None)
    if kind == "causal":
        if len(args) > 5:
            args[5] = True
        else:
            kwargs["is_causal"] = True
    node.args, node.kwargs = tuple(args), kwargs


def _sdpa_masks(ep: ExportedProgram):
    for node in ep.graph.nodes:
        if node.op != "call_function" or node.target is not torch.ops.aten.scaled_dot_product_attention.default:
            continue
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        causal = node.args[5] if len(node.args) > 5 else node.kwargs.get("is_causal", False)
        if isinstance(mask, torch.fx.Node) and not causal:
            yield node, mask


def simplify_constant_masks(ep: ExportedProgram) -> dict[str, int]:
    """Rewrite constant all-true/causal masks of SDPA nodes in ``ep`` in place; returns {kind: count}.
    Every mask is classified before any node changes."""
    cache: dict[torch.fx.Node, str | None] = {}
    plan = []
    for node, mask in _sdpa_masks(ep):
        if mask not in cache:
            cache[mask] = _mask_kind(ep, node, mask)
        if cache[mask] is not None:
            plan.append((node, cache[mask]))
    counts: dict[str, int] = {}
    for node, kind in plan:
        _fold(node, kind)
        counts[kind] = counts.get(kind, 0) + 1
    if plan:
        ep.graph.eliminate_dead_code()
        ep.graph_module.recompile()
        log.info("attention masks: %d constant masks folded (%s)", len(plan), counts)
    return counts


def _example_inputs(ep: ExportedProgram) -> tuple[tuple, dict] | None:
    example = getattr(ep, "example_inputs", None)
    return (tuple(example[0]), dict(example[1])) if example is not None else None


@dataclass(frozen=True)
class FoldConstantMasks:
    """SDPA masks that are constants of the compiled shapes -> no mask / is_causal=True."""

    name: ClassVar[str] = "fold_constant_masks"
    exactness: ClassVar[Exactness] = Exactness.EXACT
    tolerance: ClassVar[Tolerance] = ROUNDING

    def run(self, ep: ExportedProgram) -> dict[str, int]:
        return simplify_constant_masks(ep)

    def run_checked(self, ep: ExportedProgram) -> PassReport:
        """Run on ``ep`` in place and check its outputs on ``ep.example_inputs`` against the program before."""
        start, example = time.perf_counter(), _example_inputs(ep)
        if example is None:
            return PassReport(self.name, False, self.exactness.value, 0.0,
                              why_not="the program carries no example inputs to check the rewrite on")
        before = ep.module()(*example[0], **example[1])
        stats = self.run(ep)
        seconds = time.perf_counter() - start
        if not stats:
            return PassReport(self.name, False, self.exactness.value, seconds, why_not="no constant mask")
        numerics = compare(before, ep.module()(*example[0], **example[1]), self.tolerance)
        if not numerics.ok:
            raise NumericsError(f"tvm rewrite {self.name!r} broke its contract ({self.exactness.value}): "
                                f"{numerics.detail}")
        return PassReport(self.name, True, self.exactness.value, seconds, stats, numerics=numerics)
