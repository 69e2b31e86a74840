"""ZeroQuant's plan: which linears, with which groups, and what each stores. Plain data; the graph is never touched.

A linear's weight, as [out, in], is split into `out / group_size` groups of consecutive output rows; a group
size that does not divide a chosen linear's rows is refused (`PassOptionError` naming `group_size` and every
such linear) before anything is edited: a linear silently left in float would be a different model than asked.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from fxopt.errors import PassOptionError
from fxopt.rewrite import get_attr
from fxopt.sites import LinearSite, val
from fxopt.structure import Structure, role_linears, unplaced_block_linears


@dataclass(frozen=True, eq=False)
class LinearPlan:
    site: LinearSite
    block: int | None  # the transformer block holding it (LKD trains one block at a time), None outside blocks
    weight: torch.Tensor  # [out, in], the float weight as the graph has it (LKD replaces it by trained latents)
    bits: int
    group_size: int
    placed: bool = True  # the analysis gave it a role (q/k/v/o, gate/up/down); else it is in a block's module only

    @property
    def groups(self) -> int:
        return self.site.out_features // self.group_size

    def bytes_before(self) -> int:
        return self.weight.numel() * val(self.site.weight).element_size()

    def bytes_after(self) -> int:
        """Stored codes plus one fp32 scale per row (the op's w_scale)."""
        out, cols = self.weight.shape
        per_row = cols if self.bits == 8 else (cols + 1) // 2
        return out * per_row + out * 4


def out_in(weight: torch.Tensor, layout: str) -> torch.Tensor:
    return weight if layout == "out_in" else weight.t()


def chosen_sites(structure: Structure, layers: str) -> list[tuple[LinearSite, int | None, bool, bool]]:
    """(site, block index, is an attention projection, has a role) of the linears to quantize: the blocks'
    (layers="blocks": with a role, and the others of the blocks' modules, structure.block_linears) or every linear
    ("all"). A block linear left in float would be a different model than asked."""
    block_of = {s: (index, attention, True) for s, (index, attention) in role_linears(structure).items()}
    block_of.update({s: (index, False, False) for s, index in unplaced_block_linears(structure).items()})
    sites = [s for s in structure.linears if s in block_of] if layers == "blocks" else list(structure.linears)
    return [(s, *block_of.get(s, (None, False, False))) for s in sites]


def plan_linears(gm: fx.GraphModule, structure: Structure, layers: str, bits: int, group_size: int,
                 pass_name: str, attention_bits: int | None = None) -> list[LinearPlan]:
    """`attention_bits`: the q/k/v/o projections' bits where they differ from the rest (ZeroQuant's W4/8: int4
    MLP weights, int8 attention weights)."""
    chosen = chosen_sites(structure, layers)
    bad = [f"{s.weight_name} ({s.out_features} rows)" for s, *_ in chosen if s.out_features % group_size]
    if bad:
        raise PassOptionError(pass_name, "group_size", f"= {group_size} does not divide the output rows of "
                              f"{', '.join(bad)}; choose a divisor of every quantized linear's rows "
                              f"(1 = per output channel)")
    return [LinearPlan(s, block, out_in(get_attr(gm, s.weight.target).detach(), s.layout),
                       attention_bits if attention and attention_bits is not None else bits, group_size, placed)
            for s, block, attention, placed in chosen]
