"""ONNX translations of the asymmetric int8 ops (compiler/quant_asym.py)."""

from __future__ import annotations


def translations(int8_gemm: str) -> dict:
    return {}
