"""The optimized model as a file: `fxopt.save(opt, path)` / `fxopt.load(path)`.

One `torch.export` archive (`.pt2`): the optimized program re-exported with the capture's dynamic dims and its
parameters, plus, as extra files of the archive, the report (JSON, as `opt.report.to_json()`) and the example
inputs and dynamic-shape spec (so the loaded module can be re-exported for the backends). Loading needs neither
the original model's code nor its weights, only fxopt (whose fused ops the program calls) and torch.
`torch.save(opt)` and `pickle` go through the same format.

Loading checks before it believes anything: a manifest written last (`fxopt/manifest.json`) records the sha256
of every other file of the archive, so a file edited, added or removed after saving is refused by name. The
example inputs are unpickled with `weights_only=True`, and an archive holding a payload that `torch.export.load`
would unpickle unrestricted (a pickled weight or constant, a compiled AOTInductor library, sample inputs that
are not plain data) is refused: fxopt never writes one. The digests detect modification, they do not
authenticate: whoever rewrites the archive can rewrite its manifest.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import hashlib
import importlib
import io
import json
import logging
import os
import pickle
import sys
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch.export.dynamic_shapes import _DimHint, _DimHintType
from torch.export.pt2_archive import constants as pt2

from .capture import SIGNATURE, quiet
from .errors import FxoptError, first_line
from .signature import Signature

log = logging.getLogger(__name__)
T = TypeVar("T")

FORMAT = "fxopt.artifact/2"
FORMATS_WITHOUT_DIGESTS = ("fxopt.artifact/1",)  # written before the manifest: nothing to check them against
_REPORT, _INPUTS, _FORMAT, _MODULES, _SIGNATURE, _TUPLES, _MANIFEST = (
    "fxopt/report.json", "fxopt/inputs.b64", "fxopt/format", "fxopt/modules.json", "fxopt/signature.json",
    "fxopt/namedtuples.json", "fxopt/manifest.json")
_INPUT_CLASSES = [_DimHint, _DimHintType]  # Dim.AUTO in the dynamic-shape spec; the rest is tensors and plain data


class ArtifactError(FxoptError, ValueError):
    """A file is not an fxopt artifact, or one written in a format this fxopt does not read, or one modified
    after saving; names the file (and the file inside the archive at fault)."""


class ArtifactArgumentError(FxoptError, TypeError):
    """`fxopt.save` / `fxopt.load` called with an argument of the wrong kind; names the argument."""


def save(opt: Any, path: str | os.PathLike) -> Path:
    """Write `opt` (an OptimizedModule) to `path` (a `.pt2` archive); returns the path."""
    from .api import OptimizedModule

    if not isinstance(opt, OptimizedModule):
        raise ArtifactArgumentError(f"fxopt.save(opt, path): opt must be an OptimizedModule (from fxopt.optimize), "
                                    f"not {type(opt).__name__}")
    path = _path_argument("fxopt.save", path)
    data = to_bytes(opt)  # before opening: a failed save leaves no truncated file behind
    try:
        path.write_bytes(data)
    except OSError as e:
        raise ArtifactError(f"{path}: cannot write the artifact ({e.strerror or e})") from e
    return path


def load(path: str | os.PathLike) -> Any:
    """The OptimizedModule written by `save`, with its report, ready to call or to hand to a backend."""
    path = _path_argument("fxopt.load", path)
    try:
        data = path.read_bytes()
    except FileNotFoundError as e:
        raise ArtifactError(f"{path}: no such file") from e
    except IsADirectoryError as e:
        raise ArtifactError(f"{path}: a directory, not an fxopt artifact file") from e
    except OSError as e:
        raise ArtifactError(f"{path}: cannot read ({e.strerror or e})") from e
    return from_bytes(data, str(path))


def _path_argument(function: str, path: Any) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise ArtifactArgumentError(f"{function}: path must be a str or os.PathLike, not {type(path).__name__}")
    return Path(path)


@quiet
def to_bytes(opt: Any) -> bytes:
    program, buffer = opt.exported_program(), io.BytesIO()
    program.example_inputs = None  # fxopt stores its own, as plain data; torch's loader would unpickle them freely
    tuples = _namedtuples(program)
    with _serializable(tuples):
        torch.export.save(program, buffer, extra_files={
            _FORMAT: FORMAT, _REPORT: opt.report.to_json(), _INPUTS: _inputs_file(opt),
            _MODULES: json.dumps(_container_modules(program)), _TUPLES: json.dumps(_describe(tuples)),
            _SIGNATURE: json.dumps(Signature.of_module(program, opt).to_json())})
    return _with_manifest(buffer.getvalue())


def _inputs_file(opt: Any) -> str:
    """The example inputs and dynamic-shape spec as their leaves (pickled) and their structure (pytree JSON, so
    a namedtuple input needs no class unpickled), base64-encoded. Refused here, not at loading, if a leaf is
    something `load` will not unpickle (anything but tensors, plain data and Dim hints)."""
    from torch.utils import _pytree as pytree

    leaves, structure = pytree.tree_flatten(
        {"args": opt.example_inputs, "kwargs": opt.example_kwargs, "dynamic_shapes": opt.dynamic_shapes})
    buffer = io.BytesIO()
    try:
        torch.save({"leaves": leaves, "structure": pytree.treespec_dumps(structure)}, buffer)
        _unpickled_inputs(buffer.getvalue())
    except Exception as e:
        raise ArtifactError(f"cannot save: fxopt.load could not read the example inputs back (only tensors and "
                            f"plain data in containers are stored): {first_line(e)}") from e
    return base64.b64encode(buffer.getvalue()).decode()


def _unpickled_inputs(data: bytes) -> dict[str, Any]:
    """What `_inputs_file` stored; its namedtuples must be registered (`_serializable`)."""
    from torch.utils import _pytree as pytree

    stored = _plain_data(data, _INPUT_CLASSES)
    inputs = pytree.tree_unflatten(stored["leaves"], pytree.treespec_loads(stored["structure"]))
    if not (isinstance(inputs, dict) and isinstance(inputs.get("args"), tuple) and isinstance(
            inputs.get("kwargs"), dict) and isinstance(inputs.get("dynamic_shapes"), (dict, type(None)))):
        raise ValueError("not {'args': tuple, 'kwargs': dict, 'dynamic_shapes': dict or None}")
    return inputs


def _plain_data(data: bytes, classes: Sequence[type] = ()) -> Any:
    """`torch.load(weights_only=True)`: tensors, plain data and `classes`; nothing else is unpickled, nothing
    in the pickle runs."""
    try:
        with torch.serialization.safe_globals(list(classes)):
            return torch.load(io.BytesIO(data), weights_only=True)
    except pickle.UnpicklingError as e:
        refused = next((ln.strip() for ln in str(e).splitlines() if "WeightsUnpickler error" in ln), first_line(e))
        refused = refused.split(" was not an allowed global")[0]  # not torch's advice to allow it
        raise ValueError(f"not only tensors and plain data, not unpickled: {refused}") from e


def _with_manifest(data: bytes) -> bytes:
    """The archive with its manifest added: the sha256 of every file in it, by name."""
    buffer = io.BytesIO(data)
    with zipfile.ZipFile(buffer, "a") as archive:
        digests = {entry: _sha256(archive.read(entry)) for entry in archive.namelist()}
        archive.writestr(_entry(_root(archive), _MANIFEST), json.dumps({"sha256": digests}, indent=1))
    return buffer.getvalue()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _root(archive: zipfile.ZipFile) -> str:
    """The one folder every file of a torch.export archive lies in."""
    roots = {entry.split("/", 1)[0] for entry in archive.namelist()}
    if len(roots) != 1 or any("/" not in entry for entry in archive.namelist()):
        raise ValueError(f"not one root folder (found {', '.join(sorted(roots)) or 'no files'})")
    return roots.pop()


def _entry(root: str, extra_file: str) -> str:
    """Where an extra file (`fxopt/report.json`) lies in the archive."""
    return f"{root}/{pt2.EXTRA_DIR}{extra_file}"


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
            if not _may_import(d["module"]):  # a file's names never pick code to run: a namedtuple stands in
                raise ImportError(d["module"])
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


@quiet
def from_bytes(data: bytes, name: str = "<bytes>") -> Any:
    from .api import OptimizedModule

    files = _checked_fxopt_files(data, name)
    report = _parsed(name, _REPORT, lambda: _report(files[_REPORT]))
    _import_container_modules(name, files)
    with _serializable(_parsed(name, _TUPLES, lambda: _restore(json.loads(files[_TUPLES])))):
        signature = _parsed(name, _SIGNATURE, lambda: Signature.from_json(json.loads(files[_SIGNATURE])))
        inputs = _parsed(name, _INPUTS, lambda: _unpickled_inputs(base64.b64decode(files[_INPUTS], validate=True)))
        program = _program(data, name)
    gm = program.module()
    gm.meta[SIGNATURE] = signature  # names and forward's defaults as captured from the user's model
    return OptimizedModule(gm, report, inputs["args"], inputs["kwargs"], inputs["dynamic_shapes"])


def _checked_fxopt_files(data: bytes, name: str) -> dict[str, bytes]:
    """fxopt's extra files of the archive, once its format, its digests and its payloads are checked."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        root = _root(archive)
    except Exception as e:
        raise ArtifactError(f"{name}: not a torch.export archive ({type(e).__name__}: {e})") from e
    with archive:
        _check_format(archive, root, name)
        _check_digests(archive, root, name)
        _refuse_unrestricted_pickles(archive, root, name)
        files = (_REPORT, _INPUTS, _MODULES, _SIGNATURE, _TUPLES)
        missing = [f for f in files if _entry(root, f) not in archive.namelist()]
        if missing:
            raise ArtifactError(f"{name}: {', '.join(missing)} missing from the archive")
        return {f: archive.read(_entry(root, f)) for f in files}


