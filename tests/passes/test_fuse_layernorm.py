"""fuse_layernorm: decomposed LayerNorm/RMSNorm -> one op; residual add + norm -> one fused op."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fxopt.passes import FuseLayerNorm
from fxopt.testing import assert_pass_contract, capture_graph, count_ops, run_pass
from tests.models import toy

NORM_OPS = ("aten.mean", "aten.rsqrt", "aten.sqrt", "aten.pow", "aten.var_mean", "aten.div")


def fuse(model, *args):
    gm = capture_graph(model, *args)
    result = run_pass(FuseLayerNorm(), gm, *args)
    return gm, result


@pytest.mark.parametrize("model, shape", [
    (toy.BertStyleLayerNorm(16), (2, 5, 16)),
    (toy.VarMeanLayerNorm(16), (2, 5, 16)),
    (toy.PlainLayerNorm(dims=(-2, -1)), (2, 3, 5, 8)),
    (toy.PlainLayerNorm(dims=(-1,)), (4, 8)),
])
def test_layernorm_spellings_become_one_layer_norm(model, shape):
    x = torch.randn(shape)
    gm, result = fuse(model, x)
    ops = count_ops(result.graph_module)
    assert result.modified and ops["aten.layer_norm"] == 1
    assert not any(ops[o] for o in NORM_OPS), ops
    assert_pass_contract(FuseLayerNorm(), gm, result.graph_module, x)


def test_affine_parameters_are_folded_into_the_op():
    gm, result = fuse(toy.BertStyleLayerNorm(16), torch.randn(2, 3, 16))
    (ln,) = [n for n in result.graph_module.graph.nodes if "layer_norm" in str(n.target)]
    weight, bias, eps = ln.args[2], ln.args[3], ln.args[4]
    assert weight.op == bias.op == "get_attr" and eps == 1e-12
    assert count_ops(result.graph_module)["aten.mul"] == count_ops(result.graph_module)["aten.add"] == 0


@pytest.mark.parametrize("model", [toy.LlamaStyleRMSNorm(16), toy.T5StyleRMSNorm(16)])
def test_rmsnorm_spellings_become_one_rms_norm(model):
    x = torch.randn(2, 5, 16)
    gm, result = fuse(model, x)
    ops = count_ops(result.graph_module)
    assert ops["fxopt.rms_norm"] == 1 and not any(ops[o] for o in NORM_OPS), ops
    assert result.stats["rms_norm"] == 1
    assert_pass_contract(FuseLayerNorm(), gm, result.graph_module, x)


def test_llama_rmsnorm_in_half_precision_keeps_fp32_statistics():
    model = toy.LlamaStyleRMSNorm(64).half()
    x = (torch.randn(2, 5, 64) * 30).half()  # x² overflows fp16 (> 65504) unless upcast
    gm, result = fuse(model, x)
    ops = count_ops(result.graph_module)
    assert ops["fxopt.rms_norm"] == 1 and ops["aten.to"] == 0 and ops["aten._to_copy"] == 0, ops
    out = result.graph_module(x)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert_pass_contract(FuseLayerNorm(), gm, result.graph_module, x)


class PreNormResidual(nn.Module):
    def __init__(self, d=16, rms=False):
        super().__init__()
        self.norm = toy.LlamaStyleRMSNorm(d) if rms else nn.LayerNorm(d)
        self.proj = nn.Linear(d, d)

    def forward(self, x, y):
        h = x + self.proj(y)  # the residual stream...
        return self.proj(self.norm(h)) + h  # ...is used again after the norm


@pytest.mark.parametrize("rms, fused_op", [(False, "fxopt.add_layer_norm"), (True, "fxopt.add_rms_norm")])
def test_residual_add_and_norm_fuse_and_the_sum_is_reused(rms, fused_op):
    x, y = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    gm, result = fuse(PreNormResidual(rms=rms), x, y)
    ops = count_ops(result.graph_module)
    assert ops[fused_op] == 1 and ops["aten.layer_norm"] == 0 and ops["fxopt.rms_norm"] == 0, ops
    assert ops["aten.add"] == 1  # only the final `+ h`, which reads the fused op's sum
    assert_pass_contract(FuseLayerNorm(), gm, result.graph_module, x, y)


def test_residual_fusion_can_be_switched_off():
    x, y = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    gm = capture_graph(PreNormResidual(), x, y)
    result = run_pass(FuseLayerNorm(fuse_residual_add=False), gm, x, y)
    assert not result.modified  # nn.LayerNorm was already one op; nothing else to do


class BiasAddThenNorm(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.bias, self.norm = nn.Parameter(torch.randn(d)), nn.LayerNorm(d)

    def forward(self, x):
        return self.norm(x + self.bias)


class BroadcastAddThenNorm(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.norm = nn.LayerNorm(d)

    def forward(self, x, pooled):
        return self.norm(x + pooled)


class UnbiasedVariance(nn.Module):
    def forward(self, x):
        return (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, keepdim=True) + 1e-5)


class EpsOutsideRoot(nn.Module):  # the "annotated transformer" LayerNorm
    def forward(self, x):
        return (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True) + 1e-6)


class SequenceDimNorm(nn.Module):
    def forward(self, x):
        c = x - x.mean(1, keepdim=True)
        return c * torch.rsqrt(c.pow(2).mean(1, keepdim=True) + 1e-5)


class PerTokenGamma(nn.Module):
    def __init__(self, t=5):
        super().__init__()
        self.gamma = nn.Parameter(torch.randn(t, 1))

    def forward(self, x):
        c = x - x.mean(-1, keepdim=True)
        return c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + 1e-5) * self.gamma


class CenteredAlsoReturned(nn.Module):
    def forward(self, x):
        c = x - x.mean(-1, keepdim=True)
        return c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + 1e-5), c


@pytest.mark.parametrize("model, reason", [
    (UnbiasedVariance(), "unbiased variance"),
    (EpsOutsideRoot(), "outside the square root"),
    (SequenceDimNorm(), "not over its trailing dims"),
    (CenteredAlsoReturned(), "used elsewhere"),
])
def test_near_misses_stay_unchanged_with_a_reason(model, reason):
    x = torch.randn(2, 5, 16)
    gm, result = fuse(model, x)
    assert not result.modified
    assert any(reason in r for r in result.reasons), result.reasons
    assert count_ops(result.graph_module)["aten.layer_norm"] == 0


class PerHeadNorm(nn.Module):  # Cohere's q/k norm: one weight row per head, normalized over head_dim
    def __init__(self, heads=4, head_dim=8):
        super().__init__()
        self.heads, self.weight = heads, nn.Parameter(torch.randn(heads, head_dim))

    def forward(self, x):
        b, t, _ = x.shape
        x = x.view(b, t, self.heads, -1)
        mean = x.mean(-1, keepdim=True)
        var = (x - mean).pow(2).mean(-1, keepdim=True)
        return (self.weight * ((x - mean) * torch.rsqrt(var + 1e-5))).view(b, t, -1)


@pytest.mark.parametrize("model", [PerTokenGamma(), PerHeadNorm()])
def test_a_weight_not_of_the_normalized_shape_stays_outside_the_fused_core(model):
    x = torch.randn(2, 5, 32) if isinstance(model, PerHeadNorm) else torch.randn(2, 5, 16)
    gm, result = fuse(model, x)
    (ln,) = [n for n in result.graph_module.graph.nodes if n.target == torch.ops.aten.layer_norm.default]
    assert ln.args[2] is None and count_ops(result.graph_module)["aten.mul"] == 1
    assert_pass_contract(FuseLayerNorm(), gm, result.graph_module, x)


@pytest.mark.parametrize("model, inputs, reason", [
    (BiasAddThenNorm(), (torch.randn(2, 5, 16),), "constant"),
    (BroadcastAddThenNorm(), (torch.randn(2, 5, 16), torch.randn(2, 1, 16)), "broadcasts"),
])
def test_add_near_misses_are_not_fused_as_residual(model, inputs, reason):
    gm, result = fuse(model, *inputs)
    assert not result.modified and any(reason in r for r in result.reasons), result.reasons


def test_pass_is_idempotent_and_deterministic():
    x = torch.randn(2, 5, 16)
    model = toy.HandWrittenBlock(16)
    gm = capture_graph(model, x)
    first, second = run_pass(FuseLayerNorm(), gm, x), run_pass(FuseLayerNorm(), gm, x)
    assert first.graph_module.code == second.graph_module.code
    again = run_pass(FuseLayerNorm(), first.graph_module, x)
    assert not again.modified


@settings(max_examples=12, deadline=None)
@given(shape=st.lists(st.integers(2, 6), min_size=2, max_size=4), k=st.integers(1, 2),
       eps=st.sampled_from([1e-12, 1e-6, 1e-5, 1e-3]), rms=st.booleans(), affine=st.booleans(),
       scale=st.sampled_from([1e-2, 1.0, 1e3]))
def test_fused_norm_equals_the_decomposition(shape, k, eps, rms, affine, scale):
    k = min(k, len(shape) - 1)
    dims = tuple(range(-k, 0))

    class Norm(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(shape[-k:])) if affine else None

        def forward(self, x):
            c = x if rms else x - x.mean(dims, keepdim=True)
            y = c * torch.rsqrt(c.pow(2).mean(dims, keepdim=True) + eps)
            return y * self.w if affine else y

    x = torch.randn(shape) * scale + scale  # a mean far from 0 as well
    gm, result = fuse(Norm(), x)
    ops = count_ops(result.graph_module)
    assert ops["fxopt.rms_norm" if rms else "aten.layer_norm"] == 1, ops
    assert_pass_contract(FuseLayerNorm(), gm, result.graph_module, x)
    assert run_pass(FuseLayerNorm(), gm, x).graph_module.code == result.graph_module.code  # deterministic
    assert not run_pass(FuseLayerNorm(), result.graph_module, x).modified  # idempotent
