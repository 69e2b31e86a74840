"""Attention rows that may attend to no key: zeros, as torch's SDPA gives them, on ONNX Runtime too.

torch's `scaled_dot_product_attention` returns 0 for a query whose mask allows no key (its safe softmax: the
first tokens of a left-padded causal batch); the ONNX translation softmaxes such a row to a uniform average.
Before export, every SDPA with a mask is followed by

    out' = where(any(allowed, dim=-1, keepdim), out, 0)      allowed = mask (bool) or mask != -inf (float)

which changes nothing where a row has a key, and gives the rows without one torch's zeros. HF's float masks use
the dtype's minimum, not -inf: those rows softmax to uniform in torch as well and are left alone.
"""

from __future__ import annotations

import torch

aten = torch.ops.aten


def zero_rows_without_keys(ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """`ep` with the rewrite above applied in place on its graph (returned for chaining)."""
    from torch._guards import detect_fake_mode

    graph = ep.graph_module.graph
    cores = [n for n in graph.nodes if n.op == "call_function" and n.target is aten.scaled_dot_product_attention.default
             and _mask(n) is not None]
    if not cores:
        return ep
    fake = detect_fake_mode([n.meta.get("val") for n in graph.nodes if n.op == "placeholder"])
    for core in cores:
        mask = _mask(core)
        users = list(core.users)
        with graph.inserting_before(core.next):  # in order, right after the core
            allowed = mask
            if mask.meta["val"].dtype != torch.bool:
                allowed = graph.call_function(aten.ne.Scalar, (mask, float("-inf")))
            keep = graph.call_function(aten.any.dim, (allowed, -1, True))
            out = graph.call_function(aten.where.ScalarOther, (keep, core, 0.0))
        with fake:
            if allowed is not mask:
                allowed.meta["val"] = aten.ne.Scalar(mask.meta["val"], float("-inf"))
            keep.meta["val"] = aten.any.dim(allowed.meta["val"], -1, True)
            out.meta["val"] = aten.where.ScalarOther(keep.meta["val"], core.meta["val"], 0.0)
        for user in users:
            user.replace_input_with(core, out)
    ep.graph_module.recompile()
    return ep


def _mask(node: torch.fx.Node):
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    return mask if isinstance(mask, torch.fx.Node) and "val" in mask.meta else None
