"""Run a compiled fxopt TVM module: needs only the TVM *runtime* (and torch, for torch I/O and the
library GEMM/attention functions). This file is copied into every exported artifact as
``loader.py``, beside copies of ``convention.py`` (``fxopt_convention.py``) and of fxopt's
``signature.py`` (``fxopt_signature.py``), and must not import fxopt or the TVM compiler there.

    import loader                                  # from the artifact directory
    run = loader.load(".", device="cuda")           # or params={name: tensor} to supply weights
    logits = run(input_ids)                         # torch tensors in, torch tensors out

Inputs are bound by name to the captured signature (``Signature.bind``: keyword order does not matter,
wrong names and changed constants raise ``InputMismatchError``); the manifest carries it as JSON.

Library functions (``fxopt.linear`` ..., convention.py) are registered with the TVM runtime at load time; each
receives TVM tensors, views them as torch tensors through DLPack (no copy) and writes its result
into the output buffer the VM allocated, so GEMMs run in cuBLAS and attention in torch's fused
(flash / memory-efficient) kernels, on the stream TVM is launching on.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

if __package__:  # inside fxopt
    from fxopt.signature import Signature, check_index_bounds

    from . import convention
else:  # loader.py of an artifact: the copies beside it
    import fxopt_convention as convention  # type: ignore[no-redef]
    from fxopt_signature import Signature, check_index_bounds  # type: ignore[no-redef]

log = logging.getLogger(__name__)

MANIFEST, LIBRARY, PARAMS = "manifest.json", "model.so", "params.bin"
# the modules the loader imports, as copied into an artifact: {file name in the artifact: source module}
ARTIFACT_MODULES = {"fxopt_convention.py": "convention", "fxopt_signature.py": "signature"}


def import_tvm_runtime(cuda: bool) -> Any:
    """Import tvm, runtime-only when the compiler is not already loaded, plus the CUDA module."""
    if "tvm" not in sys.modules:
        os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")
    import tvm
    import tvm.runtime.vm  # noqa: F401  (not imported by tvm in runtime-only mode)
    import tvm_ffi

    if cuda and tvm_ffi.get_global_func("ffi.Module.load_from_bytes.cuda", allow_missing=True) is None:
        from tvm.base import _LOADED_LIBS
        from tvm_ffi.libinfo import load_lib_ctypes

        libdir = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent
        _LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(
            package="tvm", target_name="tvm_runtime_cuda", extra_lib_paths=[libdir], mode="RTLD_LOCAL")
    return tvm


def register_torch_externs() -> None:
    """Register the ``fxopt.*`` packed functions that ``convert.py`` emits with ``extern=True``."""
    import torch
    import torch.nn.functional as F
    import tvm_ffi

    T = torch.from_dlpack

    padded: dict[tuple[Any, ...], Any] = {}

    def pad_rows(t: Any, rows: int) -> Any:
        """``t`` zero-padded to ``rows`` rows, made once per weight (weights are constant)."""
        key = (t.data_ptr(), tuple(t.shape), t.dtype, rows)
        if key not in padded:
            padded[key] = torch.zeros((rows, *t.shape[1:]), dtype=t.dtype, device=t.device)
            padded[key][: t.shape[0]].copy_(t)
        return padded[key]

    def linear(x: Any, w: Any, *rest: Any) -> None:
        X, W, out = T(x), T(w), T(rest[-1])
        X2, out2 = X.reshape(-1, X.shape[-1]), out.view(-1, out.shape[-1])
        bias = T(rest[0]) if len(rest) == 2 else None
        if out2.shape[1] != W.shape[0]:  # N padded to a multiple of 8 (see convert.padded_output_width)
            W = pad_rows(W, out2.shape[1])
            bias = pad_rows(bias[:, None], out2.shape[1])[:, 0] if bias is not None else None
        if bias is not None:
            torch.addmm(bias, X2, W.t(), out=out2)
        else:
            torch.mm(X2, W.t(), out=out2)

    def addmm(bias: Any, x: Any, w: Any, out: Any) -> None:
        torch.addmm(T(bias), T(x), T(w), out=T(out))

    def matmul(a: Any, b: Any, out: Any) -> None:
        torch.matmul(T(a), T(b), out=T(out))

    def view(t: Any, spec: Any) -> Any:
        if spec.mode == convention.VIEW_PACKED:
            t = t[..., spec.offset:spec.offset + spec.width].unflatten(-1, (spec.heads, spec.width // spec.heads))
        return t.transpose(1, 2) if spec.mode != convention.VIEW_BHSD else t

    def sdpa(q: Any, k: Any, v: Any, *rest: Any) -> Any:
        mask, call = convention.decode_sdpa(rest)
        q, k, v = (view(T(t), spec) for t, spec in zip((q, k, v), call.views))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=T(mask) if mask is not None else None,
                                           is_causal=call.is_causal, scale=call.scale,
                                           enable_gqa=q.shape[-3] != k.shape[-3])
        # fused kernels write [B, S, H, D] memory: returning that layout is free
        return tvm_ffi.from_dlpack((o.transpose(1, 2) if call.out_bshd else o).contiguous())

    functions = {convention.LINEAR: linear, convention.ADDMM: addmm, convention.MATMUL: matmul, convention.SDPA: sdpa}
    if set(functions) != set(convention.FUNCTIONS):
        raise convention.ConventionError(f"the runtime registers {sorted(functions)}, convention {convention.VERSION} "
                                         f"declares {sorted(convention.FUNCTIONS)}")
    for name, fn in functions.items():
        tvm_ffi.register_global_func(name, fn, override=True)


class Module:
    """A loaded VM callable with the model's (args, kwargs) and returning its output structure."""

    def __init__(self, tvm: Any, library: Any, device: str, params: list[Any], manifest: dict[str, Any],
                 signature: Signature | None = None) -> None:
        self.tvm, self.device, self.manifest = tvm, device, manifest
        self.dev = tvm.cuda(0) if device == "cuda" else tvm.cpu(0)
        self.vm = tvm.runtime.vm.VirtualMachine(library, self.dev)
        self.main = self.vm["main"]
        self.params = params
        self.signature = signature or Signature.from_json(manifest["signature"])
        self.narrow = {int(i): int(n) for i, n in manifest.get("narrow_outputs", {}).items()}
        self.notes = list(manifest.get("notes", []))  # what the lowering chose (static shapes after a fallback)

    def _flat_inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
        flat = self.signature.bind(args, kwargs)
        check_index_bounds(self.manifest.get("index_bounds", []), flat)
        return flat

    def run_flat(self, inputs: list[Any]) -> list[Any]:
        import torch

        tv = [self.tvm.runtime.from_dlpack(t.contiguous()) for t in inputs]
        out = self.main(*tv, *self.params)
        # a size the model returns comes back as a Python int (a shape value of the VM), tensors by DLPack
        outs = [o if isinstance(o, int) else torch.from_dlpack(o)
                for o in (list(out) if not hasattr(out, "__dlpack__") else [out])]
        for i, n in self.narrow.items():  # computed with a padded last dim (aligned GEMM)
            outs[i] = outs[i][..., :n]
        return outs

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.structure(self.run_flat(self._flat_inputs(args, kwargs)))

    def structure(self, flat: list[Any]) -> Any:
        return self.signature.unflatten(flat)


