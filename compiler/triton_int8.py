"""Triton kernels of the fused int8 ops (compiler/quant_fused.py), registered as their CUDA kernels.

Row kernels (one program per token row, the row in registers): [residual add →] RMSNorm / LayerNorm, or
silu(gate)·up, or an activation, then the per-token quantizer, in one pass: the float row never goes to memory.
GEMM kernel: int8 × int8 → int32 (tensor cores, exact accumulation), then the dequantize epilogue
acc·s_tok·s_w (+ bias) rounded to the output dtype, the activation, the residual add, one store; or, for the
SwiGLU ops (gate/up rows interleaved), silu(gate)·up from each accumulator column pair, so one accumulator of the
full tile width serves both (two accumulators of half the width each ran 16 % slower on an H100).

The arithmetic is the reference's, in its order of roundings (the residual sum and an RMSNorm's normalized
value rounded to x's dtype, the weight product and the activation rounded again; the quantizer's division
correctly rounded, `div_rn`, and rounded half to even, `rint`), and floating-point contraction is off
(`enable_fp_fusion=False`: no fused multiply-add that the reference does not do). Transcendentals (exp, erf,
tanh, rsqrt) are CUDA's, which may differ from ATen's by an ulp of the fp32 intermediate.

Every kernel falls back to the op's reference for what it does not cover (no Triton, not CUDA, fp64, strided
inputs, several normalized dims, mixed dtypes, rows wider than MAX_ROW), so the values and the layout are
always the reference's. Launches allocate their outputs with torch.empty and never synchronize, so they are
captured by CUDA graphs (torch.compile mode="reduce-overhead") like any ATen kernel.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from . import cutlass_gemm

try:
    import triton
    import triton.language as tl

    try:
        from triton.language.extra import libdevice
    except ImportError:  # pragma: no cover - older Triton
        from triton.language.extra.cuda import libdevice
except ImportError:  # CPU-only installs: the references run
    triton = None

MAX_ROW = 32768
MAX_K = 133_000  # 127² · K < 2³¹: the int32 accumulation is exact
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_ACT = {"none": 0, "relu": 1, "silu": 2, "gelu": 3, "gelu_tanh": 4}
_NORM_RMS, _NORM_LN, _SILU_MUL, _ACT_ONLY = 0, 1, 2, 3

if triton is not None:

    @triton.jit
    def _activate(v, ACT: tl.constexpr):
        """v: fp32 values of an out-dtype tensor; the activation in fp32 (ATen's formulas)."""
        if ACT == 1:
            v = tl.maximum(v, 0.0)
        elif ACT == 2:
            v = v / (1.0 + tl.exp(-v))
        elif ACT == 3:
            v = 0.5 * v * (1.0 + libdevice.erf(v * 0.7071067811865476))
        elif ACT == 4:
            v = 0.5 * v * (1.0 + libdevice.tanh(0.7978845608028654 * (v + 0.044715 * v * v * v)))
        return v

    @triton.jit
    def _nan_max(a, b):
        return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)

    @triton.jit
    def _peak(v, axis: tl.constexpr):
        """max |v| along `axis`, NaN where a value is NaN, as torch's amax (tl.max would skip it, and a row
        holding a NaN would quantize to finite codes)."""
        return tl.reduce(tl.abs(v), axis, _nan_max)

    @triton.jit
    def _scale(absmax):
        """The per-token scale: max(abs-max, 1e-8) / 127, correctly rounded (quant_ops.scale_of); NaN stays NaN."""
        return tl.math.div_rn(tl.maximum(absmax, 1e-8, propagate_nan=tl.PropagateNan.ALL), 127.0)

    @triton.jit
    def _codes(y, s):
        """round-half-even(y / s) clamped to ±127, as int8 (quant_ops.codes); NaN (a NaN or infinite row) as 0,
        what the reference's cast makes of it."""
        c = tl.minimum(tl.maximum(libdevice.rint(tl.math.div_rn(y, s)), -127.0), 127.0)
        return tl.where(c == c, c, 0.0).to(tl.int8)

    @triton.jit
    def _elementwise_row(X, R, P, offs, cols, keep, MODE: tl.constexpr, ACT: tl.constexpr, HAS_P: tl.constexpr):
        """The value a SwiGLU (MODE 2) or activation (MODE 3) row kernel quantizes, at `cols`, in fp32."""
        x = tl.load(X + offs, mask=keep, other=0.0)
        dt = x.dtype
        xf = x.to(tl.float32)
        if MODE == 2:  # silu(gate) rounded to the dtype, times up, rounded again
            up = tl.load(R + offs, mask=keep, other=0.0).to(tl.float32)
            y = (xf / (1.0 + tl.exp(-xf))).to(dt).to(tl.float32)
            y = (y * up).to(dt).to(tl.float32)
        else:
            y = _activate(xf, ACT).to(dt).to(tl.float32)
        if HAS_P:
            y = y * tl.load(P + cols, mask=keep, other=0.0).to(tl.float32)
        return tl.where(keep, y, 0.0)

    @triton.jit
    def _row_quant_kernel(X, R, W, B, P, Q, S, SUM, Y, N, eps, MODE: tl.constexpr, ACT: tl.constexpr,
                          HAS_R: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_P: tl.constexpr,
                          HAS_Y: tl.constexpr, BLOCK: tl.constexpr):
        """One row: the value to quantize (a norm's output, SwiGLU's or an activation's), its codes and scale;
        HAS_R also stores the residual sum (SUM), HAS_Y a norm's output (Y), both in x's dtype."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        keep = cols < N
        offs = row * N + cols
        if MODE >= 2:
            y = _elementwise_row(X, R, P, offs, cols, keep, MODE, ACT, HAS_P)
        else:
            x = tl.load(X + offs, mask=keep, other=0.0)
            dt = x.dtype
            if HAS_R:
                x = x + tl.load(R + offs, mask=keep, other=0.0)  # rounded to the dtype, as x + residual is
                tl.store(SUM + offs, x, mask=keep)
            xf = x.to(tl.float32)
            if MODE == 0:
                rstd = libdevice.rsqrt(tl.sum(xf * xf, axis=0) / N + eps)
                y = (xf * rstd).to(dt).to(tl.float32)  # rounded before the weight multiply, as the reference
                if HAS_W:
                    y = (y * tl.load(W + cols, mask=keep, other=0.0).to(tl.float32)).to(dt).to(tl.float32)
            else:
                mean = tl.sum(xf, axis=0) / N
                d = tl.where(keep, xf - mean, 0.0)
                y = d * libdevice.rsqrt(tl.sum(d * d, axis=0) / N + eps)
                if HAS_W:
                    y = y * tl.load(W + cols, mask=keep, other=0.0).to(tl.float32)
                if HAS_B:
                    y = y + tl.load(B + cols, mask=keep, other=0.0).to(tl.float32)
                y = y.to(dt).to(tl.float32)
            if HAS_Y:
                tl.store(Y + offs, y.to(dt), mask=keep)  # y holds values of x's dtype: the norm's output
            if HAS_P:
                y = y * tl.load(P + cols, mask=keep, other=0.0).to(tl.float32)
            y = tl.where(keep, y, 0.0)
        s = _scale(_peak(y, 0))
        tl.store(Q + offs, _codes(y, s), mask=keep)
        tl.store(S + row, s)

    @triton.jit
    def _row_quant_chunked_kernel(X, R, P, Q, S, N, MODE: tl.constexpr, ACT: tl.constexpr, HAS_P: tl.constexpr,
                                  CHUNK: tl.constexpr):
        """Wide SwiGLU / activation rows in chunks: the row's abs-max first, then the codes from the same values
        computed again (the second read comes from L2). Few registers per lane, so many rows are in flight; the
        values and codes are the one-pass kernel's (an abs-max does not depend on the order it is taken in)."""
        row = tl.program_id(0).to(tl.int64)
        base = row * N
        peak = tl.zeros((CHUNK,), dtype=tl.float32)
        for c0 in range(0, N, CHUNK):
            cols = c0 + tl.arange(0, CHUNK)
            keep = cols < N
            peak = _nan_max(peak, tl.abs(_elementwise_row(X, R, P, base + cols, cols, keep, MODE, ACT, HAS_P)))
        s = _scale(_peak(peak, 0))
        for c0 in range(0, N, CHUNK):
            cols = c0 + tl.arange(0, CHUNK)
            keep = cols < N
            tl.store(Q + base + cols, _codes(_elementwise_row(X, R, P, base + cols, cols, keep, MODE, ACT, HAS_P), s),
                     mask=keep)
        tl.store(S + row, s)

    @triton.jit
    def _requant_codes_kernel(Y, P, PEAK, Q, S, M, N, HAS_P: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
        """Codes of a [BM, BN] tile of a GEMM output whose rows' abs-maxima (after the pre-scale) are given: an
        element-wise pass over the whole output, as many tiles in flight as the card holds (a row per program
        ran at 2x its memory bound)."""
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        in_m, in_n = rm < M, rn < N
        keep = in_m[:, None] & in_n[None, :]
        offs = rm.to(tl.int64)[:, None] * N + rn[None, :]
        y = tl.load(Y + offs, mask=keep, other=0.0).to(tl.float32)
        if HAS_P:
            y = y * tl.load(P + rn, mask=in_n, other=0.0).to(tl.float32)[None, :]
        s = _scale(tl.load(PEAK + rm, mask=in_m, other=0.0))
        tl.store(Q + offs, _codes(y, s[:, None]), mask=keep)
        if tl.program_id(1) == 0:
            tl.store(S + rm, s, mask=in_m)

    @triton.jit
    def _tile(M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
        """This program's (row tile, column tile)."""
        return _tile_of(tl.program_id(0), M, N, BM, BN, GROUP_M)

    @triton.jit
    def _tile_of(tile, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
        """Tile number `tile` as (row tile, column tile), in grouped order: GROUP_M row tiles share each weight
        tile while it is in L2."""
        width = GROUP_M * tl.cdiv(N, BN)
        first_m = (tile // width) * GROUP_M
        size_m = tl.minimum(tl.cdiv(M, BM) - first_m, GROUP_M)
        return first_m + (tile % width) % size_m, (tile % width) // size_m

    @triton.jit
    def _tile_offsets(M, N, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
        """A pointer kernel's tile: its rows rm and columns rn, the K offsets rk, and rm/rn clamped into the
        operands (int64 row offsets) for the loads; the stores mask with rm < M, rn < N."""
        pid_m, pid_n = _tile(M, N, BM, BN, GROUP_M)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rm_c = tl.where(rm < M, rm, 0).to(tl.int64)
        rn_c = tl.where(rn < N, rn, 0).to(tl.int64)
        return rm, rn, tl.arange(0, BK), rm_c, rn_c

    @triton.jit
    def _int8_gemm_kernel(A, Bw, C, SA, SB, BIAS, RES, P, PEAK, M, N, K, sa_stride, sb_stride,
                          HAS_BIAS: tl.constexpr, ACT: tl.constexpr, HAS_RES: tl.constexpr, HAS_P: tl.constexpr,
                          HAS_PEAK: tl.constexpr, SWIGLU: tl.constexpr, EVEN_K: tl.constexpr, BM: tl.constexpr,
                          BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
        rm, rn, rk, rm_c, rn_c = _tile_offsets(M, N, BM, BN, BK, GROUP_M)
        a_ptr = A + rm_c[:, None] * K + rk[None, :]
        b_ptr = Bw + rn_c[:, None] * K + rk[None, :]  # W is [N, K], K contiguous: loaded [BN, BK], used transposed
        acc = tl.zeros((BM, BN), dtype=tl.int32)
        for k in range(0, tl.cdiv(K, BK)):
            if EVEN_K:
                a = tl.load(a_ptr)
                b = tl.load(b_ptr)
            else:
                a = tl.load(a_ptr, mask=rk[None, :] < K - k * BK, other=0)
                b = tl.load(b_ptr, mask=rk[None, :] < K - k * BK, other=0)
            acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)
            a_ptr += BK
            b_ptr += BK
        _epilogue(acc, rm, rn, C, SA, SB, BIAS, RES, P, PEAK, M, N, sa_stride, sb_stride, HAS_BIAS, ACT, HAS_RES,
                  HAS_P, HAS_PEAK, SWIGLU, None, 0, 0)

    @triton.jit
    def _epilogue(acc, rm, rn, C, SA, SB, BIAS, RES, P, PEAK, M, N, sa_stride, sb_stride, HAS_BIAS: tl.constexpr,
                  ACT: tl.constexpr, HAS_RES: tl.constexpr, HAS_P: tl.constexpr, HAS_PEAK: tl.constexpr,
                  SWIGLU: tl.constexpr, c_desc, m0, j0):
        """acc · s_tok · s_w (+ bias) rounded to C's dtype, then the activation, then + residual, stored; with
        HAS_PEAK, each row's abs-max for the requantizer too (_row_peaks). With SWIGLU, the columns are gate/up
        pairs (_swiglu_pairs, which stores through c_desc where it is given, its tile at (m0, j0)).

        Offsets come straight from the aranges (masked, never clamped), so Triton sees whole contiguous rows of
        the tile and stores them 16 bytes at a time; clamped indices made every store a scalar 2-byte one.
        """
        in_m, in_n = rm < M, rn < N
        sa = tl.load(SA + rm * sa_stride, mask=in_m, other=0.0)
        sb = tl.load(SB + rn * sb_stride, mask=in_n, other=0.0)
        y = acc.to(tl.float32) * sa[:, None] * sb[None, :]
        if HAS_BIAS:
            y = y + tl.load(BIAS + rn, mask=in_n, other=0.0).to(tl.float32)[None, :]
        out_t = C.dtype.element_ty
        if SWIGLU:
            _swiglu_pairs(y, rm, rn, in_m, C, P, PEAK, N // 2, HAS_P, HAS_PEAK, c_desc, m0, j0)
            return
        y = y.to(out_t)
        keep = in_m[:, None] & in_n[None, :]
        offs = rm.to(tl.int64)[:, None] * N + rn[None, :]
        if ACT != 0:
            y = _activate(y.to(tl.float32), ACT).to(out_t)
        if HAS_RES:
            y = (y.to(tl.float32) + tl.load(RES + offs, mask=keep, other=0.0).to(tl.float32)).to(out_t)
        tl.store(C + offs, y, mask=keep)
        if HAS_PEAK:
            _row_peaks(y, rm, rn, in_m, in_n, P, PEAK, HAS_P)

    @triton.jit
    def _swiglu_pairs(y, rm, rn, in_m, C, P, PEAK, N, HAS_P: tl.constexpr, HAS_PEAK: tl.constexpr, c_desc, m0, j0):
        """SwiGLU from one accumulator whose columns 2j, 2j+1 are gate j and up j (dequantized, + bias, fp32):
        each rounded to C's dtype, silu(gate) rounded, times up, stored at column j < N. Splitting the last dim
        in two keeps each thread's values where they are (a tensor-core accumulator holds column pairs)."""
        g, u = tl.split(tl.reshape(y, (y.shape[0], y.shape[1] // 2, 2)))
        rj = tl.split(tl.reshape(rn, (rn.shape[0] // 2, 2)))[0] // 2
        out_t = C.dtype.element_ty
        g = g.to(out_t).to(tl.float32)
        h = ((g / (1.0 + tl.exp(-g))).to(out_t).to(tl.float32) * u.to(out_t).to(tl.float32)).to(out_t)
        in_j = rj < N
        if c_desc is None:
            tl.store(C + rm.to(tl.int64)[:, None] * N + rj[None, :], h, mask=in_m[:, None] & in_j[None, :])
        else:  # the split leaves a row per thread, which TMA stores whole (tl.store: a 2-byte store per value)
            c_desc.store([m0, j0], h)
        if HAS_PEAK:
            _row_peaks(h, rm, rj, in_m, in_j, P, PEAK, HAS_P)

    @triton.jit
    def _row_peaks(y, rm, rn, in_m, in_n, P, PEAK, HAS_P: tl.constexpr):
        """max |y · pre| over this tile's columns, per row, atomically maxed into PEAK (zeros before the GEMM):
        after the last tile, the row's abs-max as the per-token quantizer takes it, exact in any order."""
        v = y.to(tl.float32)
        if HAS_P:
            v = v * tl.load(P + rn, mask=in_n, other=0.0).to(tl.float32)[None, :]
        v = tl.where(in_m[:, None] & in_n[None, :], tl.abs(v), 0.0)
        tl.atomic_max(PEAK + rm, _peak(v, 1), mask=in_m)  # a NaN's bits exceed every float's: it stays

    @triton.jit
    def _tma_gemm_tile(a_desc, b_desc, c_desc, pid_m, pid_n, C, SA, SB, BIAS, RES, P, PEAK, M, N, K, sa_stride,
                       sb_stride, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, HAS_RES: tl.constexpr, HAS_P: tl.constexpr,
                       HAS_PEAK: tl.constexpr, SWIGLU: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                       BK: tl.constexpr):
        """One output tile through the tensor memory accelerator (zero fill past the edges), then the epilogue
        (a SwiGLU tile stored through c_desc, where the launch made one). fp8 operands accumulate in fp32, int8 in
        int32."""
        if a_desc.dtype == tl.int8:
            acc = tl.zeros((BM, BN), dtype=tl.int32)
        else:
            acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BK)):
            a = a_desc.load([pid_m * BM, k * BK])
            b = b_desc.load([pid_n * BN, k * BK])
            acc = tl.dot(a, b.T, acc, out_dtype=acc.dtype)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        _epilogue(acc, rm, rn, C, SA, SB, BIAS, RES, P, PEAK, M, N, sa_stride, sb_stride, HAS_BIAS, ACT, HAS_RES,
                  HAS_P, HAS_PEAK, SWIGLU, c_desc, pid_m * BM, pid_n * (BN // 2))

    @triton.jit
    def _int8_gemm_tma_kernel(a_desc, b_desc, c_desc, C, SA, SB, BIAS, RES, P, PEAK, M, N, K, sa_stride, sb_stride,
                              HAS_BIAS: tl.constexpr, ACT: tl.constexpr, HAS_RES: tl.constexpr, HAS_P: tl.constexpr,
                              HAS_PEAK: tl.constexpr, SWIGLU: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                              BK: tl.constexpr, GROUP_M: tl.constexpr):
        """The GEMM with one program per tile, its tiles brought in by TMA."""
        pid_m, pid_n = _tile(M, N, BM, BN, GROUP_M)
        _tma_gemm_tile(a_desc, b_desc, c_desc, pid_m, pid_n, C, SA, SB, BIAS, RES, P, PEAK, M, N, K, sa_stride,
                       sb_stride, HAS_BIAS, ACT, HAS_RES, HAS_P, HAS_PEAK, SWIGLU, BM, BN, BK)

    @triton.jit
    def _int8_gemm_persistent_kernel(a_desc, b_desc, c_desc, C, SA, SB, BIAS, RES, P, PEAK, M, N, K, sa_stride,
                                     sb_stride, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, HAS_RES: tl.constexpr,
                                     HAS_P: tl.constexpr, HAS_PEAK: tl.constexpr, SWIGLU: tl.constexpr,
                                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                                     PROGRAMS: tl.constexpr):
        """The TMA GEMM as one program per SM that walks the tiles; the loop nest is flattened, so the next tile's
        loads are issued while this tile's epilogue runs."""
        for tile in tl.range(tl.program_id(0), tl.cdiv(M, BM) * tl.cdiv(N, BN), PROGRAMS, flatten=True):
            pid_m, pid_n = _tile_of(tile, M, N, BM, BN, GROUP_M)
            _tma_gemm_tile(a_desc, b_desc, c_desc, pid_m, pid_n, C, SA, SB, BIAS, RES, P, PEAK, M, N, K, sa_stride,
                           sb_stride, HAS_BIAS, ACT, HAS_RES, HAS_P, HAS_PEAK, SWIGLU, BM, BN, BK)

# ---- launch configuration ------------------------------------------------------------------------------------

# (BM, BN, BK, GROUP_M, num_warps, num_stages[, TMA[, persistent]]). Small M (decode, short batches): by M.
# Otherwise the largest tile that still gives every SM work: a persistent 256x128 tile is the fastest at Llama-1B's
# M = 2048 (K, N in {2048, 5632}) on an H100, but BERT-base's M = 1024, N = 768 makes only 24 such tiles for 132
# SMs.
# Measured with benchmarks/int8_gpu.py --sweep (benchmarks/results/int8_gpu.md).
SMALL_M_CONFIGS: list[tuple[int, tuple]] = [
    (16, (16, 32, 512, 1, 4, 3)),
    (64, (64, 64, 256, 1, 4, 4)),
]
TILE_CONFIGS: list[tuple] = [  # largest first
    (256, 128, 128, 8, 8, 3, True, True),  # persistent: 6 % faster than (128, 256) at 2048x2048x5632 (H100)
    (128, 256, 128, 8, 8, 3, True),
    (128, 128, 128, 8, 8, 4, True),
    (64, 128, 128, 8, 4, 4),
    (64, 64, 128, 8, 4, 4),
]
# the SwiGLU GEMM (gate/up interleaved, N = 11264) on an H100: persistent 128x256 97.6 us at M = 2048 (256x128:
# 100.6) and 178.0 at 4096 (183.6); at M = 512 (176 such tiles) the non-persistent 128x128 34.2 (128x256: 36.9)
SWIGLU_TILE_CONFIGS: list[tuple] = [
    (128, 256, 128, 8, 8, 3, True, True),
    (128, 128, 128, 8, 8, 4, True),
    (64, 128, 128, 8, 4, 4),
    (64, 64, 128, 8, 4, 4),
]
MIN_TILES_PER_SM = 0.7
# a persistent config only where each SM gets several tiles, whose epilogues it overlaps with the next loads: at
# one tile per SM it tied (2048³: 18.2 vs 18.3 us), and SwiGLU at M = 512 (1.3 tiles per SM) was slower
PERSISTENT_MIN_TILES_PER_SM = 2.0


def _pick(configs, m: int, n: int, sms: int) -> tuple:
    """The first config that gives every SM work (a persistent one: several tiles per SM), else the last."""
    for cfg in configs:
        tiles = -(-m // cfg[0]) * -(-n // cfg[1])
        persistent = len(cfg) > 7 and cfg[7]
        if tiles >= (PERSISTENT_MIN_TILES_PER_SM if persistent else MIN_TILES_PER_SM) * sms:
            return cfg
    return configs[-1]


@functools.cache
def _sm_count(device: int) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def gemm_config(m: int, n: int, k: int, sms: int = 132, swiglu: bool = False) -> tuple:
    """The tile of an [m, k] x [k, n] GEMM (n: the interleaved gate/up columns with `swiglu`)."""
    for bound, cfg in SMALL_M_CONFIGS:
        if m <= bound:
            return cfg
    return _pick(SWIGLU_TILE_CONFIGS if swiglu else TILE_CONFIGS, m, n, sms)


def _tma_ok(tma: list, k: int, *operands: torch.Tensor) -> bool:
    """A config asking for TMA, and operands it can read: 16-byte aligned bases and rows."""
    return bool(tma and tma[0]) and k % 16 == 0 and all(t.data_ptr() % 16 == 0 for t in operands)


def launch_gemm(q2, sa, wq, ws, bias, activation: str, res2, out_dtype, config=None, pre=None,
                peak=None, swiglu: bool = False) -> torch.Tensor:
    """The epilogue GEMM on 2-d operands: q2 [M, K] int8, sa M or 1 scales, wq [N, K] int8, ws N or 1 scales;
    `peak` (M fp32 zeros) receives each output row's abs-max after the pre-scale `pre`, for a requantizer. With
    `swiglu`, wq's rows (and ws, bias) are gate/up pairs and the output is silu(gate) · up, [M, N / 2]."""
    m, k = q2.shape
    n = wq.shape[0]
    c = torch.empty((m, n // 2 if swiglu else n), dtype=out_dtype, device=q2.device)
    bm, bn, bk, group, warps, stages, *tma = config or gemm_config(m, n, k, _sm_count(q2.device.index or 0), swiglu)
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    common = (c, sa, ws, bias if bias is not None else ws, res2 if res2 is not None else c,
              pre if pre is not None else ws, peak if peak is not None else sa, m, n, k,
              1 if sa.numel() > 1 else 0, 1 if ws.numel() > 1 else 0)
    flags = dict(HAS_BIAS=bias is not None, ACT=_ACT[activation], HAS_RES=res2 is not None, HAS_P=pre is not None,
                 HAS_PEAK=peak is not None, SWIGLU=swiglu, BM=bm, BN=bn, BK=bk, GROUP_M=group, num_warps=warps,
                 num_stages=stages, enable_fp_fusion=False)
    if _tma_ok(tma, k, q2, wq):
        from triton.tools.tensor_descriptor import TensorDescriptor

        out_desc = (TensorDescriptor.from_tensor(c, [bm, bn // 2])
                    if swiglu and (c.shape[1] * c.element_size()) % 16 == 0 else None)
        descs = TensorDescriptor.from_tensor(q2, [bm, bk]), TensorDescriptor.from_tensor(wq, [bn, bk]), out_desc
        if len(tma) > 1 and tma[1]:  # persistent: one program per SM (idle ones exit; one compile per card)
            programs = _sm_count(q2.device.index or 0)
            _int8_gemm_persistent_kernel[(programs,)](*descs, *common, PROGRAMS=programs, **flags)
        else:
            _int8_gemm_tma_kernel[grid](*descs, *common, **flags)
    else:
        _int8_gemm_kernel[grid](q2, wq, *common, EVEN_K=k % bk == 0, **flags)
    return c


# warps of a row kernel by the row's padded width (benchmarks/int8_gpu.py --parts rows times the choices)
ROW_WARPS: list[tuple[int, int]] = [(512, 1), (1024, 4), (8192, 8), (1 << 62, 16)]
# SwiGLU / activation rows wider than this (padded) go through the chunked two-pass kernel, ROW_CHUNK at a time:
# one row in registers ran at 2.3-2.6x its memory bound at width 5632 on an H100
CHUNKED_ABOVE, ROW_CHUNK = 4096, 1024


def _launch_rows(mode: int, x, other, weight, bias, pre, eps: float, act: str, with_sum: bool,
                 with_output: bool = False):
    """(codes, scales), then the residual sum (with_sum) or a norm's output (with_output)."""
    n = x.shape[-1]
    q = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    s = torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device)
    total = torch.empty_like(x) if with_sum else None
    out = torch.empty_like(x) if with_output else None
    block = triton.next_power_of_2(n)
    if mode in (_SILU_MUL, _ACT_ONLY) and block > CHUNKED_ABOVE:
        _row_quant_chunked_kernel[(x.numel() // n,)](
            x, other if other is not None else x, pre if pre is not None else x, q, s, n, MODE=mode, ACT=_ACT[act],
            HAS_P=pre is not None, CHUNK=ROW_CHUNK, num_warps=4, enable_fp_fusion=False)
        return q, s
    warps = next(w for bound, w in ROW_WARPS if block <= bound)
    _row_quant_kernel[(x.numel() // n,)](
        x, other if other is not None else x, weight if weight is not None else x, bias if bias is not None else x,
        pre if pre is not None else x, q, s, total if total is not None else x, out if out is not None else x, n,
        float(eps), MODE=mode, ACT=_ACT[act], HAS_R=with_sum or mode == _SILU_MUL, HAS_W=weight is not None,
        HAS_B=bias is not None, HAS_P=pre is not None, HAS_Y=with_output, BLOCK=block, num_warps=warps,
        enable_fp_fusion=False)
    return (q, s, total) if with_sum else (q, s, out) if with_output else (q, s)


# requantize in the GEMM's epilogue from this many rows: below, the abs-max buffer's fill and the atomics cost
# more than the row kernel's second read saves (SwiGLU at M = 16: 20.2 vs 18.1 us on an H100). A GEMM whose
# output goes through an activation first leaves both to the row kernel: an erf GELU beside the abs-max in a
# 256x128 epilogue made BERT-base's FFN-up GEMM 91 us instead of 10 on an H100 (its registers spill).
REQUANT_MIN_ROWS = 128
REQUANT_TILE = (16, 256)  # the codes kernel's [rows, columns] tile


def _requantize(y: torch.Tensor, peak: torch.Tensor, pre) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token codes of a GEMM output y [M, N] whose rows' abs-maxima (after `pre`) the epilogue took: one
    element-wise pass, the row quantizer's codes and scales."""
    m, n = y.shape
    q = torch.empty((m, n), dtype=torch.int8, device=y.device)
    s = torch.empty((m, 1), dtype=torch.float32, device=y.device)
    bm, bn = REQUANT_TILE
    _requant_codes_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
        y, pre if pre is not None else y, peak, q, s, m, n, HAS_P=pre is not None, BM=bm, BN=bn, num_warps=4,
        enable_fp_fusion=False)
    return q, s


# ---- coverage and the CUDA-key kernels -------------------------------------------------------------------------

def _dense(t: torch.Tensor | None, like: torch.Tensor, shape=None, dtype=None) -> bool:
    if t is None:
        return True
    return (t.is_contiguous() and t.device == like.device and t.dtype == (dtype or like.dtype)
            and (shape is None or tuple(t.shape) == tuple(shape)))


def _rows_cover(x: torch.Tensor, *others) -> bool:
    return (triton is not None and x.is_cuda and x.dtype in _FLOATS and x.is_contiguous() and x.numel() > 0
            and x.dim() >= 1 and x.shape[-1] <= MAX_ROW and all(_dense(t, x, shape) for t, shape in others))


def _pre_ok(pre: torch.Tensor | None, x: torch.Tensor, width: int | None = None) -> bool:
    return pre is None or (pre.is_contiguous() and pre.device == x.device and pre.dtype in _FLOATS
                           and tuple(pre.shape) == (x.shape[-1] if width is None else width,))


def _reference(name: str) -> Callable:
    from .quant_fused import REFERENCES

    return REFERENCES[name]


def _norm_kernel(name: str, rms: bool, residual: bool, with_output: bool = False) -> Callable:
    def kernel(x, *args):
        r, rest = (args[0], args[1:]) if residual else (None, args)
        shape, weight = rest[0], rest[1]
        bias, eps, pre = (None, rest[2], rest[3]) if rms else (rest[2], rest[3], rest[4])
        row = (x.shape[-1],)
        if not (len(shape) == 1 and int(shape[0]) == x.shape[-1] and _pre_ok(pre, x)
                and _rows_cover(x, (r, x.shape), (weight, row), (bias, row))):
            return _reference(name)(x, *args)
        return _launch_rows(_NORM_RMS if rms else _NORM_LN, x, r, weight, bias, pre, eps, "none", residual,
                            with_output)
    kernel.__name__ = f"{name}_cuda"
    return kernel


def silu_mul_quantize_cuda(gate, up, pre_scale):
    if not (_pre_ok(pre_scale, gate) and _rows_cover(gate, (up, gate.shape))):
        return _reference("silu_mul_quantize_int8")(gate, up, pre_scale)
    return _launch_rows(_SILU_MUL, gate, up, None, None, pre_scale, 0.0, "none", False)


def activation_quantize_cuda(x, activation, pre_scale):
    if activation not in _ACT or not (_pre_ok(pre_scale, x) and _rows_cover(x)):
        return _reference("activation_quantize_int8")(x, activation, pre_scale)
    return _launch_rows(_ACT_ONLY, x, None, None, None, pre_scale, 0.0, activation, False)


def gemm_covers(q, scale, wq, w_scale, bias, activation, residual, out_dtype) -> bool:
    if triton is None or not q.is_cuda or q.dtype != torch.int8 or q.dim() < 1 or not q.is_contiguous():
        return False
    k, n, m = q.shape[-1], wq.shape[0], q.numel() // max(q.shape[-1], 1)
    out_shape = (*q.shape[:-1], n)
    return (0 < k < MAX_K and m > 0 and activation in _ACT and out_dtype in _FLOATS
            and wq.dim() == 2 and wq.shape[1] == k and _dense(wq, q, dtype=torch.int8)
            and _dense(scale, q, dtype=torch.float32)
            and (scale.dim() == 0 or tuple(scale.shape) == (*q.shape[:-1], 1))
            and _dense(w_scale, q, dtype=torch.float32) and w_scale.numel() in (1, n) and w_scale.dim() <= 1
            and (bias is None or (bias.is_contiguous() and bias.device == q.device and bias.dtype in _FLOATS
                                  and tuple(bias.shape) == (n,)))
            and _dense(residual, q, out_shape, out_dtype))


def _epilogue_gemm(q2, scale, wq, w_scale, bias, activation, res2, out_dtype) -> torch.Tensor:
    """The CUTLASS GEMM where it is built and covers the call (the same values: compiler/cutlass_gemm.py), else
    the Triton GEMM."""
    out = cutlass_gemm.gemm(q2, scale, wq, w_scale, bias, activation, res2, out_dtype,
                            _sm_count(q2.device.index or 0))
    return out if out is not None else launch_gemm(q2, scale, wq, w_scale, bias, activation, res2, out_dtype)


def int8_linear_epilogue_cuda(q, scale, wq, w_scale, bias, activation, residual, out_dtype):
    if not gemm_covers(q, scale, wq, w_scale, bias, activation, residual, out_dtype):
        return _reference("int8_linear_epilogue")(q, scale, wq, w_scale, bias, activation, residual, out_dtype)
    k, n = q.shape[-1], wq.shape[0]
    res2 = residual.reshape(-1, n) if residual is not None else None
    return _epilogue_gemm(q.reshape(-1, k), scale, wq, w_scale, bias, activation, res2, out_dtype).view(
        *q.shape[:-1], n)


def int8_linear_cuda(q, scale, wq, w_scale, bias, out_dtype):
    """For `int8_linear` (compiler/quant_ops.py): the epilogue GEMM where it covers the call, else None."""
    if not gemm_covers(q, scale, wq, w_scale, bias, "none", None, out_dtype):
        return None
    k, n = q.shape[-1], wq.shape[0]
    return _epilogue_gemm(q.reshape(-1, k), scale, wq, w_scale, bias, "none", None, out_dtype).view(*q.shape[:-1], n)


def _swiglu_covers(q, scale, wq, ws, bias, out_dtype, pre=None) -> bool:
    return (wq.dim() == 2 and wq.shape[0] % 2 == 0 and ws.numel() == wq.shape[0] and _pre_ok(pre, q, wq.shape[0] // 2)
            and gemm_covers(q, scale, wq, ws, bias, "none", None, out_dtype))


def int8_linear_swiglu_cuda(q, scale, wq_gate_up, ws_gate_up, bias_gate_up, out_dtype):
    if not _swiglu_covers(q, scale, wq_gate_up, ws_gate_up, bias_gate_up, out_dtype):
        return _reference("int8_linear_swiglu")(q, scale, wq_gate_up, ws_gate_up, bias_gate_up, out_dtype)
    k, n = q.shape[-1], wq_gate_up.shape[0] // 2
    out = launch_gemm(q.reshape(-1, k), scale, wq_gate_up, ws_gate_up, bias_gate_up, "none", None, out_dtype,
                      swiglu=True)
    return out.view(*q.shape[:-1], n)


def int8_linear_quantize_cuda(q, scale, wq, w_scale, bias, activation, pre_scale, out_dtype):
    if not (gemm_covers(q, scale, wq, w_scale, bias, activation, None, out_dtype)
            and _pre_ok(pre_scale, q, wq.shape[0])):
        return _reference("int8_linear_quantize")(q, scale, wq, w_scale, bias, activation, pre_scale, out_dtype)
    k, n = q.shape[-1], wq.shape[0]
    q2 = q.reshape(-1, k)
    if q2.shape[0] < REQUANT_MIN_ROWS or activation != "none":  # the GEMM, then the row kernel: the same codes
        y = launch_gemm(q2, scale, wq, w_scale, bias, "none", None, out_dtype)
        return activation_quantize_cuda(y.view(*q.shape[:-1], n), activation, pre_scale)
    peak = torch.zeros(q2.shape[0], dtype=torch.float32, device=q.device)
    y = launch_gemm(q2, scale, wq, w_scale, bias, activation, None, out_dtype, pre=pre_scale, peak=peak)
    codes, s = _requantize(y, peak, pre_scale)
    return codes.view(*q.shape[:-1], n), s.view(*q.shape[:-1], 1)


def int8_linear_swiglu_quantize_cuda(q, scale, wq_gate_up, ws_gate_up, bias_gate_up, pre_scale, out_dtype):
    if not _swiglu_covers(q, scale, wq_gate_up, ws_gate_up, bias_gate_up, out_dtype, pre_scale):
        return _reference("int8_linear_swiglu_quantize")(q, scale, wq_gate_up, ws_gate_up, bias_gate_up, pre_scale,
                                                         out_dtype)
    k, n = q.shape[-1], wq_gate_up.shape[0] // 2
    q2 = q.reshape(-1, k)
    gemm = (q2, scale, wq_gate_up, ws_gate_up, bias_gate_up, "none", None, out_dtype)
    if q2.shape[0] < REQUANT_MIN_ROWS:  # the GEMM, then the row quantizer: the same codes
        y = launch_gemm(*gemm, swiglu=True)
        return activation_quantize_cuda(y.view(*q.shape[:-1], n), "none", pre_scale)
    peak = torch.zeros(q2.shape[0], dtype=torch.float32, device=q.device)
    y = launch_gemm(*gemm, pre=pre_scale, peak=peak, swiglu=True)
    codes, s = _requantize(y, peak, pre_scale)
    return codes.view(*q.shape[:-1], n), s.view(*q.shape[:-1], 1)


@functools.cache
def _kernels() -> dict[str, Callable]:
    return {
        "rms_norm_quantize_int8": _norm_kernel("rms_norm_quantize_int8", rms=True, residual=False),
        "layer_norm_quantize_int8": _norm_kernel("layer_norm_quantize_int8", rms=False, residual=False),
        "add_rms_norm_quantize_int8": _norm_kernel("add_rms_norm_quantize_int8", rms=True, residual=True),
        "add_layer_norm_quantize_int8": _norm_kernel("add_layer_norm_quantize_int8", rms=False, residual=True),
        "rms_norm_and_quantize_int8": _norm_kernel("rms_norm_and_quantize_int8", rms=True, residual=False,
                                                   with_output=True),
        "layer_norm_and_quantize_int8": _norm_kernel("layer_norm_and_quantize_int8", rms=False, residual=False,
                                                     with_output=True),
        "silu_mul_quantize_int8": silu_mul_quantize_cuda,
        "activation_quantize_int8": activation_quantize_cuda,
        "int8_linear_epilogue": int8_linear_epilogue_cuda,
        "int8_linear_swiglu": int8_linear_swiglu_cuda,
        "int8_linear_quantize": int8_linear_quantize_cuda,
        "int8_linear_swiglu_quantize": int8_linear_swiglu_quantize_cuda,
    }


def cuda_kernel(name: str) -> Callable:
    """The CUDA-key kernel of the fused op `name` (it runs the reference for what Triton does not cover)."""
    return _kernels()[name]
