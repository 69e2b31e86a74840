"""ONNX Runtime backend: export an optimized fxopt graph to ONNX (fused ops as ONNX / ORT contrib ops) and run
it in an onnxruntime InferenceSession.

    legalize(opt)                         [] or UnsupportedOpError listing every node without a translation
    export(opt, "model.onnx")             -> Path; the file passes onnx.checker (full check)
    run = compile(opt, target="cpu")      torch tensors in, the model's own output structure out

Fused ops map to (see translations.py): LayerNorm → LayerNormalization, RMSNorm → RMSNormalization (opset 23),
add + LayerNorm → com.microsoft.SkipLayerNormalization, add + RMSNorm → com.microsoft.SkipSimplifiedLayerNormalization,
int8 quantize → QuantizeLinear (uint8 codes), int8 linear → com.microsoft.MatMulIntegerToFloat.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fxopt.capture import quiet

from .export import DEFAULT_OPSET, ExportResult, OnnxExportError, default_opset, export_file, legalize, op_counts
from .runtime import InputMismatchError, OrtModule, RuntimeUnavailableError, session_options
from .translations import translation_table

log = logging.getLogger(__name__)

__all__ = ["export", "export_file", "compile", "legalize", "op_counts", "translation_table", "OrtModule",
           "ExportResult", "OnnxExportError", "RuntimeUnavailableError", "InputMismatchError",
           "DEFAULT_OPSET", "default_opset", "session_options"]


@quiet
def export(opt: Any, path: str | Path, *, dynamic: bool = True, opset: int | None = None,
           external_data: bool | None = None, ort_fusions: bool = False, optimize: bool = True,
           check: bool = True, extra_translations: Mapping[Any, Callable] | None = None,
           int8_gemm: str = "auto") -> Path:
    """Export `opt` to an ONNX file at `path` and return the path.

    dynamic:       keep the capture's dynamic batch/sequence dims (False: the example inputs' shapes)
    opset:         ONNX opset; default 20, or 23 when the graph holds an RMSNorm (RMSNormalization)
    external_data: weights in `<path>.data` (default: only above 1 GiB of weights)
    ort_fusions:   also run onnxscript's ONNX Runtime fusions (attention, GELU, skip-norm); logs their counts
    optimize:      run onnxscript's graph optimizer (constant folding, dead code) on the export
    check:         run onnx.checker.check_model(full_check=True) on the file
    extra_translations: {op overload: trace-only onnxscript function} for ops of your own (they take
                   precedence over fxopt's table)
    int8_gemm:     how int8 linears multiply (int8_gemm.py): "auto" (uint8·int8 where this CPU's ORT kernel is
                   exact, i.e. has VNNI, else uint8·uint8), "u8s8" or "u8u8"; the file's metadata records it
    """
    return export_file(opt, path, dynamic=dynamic, opset=opset, external_data=external_data,
                       ort_fusions=ort_fusions, optimize=optimize, check=check,
                       extra_translations=extra_translations, int8_gemm=int8_gemm).path


@quiet
def compile(opt: Any, target: str = "cpu", *, path: str | Path | None = None,  # noqa: A001
            graph_optimization_level: str = "all", intra_op_num_threads: int | None = None,
            optimized_model_path: str | Path | None = None, **export_options: Any) -> OrtModule:
    """Export `opt` (to `path`, or a temporary directory kept alive with the result) and open an
    InferenceSession on `target` ("cpu", or "cuda" with onnxruntime-gpu installed).

    graph_optimization_level: "disable" | "basic" | "extended" | "layout" | "all" (ORT's levels)
    intra_op_num_threads:     ORT's thread count (default: ORT's choice)
    optimized_model_path:     where ORT writes the graph after its own optimizations (to inspect them)
    export_options:           as for `export` (dynamic, opset, ort_fusions, ...)
    """
    from .runtime import providers_for

    providers_for(target)  # fail before the (slow) export when the provider is missing
    keep_alive = None
    if path is None:
        keep_alive = tempfile.mkdtemp(prefix="fxopt_ort_")  # removed with the OrtModule
        path = Path(keep_alive) / "model.onnx"
    try:
        info = export_file(opt, path, **export_options)
    except BaseException:
        if keep_alive is not None:
            shutil.rmtree(keep_alive, ignore_errors=True)
        raise
    options = session_options(graph_optimization_level, intra_op_num_threads, optimized_model_path)
    return OrtModule(info.path, info.io, target=target, options=options, export_info=info,
                     keep_alive=keep_alive)
