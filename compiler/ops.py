"""fxopt's fused operators as torch.library ops.

Each op has a reference implementation (so an optimized graph still runs in torch) and a fake kernel
(so shapes propagate and the graph re-exports). Backends lower them through their own tables, keyed by
the op overloads listed in `FUSED_OPS`.

    rms_norm(x, shape, w, eps)             = w * (x32 * rsqrt(mean(x32², trailing dims) + eps)).to(x.dtype)
    add_layer_norm(x, r, shape, w, b, eps) = (layer_norm(x + r, shape, w, b, eps), x + r)
    add_rms_norm(x, r, shape, w, eps)      = (rms_norm(x + r, shape, w, eps), x + r)

The sum output gives SkipLayerNormalization semantics: the residual stream stays available to later users.
RMSNorm statistics are computed in fp32 (fp64 for fp64 inputs), as Llama-style implementations do.
"""

from __future__ import annotations

import torch

_lib = torch.library.Library("fxopt", "DEF")
_lib.define("rms_norm(Tensor x, SymInt[] normalized_shape, Tensor? weight, float eps) -> Tensor")
_lib.define("add_layer_norm(Tensor x, Tensor residual, SymInt[] normalized_shape, Tensor? weight, "
            "Tensor? bias, float eps) -> (Tensor, Tensor)")
_lib.define("add_rms_norm(Tensor x, Tensor residual, SymInt[] normalized_shape, Tensor? weight, "
            "float eps) -> (Tensor, Tensor)")


def _rms_norm_ref(x: torch.Tensor, normalized_shape, weight, eps: float) -> torch.Tensor:
    dims = tuple(range(-len(normalized_shape), 0))
    xc = x.to(torch.promote_types(x.dtype, torch.float32))  # fp32 statistics, or fp64 for fp64
    y = (xc * torch.rsqrt(xc.pow(2).mean(dims, keepdim=True) + eps)).to(x.dtype)
    return y if weight is None else weight * y


def _out_dtype(x: torch.Tensor, weight) -> torch.dtype:
    return x.dtype if weight is None else torch.promote_types(x.dtype, weight.dtype)


@torch.library.impl(_lib, "rms_norm", "CompositeExplicitAutograd")
def _rms_norm(x, normalized_shape, weight, eps):
    return _rms_norm_ref(x, normalized_shape, weight, eps)


@torch.library.impl(_lib, "add_layer_norm", "CompositeExplicitAutograd")
def _add_layer_norm(x, residual, normalized_shape, weight, bias, eps):
    s = x + residual
    return torch.nn.functional.layer_norm(s, normalized_shape, weight, bias, eps), s


@torch.library.impl(_lib, "add_rms_norm", "CompositeExplicitAutograd")
def _add_rms_norm(x, residual, normalized_shape, weight, eps):
    s = x + residual
    return _rms_norm_ref(s, normalized_shape, weight, eps), s


@torch.library.register_fake("fxopt::rms_norm", lib=_lib)
def _rms_norm_fake(x, normalized_shape, weight, eps):
    return x.new_empty(x.shape, dtype=_out_dtype(x, weight))


@torch.library.register_fake("fxopt::add_layer_norm", lib=_lib)
def _add_layer_norm_fake(x, residual, normalized_shape, weight, bias, eps):
    s = torch.empty_like(x + residual)
    return torch.empty_like(s), s


@torch.library.register_fake("fxopt::add_rms_norm", lib=_lib)
def _add_rms_norm_fake(x, residual, normalized_shape, weight, eps):
    s = torch.empty_like(x + residual)
    return s.new_empty(s.shape, dtype=_out_dtype(s, weight)), s


rms_norm = torch.ops.fxopt.rms_norm.default
add_layer_norm = torch.ops.fxopt.add_layer_norm.default
add_rms_norm = torch.ops.fxopt.add_rms_norm.default
FUSED_OPS = (rms_norm, add_layer_norm, add_rms_norm)
