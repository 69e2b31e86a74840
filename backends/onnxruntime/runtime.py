"""Run an exported fxopt graph in an onnxruntime InferenceSession, with torch tensors in and out.

The call takes the model's own arguments (positional and keyword, as at capture) and binds them by name to
the captured signature (`fxopt.signature.Signature`, shared with the TVM runner): the tensors are fed by their
ONNX input names (inputs that were constants at export, such as `use_cache=False`, are checked and dropped),
and the model's own output structure (tuple, dict, Hugging Face ModelOutput) is rebuilt from ORT's outputs.
"""

from __future__ import annotations

import logging
import shutil
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fxopt.errors import BackendError, FxoptError, PassOptionError
from fxopt.signature import CONSTANT, InputMismatchError, Signature, check_index_bounds

__all__ = ["InputMismatchError", "OrtModule", "RuntimeUnavailableError", "providers_for", "session_options"]

log = logging.getLogger(__name__)

_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
           "layout": "ORT_ENABLE_LAYOUT", "all": "ORT_ENABLE_ALL"}
_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


class RuntimeUnavailableError(FxoptError):
    """The requested onnxruntime execution provider is not installed."""


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bfloat16:
            raise InputMismatchError(None, "bfloat16 inputs cannot be fed to onnxruntime from numpy")
        return value.detach().cpu().numpy()
    return np.asarray(value)  # SymInt inputs are 0-d int64 tensors in ONNX


def session_options(graph_optimization_level: str = "all", intra_op_num_threads: int | None = None,
                    optimized_model_path: str | Path | None = None):
    import onnxruntime as ort

    if graph_optimization_level not in _LEVELS:
        raise PassOptionError("compile", "graph_optimization_level", f"must be one of {list(_LEVELS)}, "
                              f"got {graph_optimization_level!r}")
    so = ort.SessionOptions()
    so.log_severity_level = 4  # fatal only: what fails reaches the caller as an exception, not a stderr line
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[graph_optimization_level])
    if intra_op_num_threads is not None:
        so.intra_op_num_threads = intra_op_num_threads
    if optimized_model_path is not None:
        so.optimized_model_filepath = str(optimized_model_path)
    return so


def providers_for(target: str) -> list[str]:
    import onnxruntime as ort

    if target not in _PROVIDERS:
        raise ValueError(f"target must be one of {list(_PROVIDERS)}, got {target!r}")
    available = ort.get_available_providers()
    wanted = _PROVIDERS[target]
    if wanted not in available:
        raise RuntimeUnavailableError(
            f"onnxruntime: target={target!r} needs the {wanted}, but this onnxruntime "
            f"({ort.__version__}, {ort.get_device()}) offers only {available}. Install the GPU build in its place "
            f"(`pip uninstall onnxruntime && pip install onnxruntime-gpu`) on a machine with CUDA, "
            f"or use target='cpu'.")
    return [wanted, "CPUExecutionProvider"] if wanted != "CPUExecutionProvider" else [wanted]


def _warn_if_int8_gemm_saturates(session: Any, path: Path) -> None:
    """A file exported for a CPU whose uint8·int8 GEMM is exact (int8_gemm.py), opened on one where it saturates."""
    from .int8_gemm import METADATA_KEY, u8s8_exact

    if session.get_modelmeta().custom_metadata_map.get(METADATA_KEY) == "u8s8" and not u8s8_exact():
        log.warning("onnxruntime: %s multiplies its int8 linears as uint8·int8, which saturates on this CPU "
                    "(no VNNI): re-export here (int8_gemm='auto' or 'u8u8') for the exact product", path.name)


class OrtModule:
    """A compiled model: `run(*args, **kwargs)` → the model's outputs as torch tensors."""

    def __init__(self, onnx_path: Path, io: Signature, *, target: str = "cpu", options: Any = None,
                 export_info: Any = None, keep_alive: Any = None):
        import onnxruntime as ort

        self.onnx_path = Path(onnx_path)
        self.target = target
        self.export_info = export_info
        self._io = io
        if keep_alive is not None:  # the temporary directory holding the file, if we made one
            weakref.finalize(self, shutil.rmtree, keep_alive, ignore_errors=True)
        providers = providers_for(target)
        try:
            self.session = ort.InferenceSession(str(self.onnx_path), sess_options=options, providers=providers)
        except Exception as e:  # noqa: BLE001 - ORT's own (a kernel it lacks, a graph it rejects)
            raise BackendError("onnxruntime", f"opening {self.onnx_path.name} on {target}", e) from e
        _warn_if_int8_gemm_saturates(self.session, self.onnx_path)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        n_tensors = sum(leaf.kind != CONSTANT for leaf in io.outputs)
        if n_tensors != len(self.output_names):
            raise FxoptError(f"onnxruntime: the ONNX graph has {len(self.output_names)} outputs, the model "
                             f"{n_tensors} tensor outputs")
        self._device = torch.device("cuda" if target == "cuda" else "cpu")

    @property
    def notes(self) -> list[str]:
        """What the export chose (bfloat16 computed in float32)."""
        return list(getattr(self.export_info, "notes", ()))

    @property
    def op_counts(self) -> Mapping[str, int]:
        return getattr(self.export_info, "op_counts", {})

    @property
    def fusion_counts(self) -> Mapping[str, int] | None:
        return getattr(self.export_info, "fusion_counts", None)

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def run_numpy(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        try:
            return self.session.run(None, dict(feeds))
        except Exception as e:  # noqa: BLE001 - ORT's own (a shape or value its kernels refuse)
            raise BackendError("onnxruntime", f"running {self.onnx_path.name}", e) from e

    def feeds(self, *args: Any, **kwargs: Any) -> dict[str, np.ndarray]:
        # the exporter drops inputs the graph does not read, and renames an input that is also an output
        # ("x" -> "x_orig", feeding an Identity)
        wanted = set(self.input_names)
        names = {n: n if n in wanted else f"{n}_orig" for n in self._io.input_names}
        flat = self._io.bind(args, kwargs)
        check_index_bounds(getattr(self.export_info, "index_bounds", ()), flat)  # ONNX's Gather wraps -1
        return {names[name]: _to_numpy(value) for name, value in zip(self._io.input_names, flat)
                if names[name] in wanted}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        results = self.run_numpy(self.feeds(*args, **kwargs))
        return self._io.unflatten([torch.from_numpy(np.ascontiguousarray(r)).to(self._device) for r in results])

    def __repr__(self) -> str:
        return f"OrtModule({self.onnx_path.name}, target={self.target!r}, providers={self.providers})"
