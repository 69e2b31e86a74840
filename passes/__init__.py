"""The pass registry: an explicit table of name -> pass class (nothing registers itself at import)."""

from __future__ import annotations

from typing import Any

from fxopt.errors import UnknownPassError
from fxopt.pass_base import Pass

from .fuse_int8 import FuseInt8
from .fuse_layernorm import FuseLayerNorm
from .mha_to_gqa import ConvertToGQA
from .permute_nm import PermuteForNM
from .prune_nm import PruneNM
from .smoothquant import SmoothQuant
from .stabilize_softmax import StabilizeSoftmax
from .zeroquant import ZeroQuant

PASSES: dict[str, type[Pass]] = {cls.name: cls for cls in (
    ConvertToGQA, FuseInt8, FuseLayerNorm, PermuteForNM, PruneNM, SmoothQuant, StabilizeSoftmax, ZeroQuant)}

# the passes that keep the function exactly (up to float rounding), in a sensible order
EXACT_PIPELINE: tuple[str, ...] = ("stabilize_softmax", "fuse_layernorm")


def get(name: str, **options: Any) -> Pass:
    """A configured pass: `get("fuse_layernorm", fuse_residual_add=False)`."""
    if name not in PASSES:
        raise UnknownPassError(name, list(PASSES))
    return PASSES[name].configure(**options)


__all__ = ["EXACT_PIPELINE", "PASSES", "ConvertToGQA", "FuseInt8", "FuseLayerNorm", "PermuteForNM", "PruneNM",
           "SmoothQuant", "StabilizeSoftmax", "ZeroQuant", "get"]
