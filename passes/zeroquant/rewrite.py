"""ZeroQuant's edits, all through the Rewriter, after the plan (and LKD) is complete:

    y = int8_linear(quantize_int8(x, None, None, "token"), Wq, Ws, b)             weight_bits = 8
    y = int4_linear(quantize_int8(x, None, None, "token"), pack_int4(Wq), Ws, b)  weight_bits = 4

one quantizer per input node (q/k/v reading one norm output share it); Ws is the group scale repeated per row.
Codes and scales are new constants, one pair per weight attribute: linears that share a weight (blocks tied across
depth) share its codes, unless LKD trained each its own latents. The float weight goes when nothing reads it.
"""

from __future__ import annotations

import torch
from torch import fx

from fxopt import ops
from fxopt.quant_ops import pack_int4, quantize_weight_groups
from fxopt.rewrite import Rewriter
from fxopt.sites import val

from .plan import LinearPlan

INT4_LINEAR = torch.ops.fxopt.int4_linear.default


def quantizer(rw: Rewriter, x: fx.Node, before: fx.Node) -> tuple[fx.Node, fx.Node]:
    """(codes, per-token scale) nodes of `x`, inserted before `before`."""
    q = rw.call(ops.quantize_int8, (x, None, None, "token"), before=before, like=before)
    return rw.getitem(q, 0, before=before), rw.getitem(q, 1, before=before)


def quantize_linear(rw: Rewriter, plan: LinearPlan, weight: torch.Tensor, codes: tuple[fx.Node, fx.Node],
                    made: dict) -> None:
    """Replace the site's output by the int8/int4 linear of `codes` and `weight` ([out, in], float); `made` holds
    the (codes, scales) constants of the weights quantized so far, by attribute, layout and format."""
    site = plan.site
    out = site.output
    target = INT4_LINEAR if plan.bits == 4 else ops.int8_linear
    key = (str(site.weight.target), site.layout, plan.bits, plan.group_size) if weight is plan.weight else None
    if key in made:  # the same weight read by another linear: its codes, moved before this use if they follow it
        w_node, s_node = made[key]
        rw.hoist((w_node, s_node), before=out)
    else:
        wq, ws = quantize_weight_groups(weight, plan.bits, plan.group_size)
        stored, suffix = (pack_int4(wq), "int4") if plan.bits == 4 else (wq, "int8")
        w_node = rw.constant(f"{site.weight_name}_{suffix}", stored, before=out)
        s_node = rw.constant(f"{site.weight_name}_scale", ws, before=out)
        if key is not None:
            made[key] = (w_node, s_node)
    y = rw.call(target, (*codes, w_node, s_node, site.bias, val(out).dtype), before=out, like=site.node)
    if tuple(val(y).shape) != tuple(val(out).shape):  # pragma: no cover - a site's output is x.shape[:-1] + (out,)
        raise AssertionError(f"{out.name}: quantized linear gives {tuple(val(y).shape)}, site {tuple(val(out).shape)}")
    rw.replace(out, y, f"int{plan.bits}_linear")
