"""permute_nm and prune_nm: the same function with N:M-friendlier weights, then the N:M masks."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxopt
from fxopt.passes import FuseLayerNorm, PermuteForNM, PruneNM, StabilizeSoftmax
from fxopt.passes.permute_nm.search import canonical_count, efficacy, kept, nm_mask, partitions, search
from fxopt.testing import assert_within
from tests.models.hf_families import FAMILIES

D, HEADS, FFN = 32, 4, 64
QUICK = PermuteForNM(swaps_per_column=500)


class Block(nn.Module):
    """Pre-LN attention (sdpa or written out, `kv` heads shared by repeat_interleave) and an MLP, as users write."""

    def __init__(self, kv: int = HEADS, gated: bool = False, sdpa: bool = True, dh: int = D // HEADS):
        super().__init__()
        self.kv, self.dh, self.gated, self.sdpa = kv, dh, gated, sdpa
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.q, self.o = nn.Linear(D, HEADS * dh), nn.Linear(HEADS * dh, D)
        self.k, self.v = nn.Linear(D, kv * self.dh), nn.Linear(D, kv * self.dh)
        self.up, self.down = nn.Linear(D, FFN), nn.Linear(FFN, D)
        self.gate = nn.Linear(D, FFN, bias=False) if gated else None

    def attend(self, h):
        b, s, _ = h.shape
        q = self.q(h).view(b, s, HEADS, self.dh).transpose(1, 2)
        k = self.k(h).view(b, s, self.kv, self.dh).transpose(1, 2).repeat_interleave(HEADS // self.kv, 1)
        v = self.v(h).view(b, s, self.kv, self.dh).transpose(1, 2).repeat_interleave(HEADS // self.kv, 1)
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = torch.softmax(q @ k.transpose(-1, -2) * self.dh ** -0.5, dim=-1) @ v
        return self.o(y.transpose(1, 2).reshape(b, s, HEADS * self.dh))

    def mlp(self, h):
        if self.gated:
            return self.down(F.silu(self.gate(h)) * self.up(h))
        return self.down(F.gelu(self.up(h)))

    def forward(self, x):
        x = x + self.attend(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Model(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.blocks = nn.Sequential(Block(**kw), Block(**kw))

    def forward(self, x):
        return self.blocks(x)


def _columns_are_a_permutation(new: torch.Tensor, old: torch.Tensor) -> bool:
    """Every column of `new` is a column of `old`, each used once."""
    match = (new[:, :, None] == old[:, None, :]).all(0)
    return bool((match.sum(1) == 1).all() and (match.sum(0) == 1).all())


# -- the search ---------------------------------------------------------------------------------------------

def test_partition_counts_match_the_closed_form():
    assert len(partitions(4, 2)) == canonical_count(8, 4) == 35
    assert len(partitions(4, 3)) == canonical_count(12, 4) == 5775
    assert canonical_count(16, 4) == 2_627_625


def test_on_eight_columns_the_search_finds_the_best_of_all_partitions():
    for seed in range(5):
        w = torch.rand(16, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        best = max(kept(w[:, list(p)], 2, 4) for p in itertools.permutations(range(8)))
        assert kept(w[:, search(w)], 2, 4) == pytest.approx(best, rel=1e-12)


@pytest.mark.parametrize("shape", [(16, 8), (32, 24), (128, 64)])
def test_the_search_is_a_deterministic_bijection_never_below_the_identity(shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    pi = search(w, swaps_per_column=500)
    assert sorted(pi.tolist()) == list(range(shape[1]))
    assert kept(w[:, pi], 2, 4) >= kept(w, 2, 4)
    assert torch.equal(pi, search(w, swaps_per_column=500))


def test_an_already_n_m_sparse_matrix_keeps_the_identity():
    w = torch.randn(32, 16, generator=torch.Generator().manual_seed(2))
    w = w * nm_mask(w, 2, 4)
    assert torch.equal(search(w), torch.arange(16))


def test_efficacy_on_the_standard_case_beats_apexs_stripe_group_search():
    """Random uniform 128 × 64 (apex permutation_test.py's case): apex reports 35.5 % (window 8)."""
    effs = [efficacy(w, search(w), 2, 4) for w in
            (torch.rand(128, 64, generator=torch.Generator().manual_seed(s), dtype=torch.float64) for s in range(12))]
    assert sum(effs) / len(effs) >= 0.355, effs


# -- the pass on models written as users write them -----------------------------------------------------------

@pytest.mark.parametrize("kw", [{}, {"gated": True}, {"sdpa": False}, {"kv": 2, "gated": True}],
                         ids=["gelu-sdpa", "swiglu", "explicit-softmax", "gqa-swiglu"])
def test_the_permuted_model_is_the_same_function_with_columns_regrouped(kw):
    torch.manual_seed(0)
    model = Model(**kw).eval()
    opt = fxopt.optimize(model, (torch.randn(2, 6, D),), passes=[FuseLayerNorm(), QUICK])
    report = opt.report["permute_nm"]
    kinds = [n.split(":")[0].split(" ")[-1] for n in report.notes if n.startswith("block")]
    assert kinds.count("ffn") == 2 and kinds.count("v/o") == 2, report.notes
    x = torch.randn(3, 5, D)
    with torch.no_grad():
        assert_within(opt(x), model(x))
    new = {k: v for k, v in opt.graph_module.state_dict().items()}
    for i, blk in enumerate(model.blocks):
        for name in ("down", "o"):
            old = getattr(blk, name).weight.detach()
            (w,) = [v for k, v in new.items() if k.startswith(f"blocks_{i}_{name}_weight")]
            assert _columns_are_a_permutation(w, old) and kept(w, 2, 4) >= kept(old, 2, 4)


def test_the_vo_permutation_stays_within_heads():
    torch.manual_seed(0)
    model = Model(kv=2).eval()
    opt = fxopt.optimize(model, (torch.randn(2, 6, D),), passes=[FuseLayerNorm(), PermuteForNM(gather_inputs=False)])
    dh = D // HEADS
    for i, blk in enumerate(model.blocks):
        (w,) = [v for k, v in opt.graph_module.state_dict().items() if k.startswith(f"blocks_{i}_o_weight")]
        old = blk.o.weight.detach()
        for h in range(HEADS):
            assert _columns_are_a_permutation(w[:, h * dh:(h + 1) * dh], old[:, h * dh:(h + 1) * dh])


class ReturnsHidden(Block):
    def forward(self, x):
        h = F.gelu(self.up(self.ln2(x)))
        return x + self.down(h), h


class ReturnsPreActivation(Block):
    def forward(self, x):
        u = self.up(self.ln2(x))
        return x + self.down(F.gelu(u)), u


class ScaledHidden(Block):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.rand(FFN))

    def forward(self, x):
        x = x + self.attend(self.ln1(x))
        return x + self.down(F.gelu(self.up(self.ln2(x))) * self.scale)


