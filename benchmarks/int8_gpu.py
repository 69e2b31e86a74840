"""fxopt W8A8 with fused int8 kernels on an H100/H200: kernel numerics, per-GEMM times, end to end.

  python benchmarks/int8_gpu.py --out DIR                    # everything: check, gemm, e2e (llama, bert), profile
  python benchmarks/int8_gpu.py --parts check gemm --sweep   # kernel numerics, GEMM times over tile configs

Parts:
  check    every fused op's Triton kernel against its reference on the same CUDA inputs (Llama-1B rows):
           codes that differ and by how much, scales, outputs in units of the output's rounding; the int8 GEMM's
           int32 accumulation (fp32 output, unit scales) compared for equality with the exact fp64 product.
  gemm     per-GEMM times at M = 16 and M = 2048, K, N in {2048, 5632}, and BERT-base's: fp16 F.linear (cuBLAS),
           cuBLAS int8 (torch._int_mm + a separate dequantize; at M <= 16, which _int_mm refuses, the fp64
           reference), the Triton epilogue GEMM (what int8_linear and int8_linear_epilogue run on CUDA);
           CUDA-graph replays of calls cycling through weight copies that exceed L2, CUDA-event medians.
           --sweep times tile configs and reports the best beside the library's own choice.
  e2e      Llama-1B-shaped (hidden 2048, 16 layers, 32 heads, FFN 5632, vocab 32000) b4 s512 and BERT-base
           b8 s128, HF models from configs with seed 0 (random weights), fp16, sdpa: torch eager and torch.compile,
           fxopt fp16 (["stabilize_softmax", "fuse_layernorm"], as benchmarks/torch_gpu.py runs it), fxopt W8A8
           (+ ZeroQuant(weight_bits=8, group_size=1, act="token"): per-channel int8 weights, per-token int8 activations)
           without and with fuse_int8. Modes: eager, "graph" (the
           eager module captured in a CUDA graph by hand, replayed), torch.compile reduce-overhead. Timed
           interleaved (benchmarks/torch_gpu.Timer), CUDA-event medians of single calls (the host's work per call
           included), and back to back (20 calls queued, the GPU-bound time); cosine of the output vs torch fp16.
  profile  kernels per forward (torch.profiler), fxopt fp16 vs W8A8 fused: eager (what "graph" replays) and, with
           --profile-modes default, torch.compile's kernels (what reduce-overhead replays).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812

sys.path.insert(0, str(Path(__file__).parent))
from torch_gpu import Timer, make_inputs, make_model, runner  # noqa: E402

log = logging.getLogger("int8_gpu")
FP16_PIPELINE = ["stabilize_softmax", "fuse_layernorm"]
CASES = {"llama1b_b4_s512": ("llama1b", 4, 512), "bert_b8_s128": ("bert", 8, 128)}
GEMM_SHAPES = [(m, k, n) for m in (16, 2048) for k, n in ((2048, 2048), (2048, 5632), (5632, 2048))]
BERT_GEMM_SHAPES = [(1024, 768, 768), (1024, 768, 3072), (1024, 3072, 768)]
SWEEP = [(16, 64, 256, 1, 4, 4), (16, 32, 256, 1, 4, 4), (16, 32, 512, 1, 4, 3), (64, 64, 256, 1, 4, 4, True),
         (128, 256, 128, 8, 8, 3), (128, 128, 128, 8, 8, 4), (256, 128, 128, 8, 8, 3),
         (128, 256, 128, 8, 8, 3, True), (128, 128, 128, 8, 8, 4, True),
         (128, 128, 256, 8, 8, 3, True), (128, 128, 128, 8, 4, 4), (128, 256, 128, 8, 8, 4),
         (64, 256, 128, 8, 4, 4), (64, 128, 128, 8, 4, 4), (64, 64, 256, 8, 4, 4), (64, 128, 128, 8, 4, 4, True),
         (64, 64, 128, 8, 4, 4),
         (128, 256, 128, 8, 8, 3, True, True), (128, 256, 128, 8, 8, 4, True, True),
         (128, 256, 64, 8, 8, 5, True, True), (256, 128, 128, 8, 8, 3, True, True),
         (128, 128, 128, 8, 8, 4, True, True), (128, 128, 128, 8, 4, 4, True, True),
         (64, 128, 128, 8, 4, 4, True, True)]  # (BM, BN, BK, GROUP_M, warps, stages[, TMA[, persistent]])


# ---- check -------------------------------------------------------------------------------------------------

def _ulps(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in units of the spacing of b's dtype at b (an ulp of the reference)."""
    bits = {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23}[b.dtype]
    bf = b.float()
    spacing = torch.exp2(torch.floor(torch.log2(bf.abs().clamp_min(2.0 ** -14))) - bits)
    return float(((a.float() - bf).abs() / spacing).max())


