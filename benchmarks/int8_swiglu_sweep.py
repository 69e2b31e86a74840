"""The SwiGLU int8 GEMM (gate and up rows interleaved, one GEMM over both, silu·up in the epilogue) over tile
configs at Llama-1B's shapes, against two epilogue GEMMs: do_bench medians, weights rotated over copies so they
come from HBM; prints the eight fastest configs beside `gemm_config(..., swiglu=True)`'s choice (SWIGLU_TILE_CONFIGS
were set from this sweep and artifacts of the same measurements, benchmarks/results/int8_gpu.md).

  PYTHONPATH=... python benchmarks/int8_swiglu_sweep.py
"""

from __future__ import annotations

import itertools

import torch
import triton

from fxopt import triton_int8 as ti
from fxopt.quant_fused import interleave_gate_up
from fxopt.quant_ops import quantize_weight_int8

CONFIGS = [None, (128, 256, 128, 8, 8, 3, True, True), (256, 128, 128, 8, 8, 3, True, True),
           (128, 256, 128, 8, 8, 3, True), (256, 128, 128, 8, 8, 3, True), (128, 256, 64, 8, 8, 5, True, True),
           (128, 128, 128, 8, 8, 4, True), (128, 128, 128, 8, 8, 4, True, True), (128, 128, 128, 8, 8, 3, True),
           (64, 128, 128, 8, 4, 4), (64, 128, 128, 8, 4, 4, True), (64, 256, 128, 8, 4, 4, True),
           (16, 32, 256, 1, 4, 3), (16, 64, 256, 1, 4, 4), (16, 32, 512, 1, 4, 3), (16, 64, 128, 1, 4, 5)]
COPIES = 6


def weights(n: int, k: int) -> list[tuple[torch.Tensor, ...]]:
    def one():
        return tuple(t.cuda() for t in quantize_weight_int8(torch.randn(n, k) / k ** 0.5))
    return [(*one(), *one()) for _ in range(COPIES)]


def sweep(m: int, k: int, n: int) -> None:
    q, s = torch.ops.fxopt.quantize_int8(torch.randn(m, k, device="cuda", dtype=torch.float16), None, None, "token")
    w = weights(n, k)
    turn = itertools.count()

    def pair():
        wg, sg, wu, su = w[next(turn) % COPIES]
        return (ti.launch_gemm(q, s, wg, sg, None, "none", None, torch.float16),
                ti.launch_gemm(q, s, wu, su, None, "none", None, torch.float16))

    packed = [interleave_gate_up(wg, sg, None, wu, su, None) for wg, sg, wu, su in w]

    def fused(cfg):
        return ti.launch_gemm(q, s, *packed[next(turn) % COPIES], "none", None, torch.float16, cfg, swiglu=True)

    base = triton.testing.do_bench(pair, rep=200, return_mode="median")
    first, times = None, []
    for cfg in CONFIGS:
        if cfg is not None and (m <= 16) != (cfg[0] <= 16):
            continue
        try:
            out = fused(cfg)
            torch.cuda.synchronize()
        except torch.AcceleratorError:
            print("FAULT", (m, k, n), cfg, flush=True)  # noqa: T201
            raise
        except Exception as e:  # noqa: BLE001 - a config that does not fit (shared memory)
            print("skip", cfg, str(e).splitlines()[0][:80], flush=True)  # noqa: T201
            continue
        first = out if first is None else first
        times.append((triton.testing.do_bench(lambda c=cfg: fused(c), rep=200, return_mode="median"), cfg))
    print((m, k, n), f"two GEMMs {base * 1e3:.1f} us; chosen {ti.gemm_config(m, 2 * n, k, swiglu=True)}", flush=True)  # noqa: T201
    for t, cfg in sorted(times, key=lambda r: r[0])[:8]:
        print(f"   {t * 1e3:8.1f} us  {base / t:5.2f}x  {cfg}", flush=True)  # noqa: T201


if __name__ == "__main__":
    for shape in ((2048, 2048, 5632), (16, 2048, 5632), (512, 2048, 5632)):
        sweep(*shape)
