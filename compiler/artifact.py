"""The optimized model as a file: `fxopt.save(opt, path)` / `fxopt.load(path)`.

One `torch.export` archive (`.pt2`): the optimized program re-exported with the capture's dynamic dims and its
parameters, plus, as extra files of the archive, the report (JSON, as `opt.report.to_json()`) and the example
inputs and dynamic-shape spec (so the loaded module can be re-exported for the backends). Loading needs neither
the original model's code nor its weights, only fxopt (whose fused ops the program calls) and torch.
`torch.save(opt)` and `pickle` go through the same format.
"""

from __future__ import annotations

import base64
import importlib
import io
import json
import zipfile
from pathlib import Path
from typing import Any

import torch

from .capture import SIGNATURE
from .errors import FxoptError
from .signature import Signature

FORMAT = "fxopt.artifact/1"
_REPORT, _INPUTS, _FORMAT, _MODULES = ("fxopt/report.json", "fxopt/inputs.b64", "fxopt/format",
                                      "fxopt/modules.json")


class ArtifactError(FxoptError, ValueError):
    """A file is not an fxopt artifact, or one written in a format this fxopt does not read; names the file."""


def save(opt: Any, path: str | Path) -> Path:
    """Write `opt` (an OptimizedModule) to `path` (a `.pt2` archive); returns the path."""
    from .api import OptimizedModule

    if not isinstance(opt, OptimizedModule):
        raise TypeError(f"fxopt.save takes an OptimizedModule (from fxopt.optimize), not {type(opt).__name__}")
    path = Path(path)
    with path.open("wb") as f:
        f.write(to_bytes(opt))
    return path


def load(path: str | Path) -> Any:
    """The OptimizedModule written by `save`, with its report, ready to call or to hand to a backend."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: no such file")
    return from_bytes(path.read_bytes(), str(path))


def to_bytes(opt: Any) -> bytes:
    inputs = io.BytesIO()
    torch.save({"args": opt.example_inputs, "kwargs": opt.example_kwargs, "dynamic_shapes": opt.dynamic_shapes},
               inputs)
    program, buffer = opt.exported_program(), io.BytesIO()
    torch.export.save(program, buffer, extra_files={
        _FORMAT: FORMAT, _REPORT: opt.report.to_json(), _INPUTS: base64.b64encode(inputs.getvalue()).decode(),
        _MODULES: json.dumps(_container_modules(program))})
    return buffer.getvalue()


def _container_modules(program: torch.export.ExportedProgram) -> list[str]:
    """The modules defining the input/output containers (a ModelOutput class): they register the pytree
    node that deserializing the program needs, so `load` imports them first."""
    names: set[str] = set()

    def walk(spec: Any) -> None:
        if spec.type is not None and spec.type.__module__ not in ("builtins", "collections"):
            names.add(spec.type.__module__)
        for child in spec.children_specs:
            walk(child)

    for spec in (program.call_spec.in_spec, program.call_spec.out_spec):
        if spec is not None:
            walk(spec)
    return sorted(names)


def _read_extra_files(data: bytes, extra: dict[str, str]) -> None:
    """The archive's extra files, read before the program (which may need the modules they name)."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for entry in archive.namelist():
            for key in extra:
                if entry.endswith(f"extra/{key}"):
                    extra[key] = archive.read(entry).decode()


def from_bytes(data: bytes, name: str = "<bytes>") -> Any:
    from .api import OptimizedModule
    from .report import Report

    extra = {_FORMAT: "", _REPORT: "", _INPUTS: "", _MODULES: "[]"}
    try:
        _read_extra_files(data, extra)
        for module in json.loads(extra[_MODULES]):
            try:
                importlib.import_module(module)
            except ImportError as e:
                raise ArtifactError(f"{name}: its outputs are {module} containers; install the package that "
                                    f"defines them ({e})") from e
        program = torch.export.load(io.BytesIO(data), extra_files=extra)
    except ArtifactError:
        raise
    except Exception as e:
        raise ArtifactError(f"{name}: not a torch.export archive ({type(e).__name__}: {e})") from e
    if extra[_FORMAT] != FORMAT:
        raise ArtifactError(f"{name}: format {extra[_FORMAT] or 'none'!r}, this fxopt reads {FORMAT!r} "
                            f"(a plain torch.export archive is not an fxopt artifact)")
    inputs = torch.load(io.BytesIO(base64.b64decode(extra[_INPUTS])), weights_only=False)
    report = Report.from_dict(json.loads(extra[_REPORT]))
    gm = program.module()
    gm.meta[SIGNATURE] = Signature.of(program)
    return OptimizedModule(gm, report, inputs["args"], inputs["kwargs"], inputs["dynamic_shapes"])
