"""2:4 sparsity with channel permutation: `permute_nm` (exact) reorders channels so that magnitude 2:4 masks keep
more of each weight, then `prune_nm` (approximate) applies the masks.

    python examples/04_nm_sparsity.py

A small Llama built from a config (random weights). Prints, per linear, the share of |W| the 2:4 mask keeps without
and with the permutation, and the output's cosine to the dense model. `benchmarks/nm_minilm.py` does the same on
the trained MiniLM; `benchmarks/sparse24_gpu.py` measures where 2:4 is faster than dense on a GPU.
"""

from __future__ import annotations

import torch
import transformers

import fxopt
from fxopt.passes import FuseLayerNorm, PermuteForNM, PruneNM


def main() -> None:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=1000)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 1000, (2, 32))
    opt = fxopt.optimize(model, (ids,), example_kwargs={"use_cache": False},
                         passes=[FuseLayerNorm(), PermuteForNM(n=2, m=4), PruneNM(n=2, m=4, layers="ffn")])
    print(opt.report)
    (kept,) = opt.report["prune_nm"].measures
    print("\nshare of |W| kept by 2:4, without -> with the permutation:")
    for site in kept.before:
        print(f"  {site}: {kept.before[site]:.4f} -> {kept.after[site]:.4f}")
    with torch.no_grad():
        want, got = model(ids, use_cache=False).logits, opt(ids, use_cache=False).logits
    cosine = torch.nn.functional.cosine_similarity(got.flatten(1), want.flatten(1)).min()
    print(f"logits' cosine to the dense model: {cosine:.4f}")


if __name__ == "__main__":
    main()