def _check_format(archive: zipfile.ZipFile, root: str, name: str) -> None:
    entry = _entry(root, _FORMAT)
    found = archive.read(entry).decode(errors="replace") if entry in archive.namelist() else ""
    if found in FORMATS_WITHOUT_DIGESTS:
        raise ArtifactError(f"{name}: format {found!r} records no digests of its files, so this fxopt cannot tell "
                            f"whether they were modified after saving; optimize and save the model again")
    if found != FORMAT:
        raise ArtifactError(f"{name}: format {found or 'none'!r}, this fxopt reads {FORMAT!r} "
                            f"(a plain torch.export archive is not an fxopt artifact)")


def _check_digests(archive: zipfile.ZipFile, root: str, name: str) -> None:
    """Every file of the archive has the sha256 the manifest recorded at saving; none added, none removed."""
    manifest = _entry(root, _MANIFEST)
    if manifest not in archive.namelist():
        raise ArtifactError(f"{name}: {_MANIFEST} missing: the archive records no digests of its files")
    recorded = _parsed(name, _MANIFEST, lambda: _digests(archive.read(manifest)))
    entries = [entry for entry in archive.namelist() if entry != manifest]
    twice = sorted(entry for entry, count in collections.Counter(entries).items() if count > 1)
    if twice:
        raise ArtifactError(f"{name}: {', '.join(twice)} in the archive twice")
    for entry in entries:
        if entry not in recorded:
            raise ArtifactError(f"{name}: {entry} was added after saving (the manifest records no digest of it)")
        if _sha256(archive.read(entry)) != recorded[entry]:
            raise ArtifactError(f"{name}: {entry} was modified after saving (its sha256 is not the one recorded)")
    removed = sorted(set(recorded) - set(entries))
    if removed:
        raise ArtifactError(f"{name}: {', '.join(removed)} removed after saving")


