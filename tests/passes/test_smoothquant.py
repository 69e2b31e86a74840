"""smoothquant: smoothing is exact (folded into norms, or an explicit x·(1/s)); W8A8 keeps its cosine contract."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxopt
from fxopt.calibration import ChannelAbsMax, calibrate
from fxopt.passes import FuseLayerNorm, SmoothQuant
from fxopt.structure import analyze_graph
from fxopt.testing import assert_within, count_ops
from tests.models.hf_families import FAMILIES, tiny_causal_lm

torch.manual_seed(0)


class PreNormBlock(nn.Module):
    """A pre-LN block as users write it: x + fc2(gelu(fc1(ln(x)))), with a few outlier channels."""

    def __init__(self, d: int = 16, outliers: float = 1.0, affine: bool = True):
        super().__init__()
        self.ln = nn.LayerNorm(d, elementwise_affine=affine)
        self.fc1, self.fc2 = nn.Linear(d, 3 * d), nn.Linear(3 * d, d)
        if affine:
            with torch.no_grad():
                self.ln.weight[:3] *= outliers

    def forward(self, x):
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln(x))))


def calibration(shape, n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


def smoothquant(model, x, calib, fuse=True, **options):
    passes = ([FuseLayerNorm()] if fuse else []) + [SmoothQuant(**options)]
    return fxopt.optimize(model, (x,), passes=passes, calibration=calib)


def test_smoothing_alone_is_exact_and_balances_activation_and_weight_maxima_at_alpha_half():
    model, x = PreNormBlock(outliers=40.0).eval(), torch.randn(2, 6, 16)
    calib = calibration((2, 6, 16))
    opt = smoothquant(model, x, calib, smooth_only=True, alpha=0.5)
    assert_within(opt(x), model(x))
    gm = opt.graph_module
    (group,) = [g for g in analyze_graph(gm).norm_groups if g.linears]
    x_max = calibrate(gm, [ChannelAbsMax(group.output.name)], calib).of(ChannelAbsMax(group.output.name))
    w_max = getattr(gm, group.linears[0].weight.target).detach().abs().amax(0)
    torch.testing.assert_close(x_max, w_max, rtol=1e-5, atol=0)  # max|X'_j| == max|W'_j| on the calibration data
    report = opt.report["smoothquant"]
    assert report.stats == {"smoothed_into_norm": 1, "smoothed_by_multiply": 1}


def test_the_balance_is_what_the_unsmoothed_maxima_predict():
    """max|X'_j| = sqrt(act_max_j · w_max_j) at α = 0.5: the scale comes from the calibration statistics."""
    model, x = PreNormBlock().eval(), torch.randn(2, 6, 16)
    calib = calibration((2, 6, 16))
    plain = fxopt.optimize(model, (x,), passes=[FuseLayerNorm()])
    (g0,) = [g for g in analyze_graph(plain.graph_module).norm_groups if g.linears]
    act = calibrate(plain.graph_module, [ChannelAbsMax(g0.output.name)], calib).of(ChannelAbsMax(g0.output.name))
    predicted = (act * model.fc1.weight.detach().abs().amax(0)).sqrt()
    gm = smoothquant(model, x, calib, smooth_only=True).graph_module
    (g1,) = [g for g in analyze_graph(gm).norm_groups if g.linears]
    torch.testing.assert_close(getattr(gm, g1.linears[0].weight.target).detach().abs().amax(0), predicted,
                               rtol=1e-5, atol=0)


def test_a_dead_channel_and_a_zero_weight_column_give_no_inf_or_nan():
    model, x = PreNormBlock().eval(), torch.randn(2, 6, 16)
    with torch.no_grad():
        model.ln.weight[5] = model.ln.bias[5] = 0.0  # channel 5 of the norm output is always 0
        model.fc1.weight[:, 7] = 0.0
    for options in ({"smooth_only": True}, {}):
        opt = smoothquant(model, x, calibration((2, 6, 16)), **options)
        assert all(torch.isfinite(t).all() for t in opt.graph_module.state_dict().values() if t.is_floating_point())
        assert torch.isfinite(opt(x)).all()


