"""fuse_layernorm: the bugs found by running it on more architectures, and properties over user spellings and dtypes."""

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fxopt.passes import FuseLayerNorm
from fxopt.testing import assert_pass_contract, assert_within, capture_graph, count_ops, run_pass
from tests.models import toy

aten = torch.ops.aten


def fuse(model, *args, **options):
    gm = capture_graph(model, *args)
    return gm, run_pass(FuseLayerNorm(**options), gm, *args)


class FlattenedResidual(nn.Module):
    """OPT's FFN block: the sum is flattened to tokens, and the flattened sum is both normalized and the next
    residual (read before and after the norm)."""

    def __init__(self):
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(16), nn.Linear(16, 16)

    def forward(self, x, y):
        h = (x + y).reshape(-1, x.size(-1))
        before = h * 2
        return (h + self.fc(self.norm(h))).view(x.shape), before


def test_a_flattened_sum_that_is_also_the_next_residual_is_computed_once():
    args = (torch.randn(2, 5, 16), torch.randn(2, 5, 16))
    gm, result = fuse(FlattenedResidual(), *args)
    ops = count_ops(result.graph_module)
    assert ops["fxopt.add_layer_norm"] == 1 and ops["aten.layer_norm"] == 0, (ops, result.reasons)
    assert ops["aten.add"] == count_ops(gm)["aten.add"] - 1  # the residual add is gone, not duplicated
    assert_pass_contract(FuseLayerNorm(), gm, result.graph_module, *args)


class MixedDtypeResidual(nn.Module):
    def forward(self, x16, y32):
        return F.layer_norm((x16 + y32).reshape(-1, 16), (16,))


class ConstantResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.shift = nn.Parameter(torch.randn(16))

    def forward(self, x):
        return F.layer_norm((x + self.shift).reshape(-1, 16), (16,))


@pytest.mark.parametrize("model, inputs, reason", [
    (MixedDtypeResidual(), (torch.randn(2, 5, 16).half(), torch.randn(2, 5, 16)), "mixes dtypes"),
    (ConstantResidual(), (torch.randn(2, 5, 16),), "constant operand"),
])
def test_a_refused_residual_fusion_leaves_the_graph_exactly_as_it_was(model, inputs, reason):
    gm, result = fuse(model, *inputs)
    assert not result.modified and any(reason in r for r in result.reasons), result.reasons
    assert result.graph_module.code == gm.code  # the reshape was not moved


class HeadwiseNorm(nn.Module):
    """A mean-subtracted norm per head, applied after a transpose; the view back relies on the layout."""

    def forward(self, x):
        b, t, _ = x.shape
        h = x.view(b, t, 4, 16).transpose(1, 2)
        h = (h - h.mean(-1, keepdim=True)) * torch.rsqrt(h.var(-1, keepdim=True, unbiased=False) + 1e-5)
        return h.transpose(1, 2).view(b, t, 64)


