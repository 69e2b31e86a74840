"""A norm applied after a head transpose (Gemma3's q/k-norm), fused, re-exported and run on both backends.

The bug: `fxopt.rms_norm`'s fake kernel returned a contiguous tensor where the reference keeps the input's
layout, so the model's `.transpose(1, 2).view(...)` after the norm failed on re-export ("Cannot view a tensor
with shape ... and strides ...") although it runs in eager. The contract here is fuse_layernorm's (exact up to
rounding): each backend's outputs equal the optimized graph's within the pass's tolerance.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxopt
from fxopt import ops
from fxopt.numerics import compare
from fxopt.passes import FuseLayerNorm

pytest.importorskip("onnxruntime")
pytest.importorskip("tvm")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x.float() * torch.rsqrt(variance + self.eps)).to(x.dtype)


class QKNormAttention(nn.Module):
    """Attention with per-head q/k RMSNorm over head_dim, as Gemma3 and Qwen3 write it."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.q_norm, self.k_norm = RMSNorm(self.head_dim), RMSNorm(self.head_dim)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2))
        k = self.k_norm(self.k_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2))
        v = self.v_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        o = torch.softmax(q @ k.transpose(-1, -2) * self.head_dim ** -0.5, dim=-1) @ v
        return self.o_proj(o.transpose(1, 2).contiguous().view(b, t, -1)), q.transpose(1, 2).view(b, t, -1)


@pytest.fixture(scope="module")
def optimized():
    torch.manual_seed(0)
    model = QKNormAttention().eval()
    for p in model.parameters():
        nn.init.normal_(p, std=0.3)
    opt = fxopt.optimize(model, (torch.randn(2, 6, 32),), passes=["fuse_layernorm"])
    norms = [n for n in opt.graph_module.graph.nodes if n.target is ops.rms_norm]
    assert len(norms) == 2, opt.report
    return opt


@pytest.mark.parametrize("backend", ["onnxruntime", "tvm"])
def test_a_fused_norm_after_a_head_transpose_runs_on_each_backend(optimized, backend):
    run = fxopt.compile(optimized, backend=backend, target="cpu")
    x = torch.randn(2, 6, 32)
    with torch.no_grad():
        ref = optimized(x)
    result = compare(ref, run(x), FuseLayerNorm.tolerance)
    assert result.ok, result.detail
