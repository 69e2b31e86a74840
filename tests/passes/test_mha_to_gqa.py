"""mha_to_gqa: the converted graph is the model with G mean-pooled kv heads, on any layout the analysis finds."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxopt
from fxopt.errors import PassError, PassOptionError, RequirementError, StructureError
from fxopt.pass_base import ROUNDING
from fxopt.passes import ConvertToGQA, FuseLayerNorm, StabilizeSoftmax
from fxopt.structure import analyze_graph
from fxopt.testing import assert_within
from tests.models.hf_families import FAMILIES

D, HEADS = 32, 8


class SelfAttentionBlock(nn.Module):
    """Pre-LN self-attention as users write it, with `kv_heads` k/v heads (repeat_interleave to the query heads)."""

    def __init__(self, kv_heads: int = HEADS, sdpa: bool = True, bias: bool = True):
        super().__init__()
        self.heads, self.kv_heads, self.dh, self.sdpa = HEADS, kv_heads, D // HEADS, sdpa
        self.norm = nn.LayerNorm(D)
        self.q = nn.Linear(D, D, bias=bias)
        self.k = nn.Linear(D, kv_heads * self.dh, bias=bias)
        self.v = nn.Linear(D, kv_heads * self.dh, bias=bias)
        self.o = nn.Linear(D, D, bias=bias)

    def forward(self, x):
        b, s, _ = x.shape
        h = self.norm(x)
        q = self.q(h).view(b, s, self.heads, self.dh).transpose(1, 2)
        k = self.k(h).view(b, s, self.kv_heads, self.dh).transpose(1, 2)
        v = self.v(h).view(b, s, self.kv_heads, self.dh).transpose(1, 2)
        k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
        v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(self.dh), dim=-1) @ v
        return x + self.o(y.transpose(1, 2).reshape(b, s, D))


class TwoBlocks(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.blocks = nn.Sequential(SelfAttentionBlock(**kw), SelfAttentionBlock(**kw))

    def forward(self, x):
        return self.blocks(x)


def pooled(w: torch.Tensor, kv: int, groups: int, dh: int) -> torch.Tensor:
    """The definition: kv head g of the result is the mean of heads g·r … g·r + r − 1 (rows of w, or of a bias)."""
    return w.reshape(groups, kv // groups, dh, *w.shape[1:]).mean(1).reshape(groups * dh, *w.shape[1:])


def gqa_reference(model: TwoBlocks, groups: int) -> TwoBlocks:
    kw = {"sdpa": model.blocks[0].sdpa, "bias": model.blocks[0].q.bias is not None}
    ref = TwoBlocks(kv_heads=groups, **kw).eval()
    state = {}
    for name, t in model.state_dict().items():
        is_kv = name.split(".")[-2] in ("k", "v")
        state[name] = pooled(t, model.blocks[0].kv_heads, groups, D // HEADS) if is_kv else t
    ref.load_state_dict(state)
    return ref


def convert(model, x, groups, **options):
    passes = [FuseLayerNorm(), ConvertToGQA(num_kv_heads=groups, **options)]
    return fxopt.optimize(model, (x,), passes=passes)


@pytest.mark.parametrize("sdpa", [True, False], ids=["sdpa", "explicit"])
@pytest.mark.parametrize("kv_heads,groups", [(8, 2), (8, 1), (4, 2)], ids=["mha-to-2", "mha-to-mqa", "gqa4-to-2"])
def test_the_converted_graph_is_the_model_with_mean_pooled_kv_heads(sdpa, kv_heads, groups):
    torch.manual_seed(0)
    model, x = TwoBlocks(kv_heads=kv_heads, sdpa=sdpa).eval(), torch.randn(2, 6, D)
    opt = convert(model, x, groups, min_cosine=-1)
    x2 = torch.randn(3, 11, D)  # another batch size and length than captured
    assert_within(opt(x2), gqa_reference(model, groups)(x2))
    for b in analyze_graph(opt.graph_module).blocks:
        a = b.attention
        assert (a.num_heads, a.num_kv_heads) == (HEADS, groups)
        assert a.k.out_features == a.v.out_features == groups * (D // HEADS)


def test_the_kv_parameters_shrink_by_exactly_kv_over_g():
    model, x = TwoBlocks().eval(), torch.randn(2, 6, D)
    opt = convert(model, x, 2, min_cosine=-1)
    kv = [p.numel() for n, p in model.named_parameters() if n.split(".")[-2] in ("k", "v")]
    after = sum(p.numel() for p in opt.graph_module.parameters())
    assert sum(p.numel() for p in model.parameters()) - after == sum(kv) - sum(kv) * 2 // HEADS


def test_heads_already_equal_within_groups_give_the_same_function_and_the_pass_promises_rounding():
    model, x = TwoBlocks().eval(), torch.randn(2, 6, D)
    with torch.no_grad():
        for blk in model.blocks:
            for lin in (blk.k, blk.v):
                lin.weight.copy_(pooled(lin.weight, HEADS, 2, D // HEADS).view(2, 1, -1, D).expand(2, 4, -1, D)
                                 .reshape(D, D))
                lin.bias.copy_(pooled(lin.bias, HEADS, 2, D // HEADS).view(2, 1, -1).expand(2, 4, -1).reshape(D))
    opt = convert(model, x, 2)
    assert opt.report["mha_to_gqa"].tolerance == ROUNDING
    assert_within(opt(x), model(x))
    # a random init replaces those heads: no exactness is promised then
    assert convert(model, x, 2, init="random", min_cosine=-1).report["mha_to_gqa"].tolerance != ROUNDING


def test_g_equal_to_the_kv_heads_changes_nothing_and_says_so():
    model, x = TwoBlocks(kv_heads=4).eval(), torch.randn(2, 6, D)
    report = convert(model, x, 4).report["mha_to_gqa"]
    assert not report.applied and all("already 4 kv heads" in r for r in report.reasons)


def test_a_g_that_does_not_divide_the_kv_heads_is_a_typed_error_with_the_numbers():
    model, x = TwoBlocks().eval(), torch.randn(2, 6, D)
    with pytest.raises(PassError) as info:
        convert(model, x, 3)
    assert isinstance(info.value.__cause__, StructureError)
    assert "num_kv_heads=3 does not divide the 8 kv heads" in str(info.value)


def test_a_model_without_attention_is_a_typed_error():
    mlp, x = nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.Linear(D, D)).eval(), torch.randn(2, 6, D)
    with pytest.raises(PassError, match="no attention to convert") as info:
        convert(mlp, x, 1)
    assert isinstance(info.value.__cause__, StructureError)


@pytest.mark.parametrize("option,value", [("num_kv_heads", 0), ("init", "median"), ("num_kv_heads", True)])
def test_bad_options_are_refused_by_name(option, value):
    with pytest.raises(PassOptionError, match=option):
        ConvertToGQA(**{option: value})


def test_init_first_keeps_the_first_head_of_each_group_and_random_is_seeded():
    torch.manual_seed(0)
    model, x = TwoBlocks(sdpa=False).eval(), torch.randn(2, 6, D)
    dh = D // HEADS
    first = convert(model, x, 2, init="first", min_cosine=-1).graph_module
    k = next(p for n, p in first.named_parameters() if "blocks_0_k_weight" in n)
    torch.testing.assert_close(k, model.blocks[0].k.weight.view(2, 4, dh, D)[:, 0].reshape(2 * dh, D), rtol=0, atol=0)
    runs = [convert(model, x, 2, init="random", seed=s, min_cosine=-1) for s in (1, 1, 2)]
    outs = [r(x) for r in runs]
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


class KeysReturned(SelfAttentionBlock):
    """Returns its keys too (a cache a caller keeps): G heads there would change what the caller gets."""

    def forward(self, x):
        b, s, _ = x.shape
        k = self.k(x).view(b, s, self.heads, self.dh).transpose(1, 2)
        q = self.q(x).view(b, s, self.heads, self.dh).transpose(1, 2)
        v = self.v(x).view(b, s, self.heads, self.dh).transpose(1, 2)
        return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, D)), k


def test_a_key_path_read_elsewhere_is_left_with_the_reason():
    model, x = KeysReturned().eval(), torch.randn(2, 6, D)
    report = fxopt.optimize(model, (x,), passes=[ConvertToGQA(num_kv_heads=2)]).report["mha_to_gqa"]
    assert not report.applied and "is also read by" in report.reasons[0]


# -- Hugging Face models ------------------------------------------------------------------------------------------

HF = [pytest.param(n, marks=[] if n in ("llama_gqa", "gpt2", "gpt_neox", "bert") else [pytest.mark.slow])
      for n in FAMILIES]


def _equal_heads_within_groups(model, args, kwargs, groups):
    params = dict(model.named_parameters())
    with torch.no_grad():
        for b in fxopt.analyze(model, args, kwargs).blocks:
            a = b.attention
            for site, rows in ((a.k, a.k_rows), (a.v, a.v_rows)):
                per, dh = rows.shape[0] // groups, rows.shape[1]
                src = rows.view(groups, per, dh)[:, :1].expand(groups, per, dh).reshape(-1)
                w = params[site.weight_name]
                (w if site.layout == "out_in" else w.t())[rows.flatten()] = (
                    w if site.layout == "out_in" else w.t())[src].clone()
                if site.bias is not None:
                    bias = params[str(site.bias.target)]
                    bias[rows.flatten()] = bias[src].clone()


@pytest.mark.parametrize("family", HF)
def test_hf_models_with_equal_heads_in_each_group_keep_their_function_at_other_shapes(family):
    fam = FAMILIES[family]
    model = fam.build(fam.attn[-1])
    args, kwargs = fam.inputs()
    _equal_heads_within_groups(model, args, kwargs, 1)
    opt = fxopt.optimize(model, args, example_kwargs=kwargs,
                         passes=[StabilizeSoftmax(), FuseLayerNorm(), ConvertToGQA(num_kv_heads=1)])
    report = opt.report["mha_to_gqa"]
    assert report.tolerance == ROUNDING and report.stats["k_heads_pooled"] == len(fam.layers(model))
    args, kwargs = fam.inputs(batch=3, seq=5, seed=1)
    with torch.no_grad():
        assert_within(opt(*args, **kwargs), model(*args, **kwargs))


def test_hf_llama_converted_equals_hf_llamas_own_gqa_model_with_pooled_weights():
    fam = FAMILIES["llama"]
    model, (args, kwargs) = fam.build("sdpa"), fam.inputs()
    opt = fxopt.optimize(model, args, example_kwargs=kwargs,
                         passes=[FuseLayerNorm(), ConvertToGQA(num_kv_heads=2, min_cosine=-1)])
    cfg = fam.config("sdpa")
    cfg.num_key_value_heads = 2
    ref = type(model)(cfg).eval()
    dh = cfg.hidden_size // cfg.num_attention_heads
    ref.load_state_dict({n: pooled(t, cfg.num_attention_heads, 2, dh) if n.endswith(("k_proj.weight", "v_proj.weight"))
                         else t for n, t in model.state_dict().items()})
    args, kwargs = fam.inputs(batch=3, seq=7, seed=2)
    with torch.no_grad():
        assert_within(opt(*args, **kwargs).logits, ref(*args, **kwargs).logits)


NAMED = ("llama", "opt", "gpt2", "gpt_neox", "bert")  # the list; every one eager and sdpa, both backends
BACKEND_CASES = [pytest.param(f, a, b, marks=[] if (f, a, b) == ("gpt_neox", "sdpa", "onnxruntime") else
                              [pytest.mark.slow], id=f"{f}-{a}-{b}")
                 for f in NAMED for a in ("eager", "sdpa") for b in ("onnxruntime", "tvm")]


def _kv_rows_removed(model, args, kwargs, groups) -> int:
    """What pooling must remove: per block, (kv heads − G)·head_dim rows of k and of v (weights and biases)."""
    removed = 0
    for b in fxopt.analyze(model, args, kwargs).blocks:
        a = b.attention
        for site in (a.k, a.v):
            removed += (a.num_kv_heads - groups) * a.head_dim * (site.in_features + (site.bias is not None))
    return removed


@pytest.mark.parametrize("family,attn,backend", BACKEND_CASES)
def test_hf_models_convert_shrink_by_h_over_g_and_run_on_the_backends_at_other_shapes(family, attn, backend):
    pytest.importorskip(backend)
    fam = FAMILIES[family]
    model, (args, kwargs) = fam.build(attn), fam.inputs()
    opt = fxopt.optimize(model, args, example_kwargs=kwargs,
                         passes=[StabilizeSoftmax(), FuseLayerNorm(), ConvertToGQA(num_kv_heads=1, min_cosine=-1)])
    before = sum(p.numel() for p in model.parameters())
    assert before - sum(p.numel() for p in opt.graph_module.parameters()) == _kv_rows_removed(model, args, kwargs, 1)
    args, kwargs = fam.inputs(batch=3, seq=5, seed=1)
    with torch.no_grad():
        want, got = opt(*args, **kwargs), fxopt.compile(opt, backend)(*args, **kwargs)
    assert_within(got[0], want[0])


@pytest.mark.filterwarnings("error:.*autograd kernel was not registered")  # fused ops have no backward
def test_uptraining_brings_the_outputs_closer_to_the_mha_model_and_reports_the_loss():
    torch.manual_seed(0)
    model, x = TwoBlocks().eval(), torch.randn(2, 6, D)
    calib = [torch.randn(4, 6, D) for _ in range(8)]
    plain, trained = (fxopt.optimize(model, (x,), calibration=calib if steps else None, passes=[
        FuseLayerNorm(), ConvertToGQA(num_kv_heads=1, uptrain_steps=steps, uptrain_lr=1e-2, min_cosine=-1)])
        for steps in (0, 100))
    report = trained.report["mha_to_gqa"]
    assert report.numerics.cosine > plain.report["mha_to_gqa"].numerics.cosine
    (line,) = [n for n in report.notes if n.startswith("uptrained 100 steps")]
    before, after = (float(v) for v in line.split("outputs ")[1].split(" → "))
    assert after < before
    assert not any(p.requires_grad for n, p in trained.graph_module.named_parameters() if "_k_" in n or "_v_" in n)


def test_uptraining_without_calibration_is_refused_before_anything_runs():
    model, x = TwoBlocks().eval(), torch.randn(2, 6, D)
    with pytest.raises(RequirementError, match="calibration"):
        fxopt.optimize(model, (x,), passes=[ConvertToGQA(num_kv_heads=2, uptrain_steps=5)])


# -- decoding with a static KV cache ------------------------------------------------------------------------------

def _example():
    return importlib.import_module("examples.03_gqa_decode")  # the decoder the example runs


def _decoder():
    torch.manual_seed(0)
    model = _example().CachedLlama(d=64, heads=8, layers=2, ffn=128, max_len=32).eval()
    return model, (torch.tensor([[1]]), torch.tensor([0]))


def test_the_kv_cache_buffers_shrink_by_exactly_h_over_g():
    cache_bytes_per_token = _example().cache_bytes_per_token
    model, example = _decoder()
    opt = fxopt.optimize(model, example, passes=[ConvertToGQA(num_kv_heads=2, min_cosine=-1)])
    assert cache_bytes_per_token(model, 32) == 4 * cache_bytes_per_token(opt.graph_module, 32)
    assert {tuple(b.shape) for n, b in opt.graph_module.named_buffers() if "cache" in n} == {(1, 2, 32, 8)}


@pytest.mark.parametrize("groups", [8, 2], ids=["g-equals-h", "equal-heads-in-groups"])
def test_greedy_decoding_with_the_cache_gives_the_originals_tokens_when_the_conversion_is_exact(groups):
    greedy = _example().greedy
    model, example = _decoder()
    if groups < 8:
        with torch.no_grad():
            for layer in model.layers:
                for lin in (layer.attn.k_proj, layer.attn.v_proj):
                    w = lin.weight.view(groups, 8 // groups, 8, 64)
                    lin.weight.copy_(w[:, :1].expand_as(w).reshape(64, 64))
    opt = fxopt.optimize(model, example, passes=[ConvertToGQA(num_kv_heads=groups)])
    assert opt.report["mha_to_gqa"].applied == (groups < 8)
    prompt = [5, 17, 42, 9]
    assert greedy(opt, opt.graph_module, prompt, 12) == greedy(model, model, prompt, 12)


@pytest.mark.filterwarnings("error:.*autograd kernel was not registered")  # fused ops have no backward
def test_uptraining_reaches_every_layer_through_the_fused_norms():
    torch.manual_seed(0)
    model, x = TwoBlocks().eval(), torch.randn(2, 6, D)
    calib = [torch.randn(4, 6, D) for _ in range(4)]
    graphs = [fxopt.optimize(model, (x,), calibration=calib if steps else None, passes=[
        FuseLayerNorm(), ConvertToGQA(num_kv_heads=2, uptrain_steps=steps, min_cosine=-1)]).graph_module
        for steps in (0, 5)]
    assert "add_layer_norm" in graphs[1].code  # block 1's norm reads block 0's residual through the fused op
    first_k = [next(p for n, p in g.named_parameters() if n.startswith("blocks_0_k_weight")) for g in graphs]
    assert not torch.equal(*first_k)


class HalfTheKeysScaled(SelfAttentionBlock):
    """Scales the keys of heads 4-7 only: the heads differ in more than their projection rows."""

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = (lin(x).view(b, s, self.heads, self.dh).transpose(1, 2) for lin in (self.q, self.k, self.v))
        k = torch.cat([k[:, :4], k[:, 4:] * 2.0], dim=1)
        return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, D))


def test_a_path_that_treats_heads_differently_is_left_with_the_reason():
    model, x = HalfTheKeysScaled().eval(), torch.randn(2, 6, D)
    report = fxopt.optimize(model, (x,), passes=[ConvertToGQA(num_kv_heads=2)]).report["mha_to_gqa"]
    assert not report.applied and "selects or joins along a head dim" in report.reasons[0]


def test_a_capture_with_one_dynamic_dim_keeps_it():
    """Batch 1 at capture: only the length is dynamic, and must stay so (no size read as an int)."""
    torch.manual_seed(0)
    model = TwoBlocks().eval()
    opt = convert(model, torch.randn(1, 6, D), 2, min_cosine=-1)
    x = torch.randn(1, 9, D)
    assert_within(opt(x), gqa_reference(model, 2)(x))
