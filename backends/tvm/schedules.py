"""A dlight rule for element-wise GPU kernels: 16-byte vectors per thread.

dlight's ``Fallback`` maps one element to one thread (1024-thread blocks): 2-byte accesses for
fp16. Our fused element-wise kernels (SiLU·up, GELU, residual adds) ran at about 1 TB/s on an
H200 whose copy ceiling is 4.3 TB/s; with this rule Llama's SiLU·up went from 68 to 22 µs
(about 3.1 TB/s). Each thread handles ``16 / bytes`` consecutive elements of the fused iteration
space (4 when the body computes in float32: CUDA codegen has no 8-lane float32 vector), so
contiguous operands move as 16-byte vectors. Only static, purely spatial, unconditional float
kernels whose innermost extent divides by the vector length qualify (RoPE's concatenate
vectorizes to scalar code, so it is left alone); everything else goes to the next rule.
"""

from __future__ import annotations

from typing import Any

import tvm
import tvm_ffi
from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import try_inline
from tvm.s_tir.dlight.gpu.base import GPUScheduleRule

THREADS = 256


def _widest_cast_bits(stmt: Any) -> int:
    bits = [0]
    tvm_ffi.structural_walk(stmt, [(tirx.Cast, lambda c: bits.append(int(c.ty.dtype.bits)))], order="post")
    return max(bits)


def _has_conditional(stmt: Any) -> bool:
    found = False

    def visit(node: Any) -> None:
        nonlocal found
        if isinstance(node, tirx.Select) or str(getattr(node, "op", "")).endswith("if_then_else"):
            found = True

    tvm_ffi.structural_walk(stmt, [(tvm.ir.Call, visit), (tirx.Select, visit)], order="post")
    return found


class VectorizedElementwise(GPUScheduleRule):
    """Fused element-wise kernels as [blocks, 256 threads, 16-byte vector] loops."""

    def apply(self, func: tirx.PrimFunc, target: Any, _: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None:
            return None
        infos = try_inline(sch, infos)
        if len(infos) != 1 or any(k != "S" for k in infos[0].dom_kind()):
            return None
        block = infos[0].block_rv
        stmt = sch.get(block)
        if _has_conditional(stmt.body) or len(stmt.writes) != 1:
            return None
        loops = sch.get_loops(block)
        extents = [sch.get(loop).extent for loop in loops]
        if not loops or not all(isinstance(e, tirx.IntImm) for e in extents):
            return None
        dtypes = {str(r.source.dtype) for r in list(stmt.writes) + list(stmt.reads)}
        if not dtypes <= {"float16", "bfloat16", "float32"}:  # CUDA codegen lacks some int/bool vectors
            return None
        # vector width from the widest value in the body: CUDA codegen has no 8-lane float32 type
        bits = max([int(r.source.dtype.bits) for r in list(stmt.writes) + list(stmt.reads)]
                   + [_widest_cast_bits(stmt.body)])
        vec = max(1, min(8, 128 // bits))
        total = 1
        for e in extents:
            total *= int(e)
        if int(extents[-1]) % vec or total % (vec * THREADS):
            return None
        fused = sch.fuse(*loops)
        bx, tx, vx = sch.split(fused, factors=[None, THREADS, vec])
        sch.bind(bx, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")
        sch.vectorize(vx)
        return sch