def _compare(name: str, got, ref) -> dict:
    got, ref = (got if isinstance(got, tuple) else (got,)), (ref if isinstance(ref, tuple) else (ref,))
    row = {"op": name}
    for i, (g, r) in enumerate(zip(got, ref, strict=True)):
        assert g.shape == r.shape and g.dtype == r.dtype and g.stride() == r.stride(), (name, i, g.shape, r.shape)
        if g.dtype == torch.int8:
            d = (g.int() - r.int()).abs()
            row["codes_differ"] = float((d > 0).float().mean())
            row["codes_max_diff"] = int(d.max())
        elif i == 1 and g.dtype == torch.float32 and r.shape[-1] == 1:
            row["scale_max_rel"] = float(((g - r).abs() / r).max())
        else:
            row[f"out{i}_equal"] = bool(torch.equal(g, r))
            row[f"out{i}_max_ulps"] = _ulps(g, r)
    return row


def _non_finite_rows(dtype) -> list[dict]:
    """Rows holding a NaN or an infinity: the kernels' scales are NaN / inf where the reference's are (torch's
    amax propagates NaN; a NaN-skipping max would make such a row finite codes), and their codes equal."""
    from fxopt.quant_fused import REFERENCES

    f, out = torch.ops.fxopt, []
    x = torch.randn(4, 6000, device="cuda").to(dtype)
    x[0, 5], x[1, :], x[2, 7] = float("nan"), float("inf"), -float("inf")
    w = torch.ones(6000, device="cuda", dtype=dtype)
    for name, args in (("activation_quantize_int8", (x, "none", None)), ("activation_quantize_int8", (x, "gelu", None)),
                       ("rms_norm_quantize_int8", (x, [6000], w, 1e-6, None))):
        got, ref = getattr(f, name)(*args), REFERENCES[name](*args)
        out.append({"op": name, "case": "NaN / inf rows", "codes_equal": bool(torch.equal(got[0], ref[0])),
                    "scales_nan_aware_equal": bool(torch.equal(got[1].isnan(), ref[1].isnan()) and torch.equal(
                        torch.nan_to_num(got[1]), torch.nan_to_num(ref[1])))})
    return out


def check(dtype=torch.float16) -> list[dict]:
    from fxopt import ops  # noqa: F401 - registers the ops
    from fxopt.quant_fused import REFERENCES, interleave_gate_up
    from fxopt.quant_ops import quantize_weight_int8

    g = torch.Generator(device="cuda").manual_seed(0)
    dev = "cuda"
    rows = []
    f = torch.ops.fxopt
    for n in (2048, 5632):
        x = torch.randn(4, 512, n, device=dev, generator=g).to(dtype)
        r = torch.randn(4, 512, n, device=dev, generator=g).to(dtype)
        w = (torch.rand(n, device=dev, generator=g) + 0.5).to(dtype)
        b = (torch.randn(n, device=dev, generator=g) * 0.1).to(dtype)
        pre = torch.rand(n, device=dev, generator=g) + 0.5
        cases = [("rms_norm_quantize_int8", (x, [n], w, 1e-6, None)),
                 ("rms_norm_quantize_int8", (x, [n], w, 1e-6, pre)),
                 ("layer_norm_quantize_int8", (x, [n], w, b, 1e-12, None)),
                 ("add_rms_norm_quantize_int8", (x, r, [n], w, 1e-6, None)),
                 ("add_layer_norm_quantize_int8", (x, r, [n], w, b, 1e-12, pre)),
                 ("rms_norm_and_quantize_int8", (x, [n], w, 1e-6, pre)),
                 ("layer_norm_and_quantize_int8", (x, [n], w, b, 1e-12, None)),
                 ("silu_mul_quantize_int8", (x, r, None)),
                 ("silu_mul_quantize_int8", (x, r, pre)),
                 *[("activation_quantize_int8", (x, a, None)) for a in ("gelu", "gelu_tanh", "silu", "relu")]]
        for name, args in cases:
            rows.append({**_compare(name, getattr(f, name)(*args), REFERENCES[name](*args)), "n": n})
    rows.extend(_non_finite_rows(dtype))
    for m, k, n in ((2048, 2048, 5632), (2048, 5632, 2048), (16, 2048, 5632), (77, 2000, 1000)):
        q, s = f.quantize_int8(torch.randn(m, k, device=dev, generator=g).to(dtype), None, None, "token")
        wq, ws = (t.to(dev) for t in quantize_weight_int8(torch.randn(n, k, device=dev, generator=g)))
        b = (torch.randn(n, device=dev, generator=g) * 0.1).to(dtype)
        res = torch.randn(m, n, device=dev, generator=g).to(dtype)
        for act, bias, residual in (("none", None, None), ("none", b, None), ("gelu", b, None), ("silu", None, None),
                                    ("none", None, res), ("relu", b, res)):
            args = (q, s, wq, ws, bias, act, residual, dtype)
            row = _compare("int8_linear_epilogue", f.int8_linear_epilogue(*args),
                           REFERENCES["int8_linear_epilogue"](*args))
            rows.append({**row, "shape": (m, k, n), "act": act, "bias": bias is not None, "res": residual is not None})
        wu, wsu = (t.to(dev) for t in quantize_weight_int8(torch.randn(n, k, device=dev, generator=g)))
        for bg in (None, b):
            args = (q, s, *interleave_gate_up(wq, ws, bg, wu, wsu, None), dtype)
            row = _compare("int8_linear_swiglu", f.int8_linear_swiglu(*args), REFERENCES["int8_linear_swiglu"](*args))
            rows.append({**row, "shape": (m, k, n), "act": "swiglu", "bias": bg is not None})
        pre = torch.rand(n, device=dev, generator=g) + 0.5
        for name, args in (("int8_linear_quantize", (q, s, wq, ws, b, "gelu", None, dtype)),
                           ("int8_linear_quantize", (q, s, wq, ws, None, "none", pre, dtype)),
                           ("int8_linear_swiglu_quantize",
                            (q, s, *interleave_gate_up(wq, ws, None, wu, wsu, None), pre, dtype))):
            rows.append({**_compare(name, getattr(f, name)(*args), REFERENCES[name](*args)), "shape": (m, k, n)})
        one = torch.ones((), device=dev)
        exact = torch.matmul(q.double(), wq.double().t()).float()
        got = f.int8_linear_epilogue(q, one, wq, one, None, "none", None, torch.float32)
        rows.append({"op": "int32 accumulation", "shape": (m, k, n), "exact": bool(torch.equal(got, exact))})
    return rows


