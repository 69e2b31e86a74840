"""The backend protocol, and the check that every fxopt op has a lowering in every backend.

A backend legalizes first (lists every node it cannot lower, `UnsupportedOpError`), then exports an
artifact or compiles a callable. Its `lowerings` table is keyed by op overload (never by name: an int8
`fxopt.linear` must not be taken for `aten.linear`). `fxopt.compile` / `export_onnx` / `export_tvm`
dispatch through `fxopt.backends.BACKENDS`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Backend(Protocol):
    name: str
    targets: tuple[str, ...]

    @property
    def lowerings(self) -> Mapping[Any, Callable]:
        """{op overload: lowering} for the ops this backend lowers itself (fxopt's fused ops among them)."""
        ...

    def legalize(self, opt: Any) -> list[str]:
        """[] when every node lowers; else raises UnsupportedOpError listing every node that does not."""
        ...

    def export(self, opt: Any, path: str | Path, **options: Any) -> Path:
        ...

    def compile(self, opt: Any, target: str, **options: Any) -> Callable:
        """A callable taking the model's own arguments and returning its output structure."""
        ...


def missing_lowerings(registry: Iterable[Any], tables: Mapping[str, Mapping[Any, Callable]]) -> list[str]:
    """"backend: op" for every op of `registry` (fxopt.ops.REGISTRY) absent from a backend's table, in the
    registry's order then the tables' order; [] when every op lowers everywhere."""
    return [f"{backend}: {op}" for op in registry for backend, table in tables.items() if op not in table]
