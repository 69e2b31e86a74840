"""What fuse_int8's rules share: the per-token quantizer they fuse, and the checks of its codes and shapes."""

from __future__ import annotations

import operator

import torch
from torch import fx

from fxopt import ops
from fxopt.pattern import Op, Var, node_args

aten = torch.ops.aten
# arguments of each norm up to its eps (aten.layer_norm's cudnn_enable left out): x, [residual,] shape, weight,
# [bias,] eps
NORM_ARITY = {ops.rms_norm: 4, aten.layer_norm.default: 5, ops.add_rms_norm: 5, ops.add_layer_norm: 6}


def quantize(producer) -> Op:
    return Op(ops.quantize_int8, producer, Var("pre"), None, "token", label="per-token dynamic quantize_int8")


def val(n):
    return n.meta.get("val") if isinstance(n, fx.Node) else None


def check_codes(m, key: str = "linear") -> str | None:
    """The epilogue op reads per-token codes (what the backends lower it for); a per-tensor or static
    quantize_int8's codes stay with int8_linear."""
    q = m["q"]
    src = q.args[0] if q.op == "call_function" and q.target is operator.getitem else None
    if src is not None and src.target is ops.quantize_int8 and node_args(src)[2:] != [None, "token"]:
        return f"{m[key].name} reads per-tensor or static codes ({src.name}): it stays an int8_linear"
    return None


def check_same_shape(a_key: str, b_key: str, what: str):
    def check(m) -> str | None:
        a, b = val(m[a_key]), val(m[b_key])
        if not isinstance(m[b_key], fx.Node) or a is None or b is None or a.shape != b.shape or a.dtype != b.dtype:
            return f"the {what} at {m.root.name} broadcasts, mixes dtypes or adds a constant"
        return None
    return check