def _digests(text: bytes) -> dict[str, str]:
    digests = json.loads(text)["sha256"]
    if not (isinstance(digests, dict) and all(isinstance(v, str) for v in digests.values())):
        raise ValueError("sha256 is not an object of hex digests by file name")
    return digests


def _refuse_unrestricted_pickles(archive: zipfile.ZipFile, root: str, name: str) -> None:
    """`torch.export.load` unpickles some payloads without `weights_only` (a tensor-subclass weight or constant,
    a script or opaque object, sample inputs that are not plain data) and runs AOTInductor libraries; fxopt never
    writes one (its example inputs are its own file), so an archive holding one is refused before torch reads
    it."""
    for entry in archive.namelist():
        inner = entry[len(root) + 1:]
        if inner.startswith(pt2.AOTINDUCTOR_DIR) or (
                inner.startswith((pt2.WEIGHTS_DIR, pt2.CONSTANTS_DIR)) and inner.endswith(".pt")):
            raise ArtifactError(f"{name}: {entry} is a payload fxopt.save never writes (not loaded)")
        if inner.startswith((pt2.WEIGHTS_DIR, pt2.CONSTANTS_DIR)) and inner.endswith("_config.json"):
            pickled = _parsed(name, entry, lambda e=entry: _pickled_payloads(archive.read(e)))
            if pickled:
                raise ArtifactError(f"{name}: {entry} names pickled payloads ({', '.join(pickled)}), which "
                                    f"fxopt.save never writes (not loaded)")
        if inner.startswith(pt2.SAMPLE_INPUTS_DIR) and archive.getinfo(entry).file_size:
            raise ArtifactError(f"{name}: {entry}: fxopt.save writes no sample inputs there (not loaded)")


