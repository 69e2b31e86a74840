"""Which integer GEMM ORT runs the int8 linears with, chosen so that the product stays exact.

The codes q (activations) and wq (weights) are in [-127, 127]; their product is summed in int32. ORT's CPU
kernels take A as uint8 (q + 128, zero point 128) and B as uint8 or int8:

    uint8·uint8  exact on every CPU (products widened to 16 bits, summed in 32); ~1.8x slower than uint8·int8
                 where VNNI exists (measured in benchmarks/results/int8_cpu.md)
    uint8·int8   VNNI (vpdpbusd) sums each four products in 32 bits: exact. Without VNNI (AVX2, AVX-512
                 without VNNI), vpmaddubsw adds each pair of products in a saturating 16-bit lane, and
                 255·127 + 255·127 = 64770 > 32767: inexact for large codes.

`u8s8_exact()` decides by running ORT's kernel on operands where every pair sum exceeds the int16 range (and on
random ones) and comparing with the exact int64 product: a saturating kernel fails it. The choice is made on
the machine that exports and is written into the file's metadata (`fxopt.int8_gemm`); a session opened on a
CPU whose kernel saturates warns (runtime.py).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import numpy as np

log = logging.getLogger(__name__)

METADATA_KEY = "fxopt.int8_gemm"
# shapes that reach ORT's packed-weight GEMM (the linears' path) and its small-M path
_PROBE_SHAPES = ((64, 256, 64), (3, 384, 48))

Matmul = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (uint8 [M, K], int8 [K, N]) -> int [M, N]


def _operands(m: int, k: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """A = q + 128 and B = wq at the codes' extremes (every pair sum 2·255·127 or 2·1·127 in magnitude) in half
    the rows/columns, random codes in the rest."""
    rng = np.random.default_rng(0)
    a = rng.integers(-127, 128, (m, k)) + 128
    b = rng.integers(-127, 128, (k, n))
    a[: m // 2] = np.where(np.arange(k) % 4 < 2, 255, 1)
    b[:, : n // 2] = np.where(np.arange(k)[:, None] % 3 == 0, -127, 127)
    return a.astype(np.uint8), b.astype(np.int8)


def exact_on(matmul: Matmul) -> bool:
    """Whether `matmul` (uint8 A with zero point 128 · int8 B, integer result) equals the exact product."""
    for shape in _PROBE_SHAPES:
        a, b = _operands(*shape)
        exact = (a.astype(np.int64) - 128) @ b.astype(np.int64)
        if not np.array_equal(np.asarray(matmul(a, b), dtype=np.int64), exact):
            return False
    return True


def _ort_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """ORT's MatMulInteger, uint8 A (zero point 128) · int8 B as a constant (packed, as the linears' weights)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(b, "B"), numpy_helper.from_array(np.array(128, np.uint8), "a_zero")]
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["A", "B", "a_zero"], ["Y"])], "probe",
                              [helper.make_tensor_value_info("A", TensorProto.UINT8, [None, a.shape[1]])],
                              [helper.make_tensor_value_info("Y", TensorProto.INT32, [None, b.shape[1]])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"A": a})[0]


@functools.cache
def u8s8_exact() -> bool:
    """Whether this CPU's ORT uint8·int8 GEMM is exact for the int8 codes (probed once per process)."""
    exact = exact_on(_ort_matmul)
    log.info("onnxruntime uint8·int8 GEMM on this CPU: %s", "exact" if exact else "saturates (uint8·uint8 used)")
    return exact


def resolve(int8_gemm: str) -> str:
    """"auto" -> "u8s8" where this CPU's kernel is exact, else "u8u8"; "u8s8"/"u8u8" as given."""
    if int8_gemm == "auto":
        return "u8s8" if u8s8_exact() else "u8u8"
    return int8_gemm