def model_check(kind: str, batch: int, seq: int, device: str = "cuda") -> list[dict]:
    """Every fused op of the W8A8 fused model against its reference on the activations the model itself feeds
    it (one forward, each call's kernel and reference on the same inputs), the worst call per op; then the fused
    model's output against the unfused W8A8 graph's (the fuse_int8 contract), and both against torch fp16."""
    import fxopt
    from fxopt import ops
    from fxopt.capture import SIGNATURE
    from fxopt.passes import FuseInt8, ZeroQuant
    from fxopt.quant_fused import REFERENCES
    from fxopt.torch_kernels import decomposed_graph

    model = make_model(kind).to(device=device, dtype=torch.float16).eval()
    args, kwargs = make_inputs(kind, batch, seq, model.config.vocab_size, device)
    passes = [*FP16_PIPELINE, ZeroQuant(weight_bits=8, group_size=1, act="token")]
    with torch.no_grad():
        plain = fxopt.optimize(model, args, passes=passes, example_kwargs=kwargs)
        fused = fxopt.optimize(model, args, passes=[*passes, FuseInt8()], example_kwargs=kwargs, check_numerics=False)
    worst: dict[str, dict] = {}

    def probe(name: str, kernel: Callable, reference: Callable) -> Callable:
        def call(*a):
            out = kernel(*a)
            row = _compare(name, out, reference(*a))
            key = max([row.get("codes_differ", 0.0), *[v for k, v in row.items() if k.endswith("_max_ulps")]])
            old = worst.get(name, {"_key": -1.0, "calls": 0})
            worst[name] = {**(row if key > old["_key"] else old), "_key": max(key, old["_key"]),
                           "calls": old["calls"] + 1}
            return out
        return call

    table = {op: (probe(op._opname, decl.cuda_kernel, REFERENCES[op._opname]) if op._opname in REFERENCES
                  else decl.cuda_kernel or decl.reference) for op, decl in ops.REGISTRY.items()}
    graph = decomposed_graph(fused.graph_module, table)
    with torch.no_grad():
        try:
            graph(*args, **fused.graph_module.meta[SIGNATURE].as_captured(args, kwargs))
        except Exception:  # noqa: BLE001 - the output comparison below still runs
            log.exception("op probe failed")
        ref = runner(model, "eager", args, kwargs)().float()
        out_plain = runner(plain, "eager", args, kwargs)().float()
        out_fused = runner(fused, "eager", args, kwargs)().float()
    rows = [{k: v for k, v in r.items() if k != "_key"} for r in worst.values()]
    err = float((out_fused - out_plain).abs().max())
    rows.append({"op": "model output", "fused_vs_unfused_max_abs": err,
                 "unfused_vs_fp16_max_abs": float((out_plain - ref).abs().max()), "max_abs_ref": float(ref.abs().max()),
                 "cos_fused_vs_unfused": cosine(out_fused, out_plain), "cos_unfused_vs_fp16": cosine(out_plain, ref),
                 "cos_fused_vs_fp16": cosine(out_fused, ref)})
    for r in rows:
        log.info("model check %s: %s", kind, r)
    return rows


