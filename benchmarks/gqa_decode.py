"""Per-token decode latency with a static KV cache, MHA vs the GQA graphs of `mha_to_gqa`, in one run.

  python benchmarks/gqa_decode.py --out benchmarks/results            # CPU here; CUDA too where there is a GPU

The Llama-shaped decoder of examples/03_gqa_decode.py (random weights) with its caches filled to `--context`
tokens; one step = one new token per sequence at the next position, reading the whole cache. Timed: the original
module (eager), the captured MHA graph (fxopt, no pass: the baseline for the conversion), and the GQA graphs for
each G (SDPA reading the G heads itself, enable_gqa). Interleaved rounds, medians; ratios are MHA graph / GQA
graph. On CUDA every variant is also timed as a CUDA graph of one step (launch overhead removed).
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
_example = importlib.import_module("03_gqa_decode")
CachedLlama, cache_bytes_per_token, caches = _example.CachedLlama, _example.cache_bytes_per_token, _example.caches

import fxopt  # noqa: E402
from fxopt.passes import ConvertToGQA  # noqa: E402

CONFIGS = {"cpu": dict(d=512, heads=16, layers=4, ffn=1024, max_len=4096, batch=1),
           "cuda": dict(d=2048, heads=32, layers=4, ffn=5632, max_len=4096, batch=16)}


def variants(model, example, groups):
    yield "torch eager (MHA)", model, model
    mha = fxopt.optimize(model, example, passes=[])
    yield "fxopt graph (MHA)", mha, mha.graph_module
    for g in groups:
        opt = fxopt.optimize(model, example, passes=[ConvertToGQA(num_kv_heads=g, min_cosine=-1)])
        yield f"fxopt GQA G={g}", opt, opt.graph_module


def fill(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    for b in caches(module):
        b.copy_(torch.randn(b.shape, generator=g).to(b.dtype) * 0.5)


def timer(step, device, use_graph):
    if device == "cuda" and use_graph:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        step = graph.replay

    def once() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t
    return once


def run(device: str, rounds: int, groups: tuple[int, ...]) -> list[str]:
    cfg = CONFIGS[device]
    torch.manual_seed(0)
    dtype = torch.float16 if device == "cuda" else torch.float32
    model = CachedLlama(**cfg).eval().to(device, dtype)
    b, pos = cfg["batch"], cfg["max_len"] - 8
    ids = torch.randint(0, 256, (b, 1), device=device)
    p = torch.tensor([pos], device=device)
    example = (ids, p)
    rows = []
    with torch.no_grad():
        found = list(variants(model, example, groups))
        for modes in ((False, True) if device == "cuda" else (False,)):
            timers = []
            for name, call, module in found:
                fill(module)
                try:
                    timers.append((name, module, timer(lambda c=call: c(ids, p), device, modes)))
                except Exception as e:  # noqa: BLE001 - a variant that cannot be graph-captured is reported
                    rows.append((name, modes, None, None, f"{type(e).__name__}: {str(e)[:120]}"))
            samples = {name: [] for name, _, _ in timers}
            for _ in range(rounds):
                for name, _, once in timers:
                    samples[name].append(once())
            for name, module, _ in timers:
                rows.append((name, modes, statistics.median(samples[name]),
                             cache_bytes_per_token(module, cfg["max_len"]), None))
    base = {m: next(r[2] for r in rows if r[0] == "fxopt graph (MHA)" and r[1] == m and r[2])
            for m in {r[1] for r in rows}}
    lines = [f"## {device}: {cfg}, dtype {dtype}, context {pos} tokens, {rounds} interleaved rounds", "",
             "| variant | CUDA graph | ms per step (median) | KV cache bytes per token | MHA graph / this |",
             "|---|---|---|---|---|"]
    for name, mode, t, size, err in rows:
        if err:
            lines.append(f"| {name} | {mode} | failed: {err} | | |")
        else:
            lines.append(f"| {name} | {mode} | {t * 1e3:.3f} | {size} | {base[mode] / t:.2f}x |")
    return lines + [""]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--devices", default="cpu,cuda")
    a = ap.parse_args()
    lines = ["# Decode latency with a static KV cache: MHA vs mha_to_gqa", "",
             "Per-token decode step of examples/03_gqa_decode.py's Llama-shaped decoder (random weights), caches "
             "full to the context; medians. Written by benchmarks/gqa_decode.py.", ""]
    for device in a.devices.split(","):
        if device == "cuda" and not torch.cuda.is_available():
            lines.append("## cuda: no GPU on this machine\n")
            continue
        lines += run(device, a.rounds, (8, 4, 2) if device == "cpu" else (8, 4))
        print("\n".join(lines), flush=True)
    text = "\n".join(lines)
    print(text)
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        name = "gqa_decode.md" if a.devices == "cpu,cuda" else f"gqa_decode_{a.devices.replace(',', '_')}.md"
        (a.out / name).write_text(text + "\n")


if __name__ == "__main__":
    main()