class CUDAGraphed:
    """Replays a CUDA graph of one whole VM call per input signature (shapes, dtypes): TVM kernels
    and the library calls inside it are all captured, on torch's capture stream (the TVM runtime is
    pointed at it). Like torch.compile's "reduce-overhead", outputs are static buffers that the
    next call overwrites. Needs torch with CUDA."""

    def __init__(self, module: Module, warmup: int = 2) -> None:
        self.module, self.warmup = module, warmup
        self.graphs: dict[tuple[Any, ...], tuple[Any, list[Any], list[Any]]] = {}

    def _capture(self, flat: list[Any]) -> tuple[Any, list[Any], list[Any]]:
        import torch
        import tvm_ffi

        static_in = [t.clone() for t in flat]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with tvm_ffi.use_torch_stream(torch.cuda.stream(side)):
            for _ in range(self.warmup):  # warms the VM's memory pool: no cudaMalloc while capturing
                self.module.run_flat(static_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with tvm_ffi.use_torch_stream(torch.cuda.graph(graph)):
            static_out = self.module.run_flat(static_in)
        return graph, static_in, static_out

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        flat = self.module._flat_inputs(args, kwargs)
        key = tuple((tuple(t.shape), t.dtype) for t in flat)
        if key not in self.graphs:
            self.graphs[key] = self._capture(flat)
        graph, static_in, static_out = self.graphs[key]
        for dst, src in zip(static_in, flat):
            dst.copy_(src)
        graph.replay()
        return self.module.structure(static_out)


def load(path: str | Path = ".", device: str | None = None, params: dict[str, Any] | None = None) -> Module:
    """Load an artifact directory written by ``fxopt.export_tvm``. ``params`` (name -> tensor)
    replaces the stored weights, e.g. with a torch model's state_dict on the target device."""
    path = Path(path)
    manifest = json.loads((path / MANIFEST).read_text())
    device = device or manifest["device"]
    library_calls = manifest.get("library_calls")
    convention.check_manifest(library_calls)  # before anything loads: a clear error, not a missing function
    tvm = import_tvm_runtime(device == "cuda")
    if library_calls is not None:
        register_torch_externs()
    library = tvm.runtime.load_module(str(path / LIBRARY))
    dev = tvm.cuda(0) if device == "cuda" else tvm.cpu(0)
    if params is None:
        stored = tvm.runtime.load_param_dict_from_file(str(path / PARAMS))
        plist = [tvm.runtime.tensor(stored[n].numpy(), dev) for n in manifest["param_names"]]
    else:
        plist = [tvm.runtime.from_dlpack(params[n].detach().contiguous()) for n in manifest["param_names"]]
    return Module(tvm, library, device, plist, manifest)
