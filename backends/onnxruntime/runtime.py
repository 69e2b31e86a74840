"""Run an exported fxopt graph in an onnxruntime InferenceSession, with torch tensors in and out.

The call takes the model's own arguments (positional and keyword, as at capture), flattens them the way
torch.export did (`in_spec`), feeds the tensors by their ONNX input names (inputs that were constants at
export, such as `use_cache=False`, are checked and dropped), and rebuilds the model's own output structure
(`out_spec`: tuple, dict, Hugging Face ModelOutput) from ORT's flat outputs.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils import _pytree as pytree

from fxopt.errors import FxoptError

log = logging.getLogger(__name__)

_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
           "layout": "ORT_ENABLE_LAYOUT", "all": "ORT_ENABLE_ALL"}
_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


class RuntimeUnavailableError(FxoptError):
    """The requested onnxruntime execution provider is not installed."""


class InputMismatchError(FxoptError, TypeError):
    """The call's arguments are not structured like the example inputs the graph was exported with."""


@dataclasses.dataclass(frozen=True)
class _Constant:
    value: Any


@dataclasses.dataclass(frozen=True)
class IOSignature:
    """How the model's (args, kwargs) and outputs map onto the ONNX graph's flat inputs and outputs."""

    in_spec: pytree.TreeSpec
    inputs: tuple[str | _Constant, ...]  # per flat input leaf: its ONNX input name, or the constant baked in
    out_spec: pytree.TreeSpec
    outputs: tuple[int | _Constant, ...]  # per flat output leaf: index into ORT's outputs, or a constant
    # keyword arguments that were constants at export (use_cache=False): a call may leave them out
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, ep: torch.export.ExportedProgram) -> IOSignature:
        from torch.export.graph_signature import ConstantArgument

        def entry(spec):
            return _Constant(spec.arg.value) if isinstance(spec.arg, ConstantArgument) else spec.arg.name

        inputs = tuple(entry(s) for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT")
        outputs, k = [], 0
        for s in ep.graph_signature.output_specs:
            if s.kind.name != "USER_OUTPUT":
                continue
            if isinstance(s.arg, ConstantArgument):
                outputs.append(_Constant(s.arg.value))
            else:
                outputs.append(k)
                k += 1
        return cls(ep.call_spec.in_spec, inputs, ep.call_spec.out_spec, tuple(outputs),
                   _constant_kwargs(ep.call_spec.in_spec, inputs))

    def feeds(self, args: tuple, kwargs: dict, onnx_inputs: Sequence[str]) -> dict[str, np.ndarray]:
        kwargs = self._ordered(kwargs)
        with_paths, spec = pytree.tree_flatten_with_path((tuple(args), kwargs))
        if spec != self.in_spec:
            raise InputMismatchError(f"the inputs are structured as {spec}, but the graph was exported for "
                                     f"{self.in_spec}; pass them as at fxopt.optimize (same positional and "
                                     f"keyword arguments)")
        wanted = set(onnx_inputs)
        feeds: dict[str, np.ndarray] = {}
        for (path, leaf), entry in zip(with_paths, self.inputs):
            if isinstance(entry, _Constant):
                if not isinstance(leaf, torch.Tensor) and leaf != entry.value:
                    where = "args" + pytree.keystr(path[1:]) if path[0].idx == 0 else pytree.keystr(path[1:])
                    raise InputMismatchError(f"input {where} was the constant {entry.value!r} at export and is "
                                             f"{leaf!r} now; export again to change it")
                continue
            if entry in wanted:  # the exporter drops inputs the graph does not read
                feeds[entry] = _to_numpy(leaf)
        return feeds

    def _ordered(self, kwargs: dict) -> dict:
        keys = list(self.in_spec.child(1).context or []) if self.in_spec.num_children == 2 else []
        unknown = [k for k in kwargs if k not in keys]
        if unknown:
            raise InputMismatchError(f"unexpected keyword arguments {unknown}; the graph was exported with "
                                     f"keyword arguments {keys}")
        return {k: kwargs[k] if k in kwargs else self.defaults[k] for k in keys
                if k in kwargs or k in self.defaults}

    def rebuild(self, results: Sequence[np.ndarray], device: torch.device) -> Any:
        tensors = [torch.from_numpy(np.ascontiguousarray(r)).to(device) for r in results]
        leaves = [e.value if isinstance(e, _Constant) else tensors[e] for e in self.outputs]
        return pytree.tree_unflatten(leaves, self.out_spec)


def _constant_kwargs(in_spec: pytree.TreeSpec, inputs: Sequence[str | _Constant]) -> dict[str, Any]:
    if in_spec.num_children != 2:
        return {}
    args_spec, kwargs_spec = in_spec.child(0), in_spec.child(1)
    start, defaults = args_spec.num_leaves, {}
    for key, child in zip(kwargs_spec.context or [], kwargs_spec.children()):
        if child.is_leaf() and isinstance(inputs[start], _Constant):
            defaults[key] = inputs[start].value
        start += child.num_leaves
    return defaults


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bfloat16:
            raise InputMismatchError("bfloat16 inputs cannot be fed to onnxruntime from numpy")
        return value.detach().cpu().numpy()
    return np.asarray(value)  # SymInt inputs are 0-d int64 tensors in ONNX


def session_options(graph_optimization_level: str = "all", intra_op_num_threads: int | None = None,
                    optimized_model_path: str | Path | None = None):
    import onnxruntime as ort

    if graph_optimization_level not in _LEVELS:
        raise ValueError(f"graph_optimization_level must be one of {list(_LEVELS)}, "
                         f"got {graph_optimization_level!r}")
    so = ort.SessionOptions()
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


class OrtModule:
    """A compiled model: `run(*args, **kwargs)` → the model's outputs as torch tensors."""

    def __init__(self, onnx_path: Path, io: IOSignature, *, target: str = "cpu", options: Any = None,
                 export_info: Any = None, keep_alive: Any = None):
        import onnxruntime as ort

        self.onnx_path = Path(onnx_path)
        self.target = target
        self.export_info = export_info
        self._io = io
        self._keep_alive = keep_alive  # the temporary directory holding the file, if we made one
        self.session = ort.InferenceSession(str(self.onnx_path), sess_options=options,
                                            providers=providers_for(target))
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        n_tensors = sum(not isinstance(e, _Constant) for e in io.outputs)
        if n_tensors != len(self.output_names):
            raise FxoptError(f"onnxruntime: the ONNX graph has {len(self.output_names)} outputs, the model "
                             f"{n_tensors} tensor outputs")
        self._device = torch.device("cuda" if target == "cuda" else "cpu")

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
        return self.session.run(None, dict(feeds))

    def feeds(self, *args: Any, **kwargs: Any) -> dict[str, np.ndarray]:
        return self._io.feeds(args, kwargs, self.input_names)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._io.rebuild(self.run_numpy(self.feeds(*args, **kwargs)), self._device)

    def __repr__(self) -> str:
        return f"OrtModule({self.onnx_path.name}, target={self.target!r}, providers={self.providers})"
