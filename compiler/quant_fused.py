"""The int8 family's fused forms (quantize inside the producing op, dequantize inside the GEMM epilogue)."""

from __future__ import annotations


def declarations():
    return ()
