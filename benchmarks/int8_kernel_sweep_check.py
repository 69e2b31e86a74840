"""Every int8 GEMM tile config of int8_gpu.py's sweep, the SwiGLU GEMM and the row kernels, launched once each on
Llama/BERT shapes and awkward ones (M = 3, 17, 1000; K not a multiple of 16), each GEMM checked against an fp64
reference: a run for `compute-sanitizer --tool memcheck` (an "unspecified launch failure" followed one sweep).

  PYTHONPATH=... python benchmarks/int8_kernel_sweep_check.py [gemm|swiglu|rows|all]
  compute-sanitizer --tool memcheck python benchmarks/int8_kernel_sweep_check.py

Written on a machine without a GPU; not yet run on one.
"""

from __future__ import annotations

import sys
from functools import partial

import torch
from int8_gpu import BERT_GEMM_SHAPES, GEMM_SHAPES, SWEEP

from fxopt import triton_int8 as ti
from fxopt.quant_fused import REFERENCES, interleave_gate_up
from fxopt.quant_ops import quantize_weight_int8

SHAPES = GEMM_SHAPES + BERT_GEMM_SHAPES + [(17, 2048, 2048), (1000, 2000, 5000), (2048, 5632, 2056), (3, 64, 96)]
SWIGLU = [None, (128, 256, 128, 8, 8, 3, True, True), (256, 128, 128, 8, 8, 3, True, True),
          (128, 128, 128, 8, 8, 4, True), (64, 128, 128, 8, 4, 4), (16, 32, 256, 1, 4, 3)]


def launch(name: str, fn) -> torch.Tensor | None:
    """fn() synchronised; a fault is re-raised under `name`, a config that cannot compile is skipped."""
    try:
        out = fn()
        torch.cuda.synchronize()
        return out
    except torch.AcceleratorError:
        print("FAULT", name, flush=True)  # noqa: T201
        raise
    except Exception as e:  # noqa: BLE001 - a config that does not fit (shared memory)
        print("skip", name, str(e).splitlines()[0][:80], flush=True)  # noqa: T201
        return None


def rows(t: torch.Tensor) -> tuple:
    f = torch.ops.fxopt
    return (f.quantize_int8(t, None, None, "token"), f.activation_quantize_int8(t, "gelu", None),
            f.silu_mul_quantize_int8(t, t, None))


def main(part: str) -> int:
    f = torch.ops.fxopt
    torch.manual_seed(0)
    bad = 0
    for m, k, n in SHAPES:
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        wq, ws = (t.cuda() for t in quantize_weight_int8(torch.randn(n, k) / k ** 0.5))
        wu, wsu = (t.cuda() for t in quantize_weight_int8(torch.randn(n, k) / k ** 0.5))
        q, s = f.quantize_int8(x, None, None, "token")
        bias = torch.randn(n, device="cuda", dtype=torch.float16)
        want = (q.double() @ wq.double().t()) * s.double() * ws.double() + bias.double()
        for cfg in ([None, *SWEEP] if part in ("all", "gemm") else []):
            out = launch(f"gemm {(m, k, n)} {cfg}", partial(ti.launch_gemm, q, s, wq, ws, bias, "none", None,
                                                            torch.float16, cfg))
            if out is not None and float((out.double() - want).abs().max()) > 1e-2 * float(want.abs().max()):
                print("MISMATCH", (m, k, n), cfg, flush=True)  # noqa: T201
                bad += 1
        packed = interleave_gate_up(wq, ws, bias, wu, wsu, None)
        want_swiglu = REFERENCES["int8_linear_swiglu"](q, s, *packed, torch.float16)
        for cfg in (SWIGLU if part in ("all", "swiglu") else []):
            out = launch(f"swiglu {(m, k, n)} {cfg}", partial(ti.launch_gemm, q, s, *packed, "none", None,
                                                              torch.float16, cfg, swiglu=True))
            if out is not None and not torch.equal(out, want_swiglu):
                print("SWIGLU DIFFERS", (m, k, n), cfg, float((out - want_swiglu).abs().max()), flush=True)  # noqa: T201
        for width in ((k, n) if part in ("all", "rows") else ()):
            xx = torch.randn(m, width, device="cuda", dtype=torch.float16)
            launch(f"rows {(m, width)}", partial(rows, xx))
        print("done", (m, k, n), flush=True)  # noqa: T201
    print("mismatches", bad)  # noqa: T201
    return bad


if __name__ == "__main__":
    sys.exit(1 if main(sys.argv[1] if len(sys.argv) > 1 else "all") else 0)
