"""Apache TVM backend: lower an optimized fxopt graph to CPU (llvm) or CUDA (sm_90) code.

    run = compile(opt, target="cpu")            # callable: torch tensors in, model outputs out
    path = export(opt, "out_dir", target="cuda")  # model.so + params.bin + manifest.json + loader.py
    legalize(opt.exported_program())            # [] or raises UnsupportedOpError listing the nodes

For CUDA, GEMMs and attention go by default to library functions registered at load time
(``extern=True``; calling convention in convention.py, served by runtime.py through torch) and TVM
generates the fused kernels for everything else;
``extern=False`` keeps every kernel TVM-generated (dlight schedules). Weights are never compiled
into the library.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from fxopt import signature
from fxopt.api import OptimizedModule
from fxopt.capture import quiet
from fxopt.errors import BackendError, DeviceUnavailableError, UnsupportedOpError
from fxopt.widen import NOTE as widen_note
from fxopt.widen import widened

from . import convention, runtime
from .lower import ImporterError, Lowered, to_relax, unsupported_nodes

log = logging.getLogger(__name__)

__all__ = ["compile", "export", "legalize", "UnsupportedOpError"]


def _exported_program(opt: Any) -> torch.export.ExportedProgram:
    if isinstance(opt, torch.export.ExportedProgram):
        return opt
    if hasattr(opt, "exported_program"):
        return opt.exported_program()
    raise TypeError(f"expected an fxopt OptimizedModule or an ExportedProgram, not {type(opt).__name__}")


@quiet
def legalize(program: Any) -> list[str]:
    """Check that every node has a conversion; raise ``UnsupportedOpError`` naming those that don't.
    Accepts an ExportedProgram, an OptimizedModule, or a GraphModule from ``ep.module()``."""
    if isinstance(program, torch.fx.GraphModule) and not isinstance(program, torch.export.ExportedProgram):
        args = tuple(n.meta["val"] for n in program.graph.nodes if n.op == "placeholder" and "val" in n.meta)
        program = torch.export.export(program, args, strict=False) if args else program
    missing = unsupported_nodes(_exported_program(program))
    if missing:
        raise UnsupportedOpError("tvm", missing)
    _import(program, extern=False)  # the importer's own failures (ImporterError), before any build
    return missing


def _import(opt: Any, extern: bool, static: bool = False) -> Lowered:
    """The Relax module of ``opt``: with its dynamic dims, or, where TVM's importer fails on them and an import
    with the example inputs' static shapes works, with those (said in ``Lowered.notes`` and the manifest);
    ``static``: with those from the start."""
    if (wide := widened(opt) if isinstance(opt, OptimizedModule) else None) is not None:
        lowered = _import(wide, extern, static)  # TVM's layer_norm takes float32 and float16 only
        return dataclasses.replace(lowered, notes=(widen_note, *lowered.notes))
    module = getattr(opt, "graph_module", None)
    if static:
        return to_relax(opt.exported_program(dynamic=False), extern=extern, module=module)
    try:
        return to_relax(_exported_program(opt), extern=extern, module=module)
    except ImporterError as dynamic_error:
        if getattr(opt, "dynamic_shapes", None) is None:
            raise
        try:
            lowered = to_relax(opt.exported_program(dynamic=False), extern=extern, module=module)
        except UnsupportedOpError:
            raise dynamic_error from dynamic_error.__cause__
        note = (f"static shapes (the example inputs'): with dynamic dims {dynamic_error.nodes[0]}; calls at other "
                f"shapes are refused")
        log.warning("tvm: %s", note)
        return dataclasses.replace(lowered, notes=(*lowered.notes, note))


def _lower_and_build(opt: Any, target: str, extern: bool | None, **build_opts: Any) -> tuple[Lowered, Any]:
    from .build import build

    extern = (target == "cuda") if extern is None else extern
    lowered = _import(opt, extern)
    try:
        return lowered, build(lowered.mod, target, **build_opts)
    except TypeError:
        raise  # a build option that does not exist: the caller's
    except Exception as e:  # noqa: BLE001 - TVM's own (a legalization or codegen it lacks)
        error = BackendError("tvm", f"building for {target}", e)
        error.__cause__ = e
    # TVM's schedules cannot build some kernels over dynamic dims (a shared-memory stage of a symbolic size):
    # the example inputs' static shapes, said in the notes and the manifest, as for the importer's failures
    if getattr(opt, "dynamic_shapes", None) is None or any(n.startswith("static shapes") for n in lowered.notes):
        raise error
    first = str(error.__cause__).strip().splitlines()[-1][:160] if str(error.__cause__).strip() else "?"
    try:
        static = _import(opt, extern, static=True)
        built = build(static.mod, target, **build_opts)
    except Exception:  # noqa: BLE001 - the static build fails too: the dynamic one's error is the one to see
        raise error from error.__cause__
    note = (f"static shapes (the example inputs'): TVM's {target} build failed with dynamic dims ({first}); "
            f"calls at other shapes are refused")
    log.warning("tvm: %s", note)
    return dataclasses.replace(static, notes=(*static.notes, note)), built


def _manifest(lowered: Lowered, target: str, extern: bool) -> dict[str, Any]:
    return {
        "format": 2,
        "device": target if target == "cuda" else "cpu",
        "extern": extern,
        # the library calls the code makes, by which convention, and what serves them at run time
        "library_calls": convention.manifest_entry() if extern else None,
        "signature": lowered.signature.to_json(),
        "notes": list(lowered.notes),
        "param_names": lowered.param_names,
        "narrow_outputs": {str(i): n for i, n in lowered.narrow_outputs.items()},
        "index_bounds": [list(b) for b in lowered.index_bounds],
        "rewrites": [{"name": r.name, "applied": r.applied, "stats": dict(r.stats), "why_not": r.why_not,
                      "max_abs_err": r.numerics.max_abs if r.numerics else None} for r in lowered.rewrites],
    }


@quiet
def compile(opt: Any, target: str = "cpu", *, extern: bool | None = None, **build_opts: Any) -> runtime.Module:
    """Compile ``opt`` for ``target`` and return a callable taking the model's own arguments."""
    if target == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailableError("tvm: compile(target='cuda') runs the result here, and this machine has no "
                                     "CUDA device torch can use; export_tvm(..., target='cuda') builds an "
                                     "artifact for a GPU machine without one")
    lowered, ex = _lower_and_build(opt, target, extern, **build_opts)
    manifest = _manifest(lowered, target, (target == "cuda") if extern is None else extern)
    tvm = runtime.import_tvm_runtime(target == "cuda")
    if manifest["library_calls"] is not None:
        runtime.register_torch_externs()
    dev = "cuda" if target == "cuda" else "cpu"
    params = [tvm.runtime.from_dlpack(lowered.params[n].detach().to(dev).contiguous())
              for n in lowered.param_names]
    return runtime.Module(tvm, ex, dev, params, manifest, lowered.signature)


