"""Run a compiled fxopt TVM module: needs only the TVM *runtime* (and torch, for torch I/O and the
library GEMM/attention functions). This file is copied into every exported artifact as
``loader.py`` and must not import fxopt or the TVM compiler.

    import loader                                  # from the artifact directory
    run = loader.load(".", device="cuda")           # or params={name: tensor} to supply weights
    logits = run(input_ids)                         # torch tensors in, torch tensors out

Library functions (``fxopt.linear`` ...) are registered with the TVM runtime at load time; each
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

log = logging.getLogger(__name__)

MANIFEST, LIBRARY, PARAMS = "manifest.json", "model.so", "params.bin"


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

    def heads_major(t: Any, mode: int, offset: int, heads: int, width: int) -> Any:
        if mode == 2:
            t = t[..., offset:offset + width].unflatten(-1, (heads, width // heads))
        return t.transpose(1, 2) if mode else t

    def sdpa(q: Any, k: Any, v: Any, *rest: Any) -> Any:
        # rest: [mask], scale, is_causal, out_bshd, 3 x (mode, offset, heads, width); returns out
        mask = T(rest[0]) if len(rest) == 16 else None
        scale, causal, out_bshd = rest[-15], bool(rest[-14]), bool(rest[-13])
        specs = [rest[-12 + 4 * i:len(rest) - 8 + 4 * i] for i in range(3)]
        q, k, v = (heads_major(T(t), *spec) for t, spec in zip((q, k, v), specs))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                           enable_gqa=q.shape[-3] != k.shape[-3])
        # fused kernels write [B, S, H, D] memory: returning that layout is free
        return tvm_ffi.from_dlpack((o.transpose(1, 2) if out_bshd else o).contiguous())

    for name, fn in {"linear": linear, "addmm": addmm, "matmul": matmul, "sdpa": sdpa}.items():
        tvm_ffi.register_global_func(f"fxopt.{name}", fn, override=True)


class Module:
    """A loaded VM callable with the model's (args, kwargs) and returning its output structure."""

    def __init__(self, tvm: Any, library: Any, device: str, params: list[Any], manifest: dict[str, Any],
                 out_spec: Any = None) -> None:
        self.tvm, self.device, self.manifest = tvm, device, manifest
        self.dev = tvm.cuda(0) if device == "cuda" else tvm.cpu(0)
        self.vm = tvm.runtime.vm.VirtualMachine(library, self.dev)
        self.main = self.vm["main"]
        self.params = params
        self.out_spec = out_spec
        self.positions: list[int] = manifest["input_positions"]
        self.narrow = {int(i): int(n) for i, n in manifest.get("narrow_outputs", {}).items()}

    def _flat_inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
        from torch.utils._pytree import tree_flatten

        keys = self.manifest.get("kwarg_keys") or []
        if kwargs:  # torch.export flattens kwargs in the order they had at export
            kwargs = {k: kwargs[k] for k in keys if k in kwargs} | {k: kwargs[k] for k in kwargs if k not in keys}
        leaves, _ = tree_flatten((tuple(args), dict(kwargs)))
        return [leaves[i] for i in self.positions]

    def run_flat(self, inputs: list[Any]) -> list[Any]:
        import torch

        tv = [self.tvm.runtime.from_dlpack(t.contiguous()) for t in inputs]
        out = self.main(*tv, *self.params)
        outs = [torch.from_dlpack(o) for o in (list(out) if not hasattr(out, "__dlpack__") else [out])]
        for i, n in self.narrow.items():  # computed with a padded last dim (aligned GEMM)
            outs[i] = outs[i][..., :n]
        return outs

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.structure(self.run_flat(self._flat_inputs(args, kwargs)))

    def structure(self, flat: list[Any]) -> Any:
        if self.out_spec is None:
            return flat[0] if len(flat) == 1 else tuple(flat)
        from torch.utils._pytree import tree_unflatten

        return tree_unflatten(flat, self.out_spec)


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
    tvm = import_tvm_runtime(device == "cuda")
    if manifest.get("extern"):
        register_torch_externs()
    library = tvm.runtime.load_module(str(path / LIBRARY))
    dev = tvm.cuda(0) if device == "cuda" else tvm.cpu(0)
    if params is None:
        stored = tvm.runtime.load_param_dict_from_file(str(path / PARAMS))
        plist = [tvm.runtime.tensor(stored[n].numpy(), dev) for n in manifest["param_names"]]
    else:
        plist = [tvm.runtime.from_dlpack(params[n].detach().contiguous()) for n in manifest["param_names"]]
    out_spec = None
    try:
        from torch.utils._pytree import treespec_loads

        out_spec = treespec_loads(manifest["out_spec"]) if manifest.get("out_spec") else None
    except Exception as err:  # the output type may not be importable here: return a flat tuple
        log.warning("output structure not restored (%s); returning flat outputs", err)
    return Module(tvm, library, device, plist, manifest, out_spec)
