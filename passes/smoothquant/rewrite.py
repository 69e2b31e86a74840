"""SmoothQuant's edits, all through the Rewriter, each after its group's plan is complete:

    fold      γ' = γ / s, β' = β / s on the norm (a new constant; a γ-less norm gets γ' = 1 / s)
    smooth    W' = W · diag(s) on every linear of the group (input columns; rows of an (in, out) Conv1D weight)
    V→O       W_v' = diag(1/s)·W_v, b_v' = b_v / s on v's output rows feeding o's input channels
    quantize  y = int8_linear(quantize_int8(x, pre, static, g), Wq, Ws, b + Δb): one quantizer per input node,
              pre = 1/s when the scale goes into the quantizer, else None; act="tensor_asym":
              y = uint8_linear(quantize_uint8(x, pre), Wq, Ws, b + Δb); Δb the bias correction (scales.py), or 0

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
from .scales import bias_correction, out_in

QUANTIZE_UINT8 = torch.ops.fxopt.quantize_uint8.default  # compiler/quant_asym.py
UINT8_LINEAR = torch.ops.fxopt.uint8_linear.default


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


def smoothed_weight(gm: fx.GraphModule, site: LinearSite, s: torch.Tensor,
                    rows: torch.Tensor | None = None) -> torch.Tensor:
    """diag(rows)·W·diag(s) as [out, in], float64 (`rows`: a V→O fold's 1/s on v's output rows, or None)."""
    w = out_in(get_attr(gm, site.weight.target).detach().double(), site.layout) * s
    return w if rows is None else w * rows[:, None]


def site_bias(rw: Rewriter, site: LinearSite, rows: torch.Tensor | None,
              correction: torch.Tensor | None = None) -> fx.Node | None:
    """`site`'s bias, times `rows` where a V→O fold scales its rows, plus `correction` (bias correction: float64
    [out]), as a new constant where either applies; a bias-less linear gets one when corrected."""
    if (rows is None or site.bias is None) and correction is None:
        return site.bias
    old = None if site.bias is None else get_attr(rw.gm, site.bias.target).detach()
    b = torch.zeros_like(correction) if old is None else old.double()
    b = b if rows is None else b * rows
    b = b if correction is None else b + correction
    dtype = val(site.output).dtype if old is None else old.dtype
    if correction is not None:  # the epilogue adds the bias in fp32: a half bias would round Δb away
        dtype = torch.promote_types(dtype, torch.float32)
    return rw.constant(f"{site.weight_name}_bias_{'corrected' if correction is not None else 'smoothed'}",
                       b.to(dtype), before=site.output)


def _bias_reader(site: LinearSite) -> fx.Node:
    """The node of `site` that adds its bias: the linear/addmm itself, or the add after a matmul (`x @ W.T + b`)."""
    return next(n for n in (site.node, site.output) if any(u is n or u in n.args for u in site.bias.users))


def smooth_weight(rw: Rewriter, site: LinearSite, s: torch.Tensor, rows: torch.Tensor | None = None) -> None:
    w = smoothed_weight(rw.gm, site, s, rows)
    _swap_weight(rw, site, w if site.layout == "out_in" else w.t())
    if rows is not None and site.bias is not None:
        b = get_attr(rw.gm, site.bias.target).detach()
        rw.replace_constant_for(site.bias, _bias_reader(site), (b.double() * rows).to(b.dtype))


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


def asym_quantizer(rw: Rewriter, x: fx.Node, before: fx.Node, pre: torch.Tensor | None) -> tuple[fx.Node, ...]:
    """(codes, scale, zero point) nodes of `x`·pre, asymmetric per tensor (`quantize_uint8`: all 256 levels on
    the tensor's own range; a one-sided activation such as a GELU output gets twice the resolution)."""
    pre_node = None if pre is None else rw.constant(f"{x.name}_smooth", pre.float(), before=before)
    q = rw.call(QUANTIZE_UINT8, (x, pre_node), before=before, like=before)
    return tuple(rw.getitem(q, i, before=before) for i in range(3))


def static_scale(act_max: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The per-tensor scale of the smoothed activations from the calibration channel maxima: max_j act_j / s_j."""
    return scale_of((act_max.double() / s).amax())


def _weight_constants(rw: Rewriter, site: LinearSite, wq: torch.Tensor, ws: torch.Tensor, made: dict) -> tuple:
    """The (codes, scales) constants of `site`'s quantized weight: those made for another reader of the same weight
    attribute where they are equal bit for bit (a layer tied across depth, not smoothed or smoothed alike), else
    new ones. `made`: weight name -> [(wq, ws, nodes)], kept across the pass's sites."""
    out = site.output
    for q, s, nodes in made.get(site.weight_name, []):
        if q.dtype == wq.dtype and torch.equal(q, wq) and s.dtype == ws.dtype and torch.equal(s, ws):
            rw.hoist(nodes, before=out)
            return nodes
    nodes = (rw.constant(f"{site.weight_name}_int8", wq, before=out),
             rw.constant(f"{site.weight_name}_scale", ws, before=out))
    made.setdefault(site.weight_name, []).append((wq, ws, nodes))
    return nodes


def quantize_site(rw: Rewriter, site: LinearSite, codes: tuple[fx.Node, ...],
                  weight: tuple[torch.Tensor, torch.Tensor], bias: fx.Node | None, made: dict) -> None:
    """Replace `site`'s output by an int8 linear of the codes and `weight` (int8 codes [out, in] and scales, of the
    smoothed weight) plus `bias`: `int8_linear` of (codes, scale), `uint8_linear` of (codes, scale, zero point).
    Readers of one weight whose codes come out equal share them (`_weight_constants`)."""
    wq, ws = weight
    out = site.output
    wq_node, ws_node = _weight_constants(rw, site, wq, ws, made)
    dtype = val(out).dtype
    linear = UINT8_LINEAR if len(codes) == 3 else ops.int8_linear
    y = rw.call(linear, (*codes, wq_node, ws_node, bias, dtype), before=out, like=site.node)
    if tuple(val(y).shape) != tuple(val(out).shape):  # pragma: no cover - a site's output is x.shape[:-1] + (out,)
        raise AssertionError(f"{out.name}: int8 linear gives {tuple(val(y).shape)}, site gave {tuple(val(out).shape)}")
    rw.replace(out, y, "quantized_linear")


def prescale_group(rw: Rewriter, g: Group, s: torch.Tensor, order: dict, rows: dict) -> None:
    """smooth_only's form of the quantizer's pre-scale: x·(1/s) once per input node, W·diag(s) on its readers."""
    for x in dict.fromkeys(t.input for t in g.quantized):
        readers = [t for t in g.quantized if t.input is x]
        first = min((t.reshapes[0] if t.reshapes else t.node for t in readers), key=order.__getitem__)
        prescale_input(rw, x, readers, 1 / s, first)
        for t in readers:
            smooth_weight(rw, t, s, rows.pop(t, None))
            rw.counts["smoothed_by_multiply"] += 1


def quantized_weights(gm: fx.GraphModule, g: Group, s: torch.Tensor, rows: dict, weight: str,
                      means=None) -> dict:
    """Per quantized linear of the group: (int8 codes, scales, Δb or None) of its smoothed weight; `means(x)`: the
    input means bias correction needs (scales.input_means), or None. Computed before any edit."""
    out = {}
    for t in g.quantized:
        w = smoothed_weight(gm, t, s, rows.get(t))
        wq, ws = quantize_weight_int8(w, weight)
        m = None if means is None else means(t.input)
        w_hat = wq.double() * (ws.double()[:, None] if ws.dim() else ws.double())
        out[t] = (wq, ws, None if m is None else bias_correction(m, w, w_hat))
    return out


def quantize_group(rw: Rewriter, g: Group, act_max: torch.Tensor, s: torch.Tensor | None, order: dict, rows: dict,
                   act: str, weights: dict, made: dict) -> None:
    """One quantizer per input node of the group (pre-scale 1/s where no norm or v absorbed it; `s` None: not
    smoothed), then each reader an int8 linear of its `weights` entry (quantized_weights)."""
    smoothed = s is not None
    s = torch.ones_like(act_max, dtype=torch.float64) if s is None else s
    pre = 1 / s if smoothed and g.norm is None and g.v_fold is None else None
    static = static_scale(act_max, s) if act == "tensor_static" else None
    for x in dict.fromkeys(t.input for t in g.quantized):
        readers = [t for t in g.quantized if t.input is x]
        first = min((t.node for t in readers), key=order.__getitem__)
        codes = asym_quantizer(rw, x, first, pre) if act == "tensor_asym" else \
            quantizer(rw, x, first, pre, static, "token" if act == "token" else "tensor")
        for t in readers:
            wq, ws, delta = weights[t]
            quantize_site(rw, t, codes, (wq, ws), site_bias(rw, t, rows.pop(t, None), delta), made)
            rw.counts["unsmoothed" if not smoothed else "smoothed_into_v" if g.v_fold is not None else
                      "smoothed_into_norm" if pre is None else "smoothed_in_quantizer"] += 1
