"""Small models written the way people write them (not transcribed from the passes' patterns)."""

from __future__ import annotations

import math

import torch
from torch import nn


class BertStyleLayerNorm(nn.Module):
    """The original BERT/TF LayerNorm: u, s, divide by sqrt(s + eps), weight * x + bias."""

    def __init__(self, d: int, eps: float = 1e-12):
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.randn(d)), nn.Parameter(torch.randn(d)), eps

    def forward(self, x):
        u = x.mean(-1, keepdim=True)
        s = (x - u).pow(2).mean(-1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight * x + self.bias


class VarMeanLayerNorm(nn.Module):
    """torch.var_mean with unbiased=False, rsqrt, commuted affine, no bias."""

    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.gamma, self.eps = nn.Parameter(torch.rand(d) + 0.5), eps

    def forward(self, x):
        var, mean = torch.var_mean(x, dim=-1, keepdim=True, unbiased=False)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.gamma


class PlainLayerNorm(nn.Module):
    """No affine; x*x for the square; eps on the left; normalizes the last two dims."""

    def __init__(self, eps: float = 1e-6, dims=(-2, -1)):
        super().__init__()
        self.eps, self.dims = eps, dims

    def forward(self, x):
        centered = x - x.mean(dim=self.dims, keepdim=True)
        var = (centered * centered).mean(dim=self.dims, keepdim=True)
        return centered / (self.eps + var).sqrt()


class LlamaStyleRMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.weight, self.variance_epsilon = nn.Parameter(torch.rand(d) + 0.5), eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class T5StyleRMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) * w, with the weight on the right."""

    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.w, self.eps = nn.Parameter(torch.rand(d) + 0.5), eps

    def forward(self, x):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.w


class NaiveAttention(nn.Module):
    """Attention with a hand-written softmax and an optional additive mask."""

    def __init__(self, d: int = 16, heads: int = 2, dim: int = -1):
        super().__init__()
        self.qkv, self.out, self.heads, self.dim = nn.Linear(d, 3 * d), nn.Linear(d, d), heads, dim

    def forward(self, x, mask=None):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)
        if mask is not None:
            scores = scores + mask
        probs = torch.exp(scores) / torch.exp(scores).sum(dim=self.dim, keepdim=True)
        return self.out((probs @ v).transpose(1, 2).reshape(b, t, d))


class HandWrittenBlock(nn.Module):
    """A pre-norm transformer block with manual LayerNorm/RMSNorm and a naive softmax."""

    def __init__(self, d: int = 16, rms: bool = False):
        super().__init__()
        norm = (lambda: LlamaStyleRMSNorm(d)) if rms else (lambda: BertStyleLayerNorm(d, 1e-5))
        self.ln1, self.attn, self.ln2 = norm(), NaiveAttention(d), norm()
        self.ffn = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.ffn(self.ln2(x))


class HandWrittenLM(nn.Module):
    def __init__(self, vocab: int = 50, d: int = 16, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(HandWrittenBlock(d, rms=i % 2 == 1) for i in range(layers))
        self.norm, self.head = BertStyleLayerNorm(d, 1e-5), nn.Linear(d, vocab)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return {"logits": self.head(self.norm(x)), "hidden": x}


class TinyLM(nn.Module):
    """Token and learned position embeddings, the way GPT-2-style models index them."""

    def __init__(self, vocab: int = 50, positions: int = 16, width: int = 8):
        super().__init__()
        self.tokens, self.positions = nn.Embedding(vocab, width), nn.Embedding(positions, width)
        self.head = nn.Linear(width, vocab)

    def forward(self, ids):
        where = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        return self.head(self.tokens(ids) + self.positions(where))
