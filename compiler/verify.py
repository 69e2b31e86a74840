"""Structural verification after every pass: fx lint, metadata present and right, output signature unchanged.

"Right" means: every node whose metadata a pass's rewriter computed (`meta["fxopt_meta_by"]`) is re-propagated
from its inputs' metadata, and the shape, dtype and strides must equal what the node carries.
"""

from __future__ import annotations

import torch
from torch import fx
from torch.utils._pytree import tree_leaves

from .errors import VerificationError
from .rewrite import META_BY, fake_mode_of, propagate_meta


def output_signature(gm: fx.GraphModule) -> list[str]:
    out = gm.graph.output_node()
    sig = []
    for arg in tree_leaves(out.args[0]):
        val = arg.meta.get("val") if isinstance(arg, fx.Node) else arg
        sig.append(f"{tuple(val.shape)}:{val.dtype}" if isinstance(val, torch.Tensor) else repr(type(val)))
    return sig


def _describe(v) -> str:
    if isinstance(v, torch.Tensor):
        return f"{tuple(v.shape)} {v.dtype} strides {tuple(v.stride())}"
    return repr(type(v))


def _same(a, b) -> bool:
    la, lb = tree_leaves(a), tree_leaves(b)
    if len(la) != len(lb):
        return False
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if isinstance(x, torch.Tensor) and (x.shape != y.shape or x.dtype != y.dtype or
                                            (x.numel() > 1 and x.stride() != y.stride())):
            return False
    return True


def stale_metadata(gm: fx.GraphModule) -> list[str]:
    """Nodes whose recorded metadata differs from a re-propagation from their inputs."""
    mode = fake_mode_of(gm)
    if mode is None:
        return []
    wrong = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or META_BY not in node.meta or "val" not in node.meta:
            continue
        try:
            fresh = propagate_meta(node, mode)
        except Exception as e:  # noqa: BLE001 - a node that no longer runs on its inputs is stale too
            wrong.append(f"{node.name} ({node.target}) no longer runs on its inputs' metadata: {e}")
            continue
        if not _same(fresh, node.meta["val"]):
            wrong.append(f"{node.name} ({node.target}) carries {_describe(node.meta['val'])} but its inputs give "
                         f"{_describe(fresh)}")
    return wrong


def verify_graph(gm: fx.GraphModule, expected_outputs: list[str], pass_name: str) -> None:
    try:
        gm.graph.lint()
    except Exception as e:
        raise VerificationError(f"after pass {pass_name!r}: graph lint failed: {e}") from e
    for node in gm.graph.nodes:
        if node.op == "call_function" and "fxopt_pass" in node.meta and "val" not in node.meta:
            raise VerificationError(f"after pass {pass_name!r}: node {node.name} ({node.target}) has no "
                                    f"shape/dtype metadata (meta['val'])")
    stale = stale_metadata(gm)
    if stale:
        raise VerificationError(f"after pass {pass_name!r}: stale shape metadata: {'; '.join(stale[:5])}")
    got = output_signature(gm)
    if got != expected_outputs:
        raise VerificationError(f"after pass {pass_name!r}: output signature changed from "
                                f"{expected_outputs} to {got}")
