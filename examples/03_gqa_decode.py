"""Greedy decoding with a static KV cache, before and after MHA → GQA (fxopt's `mha_to_gqa`).

    python examples/03_gqa_decode.py

A Llama-shaped decoder written the way such code is written (RMSNorm, RoPE, SwiGLU, one K and one V cache
buffer per layer, updated in place with `index_copy_` at the step's positions), random weights. It is captured
for one decoding step; `ConvertToGQA(num_kv_heads=2)` pools K/V heads 8 → 2, and the cache buffers shrink with
them. The example prints the cache bytes per token and the greedy tokens of both models from the same prompt.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CachedAttention(nn.Module):
    def __init__(self, d: int, heads: int, max_len: int, batch: int):
        super().__init__()
        self.heads, self.dh = heads, d // heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.register_buffer("k_cache", torch.zeros(batch, heads, max_len, self.dh))
        self.register_buffer("v_cache", torch.zeros(batch, heads, max_len, self.dh))

    def forward(self, x, pos, cos, sin, mask):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, -1, self.dh).transpose(1, 2)
        k = self.k_proj(x).view(b, s, -1, self.dh).transpose(1, 2)
        v = self.v_proj(x).view(b, s, -1, self.dh).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        self.k_cache.index_copy_(2, pos, k)
        self.v_cache.index_copy_(2, pos, v)
        y = F.scaled_dot_product_attention(q, self.k_cache, self.v_cache, attn_mask=mask)
        return self.o_proj(y.transpose(1, 2).reshape(b, s, -1))


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class DecoderLayer(nn.Module):
    def __init__(self, d: int, heads: int, ffn: int, max_len: int, batch: int):
        super().__init__()
        self.attn_norm, self.mlp_norm = nn.RMSNorm(d, eps=1e-6), nn.RMSNorm(d, eps=1e-6)
        self.attn = CachedAttention(d, heads, max_len, batch)
        self.gate, self.up, self.down = nn.Linear(d, ffn, bias=False), nn.Linear(d, ffn, bias=False), \
            nn.Linear(ffn, d, bias=False)

    def forward(self, x, pos, cos, sin, mask):
        x = x + self.attn(self.attn_norm(x), pos, cos, sin, mask)
        h = self.mlp_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class CachedLlama(nn.Module):
    """forward(ids (batch, s), positions (s,)) -> logits (batch, s, vocab); the caches keep what earlier steps
    wrote."""

    def __init__(self, vocab: int = 256, d: int = 128, heads: int = 8, layers: int = 2, ffn: int = 256,
                 max_len: int = 64, batch: int = 1):
        super().__init__()
        self.max_len = max_len
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(DecoderLayer(d, heads, ffn, max_len, batch) for _ in range(layers))
        self.norm, self.lm_head = nn.RMSNorm(d, eps=1e-6), nn.Linear(d, vocab, bias=False)
        dh = d // heads
        freq = 1.0 / (10000 ** (torch.arange(0, dh, 2).double() / dh))
        angle = torch.arange(max_len).double()[:, None] * freq[None, :]
        angle = torch.cat((angle, angle), dim=-1)
        self.register_buffer("cos", angle.cos().float(), persistent=False)
        self.register_buffer("sin", angle.sin().float(), persistent=False)

    def forward(self, ids, pos):
        x = self.embed(ids)
        cos, sin = self.cos[pos][None, None], self.sin[pos][None, None]
        mask = (torch.arange(self.max_len, device=pos.device) <= pos[:, None])[None, None]
        for layer in self.layers:
            x = layer(x, pos, cos, sin, mask)
        return self.lm_head(self.norm(x))


def caches(module: nn.Module) -> list[torch.Tensor]:
    return [b for name, b in module.named_buffers() if name.endswith(("k_cache", "v_cache", "k_cache_0",
                                                                      "v_cache_0"))]


def cache_bytes_per_token(module: nn.Module, max_len: int) -> int:
    return sum(b.numel() * b.element_size() for b in caches(module)) // max_len


@torch.no_grad()
def greedy(step, module: nn.Module, prompt: list[int], new_tokens: int) -> list[int]:
    """Prompt fed one token per step, then `new_tokens` greedy tokens; `step(ids, pos)` runs the model."""
    for b in caches(module):
        b.zero_()
    out, tokens = [], list(prompt)
    for i in range(len(prompt) + new_tokens - 1):
        logits = step(torch.tensor([[tokens[i]]]), torch.tensor([i]))
        if i >= len(prompt) - 1:
            tokens.append(int(logits[0, -1].argmax()))
            out.append(tokens[-1])
    return out


def main() -> None:
    import fxopt
    from fxopt.passes import ConvertToGQA

    torch.manual_seed(0)
    model = CachedLlama().eval()
    example = (torch.tensor([[1]]), torch.tensor([0]))
    opt = fxopt.optimize(model, example, passes=[ConvertToGQA(num_kv_heads=2, min_cosine=-1)])
    gm = opt.graph_module
    prompt = [5, 17, 42, 99, 3]
    print("\n".join(opt.report["mha_to_gqa"].notes[-len(model.layers):]))
    sizes = []
    for name, step, module in (("MHA (8 kv heads)", model, model), ("GQA (2 kv heads)", opt, gm)):
        tokens = greedy(step, module, prompt, 16)
        sizes.append(cache_bytes_per_token(module, model.max_len))
        print(f"{name}: KV cache {sizes[-1]} bytes per token; greedy tokens {tokens}")
    print(f"the cache is {sizes[0] / sizes[1]:g}x smaller")


if __name__ == "__main__":
    main()