def rows_part() -> list[dict]:
    """Each row kernel at Llama-1B's widths, b4 s512, over warp counts: µs per call (inputs rotated beyond L2) and
    the share of the card's copy bandwidth its bytes moved would take (bytes / 3.35 TB/s, the H100 SXM's HBM3)."""
    from fxopt import triton_int8

    f, rows, m = torch.ops.fxopt, [], 2048
    saved = list(triton_int8.ROW_WARPS)
    for name, n, nbytes in (("add_rms_norm_quantize_int8", 2048, 2048 * (2 + 2 + 2 + 1)),
                            ("silu_mul_quantize_int8", 5632, 5632 * (2 + 2 + 1)),
                            ("activation_quantize_int8", 2048, 2048 * 3), ("activation_quantize_int8", 5632, 5632 * 3)):
        copies = 6
        xs = [torch.randn(m, n, device="cuda", dtype=torch.float16) for _ in range(copies)]
        rs = [torch.randn(m, n, device="cuda", dtype=torch.float16) for _ in range(copies)]
        w = torch.rand(n, device="cuda", dtype=torch.float16) + 0.5

        def call(i, name=name, xs=xs, rs=rs, w=w, n=n):
            if name == "add_rms_norm_quantize_int8":
                return f.add_rms_norm_quantize_int8(xs[i], rs[i], [n], w, 1e-6, None)
            if name == "silu_mul_quantize_int8":
                return f.silu_mul_quantize_int8(xs[i], rs[i], None)
            return f.activation_quantize_int8(xs[i], "none", None)
        for warps in (1, 2, 4, 8, 16):
            triton_int8.ROW_WARPS[:] = [(1 << 62, warps)]
            try:
                us = graph_time(call, copies) * 1e3
            except Exception as e:  # noqa: BLE001
                log.info("%s n=%d warps=%d: %s", name, n, warps, str(e).splitlines()[0][:100])
                continue
            rows.append({"op": name, "n": n, "warps": warps, "us": us, "bound_us": m * nbytes / 3.35e6})
            log.info("rows %s", rows[-1])
        triton_int8.ROW_WARPS[:] = saved
    return rows


# ---- gemm --------------------------------------------------------------------------------------------------

