"""The optimized model as a file: `fxopt.save(opt, path)` / `fxopt.load(path)`.

One `torch.export` archive (`.pt2`): the optimized program re-exported with the capture's dynamic dims and its
parameters, plus, as extra files of the archive, the report (JSON, as `opt.report.to_json()`) and the example
inputs and dynamic-shape spec (so the loaded module can be re-exported for the backends). Loading needs neither
the original model's code nor its weights, only fxopt (whose fused ops the program calls) and torch.
`torch.save(opt)` and `pickle` go through the same format.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import importlib
import io
import json
import logging
import zipfile
from pathlib import Path
from typing import Any

import torch

from .capture import SIGNATURE, quiet
from .errors import FxoptError
from .signature import Signature

log = logging.getLogger(__name__)

FORMAT = "fxopt.artifact/1"
_REPORT, _INPUTS, _FORMAT, _MODULES, _SIGNATURE, _TUPLES = (
    "fxopt/report.json", "fxopt/inputs.b64", "fxopt/format", "fxopt/modules.json", "fxopt/signature.json",
    "fxopt/namedtuples.json")


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


@quiet
def to_bytes(opt: Any) -> bytes:
    inputs = io.BytesIO()
    torch.save({"args": opt.example_inputs, "kwargs": opt.example_kwargs, "dynamic_shapes": opt.dynamic_shapes},
               inputs)
    program, buffer = opt.exported_program(), io.BytesIO()
    tuples = _namedtuples(program)
    with _serializable(tuples):
        torch.export.save(program, buffer, extra_files={
            _FORMAT: FORMAT, _REPORT: opt.report.to_json(), _INPUTS: base64.b64encode(inputs.getvalue()).decode(),
            _MODULES: json.dumps(_container_modules(program)), _TUPLES: json.dumps(_describe(tuples)),
            _SIGNATURE: json.dumps(Signature.of_module(program, opt).to_json())})
    return buffer.getvalue()


def _specs(program: torch.export.ExportedProgram):
    stack = [s for s in (program.call_spec.in_spec, program.call_spec.out_spec) if s is not None]
    while stack:
        spec = stack.pop()
        yield spec
        stack += spec.children()


def _namedtuples(program: torch.export.ExportedProgram) -> dict[str, type]:
    """The namedtuple classes in the program's input/output structure that torch cannot serialize (none is
    registered with a serialized name), by the name the archive records them under."""
    from torch.utils import _pytree as pytree

    found = {}
    for spec in _specs(program):
        cls = spec.context
        if spec.type is collections.namedtuple and cls not in pytree.SUPPORTED_SERIALIZED_TYPES:
            found[f"fxopt.namedtuple:{cls.__module__}.{cls.__qualname__}"] = cls
    return found


def _describe(tuples: dict[str, type]) -> dict[str, dict[str, Any]]:
    return {name: {"module": cls.__module__, "qualname": cls.__qualname__, "fields": list(cls._fields)}
            for name, cls in tuples.items()}


def _restore(described: dict[str, dict[str, Any]]) -> dict[str, type]:
    """The classes back: the model's own where it can be imported (and has the same fields), else a
    namedtuple of the same name and fields (outputs read by field or index the same)."""
    classes = {}
    for name, d in described.items():
        cls: Any = None
        with contextlib.suppress(Exception):
            cls = importlib.import_module(d["module"])
            for part in d["qualname"].split("."):
                cls = getattr(cls, part)
        if not (isinstance(cls, type) and list(getattr(cls, "_fields", ())) == d["fields"]):
            log.info("output type %s.%s not importable here: a namedtuple of the same fields stands in",
                     d["module"], d["qualname"])
            cls = collections.namedtuple(d["qualname"].split(".")[-1], d["fields"])
        classes[name] = cls
    return classes


@contextlib.contextmanager
def _serializable(tuples: dict[str, type]):
    """Registers the namedtuples with torch's pytree under their archive names for the duration of a save or
    load, and removes them after: the process's pytree registry is left as it was."""
    from torch.utils import _pytree as pytree

    added = []
    try:
        for name, cls in tuples.items():
            if cls not in pytree.SUPPORTED_NODES:
                pytree._register_namedtuple(cls, serialized_type_name=name)
                added.append(cls)
        yield
    finally:
        for cls in added:
            pytree._deregister_pytree_node(cls)


def _container_modules(program: torch.export.ExportedProgram) -> list[str]:
    """The modules defining the input/output containers (a ModelOutput class): they register the pytree
    node that deserializing the program needs, so `load` imports them first."""
    names: set[str] = set()

    def walk(spec: Any) -> None:
        if spec.type is not None and spec.type.__module__ not in ("builtins", "collections"):
            names.add(spec.type.__module__)
        for child in spec.children():
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


@quiet
def from_bytes(data: bytes, name: str = "<bytes>") -> Any:
    from .api import OptimizedModule
    from .report import Report

    extra = {_FORMAT: "", _REPORT: "", _INPUTS: "", _MODULES: "[]", _SIGNATURE: "", _TUPLES: "{}"}
    try:
        _read_extra_files(data, extra)
        for module in json.loads(extra[_MODULES]):
            try:
                importlib.import_module(module)
            except ImportError as e:
                raise ArtifactError(f"{name}: its outputs are {module} containers; install the package that "
                                    f"defines them ({e})") from e
        with _serializable(_restore(json.loads(extra[_TUPLES]))):
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
    gm.meta[SIGNATURE] = Signature.from_json(json.loads(extra[_SIGNATURE])) if extra[_SIGNATURE] else (
        Signature.of(program))  # names and forward's defaults as captured from the user's model
    return OptimizedModule(gm, report, inputs["args"], inputs["kwargs"], inputs["dynamic_shapes"])