@quiet
def export(opt: Any, path: str | Path, target: str = "cpu", *, extern: bool | None = None,
           save_params: bool = True, **build_opts: Any) -> Path:
    """Write a deployable directory: ``model.so`` (kernels, no weights), ``params.bin``,
    ``manifest.json``, ``loader.py`` and the two modules it imports (TVM runtime and torch only, no fxopt).
    With ``save_params=False`` the weights are left out; ``loader.load(path, params=state_dict)`` then
    supplies them."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    lowered, ex = _lower_and_build(opt, target, extern, **build_opts)
    ex.export_library(str(path / runtime.LIBRARY))
    if save_params:
        _save_params(lowered, path / runtime.PARAMS)
    manifest = _manifest(lowered, target, (target == "cuda") if extern is None else extern)
    (path / runtime.MANIFEST).write_text(json.dumps(manifest, indent=1))
    shutil.copyfile(Path(runtime.__file__), path / "loader.py")
    sources = {"convention": Path(convention.__file__), "signature": Path(signature.__file__)}
    for name, module in runtime.ARTIFACT_MODULES.items():
        shutil.copyfile(sources[module], path / name)
    log.info("exported %s (%s, %d params)", path, target, len(lowered.param_names))
    return path


def _save_params(lowered: Lowered, file: Path) -> None:
    import tvm

    params = {n: tvm.runtime.tensor(lowered.params[n].detach().cpu().contiguous().numpy())
              for n in lowered.param_names if lowered.params[n].dtype != torch.bfloat16}
    params |= {n: tvm.runtime.from_dlpack(lowered.params[n].detach().cpu().contiguous())
               for n in lowered.param_names if lowered.params[n].dtype == torch.bfloat16}
    tvm.runtime.save_param_dict_to_file(params, str(file))
