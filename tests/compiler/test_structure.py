"""fxopt.analyze: the structure found must be the model's own (its config, its parameters, its q/k/v split)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxopt
from fxopt.structure import analyze_graph
from tests.models import toy
from tests.models.hf_families import FAMILIES

# one attention implementation per family by default, both under -m slow (capture is the slow part)
# (alternating which one runs by default, so that both kinds of core are covered)
CASES = [pytest.param((name, attn), marks=[pytest.mark.slow] if i else [], id=f"{name}-{attn}")
         for j, (name, fam) in enumerate(FAMILIES.items())
         for i, attn in enumerate(fam.attn[::-1] if j % 2 else fam.attn)]
ACTS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu", "silu": "silu"}


@pytest.fixture(scope="module", params=CASES)
def analyzed(request):
    name, attn = request.param
    fam = FAMILIES[name]
    model = fam.build(attn)
    args, kwargs = fam.inputs()
    return fam, model, fxopt.analyze(model, args, kwargs)


def _expected(cfg) -> dict:
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or getattr(cfg, "num_kv_heads", None) or heads
    if getattr(cfg, "new_decoder_architecture", True) is False:
        kv = heads
    head_dim = getattr(cfg, "head_dim", None) or getattr(cfg, "d_kv", None) or cfg.hidden_size // heads
    act = next(getattr(cfg, a) for a in ("hidden_act", "activation_function", "activation", "dense_act_fn")
               if isinstance(getattr(cfg, a, None), str))
    return {"layers": cfg.num_hidden_layers, "heads": heads, "kv": kv, "head_dim": head_dim, "act": ACTS[act]}


def _weight(site):
    return _attr(site.weight.graph.owning_module, site.weight.target)


def _attr(mod, target):
    for part in target.split("."):
        mod = getattr(mod, part)
    return mod


def _name_of(model, module) -> str:
    return next(n for n, p in model.named_parameters() if p is module.weight)


def test_blocks_heads_and_activation_equal_the_config(analyzed):
    fam, model, s = analyzed
    want = _expected(model.config)
    assert not s.not_understood, s.not_understood
    assert len(s.blocks) == want["layers"]
    for b in s.blocks:
        a, m = b.attention, b.mlp
        assert (a.num_heads, a.num_kv_heads, a.head_dim) == (want["heads"], want["kv"], want["head_dim"])
        assert a.q_rows.shape == (want["heads"], want["head_dim"])
        assert a.k_rows.shape == a.v_rows.shape == (want["kv"], want["head_dim"])
        assert a.rope == fam.rope
        assert (m.kind, m.activation) == (fam.mlp, want["act"])
    assert str(s).count("\n") + 1 == want["layers"]


def test_every_block_linear_is_the_models_own_parameter(analyzed):
    fam, model, s = analyzed
    for b, layer in zip(s.blocks, fam.layers(model), strict=True):
        roles = fam.roles(layer)
        found = {"o": b.attention.o, "up": b.mlp.up, "down": b.mlp.down, "gate": b.mlp.gate}
        found.update({"qkv": b.attention.q} if "qkv" in roles else
                     {"q": b.attention.q, "k": b.attention.k, "v": b.attention.v})
        if "qkv" in roles:
            assert b.attention.layout == "fused" and b.attention.k is b.attention.q is b.attention.v
        for role, module in roles.items():
            site = found[role]
            assert site.weight_name == _name_of(model, module), role
            assert torch.equal(_weight(site), module.weight), role
        assert set(roles) >= {k for k, v in found.items() if v is not None}


def test_rows_reproduce_the_models_own_qkv_split(analyzed, monkeypatch):
    """What SDPA receives in the model's own code, at position 0 (where RoPE is the identity), is the linear's
    output at `rows`: fused splits, NeoX's per-head interleaving and Falcon's grouping included."""
    fam, model, s = analyzed
    if "sdpa" not in fam.attn:
        pytest.skip("family has no SDPA path to record its q/k/v")
    ref = fam.build("sdpa")
    ref.load_state_dict(model.state_dict())
    seen, outs = [], {}
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda q, k, v, *a, **kw: seen.append((q, k, v)) or real(q, k, v, *a, **kw))
    layers = fam.layers(ref)
    for li, layer in enumerate(layers):
        for role, mod in fam.roles(layer).items():
            mod.register_forward_hook(lambda m, i, o, key=(li, role): outs.__setitem__(key, o))
    args, kwargs = fam.inputs(batch=1, seq=1)
    with torch.no_grad():
        ref(*args, **kwargs)
    assert len(seen) == len(layers)
    for li, (b, layer, (q, k, v)) in enumerate(zip(s.blocks, layers, seen, strict=True)):
        a, roles = b.attention, fam.roles(layer)
        # for one query token, transformers >= 5.25 may pack each group's query heads into the sequence dim
        # ((batch, heads, 1, d) -> (batch, kv_heads, heads / kv_heads, d)); unpack it
        q = q.reshape(q.shape[0], -1, 1, q.shape[-1])
        y = {w: outs[(li, "qkv" if "qkv" in roles else w)][0, 0] for w in "qkv"}
        rep = q.shape[1] // k.shape[1]
        torch.testing.assert_close(y["q"][a.q_rows] * a.q_scale if a.q_scale != 1 else y["q"][a.q_rows],
                                   q[0, :, 0], rtol=0, atol=0)
        for w, t, rows in (("k", k, a.k_rows), ("v", v, a.v_rows)):
            heads = t[0, :, 0] if t.shape[1] == a.num_kv_heads else t[0, ::a.num_heads // a.num_kv_heads, 0]
            torch.testing.assert_close(y[w][rows], heads, rtol=0, atol=0)
        assert rep in (1, a.num_heads // a.num_kv_heads)


def test_norm_groups_read_by_the_blocks_linears(analyzed):
    fam, model, s = analyzed
    for b in s.blocks:
        a, m = b.attention, b.mlp
        assert a.norm is not None and {id(a.q), id(a.k), id(a.v)} <= {id(x) for x in a.norm.linears}
        assert m.norm is not None and (m.norm is a.norm) == fam.parallel
        assert {id(m.up), id(m.gate or m.up)} <= {id(x) for x in m.norm.linears}
        # post-LN: the norm output is also the next residual (SmoothQuant must not fold there); pre-LN: only linears
        assert bool(a.norm.other_readers) == fam.post_ln, a.norm.other_readers


@pytest.fixture(scope="module")
def minilm():
    transformers = pytest.importorskip("transformers")
    from tests.models.hf import minilm_path

    model = transformers.AutoModel.from_pretrained(minilm_path()).eval()
    ids = torch.randint(2, 1000, (2, 8))
    return model, fxopt.analyze(model, (ids,), {"attention_mask": torch.ones(2, 8, dtype=torch.long)})


def test_trained_minilm(minilm):
    model, s = minilm
    cfg = model.config
    assert not s.not_understood and len(s.blocks) == cfg.num_hidden_layers
    for b, layer in zip(s.blocks, model.encoder.layer, strict=True):
        a = b.attention
        assert (a.num_heads, a.num_kv_heads, a.head_dim) == (cfg.num_attention_heads, cfg.num_attention_heads,
                                                            cfg.hidden_size // cfg.num_attention_heads)
        for site, mod in ((a.q, layer.attention.self.query), (a.k, layer.attention.self.key),
                          (a.v, layer.attention.self.value), (a.o, layer.attention.output.dense),
                          (b.mlp.up, layer.intermediate.dense), (b.mlp.down, layer.output.dense)):
            assert site.weight_name == _name_of(model, mod)
        assert a.norm.other_readers  # post-LN
        assert torch.equal(a.o_cols.flatten(), torch.arange(cfg.hidden_size))


# --- models written the way users write them --------------------------------------------------------------


class UserGQA(nn.Module):
    """A small GQA decoder block as one might write it: fused qkv split by sizes, rotate-half RoPE, repeat_interleave
    for the shared kv heads, F.scaled_dot_product_attention, a SwiGLU MLP, nn.RMSNorm."""

    def __init__(self, d=32, heads=4, kv=2, rope=True, tile_kv=False):
        super().__init__()
        self.h, self.kv, self.hd, self.rope, self.tile_kv = heads, kv, d // heads, rope, tile_kv
        self.norm1, self.norm2 = nn.RMSNorm(d), nn.RMSNorm(d)
        self.qkv = nn.Linear(d, (heads + 2 * kv) * self.hd, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.w1, self.w3, self.w2 = nn.Linear(d, 64, bias=False), nn.Linear(d, 64, bias=False), nn.Linear(64, d)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).split([self.h * self.hd, self.kv * self.hd, self.kv * self.hd], -1)
        q, k, v = (z.view(b, t, -1, self.hd).transpose(1, 2) for z in (q, k, v))
        if self.rope:
            pos = torch.arange(t, dtype=torch.float32)[:, None] / 10000 ** (torch.arange(0, self.hd, 2) / self.hd)
            cos, sin = torch.cat([pos, pos], -1).cos(), torch.cat([pos, pos], -1).sin()
            rot = lambda z: torch.cat([-z[..., self.hd // 2:], z[..., : self.hd // 2]], -1)  # noqa: E731
            q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
        if self.tile_kv:  # kv heads 0, 1, 0, 1: q head h does not use kv head h // n_rep
            k, v = k.repeat(1, self.h // self.kv, 1, 1), v.repeat(1, self.h // self.kv, 1, 1)
        else:
            k, v = k.repeat_interleave(self.h // self.kv, 1), v.repeat_interleave(self.h // self.kv, 1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, -1))
        h = self.norm2(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


def test_user_gqa_block_with_fused_qkv_split_by_sizes():
    m = UserGQA()
    s = fxopt.analyze(m, (torch.randn(2, 8, 32),))
    assert not s.not_understood, s.not_understood
    (b,) = s.blocks
    a = b.attention
    assert (a.num_heads, a.num_kv_heads, a.head_dim, a.layout, a.rope, a.kind) == (4, 2, 8, "fused",
                                                                                    "rotate-half", "sdpa")
    assert torch.equal(a.q_rows, torch.arange(32).view(4, 8))
    assert torch.equal(a.k_rows, torch.arange(32, 48).view(2, 8))
    assert torch.equal(a.v_rows, torch.arange(48, 64).view(2, 8))
    assert a.kv_head_of == (0, 0, 1, 1)
    assert (b.mlp.kind, b.mlp.activation, b.mlp.gate.weight_name, b.mlp.up.weight_name) == ("gated", "silu",
                                                                                          "w1.weight", "w3.weight")
    assert str(b) == ("block 0: attn sdpa 4 heads (2 kv) × 8, qkv fused + o, rope rotate-half, mask"
                      " | mlp gated silu 32→64→32")


def test_kv_heads_shared_out_of_group_order_are_not_understood():
    s = fxopt.analyze(UserGQA(tile_kv=True), (torch.randn(2, 8, 32),))
    assert s.blocks[0].attention is None
    assert any("kv heads are not shared by consecutive q heads: (0, 1, 0, 1)" in r for r in s.not_understood)


def test_hand_written_lm_from_toy_models():
    s = fxopt.analyze(toy.HandWrittenLM(), (torch.randint(0, 50, (2, 6)),))
    assert not s.not_understood, s.not_understood
    assert [(b.attention.num_heads, b.attention.head_dim, b.attention.layout, b.mlp.activation)
            for b in s.blocks] == [(2, 8, "fused", "gelu")] * 2
    assert [b.attention.norm.kind for b in s.blocks] == ["layer_norm", "rms_norm"]
    # NaiveAttention: view(b, t, 3, heads, d).permute(2, 0, 3, 1, 4): q is rows 0..15, k 16..31, v 32..47
    assert torch.equal(s.blocks[0].attention.k_rows, torch.arange(16, 32).view(2, 8))


class Attn(nn.Module):
    def __init__(self, d=16, heads=2, softmax_dim=-1, q_from_linear=True, head_gain=False):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.h, self.dim, self.q_from_linear = heads, softmax_dim, q_from_linear
        self.gain = nn.Parameter(torch.rand(heads, 1, 1) + 0.5) if head_gain else None

    def forward(self, x):
        b, t, d = x.shape
        split = lambda z: z.view(b, t, self.h, d // self.h).transpose(1, 2)  # noqa: E731
        q = split(self.q(x) if self.q_from_linear else x)
        if self.gain is not None:
            q = q * self.gain
        k, v = split(self.k(x)), split(self.v(x))
        p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.h), dim=self.dim)
        return self.o((p @ v).transpose(1, 2).reshape(b, t, d))


@pytest.mark.parametrize("kwargs, reason", [
    ({"softmax_dim": -2}, "softmax over dim -2, not the key axis"),
    ({"q_from_linear": False}, "q of the attention at softmax does not come from one linear"),
    ({"head_gain": True}, "mul.Tensor is not a shape op"),
])
def test_attention_near_misses_are_not_understood_with_the_reason(kwargs, reason):
    s = fxopt.analyze(Attn(**kwargs), (torch.randn(2, 5, 16),))
    assert s.blocks == () and any(reason in r for r in s.not_understood), s.not_understood


def test_model_without_attention_says_so():
    mlp = nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 32), nn.GELU(approximate="tanh"), nn.Linear(32, 16))
    s = fxopt.analyze(mlp, (torch.randn(2, 5, 16),))
    assert any("no attention core" in r for r in s.not_understood)
    ((block),) = s.blocks
    assert block.attention is None and (block.mlp.kind, block.mlp.activation) == ("plain", "gelu_tanh")
    assert block.mlp.norm is not None and block.mlp.norm.kind == "layer_norm"


def test_unknown_activation_is_not_guessed():
    mlp = nn.Sequential(nn.Linear(16, 32), nn.Mish(), nn.Linear(32, 16))
    s = fxopt.analyze(mlp, (torch.randn(2, 5, 16),))
    assert s.blocks == () and any("activation is none of" in r for r in s.not_understood), s.not_understood


def test_analyze_graph_does_not_mutate_and_analyze_leaves_the_model_alone():
    m = UserGQA(rope=False).train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    s = fxopt.analyze(m, (torch.randn(2, 8, 32),))
    assert m.training and all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    gm = s.blocks[0].attention.q.node.graph.owning_module
    code = gm.code
    again = analyze_graph(gm)
    assert gm.code == code and str(again) == str(s)


def test_bad_inputs_raise_the_optimize_errors():
    with pytest.raises(fxopt.MissingInputsError):
        fxopt.analyze(UserGQA())
    with pytest.raises(fxopt.CaptureError):
        fxopt.analyze("not a module", (torch.randn(2, 8, 32),))
