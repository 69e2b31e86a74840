"""stabilize_softmax: exp(x)/sum(exp(x)) -> a max-subtracted softmax."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxopt
from fxopt.passes import StabilizeSoftmax
from fxopt.testing import assert_pass_contract, assert_within, capture_graph, count_ops, run_pass
from tests.models import toy


class NaiveSoftmax(nn.Module):
    def __init__(self, dim=-1):
        super().__init__()
        self.dim = dim

    def forward(self, x):
        e = torch.exp(x)
        return e / e.sum(dim=self.dim, keepdim=True)


class NaiveSoftmaxOverTwoDims(nn.Module):
    def forward(self, x):
        return x.exp() / x.exp().sum(dim=(-2, -1), keepdim=True)


class MaskedNaiveSoftmax(nn.Module):
    def forward(self, scores, mask):
        scores = scores + mask
        return torch.exp(scores) * (1.0 / torch.exp(scores).sum(-1, keepdim=True))


def stabilize(model, *args, **options):
    gm = capture_graph(model, *args)
    return gm, run_pass(StabilizeSoftmax(**options), gm, *args)


@pytest.mark.parametrize("dim", [-1, 0, 1])
def test_naive_softmax_becomes_the_softmax_op(dim):
    x = torch.randn(3, 4, 5)
    gm, result = stabilize(NaiveSoftmax(dim), x)
    ops = count_ops(result.graph_module)
    assert ops["aten.softmax"] == 1 and ops["aten.exp"] == ops["aten.sum"] == ops["aten.div"] == 0, ops
    assert_pass_contract(StabilizeSoftmax(), gm, result.graph_module, x)


def test_masked_softmax_with_reciprocal_spelling():
    scores, mask = torch.randn(2, 4, 6), torch.zeros(2, 1, 6)
    mask[..., -2:] = -1e4
    gm, result = stabilize(MaskedNaiveSoftmax(), scores, mask)
    assert count_ops(result.graph_module)["aten.softmax"] == 1
    assert_pass_contract(StabilizeSoftmax(), gm, result.graph_module, scores, mask)


@pytest.mark.parametrize("model", [NaiveSoftmax(-1), NaiveSoftmaxOverTwoDims()])
def test_explicit_form_subtracts_the_max(model):
    x = torch.randn(2, 3, 4)
    gm, result = stabilize(model, x, form="explicit")
    ops = count_ops(result.graph_module)
    assert ops["aten.amax"] == ops["aten.sub"] == ops["aten.exp"] == 1 and ops["aten.softmax"] == 0, ops


def test_a_reduction_over_several_dims_uses_the_explicit_form():
    x = torch.randn(2, 3, 4)
    gm, result = stabilize(NaiveSoftmaxOverTwoDims(), x)
    assert count_ops(result.graph_module)["aten.amax"] == 1
    assert_pass_contract(StabilizeSoftmax(), gm, result.graph_module, x)


@pytest.mark.parametrize("dtype, peak", [(torch.float32, 1e4), (torch.float32, -1e4), (torch.float32, 100.0),
                                         (torch.float16, 11.1), (torch.float16, 60000.0)])
def test_extreme_logits_stay_finite_and_match_torch_softmax(dtype, peak):
    x = torch.randn(4, 16).to(dtype) + torch.tensor(peak, dtype=dtype)
    x[:, 0] = peak
    model = NaiveSoftmax()
    naive = model(x)
    assert not torch.isfinite(naive).all() or peak < 0  # the original overflows (or underflows to 0/0)
    opt = fxopt.optimize(model, (x,), passes=["stabilize_softmax"])
    got = opt(x)
    assert torch.isfinite(got).all()
    expected = torch.softmax(x.float(), -1).to(dtype)
    assert_within(got, expected, StabilizeSoftmax.tolerance)
    assert opt.report["stabilize_softmax"].numerics.nonfinite_before > 0


def test_fully_masked_rows_behave_as_documented():
    scores = torch.randn(2, 5)
    minus_inf, finfo_min = scores.clone(), scores.clone()
    minus_inf[0] = float("-inf")  # a -inf mask: NaN, as torch.softmax and as the original
    finfo_min[0] = torch.finfo(torch.float32).min  # HF's mask: uniform, as torch.softmax
    opt = fxopt.optimize(NaiveSoftmax(), (scores,), passes=["stabilize_softmax"])
    assert torch.isnan(opt(minus_inf)[0]).all() and torch.isnan(torch.softmax(minus_inf, -1)[0]).all()
    torch.testing.assert_close(opt(finfo_min)[0], torch.full((5,), 0.2))
    assert torch.isnan(NaiveSoftmax()(finfo_min)[0]).all()


class EpsInDenominator(nn.Module):
    def forward(self, x):
        return torch.exp(x) / (torch.exp(x).sum(-1, keepdim=True) + 1e-9)


class ExpReused(nn.Module):
    def forward(self, x):
        e = torch.exp(x)
        return e / e.sum(-1, keepdim=True), e


@pytest.mark.parametrize("model, reason", [(EpsInDenominator(), "not the whole denominator"),
                                           (ExpReused(), "used elsewhere")])
def test_near_misses_stay_unchanged_with_a_reason(model, reason):
    _, result = stabilize(model, torch.randn(2, 5))
    assert not result.modified and any(reason in r for r in result.reasons), result.reasons
    assert count_ops(result.graph_module)["aten.softmax"] == 0


def test_invalid_form_is_a_typed_error_naming_the_option():
    with pytest.raises(fxopt.PassOptionError, match="'form'"):
        fxopt.passes.get("stabilize_softmax", form="fast")


def test_pass_is_idempotent_and_deterministic():
    x = torch.randn(2, 4, 16)
    gm = capture_graph(toy.NaiveAttention(16), x)
    first, second = run_pass(StabilizeSoftmax(), gm, x), run_pass(StabilizeSoftmax(), gm, x)
    assert first.modified and first.graph_module.code == second.graph_module.code
    assert not run_pass(StabilizeSoftmax(), first.graph_module, x).modified


@settings(max_examples=12, deadline=None)
@given(shape=st.lists(st.integers(2, 6), min_size=1, max_size=4), data=st.data(),
       shift=st.sampled_from([0.0, 30.0, -30.0]))
def test_rewritten_softmax_equals_the_original_where_it_is_finite(shape, data, shift):
    dim = data.draw(st.integers(-len(shape), len(shape) - 1))
    x = torch.randn(shape) * 5 + shift
    gm, result = stabilize(NaiveSoftmax(dim), x)
    assert result.modified
    assert_pass_contract(StabilizeSoftmax(), gm, result.graph_module, x)
    torch.testing.assert_close(result.graph_module(x), torch.softmax(x, dim))
    assert run_pass(StabilizeSoftmax(), gm, x).graph_module.code == result.graph_module.code  # deterministic
    assert not run_pass(StabilizeSoftmax(), result.graph_module, x).modified  # idempotent
