"""Where 2:4 sparsity pays on the GPU: dense fp16 F.linear vs the same weight, 2:4-pruned, as a
`torch.sparse.to_sparse_semi_structured` tensor (cuSPARSELt, else CUTLASS), per layer shape and token count.

  python benchmarks/sparse24_gpu.py --out benchmarks/results      (a CUDA GPU with sm_80+)

Shapes: the linears prune_nm prunes in MiniLM, BERT-base, a Llama-1B-shaped and a Llama-7B-shaped model (K in, N
out); M tokens. Each cell: the two callables timed interleaved (alternating blocks, CUDA events, CUDA graphs so
launch overhead is out), median ms; ratio = dense / sparse (> 1: 2:4 is faster). The max abs difference is
against the dense product of the same pruned weight. Writes sparse24_gpu.md and sparse24_gpu.json (the table
`PruneNM(only_where_faster=...)` reads).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = {"minilm": [(384, 384), (384, 1536), (1536, 384)],
          "bert_base": [(768, 768), (768, 3072), (3072, 768)],
          "llama_1b": [(2048, 2048), (2048, 5632), (5632, 2048)],
          "llama_7b": [(4096, 4096), (4096, 11008), (11008, 4096)]}
TOKENS = (16, 128, 512, 2048, 8192)


def pruned(w: torch.Tensor) -> torch.Tensor:
    g = w.abs().reshape(w.shape[0], -1, 4)
    mask = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, g.topk(2, -1).indices, True)
    return w * mask.reshape(w.shape)


def graphed(fn, x):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn(x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn(x)
    return g


def time_pair(a, b, reps: int, rounds: int) -> tuple[float, float]:
    times = {0: [], 1: []}
    for r in range(rounds):
        for which in ((0, 1) if r % 2 == 0 else (1, 0)):
            g = (a, b)[which]
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            g.replay()
            start.record()
            for _ in range(reps):
                g.replay()
            end.record()
            torch.cuda.synchronize()
            times[which].append(start.elapsed_time(end) / reps)
    return statistics.median(times[0]), statistics.median(times[1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=10)
    a = ap.parse_args()
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured
    torch.manual_seed(0)
    backend = "cuSPARSELt" if not SparseSemiStructuredTensor._FORCE_CUTLASS else "CUTLASS"
    rows, table = [], []
    for model, shapes in SHAPES.items():
        for k, n in shapes:
            w = pruned(torch.randn(n, k, device="cuda", dtype=torch.float16))
            ws = to_sparse_semi_structured(w)
            for m in TOKENS:
                x = torch.randn(m, k, device="cuda", dtype=torch.float16)
                try:
                    diff = float((F.linear(x, ws) - F.linear(x, w)).abs().max())
                    dense, sparse = graphed(lambda t: F.linear(t, w), x), graphed(lambda t: F.linear(t, ws), x)
                    td, ts = time_pair(dense, sparse, a.reps, a.rounds)
                except RuntimeError as e:
                    print(model, m, k, n, "failed:", str(e).splitlines()[0], flush=True)
                    continue
                rows.append((model, m, k, n, td, ts, td / ts, diff))
                table.append({"m": m, "k": k, "n": n, "dense_ms": td, "sparse_ms": ts, "speedup": td / ts})
                print(rows[-1], flush=True)
    lines = [f"# 2:4 sparse vs dense fp16 linear on {torch.cuda.get_device_name()} ({backend}, torch {torch.__version__})",
             "", "y = x·Wᵀ, x (M, K) fp16, W (N, K) fp16 2:4-pruned; CUDA graphs, interleaved, median of "
             f"{a.rounds} blocks of {a.reps}; speedup = dense ms / sparse ms.", "",
             "| model | M | K | N | dense ms | 2:4 ms | speedup | max abs diff |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]:.4f} | {r[5]:.4f} | {r[6]:.2f}× | {r[7]:.3g} |" for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "sparse24_gpu.md").write_text(text)
        (a.out / "sparse24_gpu.json").write_text(json.dumps({"device": torch.cuda.get_device_name(),
                                                             "backend": backend, "cells": table}, indent=1))


if __name__ == "__main__":
    main()