def test_a_norm_without_affine_parameters_gets_one():
    model, x = PreNormBlock(affine=False).eval(), torch.randn(2, 6, 16)
    opt = smoothquant(model, x, calibration((2, 6, 16)), smooth_only=True)
    assert opt.report["smoothquant"].stats["smoothed_into_norm"] == 1
    assert_within(opt(x), model(x))


def _block_linears(family, model) -> int:
    return sum(len(family.roles(layer)) for layer in family.layers(model))


SMOOTHED = ("smoothed_into_norm", "smoothed_by_multiply", "smoothed_into_v")


FAST = ("opt", "llama_gqa", "gpt2", "bert")  # the rest run with -m slow


@pytest.mark.parametrize("name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow)
                                  for n in sorted(FAMILIES)])
def test_smoothing_alone_keeps_every_family_exact_and_smooths_every_block_linear(name):
    family = FAMILIES[name]
    model = family.build("eager")
    args, kwargs = family.inputs(seed=0)
    calib = [family.inputs(seed=i) for i in range(1, 4)]
    opt = fxopt.optimize(model, args, passes=[FuseLayerNorm(), SmoothQuant(smooth_only=True)], example_kwargs=kwargs,
                         calibration=calib)
    stats = opt.report["smoothquant"].stats
    assert sum(stats.get(k, 0) for k in SMOOTHED) == _block_linears(family, model), stats
    if not family.post_ln:  # every block's input norms absorb their scales
        assert stats["smoothed_into_norm"] >= 2 * len(family.layers(model)) - (1 if family.parallel else 0), stats
    else:  # the norm output is also the residual: a fold would corrupt it
        assert "smoothed_into_norm" not in stats, stats
    fresh_args, fresh_kwargs = family.inputs(seed=9, batch=3, seq=7)
    with torch.no_grad():
        want = model(*fresh_args, **fresh_kwargs)[0]
    assert_within(opt(*fresh_args, **fresh_kwargs)[0], want)


