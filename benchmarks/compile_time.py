"""Compile time of the exact pipeline on GPT-2-shaped models (768 hidden, 12 heads, random weights).

    python benchmarks/compile_time.py [--layers 12 24] [--out benchmarks/results/compile_time.md]

Reports capture time and seconds per pass (numerics checks included) for each depth, and the deep/shallow
ratio. Target (issue 2): under 60 s for 24 layers on 2 CPU cores, ratio <= 2.2.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch
import transformers

import fxopt
from fxopt.passes import EXACT_PIPELINE


def measure(layers: int) -> dict[str, float]:
    config = transformers.GPT2Config(n_layer=layers, n_embd=768, n_head=12, vocab_size=50257,
                                     attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 50257, (2, 32))
    start = time.perf_counter()
    opt = fxopt.optimize(model, (ids,), passes=list(EXACT_PIPELINE), example_kwargs={"use_cache": False})
    total = time.perf_counter() - start
    row = {"capture": opt.report.capture.seconds, "total": total}
    row.update({p.name: p.seconds for p in opt.report.passes})
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, nargs=2, default=[12, 24])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "compile_time.md")
    args = parser.parse_args()
    measure(2)  # warm-up: imports, first export
    shallow, deep = (measure(n) for n in args.layers)
    keys = list(shallow)
    lines = [f"# fxopt compile time, GPT-2-shaped (768 hidden, 12 heads), exact pipeline {list(EXACT_PIPELINE)}",
             "", f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
             f"torch {torch.__version__}; seconds, one run each.", "",
             f"| step | {args.layers[0]} layers | {args.layers[1]} layers | ratio |", "|---|---|---|---|"]
    lines += [f"| {k} | {shallow[k]:.2f} | {deep[k]:.2f} | {deep[k] / max(shallow[k], 1e-9):.2f} |" for k in keys]
    ok = deep["total"] < 60 and deep["total"] / shallow["total"] <= 2.2
    lines += ["", f"Target (24 layers < 60 s, ratio <= 2.2): {'met' if ok else 'NOT met'}."]
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
