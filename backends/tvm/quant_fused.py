"""Relax lowerings of the fused int8 ops (compiler/quant_fused.py)."""

from __future__ import annotations


def converters() -> dict:
    return {}