def _column_scales(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    return after.detach().double().abs().amax(0) / before.detach().double().abs().amax(0)


def test_q_k_and_v_share_one_scale_and_gate_and_up_another():
    family = FAMILIES["llama_gqa"]
    model = family.build("eager")
    args, kwargs = family.inputs()
    opt = fxopt.optimize(model, args, passes=[FuseLayerNorm(), SmoothQuant(smooth_only=True, fold_vo=False)],
                         example_kwargs=kwargs, calibration=[family.inputs(seed=i) for i in range(1, 4)])
    blocks = analyze_graph(opt.graph_module).blocks
    def scale(layer, role, site):
        return _column_scales(family.roles(layer)[role].weight, getattr(opt.graph_module, site.weight.target))

    for layer, block in zip(family.layers(model), blocks):
        a, m = block.attention, block.mlp
        s_q, s_k, s_v = scale(layer, "q", a.q), scale(layer, "k", a.k), scale(layer, "v", a.v)
        torch.testing.assert_close(s_k, s_q)
        torch.testing.assert_close(s_v, s_q)
        torch.testing.assert_close(scale(layer, "up", m.up), scale(layer, "gate", m.gate))
        assert not torch.allclose(scale(layer, "up", m.up), s_q)


@pytest.mark.parametrize("name", ["opt", "llama_gqa", "gpt2", "bert"])
@pytest.mark.parametrize("act", ["token", "tensor_static", "tensor_asym"])
def test_w8a8_replaces_every_block_linear_by_an_int8_linear_and_keeps_its_contract(name, act):
    family = FAMILIES[name]
    model = family.build("sdpa")
    args, kwargs = family.inputs()
    sq = SmoothQuant(act=act)
    opt = fxopt.optimize(model, args, passes=[FuseLayerNorm(), sq], example_kwargs=kwargs,
                         calibration=[family.inputs(seed=i) for i in range(1, 5)])
    report = opt.report["smoothquant"]
    n = _block_linears(family, model)
    linear = "fxopt.uint8_linear" if act == "tensor_asym" else "fxopt.int8_linear"
    assert count_ops(opt.graph_module)[linear] == n == report.stats["quantized_linear"]
    assert report.numerics.cosine >= sq.min_cosine
    int8 = [t for t in opt.graph_module.state_dict().values() if t.dtype == torch.int8]
    assert len(int8) == n + report.stats.get("int8_embedding", 0)  # int8 codes stored, the float weights gone
    names = {k for k, _ in model.named_parameters()}
    for layer in family.layers(model):
        for module in family.roles(layer).values():
            name_of = next(k for k in names if model.get_parameter(k) is module.weight)
            assert not hasattr(opt.graph_module, name_of.replace(".", "_"))


@pytest.mark.parametrize("name", ["llama_gqa", "opt"])
def test_o_projs_scale_goes_into_v_rows_per_head_and_stays_exact(name):
    family = FAMILIES[name]  # GQA: one v row feeds several q heads' o columns; OPT: v has a bias
    model = family.build("eager")
    with torch.no_grad():  # HF initializes biases to 0: give v's one values to scale
        for layer in family.layers(model):
            if family.roles(layer)["v"].bias is not None:
                family.roles(layer)["v"].bias.normal_()
    args, kwargs = family.inputs()
    opt = fxopt.optimize(model, args, passes=[FuseLayerNorm(), SmoothQuant(smooth_only=True)], example_kwargs=kwargs,
                         calibration=[family.inputs(seed=i) for i in range(1, 4)])
    report = opt.report["smoothquant"]
    layers = len(family.layers(model))  # per block: o_proj into v's rows; only the FFN's second linear multiplies
    assert report.stats["smoothed_into_v"] == layers and report.stats["smoothed_by_multiply"] == layers
    assert sum(n.endswith("rows (V→O), α=0.5, float") for n in report.notes) == layers
    fresh_args, fresh_kwargs = family.inputs(seed=9, batch=3, seq=7)
    with torch.no_grad():
        assert_within(opt(*fresh_args, **fresh_kwargs)[0], model(*fresh_args, **fresh_kwargs)[0])
    gm = opt.graph_module
    for layer, block in zip(family.layers(model), analyze_graph(gm).blocks):
        a, roles = block.attention, family.roles(layer)
        ratio = {r: getattr(gm, site.weight.target).double() / roles[r].weight.double() for r, site in
                 (("q", a.q), ("v", a.v), ("o", a.o))}
        v_row = (ratio["v"] / ratio["q"][0]).mean(1)  # 1/s_o of each v row (q's row: the shared column scale)
        assert torch.allclose(ratio["v"] / ratio["q"][0], v_row[:, None])
        rows = a.v_rows[list(a.kv_head_of)].flatten()  # the v row behind each o input column
        o_col = ratio["o"][0, a.o_cols.flatten()]  # s_o of each o column
        torch.testing.assert_close(v_row[rows] * o_col, torch.ones_like(o_col))
        assert not torch.allclose(o_col, torch.ones_like(o_col))  # a real scale, not the identity
        if roles["v"].bias is not None:
            torch.testing.assert_close(getattr(gm, a.v.bias.target).double(), roles["v"].bias.double() * v_row)


class ContextReadTwice(nn.Module):
    """Attention whose output is also returned: its channels are not only o_proj's input, so v's rows cannot
    absorb o_proj's scale (the returned context would change)."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        b, t, d = x.shape
        split = lambda y: y.view(b, t, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        ctx = nn.functional.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        ctx = ctx.transpose(1, 2).reshape(b, t, d)
        return self.o(ctx), ctx


def test_o_projs_scale_stays_in_the_quantizer_where_the_attention_output_has_other_readers():
    model, x = ContextReadTwice().eval(), torch.randn(2, 8, 32)
    opt = smoothquant(model, x, calibration((2, 8, 32)), fuse=False, layers="all", min_cosine=0.0)
    report = opt.report["smoothquant"]
    assert "smoothed_into_v" not in report.stats and report.stats["smoothed_in_quantizer"] == 4
    o_note = next(n for n in report.notes if n.startswith("o.weight"))
    assert "quantizer" in o_note and "not into v's rows" in o_note and "also read by" in o_note


class SeparateBiasAttention(nn.Module):
    """v written as `x @ W.T + b` (Falcon's FalconLinear): the bias is read by the add after the matmul."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.o = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.wv, self.bv = nn.Parameter(torch.randn(d, d) / d**0.5), nn.Parameter(torch.randn(d))

    def forward(self, x):
        b, t, d = x.shape
        split = lambda y: y.view(b, t, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        v = x @ self.wv.t() + self.bv
        ctx = nn.functional.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(v))
        return self.o(ctx.transpose(1, 2).reshape(b, t, d))


class StaticCacheAttention(nn.Module):
    """k and v written into cache buffers in place (`index_copy_`), attention over the whole cache."""

    def __init__(self, d=32, heads=4, length=16, batch=2):
        super().__init__()
        self.heads, self.hd = heads, d // heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.register_buffer("kc", torch.zeros(batch, heads, length, self.hd))
        self.register_buffer("vc", torch.zeros(batch, heads, length, self.hd))

    def forward(self, x, pos):
        b, t, d = x.shape
        split = lambda y: y.view(b, t, self.heads, self.hd).transpose(1, 2)  # noqa: E731
        self.kc.index_copy_(2, pos, split(self.k(x)))
        self.vc.index_copy_(2, pos, split(self.v(x)))
        ctx = nn.functional.scaled_dot_product_attention(split(self.q(x)), self.kc, self.vc)
        return x + self.o(ctx.transpose(1, 2).reshape(b, t, d))


def test_v_rows_absorb_o_projs_scale_where_the_bias_is_added_after_a_matmul():
    model, x = SeparateBiasAttention().eval(), torch.randn(2, 8, 32)
    opt = smoothquant(model, x, calibration((2, 8, 32)), fuse=False, smooth_only=True, layers="all")
    assert opt.report["smoothquant"].stats["smoothed_into_v"] == 1
    fresh = torch.randn(3, 5, 32)
    assert_within(opt(fresh), model(fresh))


def test_a_v_written_into_a_static_cache_keeps_o_projs_scale_out_of_its_rows():
    model, pos = StaticCacheAttention().eval(), torch.arange(8)
    x = [torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    opt = fxopt.optimize(model, (x[0], pos), passes=[SmoothQuant(smooth_only=True, layers="all")],
                         calibration=[((x[i], pos), {}) for i in (1, 2, 3)], progress=False)  # (autograd on)
    report = opt.report["smoothquant"]
    assert "smoothed_into_v" not in report.stats
    assert any(n.startswith("o.weight") and "cache" in n for n in report.notes), report.notes


def test_auto_scores_each_batch_with_the_scale_the_other_batches_maxima_give():
    from fxopt.passes.smoothquant.scales import (
        ALPHA_GRID,
        best_alpha,
        quantized_error,
        smoothing_scale,
        tokens,
        weight_max,
    )

    g = torch.Generator().manual_seed(0)
    spread = torch.linspace(0.1, 30, 16, dtype=torch.float64)
    batches = [torch.randn(4, 32, 16, generator=g, dtype=torch.float64) * spread for _ in range(3)]
    for k, b in enumerate(batches):  # an outlier channel of its own in each batch: one the other batches never saw
        b[..., k] *= 20
    weights = [torch.randn(8, 16, generator=g, dtype=torch.float64)]
    maxima = [b.reshape(-1, 16).abs().amax(0) for b in batches]
    tie = lambda s: s.reshape(8, 2).amax(1).repeat_interleave(2)  # noqa: E731  (two channels a v row, as GQA ties)
    chosen = best_alpha(batches, weights, torch.stack(maxima).amax(0), "tensor", True, tie)

    def error(s_of):  # batch k scored with the scale of the other batches' maxima
        return sum(quantized_error(tokens([b]), weights, s_of(torch.stack(maxima[:k] + maxima[k + 1:]).amax(0)),
                                   "tensor", True) for k, b in enumerate(batches))
    errors = {a: error(lambda m, a=a: tie(smoothing_scale(m, weight_max(weights), a))) for a in ALPHA_GRID}
    unsmoothed = error(lambda m: torch.ones(16, dtype=torch.float64))
    assert chosen is not None and errors[chosen] == min(errors.values()) and errors[chosen] <= unsmoothed


def test_a_per_tensor_quantizer_is_scored_with_its_whole_batchs_range_not_the_evaluated_tokens():
    from fxopt.passes.smoothquant.scales import Tokens, quantized_error

    g = torch.Generator().manual_seed(1)
    batch = torch.randn(64, 16, generator=g, dtype=torch.float64)
    batch[0, 3] = 50.0  # one token sets the range; the evaluated tokens do not include it
    weights, one = [torch.randn(8, 16, generator=g, dtype=torch.float64)], torch.ones(16, dtype=torch.float64)
    rows = slice(1, None, 2)
    for act in ("tensor", "tensor_asym"):
        scored = quantized_error(Tokens(batch[rows], ((batch, rows),)), weights, one, act, True)
        alone = quantized_error(batch[rows], weights, one, act, True)
        assert scored > 4 * alone  # a range 50 / max|rest| coarser costs its square in error


def test_bias_correction_makes_the_quantized_linear_unbiased_on_the_calibration_tokens():
    from fxopt.passes.smoothquant.scales import Tokens, bias_correction, fake_inputs, input_means
    from fxopt.quant_ops import quantize_weight_int8

    g = torch.Generator().manual_seed(2)
    batches = list(torch.randn(2, 4, 32, 16, generator=g, dtype=torch.float64) + 3.0)  # a mean far from 0
    w, s = torch.randn(8, 16, generator=g, dtype=torch.float64), torch.rand(16, generator=g, dtype=torch.float64) + 0.5
    flat = [b.reshape(-1, 16) for b in batches]
    every = Tokens(torch.cat(flat), tuple((b, torch.arange(len(b))) for b in flat))
    wq, ws = quantize_weight_int8(w, "channel")
    w_hat = wq.double() * ws.double()[:, None]
    for act in ("tensor", "tensor_asym", "token"):
        act_max = every.values.abs().amax(0)
        q = fake_inputs(every, s, act, act_max).double() @ w_hat.t()
        exact = (every.values / s) @ w.t()
        delta = bias_correction(input_means(batches, s, act, act_max), w, w_hat)
        assert (exact - q).mean(0).abs().max() > 1e-3  # biased before
        assert torch.allclose((exact - (q + delta)).mean(0), torch.zeros(8, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("weight", ["channel", "tensor"])
def test_a_calibration_set_with_an_empty_batch_and_either_weight_granularity_quantizes(weight):
    model, x = GeluFeedForward().eval(), torch.randn(4, 8, 32)
    calib = [torch.randn(4, 8, 32), torch.randn(0, 8, 32), torch.randn(3, 8, 32)]
    for alpha in (0.5, "auto"):
        opt = smoothquant(model, x, calib, fuse=False, act="tensor", weight=weight, alpha=alpha, layers="all",
                          min_cosine=0.0)
        assert count_ops(opt.graph_module)["fxopt.int8_linear"] == 2 and torch.isfinite(opt(x)).all()


OUTLIERS = [3, 17, 40]


class OutlierMLP(nn.Module):
    """An RMSNorm → gated MLP whose norm γ has a few channels 60× larger, as LLM outlier features are (and, as
    there, the weights reading them are small: the outliers do not dominate the output, they dominate the scale)."""

    def __init__(self, d=64):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(d))
        with torch.no_grad():
            self.gamma[OUTLIERS] = 60.0
        self.gate, self.up, self.down = nn.Linear(d, 2 * d, bias=False), nn.Linear(d, 2 * d, bias=False), \
            nn.Linear(2 * d, d, bias=False)
        with torch.no_grad():
            self.gate.weight[:, OUTLIERS] /= 60.0
            self.up.weight[:, OUTLIERS] /= 60.0

    def forward(self, x):
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.gamma
        return x + self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h))


def test_smoothing_recovers_most_of_what_naive_per_tensor_w8a8_loses_on_outlier_channels():
    model, x = OutlierMLP().eval(), torch.randn(4, 16, 64)
    calib = calibration((4, 16, 64), n=8)
    want = model(x)
    mlp = want - x  # the MLP's own output (the residual is exact either way)

    def error(**options):
        opt = smoothquant(model, x, calib, act="tensor", min_cosine=0.0, **options)
        return float((opt(x) - want).pow(2).mean() / mlp.pow(2).mean())

    naive, smoothed, auto = error(smooth=False), error(alpha=0.5), error(alpha="auto")
    assert smoothed < naive / 10 and auto < naive / 10, (naive, smoothed, auto)


class GeluFeedForward(nn.Module):
    """fc2 reads a GELU output: one-sided, in [-0.17, max], as every transformer FFN's down projection does."""

    def __init__(self, d: int = 32, bias: bool = True):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 4 * d, bias=bias), nn.Linear(4 * d, d, bias=bias)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


def test_asymmetric_per_tensor_spends_every_level_on_the_activations_own_range():
    from fxopt.quant_ops import QMAX, quantize_weight_int8

    model, x = GeluFeedForward().eval(), torch.randn(4, 8, 32) * 3
    opt = smoothquant(model, x, calibration((4, 8, 32)), fuse=False, smooth=False, act="tensor_asym", layers="all",
                      bias_correction=False)
    h = torch.nn.functional.gelu(model.fc1(x)).double()
    # the reference, written out: 255 steps over [min(h, 0), max(h, 0)], 0.0 on a level, the int8 weights
    lo, hi = min(float(h.min()), 0.0), max(float(h.max()), 0.0)
    step = (hi - lo) / 255
    zero = round(-lo / step)
    codes = ((h / step).round() + zero).clamp(0, 255)
    wq, ws = quantize_weight_int8(model.fc2.weight.detach(), "channel")
    want = (codes - zero) * step @ (wq.double() * ws.double()[:, None]).t() + model.fc2.bias.double()
    got = opt.graph_module(x)
    out_scale = want.abs().amax() / QMAX  # the op family's bound: within 2 output scales of the reference
    assert (got.double() - want).abs().max() <= 2 * out_scale
    assert count_ops(opt.graph_module)["fxopt.quantize_uint8"] == 2  # fc1's input and fc2's
    assert -lo < hi * 0.2  # one-sided: the symmetric quantizer would spend half its levels below min(h)


def test_on_a_one_sided_activation_the_asymmetric_quantizer_loses_less_than_the_symmetric_one():
    model, x = GeluFeedForward().eval(), torch.randn(8, 16, 32) * 3
    want = model(x)

    def error(act):
        opt = smoothquant(model, x, calibration((8, 16, 32)), fuse=False, smooth=False, act=act, layers="all",
                          min_cosine=0.0)
        return float((opt(x) - want).pow(2).mean())

    # half the step on [-0.17, max] quarters fc2's activation noise; fc1's input and the weights' share is unchanged
    assert error("tensor_asym") < error("tensor") * 2 / 3


@pytest.mark.parametrize("bias", [True, False])
def test_bias_correction_removes_most_of_the_systematic_error_on_fresh_inputs_of_the_calibration_distribution(bias):
    def tokens(batch):  # a channel that barely varies (as a [CLS] token's massive activation): rounds alike each time
        return batch.index_fill(-1, torch.tensor([0]), 0.0) + torch.nn.functional.one_hot(torch.tensor(0), 32) * 8

    model, x = GeluFeedForward(bias=bias).eval(), tokens(torch.randn(8, 16, 32))
    fresh = tokens(torch.randn(64, 16, 32, generator=torch.Generator().manual_seed(9)))
    calib = [tokens(c) for c in calibration((8, 16, 32))]

    def mean_error(correct):  # per output channel, the error's mean over every token: what a bias can remove
        opt = fxopt.optimize(model, (x,), calibration=calib, passes=[SmoothQuant(
            act="tensor_asym", smooth=False, layers="all", bias_correction=correct, min_cosine=0.0)])
        if correct and not bias:
            assert count_ops(opt.graph_module)["fxopt.uint8_linear"] == 2  # each linear got a bias to correct
        with torch.no_grad():
            return float((opt(fresh) - model(fresh)).reshape(-1, 32).mean(0).abs().mean())

    assert mean_error(True) < mean_error(False) / 3


@pytest.mark.parametrize("act, corrected", [("tensor", True), ("tensor_asym", True), ("token", False)])
def test_bias_correction_is_on_by_default_for_per_tensor_activations_only(act, corrected):
    model, x = GeluFeedForward().eval(), torch.randn(4, 8, 32) * 3
    calib = calibration((4, 8, 32))

    def out(**options):
        opt = smoothquant(model, x, calib, fuse=False, act=act, layers="all", min_cosine=0.0, **options)
        return opt.graph_module(x)

    assert torch.equal(out(), out(bias_correction=corrected))
    assert not torch.equal(out(), out(bias_correction=not corrected))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_asymmetric_quantizer_works_in_fp32_so_a_dead_channel_of_a_half_model_stays_finite(dtype):
    model = GeluFeedForward()
    with torch.no_grad():  # fc2's input channel 5 is gelu(0) = 0 on every token: s = 1e-5, 1/s = 1e5 (inf in fp16)
        model.fc1.weight[5] = 0
        model.fc1.bias[5] = 0
    model = model.to(dtype).eval()
    x = torch.randn(4, 8, 32, dtype=dtype)
    calib = [t.to(dtype) for t in calibration((4, 8, 32))]
    opt = smoothquant(model, x, calib, fuse=False, act="tensor_asym", layers="all", alpha=0.9, min_cosine=0.0)
    y = opt(x)
    assert y.dtype == dtype and torch.isfinite(y).all()


def test_an_output_that_turns_non_finite_breaks_any_contract():
    from fxopt.numerics import compare
    from fxopt.pass_base import Tolerance

    loose = Tolerance(rtol={torch.float32: float("inf")}, atol=float("inf"), min_cosine=0.0)
    before, after = torch.ones(4), torch.tensor([1.0, float("nan"), 1.0, 1.0])
    result = compare(before, after, loose)
    assert not result.ok and "non-finite" in result.detail and result.cosine == -1.0


def test_options_are_checked():
    with pytest.raises(fxopt.PassOptionError, match="alpha"):
        SmoothQuant(alpha=1.5)
    with pytest.raises(fxopt.PassOptionError, match="act"):
        SmoothQuant(act="channel")
    with pytest.raises(fxopt.PassOptionError, match="smooth_only"):
        SmoothQuant(smooth=False, smooth_only=True)


def test_without_calibration_nothing_runs():
    with pytest.raises(fxopt.CalibrationError, match="smoothquant"):
        fxopt.optimize(PreNormBlock().eval(), (torch.randn(2, 3, 16),), passes=[SmoothQuant()])


@pytest.mark.parametrize("smooth", [False, True])
def test_albert_s_layer_shared_across_depth_is_quantized_once_unless_smoothing_makes_the_uses_differ(smooth):
    from transformers import AlbertConfig, AlbertModel

    torch.manual_seed(0)
    config = AlbertConfig(vocab_size=100, embedding_size=16, hidden_size=32, num_hidden_layers=3,
                          num_attention_heads=4, intermediate_size=64, attn_implementation="eager")
    model, ids = AlbertModel(config).eval(), torch.randint(0, 100, (2, 9))
    calib = [(torch.randint(0, 100, (2, 9)),) for _ in range(2)]
    opt = fxopt.optimize(model, (ids,), passes=[SmoothQuant(smooth=smooth, embeddings=False)], calibration=calib)
    assert opt.report["smoothquant"].stats["quantized_linear"] == 6 * 3  # q, k, v, o, ffn, ffn_output, 3 times
    shared = sum(p.numel() for n, p in model.named_parameters() if "albert_layer_groups" in n and p.dim() == 2)
    codes = sum(t.numel() for t in opt.graph_module.buffers() if t.dtype == torch.int8)
    # unsmoothed, the three uses quantize the one weight to the same codes: one copy. Smoothed, each use has its
    # own activation statistics, so its own scales, so its own codes
    assert codes == (3 * shared if smooth else shared)
    assert opt.report["smoothquant"].numerics.ok


@pytest.mark.parametrize("family", ["Qwen3", "Phi3"])
def test_every_linear_of_a_block_is_quantized_even_where_the_analysis_gives_it_no_role(family):
    model, blocks = tiny_causal_lm(family, **({"head_dim": 8} if family == "Qwen3" else {}))
    calib = [((torch.randint(2, 100, (2, 8)),), {"use_cache": False}) for _ in range(2)]
    opt = fxopt.optimize(model, (torch.randint(2, 100, (2, 8)),), example_kwargs={"use_cache": False},
                         passes=[FuseLayerNorm(), SmoothQuant()], calibration=calib)
    assert opt.report["smoothquant"].stats["quantized_linear"] == blocks
    left = [n.args[1].target for n in opt.graph_module.graph.nodes if n.target is torch.ops.aten.linear.default]
    assert left == ["lm_head.weight"]
    assert opt.report["smoothquant"].numerics.ok