def graph_time(fn: Callable[[int], object], copies: int, reps: int = 20) -> float:
    """Median ms of one call, from CUDA-graph replays of `copies` calls (call i uses weight copy i)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(copies):
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(copies):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / copies)
    return statistics.median(times)


def gemm_row(m: int, k: int, n: int, sweep: bool) -> dict:
    from fxopt import triton_int8
    from fxopt.quant_ops import _dequantize, quantize_weight_int8

    copies = max(4, int(200e6 // (n * k * 2)) + 1)  # fp16 weights beyond the 50 MB L2
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    w16 = [torch.randn(n, k, device="cuda", dtype=torch.float16) / k ** 0.5 for _ in range(copies)]
    w8 = [tuple(t.cuda() for t in quantize_weight_int8(w)) for w in w16]
    q, s = torch.ops.fxopt.quantize_int8(x, None, None, "token")

    def triton(i: int, cfg=None):
        return triton_int8.launch_gemm(q, s, w8[i][0], w8[i][1], None, "none", None, torch.float16, cfg)

    t = {"fp16 F.linear": graph_time(lambda i: F.linear(x, w16[i]), copies),
         "int8_linear (_int_mm + dequant)": graph_time(lambda i: _dequantize(
             torch._int_mm(q, w8[i][0].t()) if m > 16 else q.double() @ w8[i][0].double().t(), s, w8[i][1], None,
             torch.float16), copies),
         "triton epilogue": graph_time(triton, copies)}
    if m > 16:
        t["_int_mm alone"] = graph_time(lambda i: torch._int_mm(q, w8[i][0].t()), copies)
    t.update(fp8_times(x, w16, copies))
    row = {"m": m, "k": k, "n": n, "config": triton_int8.gemm_config(m, n, k), **t}
    if sweep:
        best, want = None, triton(0)
        for cfg in SWEEP:
            if (m <= 16) != (cfg[0] <= 16):
                continue
            try:
                if not torch.equal(triton(0, cfg), want):
                    log.warning("config %s: output differs from the default config's", cfg)
                    continue
                ms = graph_time(lambda i, c=cfg: triton(i, c), copies, reps=10)
                torch.cuda.synchronize()  # a fault surfaces here, under this config's name
            except torch.AcceleratorError:
                log.exception("config %s at %s faulted", cfg, (m, k, n))
                raise
            except Exception as e:  # noqa: BLE001 - a config that does not fit (shared memory) is skipped
                log.info("config %s: %s", cfg, str(e).splitlines()[0][:100])
                continue
            row[f"sweep {cfg}"] = ms
            log.info("sweep %s %s: %.1f us", (m, k, n), cfg, ms * 1e3)
            if best is None or ms < best[1]:
                best = (cfg, ms)
        row["best"] = best
    flops = 2 * m * k * n
    log.info("gemm %s: %s", (m, k, n), {a: (round(v, 4), round(flops / v / 1e9, 1)) for a, v in t.items()})
    return row


def fp8_times(x: torch.Tensor, w16: list, copies: int) -> dict:
    """Beside int8, the same GEMM in e4m3 (row scales of x, column scales of w): cuBLASLt through
    `torch._scaled_mm` (bf16 out, fast accumulation) and our persistent Triton kernel (fp16 out)."""
    from fxopt import triton_int8

    out = {}
    try:
        x8 = x.to(torch.float8_e4m3fn)
        w8 = [w.to(torch.float8_e4m3fn) for w in w16]
        sa = torch.ones(x.shape[0], 1, device="cuda", dtype=torch.float32)
        sb = torch.ones(1, w16[0].shape[0], device="cuda", dtype=torch.float32)
        out["fp8 _scaled_mm row/col"] = graph_time(lambda i: torch._scaled_mm(
            x8, w8[i].t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16, use_fast_accum=True), copies)
        cfg = (128, 256, 128, 8, 8, 3, True, True) if x.shape[0] > 1024 else (64, 128, 128, 8, 4, 4, True, True)
        out["fp8 triton persistent"] = graph_time(lambda i: triton_int8.launch_gemm(
            x8, sa, w8[i], sb.flatten(), None, "none", None, torch.float16, cfg), copies)
    except Exception as e:  # noqa: BLE001 - an experiment beside the table, never its failure
        log.info("fp8: %s", str(e).splitlines()[0][:160])
    return out


def swiglu_row(m: int, k: int = 2048, n: int = 5632) -> dict:
    """SwiGLU's gate and up at Llama-1B's shapes: one GEMM over the interleaved gate/up rows with silu·up in its
    epilogue, then the row quantizer or requantizing in the epilogue, vs two epilogue GEMMs and
    silu_mul_quantize (what fuse_int8 did first), vs fp16 (two F.linear, silu, mul)."""
    from fxopt.quant_fused import interleave_gate_up
    from fxopt.quant_ops import quantize_weight_int8

    f = torch.ops.fxopt
    copies = max(4, int(200e6 // (n * k * 4)) + 1)
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    w16 = [(torch.randn(n, k, device="cuda", dtype=torch.float16) / k ** 0.5,
            torch.randn(n, k, device="cuda", dtype=torch.float16) / k ** 0.5) for _ in range(copies)]
    w8 = [tuple(t.cuda() for w in two for t in quantize_weight_int8(w)) for two in w16]
    packed = [interleave_gate_up(wg, wsg, None, wu, wsu, None) for wg, wsg, wu, wsu in w8]
    q, s = f.quantize_int8(x, None, None, "token")

    def fused(i):
        return f.activation_quantize_int8(f.int8_linear_swiglu(q, s, *packed[i], x.dtype), "none", None)

    def pair(i):
        wg, wsg, wu, wsu = w8[i]
        gate = f.int8_linear_epilogue(q, s, wg, wsg, None, "none", None, x.dtype)
        return f.silu_mul_quantize_int8(gate, f.int8_linear_epilogue(q, s, wu, wsu, None, "none", None, x.dtype),
                                        None)

    def requantized(i):
        return f.int8_linear_swiglu_quantize(q, s, *packed[i], None, x.dtype)

    t = {"fp16": graph_time(lambda i: F.silu(F.linear(x, w16[i][0])) * F.linear(x, w16[i][1]), copies),
         "two GEMMs + silu_mul_quantize": graph_time(pair, copies),
         "swiglu GEMM + quantize": graph_time(fused, copies),
         "swiglu GEMM requantizing (abs-max in the epilogue, one-pass codes)": graph_time(requantized, copies)}
    log.info("swiglu %s: %s", (m, k, n), {a: round(v * 1e3, 1) for a, v in t.items()})
    return {"m": m, "k": k, "n": n, **t}


def gemm(sweep: bool) -> list[dict]:
    rows = []
    for m, k, n in GEMM_SHAPES + BERT_GEMM_SHAPES:
        try:
            rows.append(gemm_row(m, k, n, sweep))
        except Exception:  # noqa: BLE001
            log.exception("gemm %s failed", (m, k, n))
        torch.cuda.empty_cache()
    return rows


def gemm_table(rows: list[dict]) -> str:
    cols = ["fp16 F.linear", "int8_linear (_int_mm + dequant)", "triton epilogue"]
    out = ["| M, K, N | " + " | ".join(f"{c} µs" for c in cols) + " | triton vs fp16 | int8 weight bytes |",
           "|---|" + "---|" * (len(cols) + 2)]
    for r in rows:
        out.append(f"| {r['m']}, {r['k']}, {r['n']} | " + " | ".join(f"{r[c] * 1e3:.1f}" for c in cols)
                   + f" | {r['fp16 F.linear'] / r['triton epilogue']:.2f}x | {r['k'] * r['n'] / 2**20:.1f} MiB |")
    return "\n".join(out)


# ---- e2e ---------------------------------------------------------------------------------------------------

VARIANTS = ("torch fp16", "fxopt fp16", "fxopt W8A8", "fxopt W8A8 fused", "fxopt W8A8 fused, Triton GEMMs")
TRITON_ONLY = "Triton GEMMs"  # a variant whose calls run with the CUTLASS library set aside (where it is built)


@contextlib.contextmanager
def triton_gemms():
    """fxopt's int8 GEMMs on Triton only, as where `fxopt build-kernels` was not run: the same model, so the
    CUTLASS library (compiler/cutlass_gemm.py) is compared with the Triton kernels it replaces in one run."""
    from fxopt import cutlass_gemm

    saved = cutlass_gemm.gemm
    cutlass_gemm.gemm = lambda *args, **kwargs: None
    try:
        yield
    finally:
        cutlass_gemm.gemm = saved


def _calls_on_triton(fn: Callable | None) -> Callable | None:
    def call():
        with triton_gemms():
            return fn()
    return None if fn is None else call


def build(kind: str, batch: int, seq: int, variants) -> tuple[dict, tuple, dict]:
    import fxopt
    from fxopt.passes import FuseInt8, ZeroQuant

    model = make_model(kind).to(device="cuda", dtype=torch.float16).eval()
    args, kwargs = make_inputs(kind, batch, seq, model.config.vocab_size, "cuda")
    modules = {"torch fp16": model}
    for name in variants:
        if name == "torch fp16":
            continue
        passes = list(FP16_PIPELINE)
        if "W8A8" in name:
            passes.append(ZeroQuant(weight_bits=8, group_size=1, act="token"))  # per-channel weights, per-token acts
        if "fused" in name:
            passes.append(FuseInt8())
        t0 = time.perf_counter()
        with torch.no_grad():
            opt = fxopt.optimize(model, args, passes=passes, example_kwargs=kwargs)
        log.info("%s %s: optimized in %.1f s\n%s", kind, name, time.perf_counter() - t0, opt.report)
        modules[name] = opt
    return modules, args, kwargs


def graphed(module, args, kwargs) -> Callable[[], torch.Tensor] | None:
    """The eager module captured in one CUDA graph (after warm-up on a side stream); None where capture fails."""
    def call():
        with torch.inference_mode():
            out = module(*args, **kwargs)
            return out if isinstance(out, torch.Tensor) else out[0]
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                call()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = call()
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 - reported, the cell stays empty
        log.warning("CUDA graph capture failed: %s", str(e).splitlines()[0][:200])
        torch.cuda.synchronize()
        return None

    def replay():
        graph.replay()
        return out
    return replay


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def weight_bytes(module) -> dict:
    gm = getattr(module, "graph_module", module)
    tensors = {**dict(gm.named_parameters(remove_duplicate=True)), **dict(gm.named_buffers(remove_duplicate=True))}
    seen, total, blocks = set(), 0, 0
    for name, t in tensors.items():
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
        if "layers" in name or "layer_" in name or "layer." in name:
            blocks += t.numel() * t.element_size()
    return {"total": total, "blocks": blocks}


# torch.compile cells (each compile takes a minute)
COMPILED = ("torch fp16", "fxopt fp16", "fxopt W8A8 fused", "fxopt W8A8 fused, Triton GEMMs")


def e2e(case: str, spec: tuple, modes, reps: int, with_profile: bool, variants=VARIANTS, profile_modes=("eager",)
        ) -> tuple[list[dict], dict, dict]:
    kind, batch, seq = spec
    modules, args, kwargs = build(kind, batch, seq, variants)
    tables = {m: profile(modules, args, kwargs, mode=m) for m in profile_modes} if with_profile else {}
    fns: dict[str, Callable] = {}
    for name, module in modules.items():
        for mode in modes:
            if mode not in ("eager", "graph") and name not in COMPILED:
                continue
            if mode == "graph":
                if TRITON_ONLY in name:
                    with triton_gemms():
                        fn = graphed(module, args, kwargs)
                else:
                    fn = graphed(module, args, kwargs)
            else:
                fn = runner(module, mode, args, kwargs)
                fn = _calls_on_triton(fn) if TRITON_ONLY in name else fn
                try:
                    fn()
                except Exception as e:  # noqa: BLE001
                    log.warning("%s %s failed: %s", name, mode, str(e).splitlines()[0][:200])
                    fn = None
            if fn is not None:
                fns[f"{name} | {mode}"] = fn
    ref = runner(modules["torch fp16"], "eager", args, kwargs)().float().clone()
    cos = {k: cosine(fn().float(), ref) for k, fn in fns.items()}
    times = Timer("cuda").interleaved_ms(fns, reps)
    streamed = back_to_back_ms(fns)
    host = host_ms(fns)
    rows = []
    base = {m: statistics.median(times[f"fxopt fp16 | {m}"]) for m in modes if f"fxopt fp16 | {m}" in times}
    best_fp16 = min(base.values())
    base_b2b = {m: streamed[f"fxopt fp16 | {m}"] for m in modes if f"fxopt fp16 | {m}" in streamed}
    for key, ts in times.items():
        name, mode = key.split(" | ")
        ms = statistics.median(ts)
        rows.append({"case": case, "variant": name, "mode": mode, "ms": ms, "min_ms": min(ts),
                     "vs_fxopt_fp16_same_mode": base.get(mode, float("nan")) / ms,
                     "vs_fxopt_fp16_best": best_fp16 / ms, "cosine_vs_torch_fp16": cos[key],
                     "host_ms": host[key], "b2b_ms": streamed[key], "b2b_vs_fxopt_fp16_same_mode":
                         base_b2b.get(mode, float("nan")) / streamed[key]})
        log.info("%s", rows[-1])
    sizes = {name: weight_bytes(m) for name, m in modules.items()}
    del fns, modules
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    return rows, sizes, tables


def host_ms(fns: dict[str, Callable], calls: int = 10) -> dict[str, float]:
    """Median ms the host spends in one call, the GPU idle when it starts: the part of a single call's time that
    back-to-back calls hide (guards, input copies, the graph launch)."""
    out = {}
    for name, fn in fns.items():
        ts = []
        for _ in range(calls):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
        out[name] = statistics.median(ts)
    return out


def back_to_back_ms(fns: dict[str, Callable], calls: int = 20, rounds: int = 6) -> dict[str, float]:
    """Median ms per call of `calls` calls queued back to back (one pair of CUDA events around them all), rounds
    alternating in order: the GPU-bound time, where the host's per-call work (torch.compile's guards, the graph
    launch) overlaps the previous call's kernels, as in a serving loop. Timer's per-call events count that host
    work (the GPU idles while it runs)."""
    out: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fns[name]()
            end.record()
            end.synchronize()
            out[name].append(start.elapsed_time(end) / calls)
    return {name: statistics.median(ts) for name, ts in out.items()}


def e2e_table(rows: list[dict]) -> str:
    out = ["| case | variant | mode | median ms | min ms | speed-up vs fxopt fp16 (same mode) | vs fxopt fp16 "
           "(its best mode) | back-to-back ms | back-to-back speed-up (same mode) | host ms per call | "
           "cosine vs torch fp16 |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    out += [f"| {r['case']} | {r['variant']} | {r['mode']} | {r['ms']:.3f} | {r['min_ms']:.3f} | "
            f"{r['vs_fxopt_fp16_same_mode']:.2f}x | {r['vs_fxopt_fp16_best']:.2f}x | "
            f"{r.get('b2b_ms', float('nan')):.3f} | {r.get('b2b_vs_fxopt_fp16_same_mode', float('nan')):.2f}x | "
            f"{r.get('host_ms', float('nan')):.3f} | "
            f"{r['cosine_vs_torch_fp16']:.5f} |"
            for r in rows]
    return "\n".join(out)


# ---- profile -----------------------------------------------------------------------------------------------

def category(kernel: str) -> str:
    k = kernel.lower()
    if "int8_gemm" in k or "int8_swiglu" in k:
        return "int8 GEMM (Triton, fused dequant)"
    if "cutlass::" in k and ("signed char" in k or "int8_t" in k):
        return "int8 GEMM (CUTLASS, fused dequant)"
    if "row_quant" in k:
        return "norm/activation + quantize (Triton)"
    if "_norm_kernel" in k:
        return "norm (Triton)"
    if "flash" in k or "fmha" in k or "attention" in k or "efficient" in k:
        return "attention"
    if "igemm" in k or "imma" in k or ("int" in k and "gemm" in k) or "s8" in k:
        return "int8 GEMM (cuBLAS)"
    if "gemm" in k or "xmma" in k or "cutlass" in k or "nvjet" in k or "matmul" in k:
        return "fp16 GEMM (cuBLAS)"
    if "reduce" in k:
        return "reductions"
    return "elementwise / copies / other"


def profile(modules: dict, args: tuple, kwargs: dict, calls: int = 5, mode: str = "eager") -> dict:
    """Kernels per forward of the fxopt variants, by name and category: in eager (the kernels a CUDA graph
    replays), or with mode="default", torch.compile's (the kernels reduce-overhead's graph replays)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    tables = {}
    for name, module in modules.items():
        if name == "torch fp16":
            continue
        if mode != "eager" and name not in COMPILED:
            continue
        call = runner(module, mode, args, kwargs)
        call = _calls_on_triton(call) if TRITON_ONLY in name else call
        for _ in range(3):
            call()
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                call()
            torch.cuda.synchronize()
        kernels = {}
        for e in prof.key_averages():
            if e.device_time_total > 0:
                kernels[e.key] = (e.count / calls, e.device_time_total / calls / 1e3)
        cats: dict[str, list] = {}
        for key, (count, ms) in kernels.items():
            c = cats.setdefault(category(key), [0, 0.0])
            c[0] += count
            c[1] += ms
        tables[name] = {"kernels": kernels, "categories": cats}
    return tables


