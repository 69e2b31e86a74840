"""TVM backend on the CPU (llvm): fxopt graphs after the exact pipeline must match torch.

The contract is the exact passes' own: TVM evaluates the same float function in another order, so its outputs
equal the optimized graph's within ROUNDING (per dtype, relative to the output's scale).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

pytest.importorskip("tvm")
transformers = pytest.importorskip("transformers")

import fxopt  # noqa: E402
from fxopt import passes  # noqa: E402
from fxopt.backends import tvm as fxtvm  # noqa: E402
from fxopt.errors import UnsupportedOpError  # noqa: E402
from fxopt.pass_base import ROUNDING  # noqa: E402
from fxopt.testing import assert_within  # noqa: E402


def assert_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert_within(out, ref, ROUNDING)


class ToyBlock(nn.Module):
    """Pre-norm attention with a hand-written softmax (amax/exp/sum) and a residual LayerNorm."""

    def __init__(self, d: int = 32, vocab: int = 50):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, vocab, bias=False)
        self.scale = d ** -0.5

    def forward(self, ids):
        x = self.emb(ids)
        q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)
        s = q @ k.transpose(-1, -2) * self.scale
        p = torch.exp(s - s.amax(-1, keepdim=True))
        p = p / p.sum(-1, keepdim=True)
        h = self.ln2(x + p @ v)
        return {"logits": self.out(h), "hidden": h}


def _optimize(model: nn.Module, args: tuple, kwargs: dict | None = None):
    return fxopt.optimize(model.eval(), args, passes=list(passes.EXACT_PIPELINE), example_kwargs=kwargs)


def test_toy_graph_matches_torch_and_keeps_output_structure():
    model, ids = ToyBlock().eval(), torch.randint(0, 50, (2, 8))
    run = fxtvm.compile(_optimize(model, (ids,)), target="cpu")
    out, ref = run(ids), model(ids)
    assert set(out) == {"logits", "hidden"}
    assert_close(out["logits"], ref["logits"])
    assert_close(out["hidden"], ref["hidden"])


def _hf(name: str):
    cfg = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=128,
               max_position_embeddings=64)
    if name == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64)), {"use_cache": False}
    if name == "opt":
        return transformers.OPTForCausalLM(transformers.OPTConfig(
            ffn_dim=128, word_embed_proj_dim=64, **cfg)), {"use_cache": False}
    if name == "llama":  # grouped-query attention: 2 kv heads for 4 query heads
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            num_key_value_heads=2, intermediate_size=128, **cfg)), {"use_cache": False}
    return transformers.BertModel(transformers.BertConfig(intermediate_size=128, **cfg)), {}


@pytest.mark.parametrize("name", ["gpt2", "opt", "llama", "bert"])
def test_hf_model_after_exact_pipeline_matches_torch(name):
    model, kwargs = _hf(name)
    model.eval()
    ids = torch.randint(0, 128, (2, 16))
    if name == "bert":
        kwargs = {"attention_mask": torch.ones(2, 16, dtype=torch.long)}
    run = fxtvm.compile(_optimize(model, (ids,), kwargs), target="cpu")
    field = "last_hidden_state" if name == "bert" else "logits"
    with torch.no_grad():
        assert_close(getattr(run(ids, **kwargs), field), getattr(model(ids, **kwargs), field))
        ids2 = torch.randint(0, 128, (3, 11))  # dynamic batch and sequence length
        if name == "bert":
            kwargs = {"attention_mask": torch.ones(3, 11, dtype=torch.long)}
        assert_close(getattr(run(ids2, **kwargs), field), getattr(model(ids2, **kwargs), field))


@torch.library.custom_op("fxopt_test::mystery", mutates_args=())
def _mystery(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_mystery.register_fake
def _(x):
    return torch.empty_like(x)


class UsesMystery(nn.Module):
    def forward(self, x):
        return torch.ops.fxopt_test.mystery(torch.relu(x)) + 1


def test_legalize_reports_unsupported_nodes_before_lowering():
    ep = torch.export.export(UsesMystery(), (torch.randn(2, 3),))
    with pytest.raises(UnsupportedOpError) as info:
        fxtvm.legalize(ep)
    assert len(info.value.nodes) == 1 and "mystery" in info.value.nodes[0]
    with pytest.raises(UnsupportedOpError):
        fxtvm.compile(ep, target="cpu")
    assert fxtvm.legalize(torch.export.export(ToyBlock(), (torch.randint(0, 50, (2, 8)),))) == []


def test_cpu_artifact_runs_with_the_runtime_only(tmp_path):
    model, ids = ToyBlock().eval(), torch.randint(0, 50, (2, 8))
    path = fxtvm.export(_optimize(model, (ids,)), tmp_path / "toy", target="cpu")
    assert {p.name for p in path.iterdir()} >= {"model.so", "params.bin", "manifest.json", "loader.py"}
    assert json.loads((path / "manifest.json").read_text())["device"] == "cpu"
    torch.save(ids, tmp_path / "ids.pt")
    script = (
        "import sys, torch; sys.path.insert(0, sys.argv[1]); import loader, tvm.base\n"
        "assert 'tvm_compiler' not in tvm.base._LOADED_LIBS\n"
        "out = loader.load(sys.argv[1])(torch.load(sys.argv[2]))\n"
        "torch.save(out['logits'], sys.argv[3])\n")
    env = dict(os.environ, TVM_USE_RUNTIME_LIB="1")
    subprocess.run([sys.executable, "-c", script, str(path), str(tmp_path / "ids.pt"), str(tmp_path / "o.pt")],
                   check=True, env=env, cwd=tmp_path)
    assert_close(torch.load(tmp_path / "o.pt"), model(ids)["logits"])


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_library_dispatch_path_matches_torch(name):
    """``extern=True`` (the CUDA default) on the CPU: GEMMs and attention go to the runtime-registered
    torch functions (strided q/k/v views, [B, S, H, D] output, the transposed unaligned-N GEMM)."""
    model, kwargs = _hf(name)
    if name == "gpt2":  # an odd vocabulary, like GPT-2's 50257
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_layer=2, n_embd=64, n_head=4, vocab_size=127, n_positions=64))
    model.eval()
    ids = torch.randint(0, 127, (2, 16))
    run = fxtvm.compile(_optimize(model, (ids,), kwargs), target="cpu", extern=True)
    with torch.no_grad():
        assert_close(run(ids, **kwargs).logits, model(ids, **kwargs).logits)


def test_constant_causal_mask_becomes_is_causal_and_input_masks_stay():
    from fxopt.backends.tvm.lower import decompose
    from fxopt.backends.tvm.masks import simplify_constant_masks

    def sdpa_nodes(ep):
        return [n for n in ep.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default]

    gpt2, kwargs = _hf("gpt2")
    ids = torch.randint(0, 128, (2, 16))
    ep = decompose(torch.export.export(gpt2.eval(), (ids,), kwargs, strict=False))  # static shapes
    assert simplify_constant_masks(ep) == {"causal": 2}
    assert all(n.kwargs.get("is_causal") and (len(n.args) < 4 or n.args[3] is None) for n in sdpa_nodes(ep))

    bert, _ = _hf("bert")
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 12:] = 0  # padding: the mask depends on an input and must stay
    ep = decompose(torch.export.export(bert.eval(), (ids,), {"attention_mask": mask}, strict=False))
    assert simplify_constant_masks(ep) == {}


def test_library_attention_reads_q_k_v_in_place_from_the_projection():
    """GPT-2's packed c_attn output is handed over once, with each operand's offset; BERT's per-projection
    [B, S, H, D] views are handed over unpermuted; anything else goes as it is ([B, H, S, D])."""
    from fxopt.backends.tvm import convention
    from fxopt.backends.tvm.attention import qkv_view
    from fxopt.backends.tvm.lower import decompose

    def first_sdpa_operands(name):
        model, kwargs = _hf(name)
        ep = decompose(torch.export.export(model.eval(), (torch.randint(0, 128, (2, 16)),), kwargs, strict=False))
        sdpa = next(n for n in ep.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default)
        return [qkv_view(a) for a in sdpa.args[:3]]

    packed = first_sdpa_operands("gpt2")
    assert len({src for src, _ in packed}) == 1
    assert [(v.mode, v.offset, v.heads, v.width) for _, v in packed] == [
        (convention.VIEW_PACKED, offset, 4, 64) for offset in (0, 64, 128)]
    separate = first_sdpa_operands("bert")
    assert [v.mode for _, v in separate] == [convention.VIEW_BSHD] * 3
    assert all(src.target is torch.ops.aten.view.default for src, _ in separate)
