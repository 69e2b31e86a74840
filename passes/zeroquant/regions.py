"""LKD's unit: a transformer block of the graph as a region of nodes, found from the plan. Plain data.

A block's *region* is the graph's nodes from its first quantized linear (in graph order) up to the next block's
first, the last block ending at its own last residual add: its inputs are the values it reads from before the
region (the residual stream, masks, rotary tables), its outputs the values read after it. Constants and what is
computed from constants alone (a transposed weight) are part of every region that reads them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from fxopt import ops

from .plan import LinearPlan


@dataclass(frozen=True, eq=False)
class Region:
    index: int  # the block
    nodes: tuple[fx.Node, ...]  # in graph order
    inputs: tuple[fx.Node, ...]
    outputs: tuple[fx.Node, ...]
    plans: tuple[LinearPlan, ...]

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(n.name for n in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(n.name for n in self.outputs)



def reader(plan: LinearPlan) -> fx.Node:
    return plan.site.reshapes[0] if plan.site.reshapes else plan.site.node


def _constant_only(n: fx.Node, memo: dict) -> bool:
    if n not in memo:
        memo[n] = n.op == "get_attr" or (n.op == "call_function" and bool(n.all_input_nodes)
                                         and all(_constant_only(a, memo) for a in n.all_input_nodes))
    return memo[n]


def block_regions(gm: fx.GraphModule, plans: list[LinearPlan]) -> list[Region]:
    """The region of every block with quantized linears, in graph order."""
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    by_block: dict[int, list[LinearPlan]] = {}
    for p in plans:
        if p.block is not None:
            by_block.setdefault(p.block, []).append(p)
    blocks = sorted(by_block.items(), key=lambda kv: min(order[reader(p)] for p in kv[1]))
    starts = [min(order[reader(p)] for p in ps) for _, ps in blocks]
    output = next(n for n in reversed(nodes) if n.op == "output")
    regions, memo = [], {}
    for i, (index, ps) in enumerate(blocks):
        if i + 1 < len(starts):
            end = starts[i + 1]
        else:
            last = max(order[p.site.output] for p in ps)
            end = last + 1
            for n in nodes[last + 1:]:  # through the residual add(s) and the getitems reading them
                if not any(order.get(a, -1) >= starts[i] for a in n.all_input_nodes) or n.op == "output":
                    break
                end = order[n] + 1
                if n.target in (torch.ops.aten.add.Tensor, ops.add_layer_norm, ops.add_rms_norm):
                    break
        inside = [n for n in nodes[starts[i]:end] if n.op == "call_function" and not _constant_only(n, memo)]
        members = set(inside)
        inputs = dict.fromkeys(a for n in inside for a in n.all_input_nodes
                               if a not in members and not _constant_only(a, memo))
        outputs = [n for n in inside if any(u not in members for u in n.users) or n in output.all_input_nodes]
        regions.append(Region(index, tuple(inside), tuple(inputs), tuple(outputs), tuple(ps)))
    return regions