def profile_table(case: str, tables: dict, mode: str = "eager") -> str:
    names = list(tables)
    cats = sorted({c for t in tables.values() for c in t["categories"]})
    out = [f"#### {case}: device ms per forward (kernel launches), {mode}", "",
           "| kernel category | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for c in cats:
        cells = [tables[n]["categories"].get(c) for n in names]
        out.append(f"| {c} | " + " | ".join(f"{v[1]:.3f} ({v[0]:.0f})" if v else "" for v in cells) + " |")
    out.append("| total | " + " | ".join(
        f"{sum(v[1] for v in tables[n]['categories'].values()):.3f} "
        f"({sum(v[0] for v in tables[n]['categories'].values()):.0f})" for n in names) + " |")
    for n in names[-1:]:
        out += ["", f"Top kernels, {n}:", ""]
        top = sorted(tables[n]["kernels"].items(), key=lambda kv: -kv[1][1])[:10]
        out += [f"- {count:4.0f} x, {ms:7.3f} ms  `{key[:100]}`" for key, (count, ms) in top]
    return "\n".join(out)


def check_table(rows: list[dict]) -> str:
    out = ["| op | case | codes that differ | max code diff | scale max rel diff | outputs equal | max ulps |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        case = r.get("n", r.get("shape", r.get("case")))
        extra = f" {r['act']}{' +bias' if r.get('bias') else ''}{' +res' if r.get('res') else ''}" if "act" in r else ""
        eq = [v for k, v in r.items() if k.endswith("_equal")] or ([r["exact"]] if "exact" in r else [])
        ulps = [v for k, v in r.items() if k.endswith("_max_ulps")]
        out.append(f"| {r['op']} | {case}{extra} | {r.get('codes_differ', '')} | {r.get('codes_max_diff', '')} | "
                   f"{r.get('scale_max_rel', '')} | {all(eq) if eq else ''} | {max(ulps) if ulps else ''} |")
    return "\n".join(out)


def markdown(result: dict) -> str:
    parts = [f"# fxopt W8A8 with fused int8 kernels ({result['card']}, torch {result['torch']}, "
             f"Triton {result.get('triton')}, {result['date']})", ""]
    if result.get("e2e"):
        parts += ["## End to end", "", e2e_table(result["e2e"]), ""]
        for case, sizes in result.get("weight_bytes", {}).items():
            parts.append(f"- {case} weight bytes: " + ", ".join(
                f"{k}: {v['total'] / 2**20:.0f} MiB (blocks {v['blocks'] / 2**20:.0f} MiB)" for k, v in sizes.items()))
        parts.append("")
    if result.get("gemm"):
        parts += ["## Per GEMM (CUDA-graph replays, weights rotated beyond L2)", "", gemm_table(result["gemm"]), ""]
    for case, by_mode in result.get("profile", {}).items():
        for mode, tables in by_mode.items():
            if tables:
                parts += [profile_table(case, tables, mode), ""]
    if result.get("check"):
        parts += ["## Kernel numerics (Triton vs the op's reference, same CUDA inputs)", "",
                  check_table(result["check"]), ""]
    return "\n".join(parts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="*", default=["check", "gemm", "e2e", "profile"])
    p.add_argument("--cases", nargs="*", default=list(CASES))
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--modes", nargs="*", default=["eager", "graph", "reduce-overhead"])
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--reps", type=int, default=60)
    p.add_argument("--profile-modes", nargs="*", default=["eager"], help='"eager" and/or "default" (torch.compile)')
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    a.out.mkdir(parents=True, exist_ok=True)
    result = {"card": torch.cuda.get_device_name(), "torch": torch.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    try:
        import triton
        result["triton"] = triton.__version__
    except ImportError:
        pass

    def save():
        (a.out / "int8_gpu.json").write_text(json.dumps(result, indent=1, default=str))
        (a.out / "int8_gpu.md").write_text(markdown(result))

    if "check" in a.parts:
        t0 = time.perf_counter()
        try:
            result["check"] = check()
        except Exception:  # noqa: BLE001 - the rest of the run still says what it can
            log.exception("check failed")
            result["check"] = []
        for r in result["check"]:
            print(r)  # noqa: T201
        log.info("check in %.1f s", time.perf_counter() - t0)
        save()
    if "modelcheck" in a.parts:
        for case in a.cases:
            result.setdefault("model_check", {})[case] = model_check(*CASES[case])
            save()
    if "rows" in a.parts:
        result["rows"] = rows_part()
        save()
    if "swiglu" in a.parts:
        result["swiglu"] = [swiglu_row(m) for m in (16, 2048)]
        save()
    if "gemm" in a.parts:
        result["gemm"] = gemm(a.sweep)
        save()
        print(gemm_table(result["gemm"]))  # noqa: T201
        if a.sweep:
            for r in result["gemm"]:  # the library's own choice stays in force: the e2e part measures that
                print((r["m"], r["k"], r["n"]), "chosen", r["config"], "best of the sweep", r.get("best"))  # noqa: T201
    for case in a.cases:
        if "e2e" in a.parts:
            rows, sizes, tables = e2e(case, CASES[case], a.modes, a.reps, "profile" in a.parts, a.variants,
                                      a.profile_modes)
            result.setdefault("e2e", []).extend(rows)
            result.setdefault("weight_bytes", {})[case] = sizes
            result.setdefault("profile", {})[case] = tables
            save()
            print(e2e_table(rows))  # noqa: T201
            print(json.dumps(sizes))  # noqa: T201
            for mode, by_name in tables.items():
                print(profile_table(case, by_name, mode))  # noqa: T201


if __name__ == "__main__":
    main()
