"""fxopt's CUTLASS sm90a GEMM (compiler/kernels/gemm_sm90.cu) beside its Triton GEMM, every tile config, same run.

  fxopt build-kernels -o LIB                                # here or on the GPU machine: nvcc, no GPU needed
  python benchmarks/int8_cutlass.py --lib LIB --out OUT     # default --lib: the library fxopt itself loads

The question it answers: is the Triton int8 GEMM (about 950 TOP/s in the Llama-1B forward, 48 % of an H100's
int8 peak) what keeps fused W8A8 at 1.2x fp16 end to end, and would CUTLASS's ping-pong / cooperative kernels,
which overlap one tile's epilogue with the next tile's main loop across warp groups (Triton 3.6 does not
warp-specialize on Hopper), be faster with the same epilogue?

Per Llama-1B layer GEMM at M = 2048 (and M = 512, 16; BERT-base's at M = 1024), each with the epilogue fuse_int8
gives it there (bias, or + residual): fp16 F.linear (cuBLAS), the Triton epilogue GEMM (`launch_gemm`, the
library's own tile choice), and every CUTLASS tile config of the library; int8 and e4m3 (beside the Triton
persistent kernel on e4m3). The gate/up GEMM is timed plain (N = 11264) and, as the SwiGLU it feeds, plus
`silu_mul_quantize_int8` on its output, beside the Triton SwiGLU GEMM that requantizes in its epilogue.

Numerics: each CUTLASS output is compared with the Triton kernel's on the same inputs ("eq" true when bitwise
equal; else the largest difference in units of the output's rounding). CUDA-graph replays of calls cycling
through weight copies beyond L2, CUDA-event medians (benchmarks/int8_gpu.graph_time).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812

sys.path.insert(0, str(Path(__file__).parent))
from int8_gpu import _ulps, graph_time  # noqa: E402

log = logging.getLogger("int8_cutlass")
INT8_CONFIGS = {0: "128x128 ping-pong", 1: "128x256 cooperative", 2: "128x128 ping-pong, cluster 2x1",
                3: "256x128 cooperative", 4: "64x128 ping-pong", 5: "128x256 cooperative, cluster 2x1"}
FP8_CONFIGS = {0: "128x128 ping-pong", 1: "128x256 cooperative", 2: "128x128 ping-pong, cluster 2x1"}
# (M, K, N, epilogue): Llama-1B's q/k/v (one GEMM after fuse_int8's concatenation), o + residual, gate/up
# (interleaved, one GEMM), down + residual; BERT-base's qkv + bias, FFN down + residual.
SHAPES = [(2048, 2048, 6144, "plain"), (2048, 2048, 2048, "residual"), (2048, 2048, 11264, "plain"),
          (2048, 5632, 2048, "residual"), (512, 2048, 6144, "plain"), (512, 5632, 2048, "residual"),
          (16, 2048, 6144, "plain"), (16, 5632, 2048, "residual"), (1024, 768, 2304, "bias"),
          (1024, 3072, 768, "residual"),
          # residue tiles (M, N not multiples of the tile; what a prefill of odd length gives): values first
          (777, 2048, 6152, "residual"), (100, 768, 2312, "bias"), (1000, 5632, 2056, "residual")]


class Cutlass:
    """The library (fxopt.cutlass_gemm.Library) with a chosen tile config."""

    def __init__(self, path: Path):
        from fxopt.cutlass_gemm import Library

        self.lib = Library(path, torch.cuda.current_device())

    def __call__(self, cfg: int, q, s, wq, ws, bias=None, residual=None):
        out = torch.empty(q.shape[0], wq.shape[0], dtype=torch.float16, device="cuda")
        rc = self.lib.run(cfg, q, s, wq, ws, bias, residual, out)
        if rc:
            raise RuntimeError(f"CUTLASS config {cfg} returned {rc}")
        return out


def _agreement(got: torch.Tensor, want: torch.Tensor):
    return True if torch.equal(got, want) else _ulps(got, want)


def gemm_row(cut: Cutlass, m: int, k: int, n: int, epilogue: str) -> dict:
    from fxopt import triton_int8
    from fxopt.quant_ops import quantize_weight_int8

    copies = max(4, int(200e6 // (n * k * 2)) + 1)
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    w16 = [torch.randn(n, k, device="cuda", dtype=torch.float16) / k ** 0.5 for _ in range(copies)]
    w8 = [tuple(t.cuda() for t in quantize_weight_int8(w)) for w in w16]
    ws = [w[1].reshape(-1).contiguous() for w in w8]
    q, s = torch.ops.fxopt.quantize_int8(x, None, None, "token")
    s1 = s.reshape(-1).contiguous()
    bias = torch.randn(n, device="cuda", dtype=torch.float16) if epilogue == "bias" else None
    res = torch.randn(m, n, device="cuda", dtype=torch.float16) if epilogue == "residual" else None

    def triton(i, qq=q, ss=s, w=w8, cfg=None):
        return triton_int8.launch_gemm(qq, ss, w[i][0], w[i][1], bias, "none", res, torch.float16, cfg)

    from fxopt.cutlass_gemm import tile

    row = {"m": m, "k": k, "n": n, "epilogue": epilogue,
           "fxopt's cutlass tile": INT8_CONFIGS.get(tile(m, n), "none: Triton"),
           "fp16 F.linear": graph_time(lambda i: F.linear(x, w16[i], bias) + (0 if res is None else res), copies),
           "triton int8": graph_time(triton, copies)}
    want = triton(0)
    for cfg, name in INT8_CONFIGS.items():
        try:
            row[f"cutlass int8 {name} eq"] = _agreement(cut(cfg, q, s1, w8[0][0], ws[0], bias, res), want)
            row[f"cutlass int8 {name}"] = graph_time(lambda i, c=cfg: cut(c, q, s1, w8[i][0], ws[i], bias, res),
                                                     copies)
        except Exception as e:  # noqa: BLE001 - a config that cannot run this shape is reported, not fatal
            row[f"cutlass int8 {name}"] = str(e)[:120]
    # e4m3 beside it: unit scales (the epilogue is the same; only the main loop's operand type changes)
    x8 = x.to(torch.float8_e4m3fn)
    f8 = [(w.to(torch.float8_e4m3fn), torch.ones(n, device="cuda")) for w in w16]
    one = torch.ones(m, 1, device="cuda")
    tcfg = (128, 256, 128, 8, 8, 3, True, True) if m > 1024 else (64, 128, 128, 8, 4, 4, True, True)
    try:
        row["triton fp8 persistent"] = graph_time(lambda i: triton(i, x8, one, f8, tcfg), copies)
        want8 = triton(0, x8, one, f8, tcfg)
    except Exception as e:  # noqa: BLE001
        row["triton fp8 persistent"], want8 = str(e)[:120], None
    for cfg, name in FP8_CONFIGS.items():
        try:
            got = cut(cfg, x8, one.reshape(-1), f8[0][0], f8[0][1], bias, res)
            if want8 is not None:
                row[f"cutlass fp8 {name} vs triton fp8"] = _agreement(got, want8)
            row[f"cutlass fp8 {name}"] = graph_time(
                lambda i, c=cfg: cut(c, x8, one.reshape(-1), f8[i][0], f8[i][1], bias, res), copies)
        except Exception as e:  # noqa: BLE001
            row[f"cutlass fp8 {name}"] = str(e)[:120]
    ops = 2 * m * k * n
    log.info("%s: %s", (m, k, n, epilogue), {a: (round(v * 1e3, 1), round(ops / v / 1e9)) if isinstance(v, float)
                                             else v for a, v in row.items() if a not in ("m", "k", "n")})
    return row


def swiglu_row(cut: Cutlass, m: int = 2048, k: int = 2048, n: int = 5632) -> dict:
    """The SwiGLU as fuse_int8 runs it (Triton GEMM over the interleaved rows, requantizing in its epilogue) vs
    CUTLASS GEMMs for gate and up (fp16 outputs) then silu_mul_quantize_int8: what a CUTLASS path without a SwiGLU
    epilogue would run."""
    from fxopt.quant_fused import interleave_gate_up
    from fxopt.quant_ops import quantize_weight_int8

    f = torch.ops.fxopt
    copies = max(4, int(200e6 // (n * k * 4)) + 1)
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    packed = []
    for _ in range(copies):
        wg, wsg = quantize_weight_int8(torch.randn(n, k, device="cuda", dtype=torch.float16) / k ** 0.5)
        wu, wsu = quantize_weight_int8(torch.randn(n, k, device="cuda", dtype=torch.float16) / k ** 0.5)
        packed.append(interleave_gate_up(wg, wsg, None, wu, wsu, None))
    q, s = f.quantize_int8(x, None, None, "token")
    s1 = s.reshape(-1).contiguous()

    def triton(i):
        return f.int8_linear_swiglu_quantize(q, s, *packed[i], None, x.dtype)

    halves = [tuple(t.contiguous() for t in (w[0::2], ws.reshape(-1)[0::2], w[1::2], ws.reshape(-1)[1::2]))
              for w, ws, _ in packed]

    def cutlass(i, cfg):
        wg, sg, wu, su = halves[i]
        return f.silu_mul_quantize_int8(cut(cfg, q, s1, wg, sg), cut(cfg, q, s1, wu, su), None)

    row = {"m": m, "k": k, "n": n, "triton swiglu requantizing": graph_time(triton, copies)}
    want = triton(0)
    for cfg, name in INT8_CONFIGS.items():
        try:
            got = cutlass(0, cfg)
            row[f"cutlass {name} + silu_mul_quantize codes eq"] = bool(torch.equal(got[0], want[0]))
            row[f"cutlass {name} + silu_mul_quantize"] = graph_time(lambda i, c=cfg: cutlass(i, c), copies)
        except Exception as e:  # noqa: BLE001
            row[f"cutlass {name} + silu_mul_quantize"] = str(e)[:120]
    log.info("swiglu %s: %s", (m, k, n), row)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lib", type=Path, help="the built library (default: fxopt's, cutlass_gemm.library_path())")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from fxopt.cutlass_gemm import library_path

    cut = Cutlass(a.lib or library_path())
    result = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "gemm": [], "swiglu": []}
    a.out.mkdir(parents=True, exist_ok=True)
    for shape in SHAPES:
        result["gemm"].append(gemm_row(cut, *shape))
        (a.out / "int8_cutlass.json").write_text(json.dumps(result, indent=1, default=str))
    for m in (2048, 512):
        result["swiglu"].append(swiglu_row(cut, m))
        (a.out / "int8_cutlass.json").write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