def _pickled_payloads(config: bytes) -> list[str]:
    """The payloads a torch.export weights/constants config has unpickled: all but plain tensor bytes."""
    payloads = json.loads(config)["config"]
    return [payload["path_name"] for payload in payloads.values()
            if payload.get("use_pickle") is not False or not payload["path_name"].startswith(
                (pt2.WEIGHT_FILENAME_PREFIX, pt2.TENSOR_CONSTANT_FILENAME_PREFIX))]


def _parsed(name: str, file: str, parse: Callable[[], T]) -> T:
    """`parse()`, any failure of it an ArtifactError naming the file it was reading."""
    try:
        return parse()
    except ArtifactError:
        raise
    except Exception as e:
        raise ArtifactError(f"{name}: {file} is not what fxopt.save writes ({type(e).__name__}: "
                            f"{first_line(e)})") from e


def _report(text: bytes) -> Any:
    from .report import Report

    return Report.from_dict(json.loads(text))


# packages whose modules an artifact may name for import (their output containers register pytree nodes when
# imported); any other module must already be imported by the caller: a file's names never pick code to run
IMPORTABLE_PACKAGES = frozenset({"torch", "transformers", "diffusers", "timm", "sentence_transformers", "collections"})


def _may_import(module: str) -> bool:
    return module in sys.modules or module.split(".")[0] in IMPORTABLE_PACKAGES


def _import_container_modules(name: str, files: dict[str, bytes]) -> None:
    """The modules defining the program's containers register their pytree nodes when imported."""
    for module in _parsed(name, _MODULES, lambda: _strings(json.loads(files[_MODULES]))):
        if not _may_import(module):
            raise ArtifactError(f"{name}: its outputs are {module} containers; fxopt.load imports only modules of "
                                f"{sorted(IMPORTABLE_PACKAGES)} by itself: import {module} first")
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ArtifactError(f"{name}: its outputs are {module} containers; install the package that "
                                f"defines them ({e})") from e


def _program(data: bytes, name: str) -> torch.export.ExportedProgram:
    try:
        return torch.export.load(io.BytesIO(data))
    except Exception as e:
        raise ArtifactError(f"{name}: not a torch.export archive ({type(e).__name__}: {e})") from e


def _strings(value: Any) -> list[str]:
    if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise ValueError("not a list of module names")
    return value
