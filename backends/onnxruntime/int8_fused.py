"""ONNX translations of the fused int8 ops (compiler/quant_fused.py)."""

from __future__ import annotations


def translations(opset: int, int8_gemm: str) -> dict:
    return {}
