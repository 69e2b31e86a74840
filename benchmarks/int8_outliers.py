"""W8A8 on models with LLM-like activation outliers: naive per-tensor int8 degrades, SmoothQuant recovers it.

  python benchmarks/int8_outliers.py --out benchmarks/results

Models: a small OPT (LayerNorm, pre-LN) and a small Llama (RMSNorm, gated MLP), random weights, whose norms'
γ have a few channels (4 of 256) scaled up by 30-100x: the way outlier features emerge in the residual stream of
large LLMs (Dettmers et al. 2022; the SmoothQuant paper's figure 4). Everything else is the model as
`transformers` builds it. Metric: the final hidden state (the logits' input), cosine and relative MSE to FP32 on
held-out random token sequences; calibration on other sequences. Rows: naive W8A8 (smooth=False) and SmoothQuant
(alpha 0.5 and "auto"), per-tensor dynamic, per-tensor static and per-token activations, per-channel weights.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import transformers as T

import fxopt
from fxopt.passes import FuseLayerNorm, SmoothQuant

VOCAB, HIDDEN, LAYERS, HEADS, OUTLIERS = 1000, 256, 4, 4, 4


def build(family: str) -> torch.nn.Module:
    common = dict(num_hidden_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS, vocab_size=VOCAB,
                  max_position_embeddings=256, bos_token_id=0, eos_token_id=0, attn_implementation="sdpa")
    if family == "opt":
        model = T.OPTForCausalLM(T.OPTConfig(ffn_dim=4 * HIDDEN, word_embed_proj_dim=HIDDEN, pad_token_id=1, **common))
        norms = [m for n, m in model.named_modules() if n.endswith("layer_norm") and ".layers." in n]
    else:
        model = T.LlamaForCausalLM(T.LlamaConfig(intermediate_size=4 * HIDDEN, num_key_value_heads=HEADS, **common))
        norms = [m for n, m in model.named_modules() if n.endswith("layernorm") and ".layers." in n]
    g = torch.Generator().manual_seed(1)
    channels = torch.randperm(HIDDEN, generator=g)[:OUTLIERS]  # the same channels in every layer, as in LLMs
    with torch.no_grad():
        for norm in norms:
            norm.weight[channels] *= 30 + 70 * torch.rand(OUTLIERS, generator=g)
    return model.eval()


def data(n: int, seed: int, batch: int = 4, seq: int = 64) -> list[tuple[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(2, VOCAB, (batch, seq), generator=g),) for _ in range(n)]


class Hidden(torch.nn.Module):
    """The decoder's final hidden state (what the LM head reads)."""

    def __init__(self, model):
        super().__init__()
        self.model = model.model

    def forward(self, ids):
        return self.model(input_ids=ids, use_cache=False).last_hidden_state


def fidelity(run, ref, held_out) -> tuple[float, float]:
    cos, mse = [], []
    with torch.no_grad():
        for (ids,), want in zip(held_out, ref):
            got = run(ids).double()
            cos.append(torch.nn.functional.cosine_similarity(got.flatten(1), want.flatten(1), dim=-1).mean())
            mse.append(((got - want) ** 2).mean() / (want ** 2).mean())
    return float(torch.stack(cos).mean()), float(torch.stack(mse).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    a = p.parse_args()
    torch.manual_seed(0)
    calib, held_out = data(8, seed=2), data(8, seed=3)
    lines = []
    for family in ("opt", "llama"):
        model = Hidden(build(family))
        with torch.no_grad():
            ref = [model(ids).double() for (ids,) in held_out]
        for act in ("tensor", "tensor_static", "token"):
            for smooth, alpha in ((False, 0.5), (True, 0.5), (True, "auto")):
                sq = SmoothQuant(alpha=alpha, act=act, smooth=smooth, min_cosine=-1.0)
                opt = fxopt.optimize(model, calib[0], passes=[FuseLayerNorm(), sq], calibration=calib, progress=False)
                cos, mse = fidelity(opt, ref, held_out)
                label = "naive W8A8 (no smoothing)" if not smooth else f"SmoothQuant α={alpha}"
                lines.append(f"| {family} | {act} | {label} | {cos:.5f} | {mse:.2e} |")
                print(lines[-1], flush=True)  # noqa: T201
    head = (f"# W8A8 with activation outliers: {LAYERS}-layer OPT and Llama, hidden {HIDDEN}, {OUTLIERS} norm channels "
            f"of every layer scaled 30-100x (random weights)\n\ntorch {torch.__version__}; final hidden state vs "
            f"FP32 over {len(held_out)} held-out batches of 4x64 random tokens, {len(calib)} calibration batches; "
            f"per-channel int8 weights.\n\n| model | activations | method | mean cosine | relative MSE |\n"
            f"|---|---|---|---|---|\n")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "int8_outliers.md").write_text(head + "\n".join(lines) + "\n")
    print(head + "\n".join(lines))  # noqa: T201


if __name__ == "__main__":
    main()
