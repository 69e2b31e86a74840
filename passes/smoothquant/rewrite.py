"""SmoothQuant's edits, all through the Rewriter, each after its group's plan is complete:

    fold      γ' = γ / s, β' = β / s on the norm (a new constant; a γ-less norm gets γ' = 1 / s)
    smooth    W' = W · diag(s) on every linear of the group (input columns; rows of an (in, out) Conv1D weight)
    quantize  y = int8_linear(quantize_int8(x, pre, static, g), Wq, Ws, b): one quantizer per input node,
              pre = 1/s when the scale goes into the quantizer, else None

Weights are new constants, never edited in place, and a weight shared with another reader (a tied embedding)
is replaced for this linear only.
"""

from __future__ import annotations

import torch
from torch import fx

from fxopt import ops
from fxopt.quant_ops import quantize_weight_int8, scale_of
from fxopt.rewrite import Rewriter, get_attr
from fxopt.sites import LinearSite, val

from .plan import Group, _weight_arg
from .scales import out_in


def _swap_weight(rw: Rewriter, site: LinearSite, tensor: torch.Tensor) -> None:
    """`site` reads `tensor` where it read its weight; other readers of the old weight keep it."""
    rw.replace_constant_for(site.weight, site.node, tensor.to(val(site.weight).dtype))


def fold_into_norm(rw: Rewriter, group: Group, s: torch.Tensor) -> None:
    norm = group.norm.norm
    dtype = val(group.norm.output).dtype
    for i in (p for p in _weight_arg(group.norm) if p is not None):
        old = norm.args[i] if len(norm.args) > i else None
        if old is None and i != _weight_arg(group.norm)[0]:
            continue  # no β: nothing to divide
        base = torch.ones_like(s) if old is None else get_attr(rw.gm, old.target).detach().double()
        new = rw.constant(f"{norm.name}_smoothed", (base / s).to(val(old).dtype if old is not None else dtype),
                          before=norm)
        rw.set_arg(norm, i, new)


def smoothed_weight(rw: Rewriter, site: LinearSite, s: torch.Tensor) -> torch.Tensor:
    """W·diag(s) as [out, in], float64."""
    return out_in(get_attr(rw.gm, site.weight.target).detach().double(), site.layout) * s


def smooth_weight(rw: Rewriter, site: LinearSite, s: torch.Tensor) -> None:
    w = smoothed_weight(rw, site, s)
    _swap_weight(rw, site, w if site.layout == "out_in" else w.t())


def prescale_input(rw: Rewriter, x: fx.Node, sites: list[LinearSite], inv_s: torch.Tensor, before: fx.Node) -> None:
    """x·(1/s) as an explicit multiply read by `sites` (smooth_only's form of the quantizer's pre-scale)."""
    scale = rw.constant(f"{x.name}_smooth", inv_s.to(val(x).dtype), before=before)
    scaled = rw.call(torch.ops.aten.mul.Tensor, (x, scale), before=before, like=x)
    for site in sites:
        reader = site.reshapes[0] if site.reshapes else site.node  # the site's node that reads x
        rw.set_arg(reader, list(reader.args).index(x), scaled)


def quantizer(rw: Rewriter, x: fx.Node, before: fx.Node, pre: torch.Tensor | None, static: torch.Tensor | None,
              granularity: str) -> tuple[fx.Node, fx.Node]:
    """(codes, scale) nodes of `x`, inserted before `before`."""
    pre_node = None if pre is None else rw.constant(f"{x.name}_smooth", pre.float(), before=before)
    static_node = None if static is None else rw.constant(f"{x.name}_scale", static.float(), before=before)
    q = rw.call(ops.quantize_int8, (x, pre_node, static_node, granularity), before=before, like=before)
    return rw.getitem(q, 0, before=before), rw.getitem(q, 1, before=before)


def centered(rw: Rewriter, x: fx.Node, before: fx.Node, pre: torch.Tensor | None) -> tuple[fx.Node, fx.Node]:
    """(x·pre − c, c), c = (max + min)/2 of x·pre over the whole tensor: the symmetric per-tensor quantizer of the
    centered tensor spends its levels on [min, max] only (asymmetric per-tensor quantization; a one-sided
    activation such as a GELU output gets twice the resolution). `quantize_site` adds c·Σ_j Ŵ[:, j] back."""
    aten = torch.ops.aten
    if val(x).dtype != torch.float32:  # all of it in fp32, as the quantizer computes: 1/s of a dead channel is 1e5
        x = rw.call(aten._to_copy.default, (x,), {"dtype": torch.float32}, before=before, like=x)
    if pre is not None:
        scale = rw.constant(f"{x.name}_smooth", pre.float(), before=before)
        x = rw.call(aten.mul.Tensor, (x, scale), before=before, like=x)
    hi = rw.call(aten.max.default, (x,), before=before)
    lo = rw.call(aten.min.default, (x,), before=before)
    center = rw.call(aten.mul.Tensor, (rw.call(aten.add.Tensor, (hi, lo), before=before), 0.5), before=before)
    return rw.call(aten.sub.Tensor, (x, center), before=before, like=x), center


def static_scale(act_max: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The per-tensor scale of the smoothed activations from the calibration channel maxima: max_j act_j / s_j."""
    return scale_of((act_max.double() / s).amax())


def quantize_site(rw: Rewriter, site: LinearSite, codes: tuple[fx.Node, fx.Node], w: torch.Tensor,
                  weight_granularity: str, center: fx.Node | None = None) -> None:
    """Replace `site`'s output by an int8 linear of the codes and `w` ([out, in], already smoothed); with the
    `center` c the codes were taken after subtracting (`centered`), + c·Σ_j Ŵ[:, j] of the int8 weights Ŵ."""
    wq, ws = quantize_weight_int8(w, weight_granularity)
    out = site.output
    wq_node = rw.constant(f"{site.weight_name}_int8", wq, before=out)
    ws_node = rw.constant(f"{site.weight_name}_scale", ws, before=out)
    dtype = val(out).dtype
    y = rw.call(ops.int8_linear, (*codes, wq_node, ws_node, site.bias, dtype), before=out, like=site.node)
    if center is not None:  # c (fp32) · Σ_j Ŵ[:, j] in fp32, added in the output's dtype
        sums = rw.constant(f"{site.weight_name}_colsum", (wq.double() * ws.double().reshape(-1, 1)).sum(1).float(),
                           before=out)
        shift = rw.call(torch.ops.aten.mul.Tensor, (center, sums), before=out, like=sums)
        if dtype != torch.float32:
            shift = rw.call(torch.ops.aten._to_copy.default, (shift,), {"dtype": dtype}, before=out, like=shift)
        y = rw.call(torch.ops.aten.add.Tensor, (y, shift), before=out, like=y)
    if tuple(val(y).shape) != tuple(val(out).shape):  # pragma: no cover - a site's output is x.shape[:-1] + (out,)
        raise AssertionError(f"{out.name}: int8 linear gives {tuple(val(y).shape)}, site gave {tuple(val(out).shape)}")
    rw.replace(out, y, "quantized_linear")