def test_a_norm_whose_fused_op_would_change_the_layout_is_left_with_a_reason():
    x = torch.randn(2, 3, 64)
    gm, result = fuse(HeadwiseNorm(), x)
    assert not result.modified and any("strides" in r for r in result.reasons), result.reasons
    assert torch.equal(result.graph_module(x), HeadwiseNorm()(x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_layernorm_with_torch_var_in_half_precision_is_fused(dtype):
    class VarLayerNorm(nn.Module):
        def forward(self, x):
            return (x - x.mean(-1, keepdim=True)) / torch.sqrt(torch.var(x, -1, keepdim=True, unbiased=False) + 1e-5)

    x = torch.randn(2, 5, 32)
    x[..., 0] = 400.0  # (x - μ)² overflows fp16 if written out; the variance itself (~5e3) does not
    x = x.to(dtype)
    gm, result = fuse(VarLayerNorm(), x)
    assert count_ops(result.graph_module)["aten.layer_norm"] == 1, result.reasons
    assert torch.isfinite(result.graph_module(x)).all()
    assert_pass_contract(FuseLayerNorm(), gm, result.graph_module, x)


def test_rmsnorm_with_eps_outside_the_root_is_named_as_such():
    class EpsOutsideRMS(nn.Module):
        def forward(self, x):
            return x / (x.pow(2).mean(-1, keepdim=True).sqrt() + 1e-6)

    _, result = fuse(EpsOutsideRMS(), torch.randn(2, 5, 16))
    assert not result.modified
    assert any("x/(rms(x)+eps) is not RMSNorm" in r for r in result.reasons), result.reasons
    assert not any("LayerNorm" in r for r in result.reasons), result.reasons


def test_a_graph_with_nothing_to_fuse_comes_back_identical():
    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down, self.norm = nn.Linear(16, 32), nn.Linear(32, 16), nn.LayerNorm(16)

        def forward(self, x):
            return self.down(F.gelu(self.up(self.norm(x))))

    x = torch.randn(2, 5, 16)
    gm, result = fuse(MLP(), x)
    assert not result.modified and result.graph_module.code == gm.code


# -- properties over the ways people write norms ---------------------------------------------------------------
def _layer_norms(dims, eps):
    def hf(x):  # BERT / TF
        u = x.mean(dims, keepdim=True)
        s = (x - u).pow(2).mean(dims, keepdim=True)
        return (x - u) / torch.sqrt(s + eps)

    def var_mean(x):
        var, mean = torch.var_mean(x, dim=dims, keepdim=True, unbiased=False)
        return (x - mean) * torch.rsqrt(var + eps)

    def centered_square(x):
        c = x - x.mean(dim=dims, keepdim=True)
        return c / (eps + (c * c).mean(dim=dims, keepdim=True)).sqrt()

    def method_chain(x):
        return x.sub(x.mean(dims, keepdim=True)).div(x.var(dims, unbiased=False, keepdim=True).add(eps).sqrt())

    return [hf, var_mean, centered_square, method_chain]


def _rms_norms(dims, eps):
    def llama(x):
        h = x.to(torch.float32)
        return (h * torch.rsqrt(h.pow(2).mean(dims, keepdim=True) + eps)).to(x.dtype)

    def t5(x):
        return x / torch.sqrt(x.pow(2).mean(dims, keepdim=True) + eps)

    def square_pow(x):
        return x * (x.square().mean(dims, keepdim=True) + eps) ** -0.5

    def sum_over_count(x):
        n = 1
        for d in dims:
            n *= x.shape[d]
        return x * torch.rsqrt((x * x).sum(dims, keepdim=True) / n + eps)

    return [llama, t5, square_pow, sum_over_count]


class Written(nn.Module):
    def __init__(self, norm, weight):
        super().__init__()
        self.norm, self.weight = norm, nn.Parameter(weight) if weight is not None else None

    def forward(self, x):
        y = self.norm(x)
        return y if self.weight is None else self.weight * y


@settings(max_examples=30, deadline=None)
@given(shape=st.lists(st.integers(2, 6), min_size=2, max_size=4), k=st.integers(1, 2), rms=st.booleans(),
       spelling=st.integers(0, 3), affine=st.booleans(), eps=st.sampled_from([1e-6, 1e-5, 1e-3]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), scale=st.sampled_from([1e-2, 1.0, 30.0]),
       seed=st.integers(0, 2**31 - 1))
def test_every_spelling_in_every_dtype_fuses_within_the_contract_and_keeps_the_layout(
        shape, k, rms, spelling, affine, eps, dtype, scale, seed):
    k = min(k, len(shape) - 1)
    dims = tuple(range(len(shape) - k, len(shape)))
    norm = (_rms_norms if rms else _layer_norms)(dims, eps)[spelling]
    generator = torch.Generator().manual_seed(seed)
    weight = (torch.rand(shape[-k:], generator=generator) + 0.5).to(dtype) if affine else None
    model = Written(norm, weight)
    x = ((torch.randn(shape, generator=generator) * scale) + scale).to(dtype)  # a mean far from 0
    gm, result = fuse(model, x)
    ops = count_ops(result.graph_module)
    assert ops["fxopt.rms_norm" if rms else "aten.layer_norm"] == 1, (ops, result.reasons)
    if dtype == torch.float32:
        assert_pass_contract(FuseLayerNorm(), gm, result.graph_module, x)
    else:
        # in fp16/bf16 the original's own step-by-step x - mu and variance round at every step (over 2 channels
        # they cancel catastrophically), so the reference is the same model in fp64: the fused op, which
        # accumulates in fp32, must be within rounding of it
        truth = copy.deepcopy(model).double()(x.double()).to(dtype)
        assert_within(result.graph_module(x), truth, FuseLayerNorm().tolerance)
    out = result.graph_module(x)
    assert out.stride() == model(x).stride()
    assert not run_pass(FuseLayerNorm(), result.graph_module, x).modified  # idempotent


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_rms_norm_after_a_head_transpose_keeps_the_layout(layout):
    norm = toy.LlamaStyleRMSNorm(8)

    class QKNorm(nn.Module):  # Gemma3-style: q/k norm applied per head after the transpose
        def __init__(self):
            super().__init__()
            self.norm = norm

        def forward(self, x):
            b, t, _ = x.shape
            q = x.view(b, t, 4, 8)
            q = self.norm(q.transpose(1, 2) if layout == "transposed" else q)
            return q.transpose(1, 2).reshape(b, t, 32) if layout == "transposed" else q.reshape(b, t, 32)

    x = torch.randn(2, 3, 32)
    gm, result = fuse(QKNorm(), x)
    assert count_ops(result.graph_module)["fxopt.rms_norm"] == 1, result.reasons
    assert_pass_contract(FuseLayerNorm(), gm, result.graph_module, x)


def test_a_sum_over_two_dims_divided_by_the_product_of_their_sizes_is_a_mean():
    """Found by the property test above: sum(x², (-2, -1)) / (x.shape[-2] * x.shape[-1]) with one dim dynamic
    traces to a Python product of a sym_size and a constant."""
    norm = _rms_norms((1, 2), 1e-6)[3]
    x = torch.randn(2, 2, 2) * 0.01
    gm, result = fuse(Written(norm, None), x)
    assert count_ops(result.graph_module)["fxopt.rms_norm"] == 1, result.reasons
    assert_pass_contract(FuseLayerNorm(), gm, result.graph_module, x)
