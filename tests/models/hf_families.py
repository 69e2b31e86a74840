"""More Hugging Face families, built from small configs (random weights; nothing is downloaded).

Each `Family` knows how to build its model and example inputs and, for the structure tests, where the model's own
modules keep each block's q/k/v/o and MLP linears (`roles`), so that what `fxopt.analyze` finds can be compared with
the parameters the Hugging Face code itself uses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

transformers = __import__("pytest").importorskip("transformers")

VOCAB = 100
HIDDEN, HEADS, LAYERS = 32, 4, 2


@dataclass(frozen=True)
class Family:
    """A model family: `config()` builds the tiny config, `model_class` the model, `roles(layer)` the modules."""

    name: str
    model_class: str
    config: Callable[[str], object]  # attn_implementation -> config
    layers: Callable[[torch.nn.Module], list]  # model -> its transformer layers, in order
    roles: Callable[[torch.nn.Module], dict]  # layer -> {"q"|"k"|"v"|"qkv"|"o"|"up"|"gate"|"down": module}
    heads: int = HEADS
    kv_heads: int = HEADS
    head_dim: int = HIDDEN // HEADS
    mlp: str = "plain"
    rope: str | None = None
    encoder: bool = False  # takes an attention mask, not use_cache
    parallel: bool = False  # attention and MLP read one norm (GPT-J, Phi)
    post_ln: bool = False  # the norm output is also the next residual (BERT, DistilBERT)
    attn: tuple[str, ...] = ("eager", "sdpa")
    extra: dict = field(default_factory=dict)

    def build(self, attn: str = "eager") -> torch.nn.Module:
        torch.manual_seed(0)
        return getattr(transformers, self.model_class)(self.config(attn)).eval()

    def inputs(self, batch: int = 2, seq: int = 8, seed: int = 0) -> tuple[tuple, dict]:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(2, VOCAB, (batch, seq), generator=g)
        if self.encoder:
            mask = torch.ones(batch, seq, dtype=torch.long)
            mask[0, -2:] = 0
            return (ids,), {"attention_mask": mask}
        return (ids,), {"use_cache": False}


T = transformers
_common = {"vocab_size": VOCAB, "bos_token_id": 0, "eos_token_id": 0}


def _llama_like(cls: str, kv: int, **extra) -> Callable[[str], object]:
    return lambda attn: getattr(T, cls)(num_hidden_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS,
                                        num_key_value_heads=kv, intermediate_size=2 * HIDDEN,
                                        max_position_embeddings=128, attn_implementation=attn, **_common, **extra)


def _llama_roles(layer):
    a, m = layer.self_attn, layer.mlp
    return {"q": a.q_proj, "k": a.k_proj, "v": a.v_proj, "o": a.o_proj,
            "up": m.up_proj, "gate": m.gate_proj, "down": m.down_proj}


def _decoder_layers(model):
    return list(model.model.layers)


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("gpt2", "GPT2LMHeadModel",
           lambda attn: T.GPT2Config(n_layer=LAYERS, n_embd=HIDDEN, n_head=HEADS, n_positions=128,
                                     attn_implementation=attn, **_common),
           lambda m: list(m.transformer.h),
           lambda layer: {"qkv": layer.attn.c_attn, "o": layer.attn.c_proj,
                          "up": layer.mlp.c_fc, "down": layer.mlp.c_proj}),
    Family("opt", "OPTForCausalLM",
           lambda attn: T.OPTConfig(num_hidden_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS,
                                    ffn_dim=2 * HIDDEN, max_position_embeddings=128, word_embed_proj_dim=HIDDEN,
                                    pad_token_id=1, attn_implementation=attn, **_common),
           lambda m: list(m.model.decoder.layers),
           lambda layer: {"q": layer.self_attn.q_proj, "k": layer.self_attn.k_proj, "v": layer.self_attn.v_proj,
                          "o": layer.self_attn.out_proj, "up": layer.fc1, "down": layer.fc2}),
    Family("llama", "LlamaForCausalLM", _llama_like("LlamaConfig", HEADS), _decoder_layers, _llama_roles,
           mlp="gated", rope="rotate-half"),
    Family("llama_gqa", "LlamaForCausalLM", _llama_like("LlamaConfig", HEADS // 2), _decoder_layers,
           _llama_roles, kv_heads=HEADS // 2, mlp="gated", rope="rotate-half"),
    Family("qwen2", "Qwen2ForCausalLM", _llama_like("Qwen2Config", HEADS // 2), _decoder_layers, _llama_roles,
           kv_heads=HEADS // 2, mlp="gated", rope="rotate-half"),
    Family("mistral", "MistralForCausalLM", _llama_like("MistralConfig", HEADS // 2, sliding_window=None),
           _decoder_layers, _llama_roles, kv_heads=HEADS // 2, mlp="gated", rope="rotate-half"),
    Family("gpt_neox", "GPTNeoXForCausalLM",
           lambda attn: T.GPTNeoXConfig(num_hidden_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS,
                                        intermediate_size=2 * HIDDEN, max_position_embeddings=128,
                                        rotary_pct=0.5, attn_implementation=attn, **_common),
           lambda m: list(m.gpt_neox.layers),
           lambda layer: {"qkv": layer.attention.query_key_value, "o": layer.attention.dense,
                          "up": layer.mlp.dense_h_to_4h, "down": layer.mlp.dense_4h_to_h},
           rope="rotate-half"),
    Family("phi", "PhiForCausalLM",
           lambda attn: T.PhiConfig(num_hidden_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS,
                                    intermediate_size=2 * HIDDEN, max_position_embeddings=128,
                                    attn_implementation=attn, **_common),
           lambda m: list(m.model.layers),
           lambda layer: {"q": layer.self_attn.q_proj, "k": layer.self_attn.k_proj, "v": layer.self_attn.v_proj,
                          "o": layer.self_attn.dense, "up": layer.mlp.fc1, "down": layer.mlp.fc2},
           rope="rotate-half", parallel=True),
    Family("falcon", "FalconForCausalLM",
           lambda attn: T.FalconConfig(num_hidden_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS,
                                       num_kv_heads=HEADS // 2, new_decoder_architecture=True, alibi=False,
                                       attn_implementation=attn, **_common),
           lambda m: list(m.transformer.h),
           lambda layer: {"qkv": layer.self_attention.query_key_value, "o": layer.self_attention.dense,
                          "up": layer.mlp.dense_h_to_4h, "down": layer.mlp.dense_4h_to_h},
           kv_heads=HEADS // 2, rope="rotate-half"),
    Family("gptj", "GPTJForCausalLM",
           lambda attn: T.GPTJConfig(n_layer=LAYERS, n_embd=HIDDEN, n_head=HEADS, n_positions=128, rotary_dim=4,
                                     attn_implementation=attn, **_common),
           lambda m: list(m.transformer.h),
           lambda layer: {"q": layer.attn.q_proj, "k": layer.attn.k_proj, "v": layer.attn.v_proj,
                          "o": layer.attn.out_proj, "up": layer.mlp.fc_in, "down": layer.mlp.fc_out},
           rope="interleaved", attn=("eager",), parallel=True),
    Family("bert", "BertModel",
           lambda attn: T.BertConfig(num_hidden_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS,
                                     intermediate_size=2 * HIDDEN, vocab_size=VOCAB, max_position_embeddings=128,
                                     attn_implementation=attn),
           lambda m: list(m.encoder.layer),
           lambda layer: {"q": layer.attention.self.query, "k": layer.attention.self.key,
                          "v": layer.attention.self.value, "o": layer.attention.output.dense,
                          "up": layer.intermediate.dense, "down": layer.output.dense},
           encoder=True, post_ln=True),
    Family("distilbert", "DistilBertModel",
           lambda attn: T.DistilBertConfig(n_layers=LAYERS, dim=HIDDEN, n_heads=HEADS, hidden_dim=2 * HIDDEN,
                                           vocab_size=VOCAB, max_position_embeddings=128,
                                           attn_implementation=attn),
           lambda m: list(m.transformer.layer),
           lambda layer: {"q": layer.attention.q_lin, "k": layer.attention.k_lin, "v": layer.attention.v_lin,
                          "o": layer.attention.out_lin, "up": layer.ffn.lin1, "down": layer.ffn.lin2},
           encoder=True, post_ln=True),
    Family("t5_encoder", "T5EncoderModel",
           lambda attn: T.T5Config(num_layers=LAYERS, d_model=HIDDEN, num_heads=HEADS, d_kv=HIDDEN // HEADS,
                                   d_ff=2 * HIDDEN, vocab_size=VOCAB, feed_forward_proj="gated-gelu",
                                   attn_implementation=attn),
           lambda m: list(m.encoder.block),
           lambda layer: {"q": layer.layer[0].SelfAttention.q, "k": layer.layer[0].SelfAttention.k,
                          "v": layer.layer[0].SelfAttention.v, "o": layer.layer[0].SelfAttention.o,
                          "up": layer.layer[1].DenseReluDense.wi_1, "gate": layer.layer[1].DenseReluDense.wi_0,
                          "down": layer.layer[1].DenseReluDense.wo},
           mlp="gated", encoder=True, attn=("eager",)),
)}


def tiny_causal_lm(family: str, **extra) -> tuple[torch.nn.Module, int]:
    """A `{family}ForCausalLM` from a tiny config (random weights, seed 0) for the families the structure analysis
    only partly places (Qwen3, Phi3, Mixtral), and how many nn.Linear its blocks (`model.layers.*`) hold."""
    config = getattr(T, f"{family}Config")(num_hidden_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS,
                                           num_key_value_heads=HEADS // 2, intermediate_size=2 * HIDDEN,
                                           attn_implementation="sdpa", pad_token_id=0, **_common, **extra)
    torch.manual_seed(0)
    model = getattr(T, f"{family}ForCausalLM")(config).eval()
    return model, sum(isinstance(m, torch.nn.Linear) for n, m in model.named_modules() if n.startswith("model.layers."))
