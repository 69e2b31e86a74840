"""Backends: each legalizes first (lists every node it cannot translate), then lowers and runs.

    BACKENDS["onnxruntime"].compile(opt, "cpu")     the objects fxopt.compile / export_* dispatch to
    missing_lowerings()                             fxopt ops without a lowering in some backend ([] is right)

Nothing registers at import: `BACKENDS` is written out here, and each backend imports its toolchain (onnx,
TVM) only when one of its methods runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from .base import Backend
from .base import missing_lowerings as _missing

__all__ = ["BACKENDS", "Backend", "OnnxRuntimeBackend", "TvmBackend", "missing_lowerings"]


class OnnxRuntimeBackend:
    name = "onnxruntime"
    targets = ("cpu", "cuda")

    @property
    def lowerings(self) -> Mapping[Any, Callable]:
        from .onnxruntime.translations import RMS_NORMALIZATION_OPSET, translation_table

        return translation_table(RMS_NORMALIZATION_OPSET)  # the same ops at every opset

    def legalize(self, opt: Any) -> list[str]:
        from . import onnxruntime

        return onnxruntime.legalize(opt)

    def export(self, opt: Any, path: str | Path, **options: Any) -> Path:
        from . import onnxruntime

        return onnxruntime.export(opt, path, **options)

    def compile(self, opt: Any, target: str, **options: Any) -> Callable:
        from . import onnxruntime

        return onnxruntime.compile(opt, target=target, **options)


class TvmBackend:
    name = "tvm"
    targets = ("cpu", "cuda")

    @property
    def lowerings(self) -> Mapping[Any, Callable]:
        from .tvm.table import lowerings

        return lowerings(extern=False)  # extern=True adds view/permute passthroughs, drops nothing

    def legalize(self, opt: Any) -> list[str]:
        from . import tvm

        return tvm.legalize(opt)

    def export(self, opt: Any, path: str | Path, **options: Any) -> Path:
        from . import tvm

        return tvm.export(opt, path, **options)

    def compile(self, opt: Any, target: str, **options: Any) -> Callable:
        from . import tvm

        return tvm.compile(opt, target=target, **options)


BACKENDS: dict[str, Backend] = {"onnxruntime": OnnxRuntimeBackend(), "tvm": TvmBackend()}


def missing_lowerings(registry: Iterable[Any] | None = None,
                      tables: Mapping[str, Mapping[Any, Callable]] | None = None) -> list[str]:
    """"backend: op" for each fxopt op (default: `fxopt.ops.REGISTRY`) that a backend's table (default: each
    of `BACKENDS`' `lowerings`) cannot lower."""
    if registry is None:
        from fxopt.ops import REGISTRY as registry
    if tables is None:
        tables = {name: backend.lowerings for name, backend in BACKENDS.items()}
    return _missing(registry, tables)
