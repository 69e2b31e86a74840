"""Helpers for testing passes (ours and users' own): capture a graph, count ops, check a pass's contract."""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch import fx, nn

from .canonicalize import canonicalize_graph
from .capture import capture
from .numerics import compare, run_graph
from .pass_base import ROUNDING, Pass, PassContext, PassResult, Tolerance
from .pipeline import clone_graph_module


def op_name(node: fx.Node) -> str:
    """`aten.layer_norm`, `fxopt.rms_norm`, `getitem`: namespace.op without the overload."""
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._schema.name.split('::')[-1]}"
    return getattr(target, "__name__", str(target))


def count_ops(gm: fx.GraphModule) -> Counter[str]:
    return Counter(op_name(n) for n in gm.graph.nodes if n.op == "call_function")


def capture_graph(model: nn.Module, *args: Any, canonical: bool = True, **kwargs: Any) -> fx.GraphModule:
    """The captured graph, canonicalized as the pipeline does before the first pass (`canonical=False`: raw)."""
    gm = capture(model, args, kwargs)[0]
    if canonical:
        canonicalize_graph(gm)
    return gm


def run_pass(p: Pass, gm: fx.GraphModule, *args: Any, **kwargs: Any) -> PassResult:
    """Run `p` on a copy of `gm` (the original stays as it was)."""
    return p.run(clone_graph_module(gm), PassContext(args, kwargs))


def assert_within(got: Any, want: Any, tolerance: Tolerance = ROUNDING) -> None:
    """`got` equals `want` (same pytree of tensors) within `tolerance` (a pass's contract; default ROUNDING)."""
    result = compare(want, got, tolerance)
    assert result.ok, result.detail


def assert_pass_contract(p: Pass, before: fx.GraphModule, after: fx.GraphModule, *args: Any, **kwargs: Any):
    """The pass's own tolerance holds between `before` and `after` on these inputs."""
    result = compare(run_graph(before, args, kwargs), run_graph(after, args, kwargs), p.tolerance)
    assert result.ok, f"{p.name} broke its contract: {result.detail}"
    return result