class ReturnsValues(Block):
    def forward(self, x):
        b, s, _ = x.shape
        v = self.v(self.ln1(x))
        return x + self.attend(self.ln1(x)), v.view(b, s, HEADS, self.dh)


@pytest.mark.parametrize("model, group, why", [
    (ReturnsHidden(), "ffn", "graph output"),
    (ReturnsPreActivation(), "ffn", "graph output"),
    (ReturnsValues(), "v/o", "graph output"),
], ids=["hidden-returned", "pre-activation-returned", "values-returned"])
def test_a_group_that_cannot_be_proven_is_left_alone_with_the_reason(model, group, why):
    model.eval()
    opt = fxopt.optimize(model, (torch.randn(2, 6, D),), passes=[FuseLayerNorm(), QUICK])
    report = opt.report["permute_nm"]
    assert any(r.startswith(f"block 0 {group}:") and why in r for r in report.reasons), report.reasons
    assert not any(n.startswith(f"block 0 {group}:") for n in report.notes)
    x = torch.randn(3, 5, D)
    with torch.no_grad():
        assert_within(opt(x), model(x))


class SharedKV(nn.Module):
    """One projection read as both k and v: permuting v's channels would permute k's too."""

    def __init__(self):
        super().__init__()
        self.ln, self.q, self.kv, self.o = nn.LayerNorm(D), nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, x):
        b, n, _ = x.shape
        h = self.ln(x)
        q, kv = (t.view(b, n, HEADS, D // HEADS).transpose(1, 2) for t in (self.q(h), self.kv(h)))
        return x + self.o(F.scaled_dot_product_attention(q, kv, kv).transpose(1, 2).reshape(b, n, D))


def test_one_projection_read_as_k_and_v_is_no_vo_group():
    model = SharedKV().eval()
    opt = fxopt.optimize(model, (torch.randn(2, 6, D),), passes=[FuseLayerNorm(), QUICK])
    report = opt.report["permute_nm"]
    assert any(r.startswith("block 0 v/o:") and "also read as k" in r for r in report.reasons), report.reasons
    x = torch.randn(3, 5, D)
    with torch.no_grad():
        assert_within(opt(x), model(x))


def test_a_head_dim_that_is_not_a_multiple_of_m_leaves_that_group_and_permutes_the_others():
    torch.manual_seed(0)
    model = nn.Sequential(Block(dh=6), Block(dh=6)).eval()  # a v/o segment of 6 channels: no whole 4-groups
    opt = fxopt.optimize(model, (torch.randn(2, 6, D),), passes=[FuseLayerNorm(), QUICK])
    report = opt.report["permute_nm"]
    assert sum(" v/o: 6 channels per segment, not a multiple of 4" in r for r in report.reasons) == 2, report.reasons
    assert sum(" ffn:" in n for n in report.notes) == 2
    x = torch.randn(3, 5, D)
    with torch.no_grad():
        assert_within(opt(x), model(x))


def test_a_per_channel_parameter_in_the_mlp_is_no_ffn_group_and_down_reads_a_gathered_input_instead():
    model = ScaledHidden().eval()
    opt = fxopt.optimize(model, (torch.randn(2, 6, D),),
                         passes=[FuseLayerNorm(), PermuteForNM(layers="all", swaps_per_column=500)])
    report = opt.report["permute_nm"]
    assert not any(" ffn:" in n for n in report.notes)
    assert any(n.startswith("input ") and "down" in n.split("→")[1] for n in report.notes), report.notes
    x = torch.randn(3, 5, D)
    with torch.no_grad():
        assert_within(opt(x), model(x))


def test_options_are_checked():
    from fxopt.errors import PassOptionError
    for bad in ({"n": 4, "m": 4}, {"layers": "some"}, {"swaps_per_column": -1}):
        with pytest.raises(PassOptionError):
            PermuteForNM(**bad)
    with pytest.raises(PassOptionError):
        PruneNM(n=0)


# -- pruning ------------------------------------------------------------------------------------------------

def test_pruning_keeps_n_of_every_m_and_reports_what_the_permutation_gained():
    torch.manual_seed(0)
    model = Model(gated=True).eval()
    x = torch.randn(2, 6, D)
    opt = fxopt.optimize(model, (x,), passes=[FuseLayerNorm(), PermuteForNM(), PruneNM(min_cosine=0)])
    report = opt.report["prune_nm"]
    assert report.stats["pruned_linear"] == 14
    for k, w in opt.graph_module.state_dict().items():
        if w.dim() == 2 and w.shape[1] % 4 == 0 and "weight" in k:
            assert bool(((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) == 2).all()), k
    gains = [n for n in report.notes if "without the permutation" in n]
    assert len(gains) == 14
    for line in gains:
        with_p, without = (float(line.split(" of |W|")[0].split("kept ")[1]),
                           float(line.split("(")[1].split(" without")[0]))
        assert with_p >= without
    assert any(float(line.split(" of |W|")[0].split("kept ")[1]) > float(line.split("(")[1].split(" without")[0])
               for line in gains)


def test_pruning_without_permutation_reports_plain_kept_and_the_cosine_contract():
    torch.manual_seed(0)
    model = Model().eval()
    opt = fxopt.optimize(model, (torch.randn(2, 6, D),), passes=[FuseLayerNorm(), PruneNM(layers="ffn")])
    report = opt.report["prune_nm"]
    assert report.stats["pruned_linear"] == 4 and report.numerics.cosine >= 0.5
    assert all("without" not in n for n in report.notes)


# -- Hugging Face models -------------------------------------------------------------------------------------

_HF = ["llama", "gpt2", "opt", "gpt_neox", "bert"]


@pytest.mark.parametrize("family", [pytest.param(f, marks=[] if f in ("llama", "gpt2") else pytest.mark.slow)
                                    for f in _HF])
def test_hf_models_keep_their_function_with_every_block_permuted(family):
    fam = FAMILIES[family]
    model, (args, kwargs) = fam.build(fam.attn[-1]), fam.inputs()
    opt = fxopt.optimize(model, args, example_kwargs=kwargs, passes=[StabilizeSoftmax(), FuseLayerNorm(), QUICK])
    notes = opt.report["permute_nm"].notes
    layers = len(fam.layers(model))
    assert sum(" ffn:" in n for n in notes) == layers and sum(" v/o:" in n for n in notes) == layers, notes
    args, kwargs = fam.inputs(batch=3, seq=5, seed=1)
    with torch.no_grad():
        assert_within(opt(*args, **kwargs), model(*args, **kwargs))


@pytest.mark.parametrize("backend", ["onnxruntime", pytest.param("tvm", marks=pytest.mark.slow)])
def test_a_permuted_and_pruned_llama_runs_on_the_backends(backend):
    pytest.importorskip(backend)
    fam = FAMILIES["llama"]
    model, (args, kwargs) = fam.build("sdpa"), fam.inputs()
    opt = fxopt.optimize(model, args, example_kwargs=kwargs,
                         passes=[FuseLayerNorm(), QUICK, PruneNM(min_cosine=-1)])
    args, kwargs = fam.inputs(batch=3, seq=5, seed=1)
    with torch.no_grad():
        want, got = opt(*args, **kwargs), fxopt.compile(opt, backend)(*args, **kwargs)
    assert_within(got[0], want[0])


def test_pruning_only_where_the_speed_table_says_2_4_pays(tmp_path):
    table = tmp_path / "speed.json"
    table.write_text(__import__("json").dumps({"cells": [
        {"m": 16, "k": D, "n": FFN, "speedup": 0.5}, {"m": 2048, "k": D, "n": FFN, "speedup": 1.3},
        {"m": 2048, "k": FFN, "n": D, "speedup": 0.9}]}))
    model = Model().eval()
    opt = fxopt.optimize(model, (torch.randn(2, 6, D),),
                         passes=[PruneNM(layers="ffn", speed_table=str(table), tokens=4096, min_cosine=-1)])
    report = opt.report["prune_nm"]
    assert report.stats["pruned_linear"] == 2  # the two up projections (1.3×); down measured 0.9×
    assert sum("0.90× dense" in r for r in report.reasons) == 2
    small = fxopt.optimize(model, (torch.randn(2, 6, D),),
                           passes=[PruneNM(layers="ffn", speed_table=str(table), tokens=100, min_cosine=-1)])
    assert "prune_nm" in small.report and not small.report["prune_nm"].applied
    assert sum("0.50× dense" in r for r in small.report["prune_nm"].reasons) == 2
    from fxopt.errors import PassOptionError
    with pytest.raises(PassOptionError, match="speed_table"):
        PruneNM(speed_table=str(tmp_path / "missing.json"))
