"""Structural verification after every pass: fx lint, metadata present, output signature unchanged."""

from __future__ import annotations

import torch
from torch import fx

from .errors import VerificationError


def output_signature(gm: fx.GraphModule) -> list[str]:
    out = gm.graph.output_node()
    sig = []
    for arg in torch.utils._pytree.tree_leaves(out.args[0]):
        val = arg.meta.get("val") if isinstance(arg, fx.Node) else arg
        sig.append(f"{tuple(val.shape)}:{val.dtype}" if isinstance(val, torch.Tensor) else repr(type(val)))
    return sig


def verify_graph(gm: fx.GraphModule, expected_outputs: list[str], pass_name: str) -> None:
    try:
        gm.graph.lint()
    except Exception as e:
        raise VerificationError(f"after pass {pass_name!r}: graph lint failed: {e}") from e
    for node in gm.graph.nodes:
        if node.op == "call_function" and "fxopt_pass" in node.meta and "val" not in node.meta:
            raise VerificationError(f"after pass {pass_name!r}: node {node.name} ({node.target}) has no "
                                    f"shape/dtype metadata (meta['val'])")
    got = output_signature(gm)
    if got != expected_outputs:
        raise VerificationError(f"after pass {pass_name!r}: output signature changed from "
                                f"{expected_outputs} to {got}")
