"""Targets, Relax pipelines and the build itself, for llvm (CPU) and CUDA (sm_90).

CUDA without a GPU. TVM's CUDA runtime module (``libtvm_runtime_cuda.so``) links the driver
``libcuda.so.1``. Where no driver exists that library fails to load, TVM then has no CUDA module
type, and ``tvm.compile`` silently embeds CUDA *source* (no nvcc call, no device code). So, when
the CUDA runtime module is not loaded yet, ``ensure_cuda_codegen`` compiles a stub driver
(``cudastub.py``, every call answers "no device") with the host C compiler, loads it
``RTLD_GLOBAL`` so that it satisfies the ``libcuda.so.1`` dependency by soname, then loads
``libtvm_runtime_cuda.so``. This works after ``import tvm`` too. Kernels are compiled by nvcc to
a fatbin for ``arch`` through our ``tvm_callback_cuda_compile`` (no Target scope or env needed).
On a machine with a GPU the real driver is used and the stub is never built.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import tvm
import tvm_ffi
from tvm import relax

from . import cudastub
from .schedules import VectorizedElementwise

log = logging.getLogger(__name__)

CUDA_ARCH = "sm_90"


def make_target(target: str, arch: str = CUDA_ARCH) -> tvm.target.Target:
    if target == "cpu":
        return tvm.target.Target({"kind": "llvm"})
    if target == "cuda":
        return tvm.target.Target({"kind": "cuda", "arch": arch}, host={"kind": "llvm"})
    raise ValueError(f"target must be 'cpu' or 'cuda', not {target!r}")


def _stub_path() -> Path:
    digest = hashlib.sha256(cudastub.SOURCE.encode()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fxopt" / f"cudastub-{digest}"
    return cache / "libcuda.so.1"


def _build_stub() -> Path:
    lib = _stub_path()
    if lib.exists():
        return lib
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("building CUDA code without a GPU needs a C compiler for the driver stub")
    lib.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "cudastub.c"
        src.write_text(cudastub.SOURCE)
        out = Path(tmp) / "libcuda.so.1"
        subprocess.run([cc, "-shared", "-fPIC", "-O1", "-Wl,-soname,libcuda.so.1", "-o", str(out), str(src)],
                       check=True, capture_output=True)
        shutil.move(str(out), lib)
    return lib


def _load_cuda_runtime_module() -> None:
    from tvm.base import _LOADED_LIBS
    from tvm_ffi.libinfo import load_lib_ctypes

    libdir = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent
    _LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(
        package="tvm", target_name="tvm_runtime_cuda", extra_lib_paths=[libdir], mode="RTLD_LOCAL")


def ensure_cuda_codegen(arch: str = CUDA_ARCH, fast_math: bool = False) -> None:
    """Make ``tvm.compile`` for CUDA emit a device binary (fatbin via nvcc) on any machine."""
    if tvm_ffi.get_global_func("ffi.Module.create.cuda", allow_missing=True) is None:
        try:
            _load_cuda_runtime_module()
        except (OSError, RuntimeError):
            stub = _build_stub()
            log.info("no CUDA driver here; loading the build stub %s", stub.name)
            ctypes.CDLL(str(stub), mode=ctypes.RTLD_GLOBAL)
            _load_cuda_runtime_module()
    if tvm_ffi.get_global_func("ffi.Module.create.cuda", allow_missing=True) is None:
        raise RuntimeError("TVM's CUDA runtime module could not be loaded; CUDA code would be source only")
    if shutil.which("nvcc") is None:
        raise RuntimeError("the CUDA build needs nvcc on PATH")

    from tvm.support import nvcc

    def compile_cuda(code: str) -> bytes:
        prev = os.environ.get("TVM_CUDA_NVCC_NO_FAST_MATH")
        if not fast_math:
            os.environ["TVM_CUDA_NVCC_NO_FAST_MATH"] = "1"
        try:
            return nvcc.compile_cuda(code, target_format="fatbin", arch=arch, compiler="nvcc")
        finally:
            if prev is None:
                os.environ.pop("TVM_CUDA_NVCC_NO_FAST_MATH", None)

    tvm_ffi.register_global_func("tvm_callback_cuda_compile", compile_cuda, override=True)


def gpu_pipeline(target: tvm.target.Target) -> tvm.transform.Pass:
    """dispatch sort/scan -> legalize -> fuse -> dlight GPU schedules -> VM lowering (TVM's CUDA
    pipeline, spelled out so that the schedule rules are ours to choose)."""
    from tvm.s_tir import dlight as dl

    backend = relax.backend.cuda.pipeline

    @tvm.transform.module_pass(opt_level=0)
    def _pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        passes = [relax.transform.DeadCodeElimination()]  # e.g. transposes the library reads strided
        passes += backend.library_dispatch_passes(target) + [  # sort/scan (cumsum) -> GPU kernels
            relax.transform.LegalizeOps(),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(),
            relax.transform.FuseOps(),
            relax.transform.FuseTIR(),
            dl.ApplyDefaultSchedule(
                dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.LowBatchGEMV(), dl.gpu.Reduction(),
                dl.gpu.GeneralReduction(), dl.gpu.Transpose(), VectorizedElementwise(), dl.gpu.Fallback()),
        ]
        passes += backend.dataflow_lower_passes(target) + backend.finalize_passes(target)
        with target:
            return tvm.transform.Sequential(passes)(mod)

    return _pipeline


def build(mod: tvm.IRModule, target: str, *, arch: str = CUDA_ARCH, fast_math: bool = False,
          cuda_graph: bool = False) -> Any:
    """Compile a Relax module to a VM executable for ``target`` ("cpu" or "cuda").
    ``cuda_graph`` turns on TVM's own CUDA-graph rewriting (not measured with library calls;
    ``runtime.CUDAGraphed`` is the measured way)."""
    tgt = make_target(target, arch)
    if target == "cpu":
        return tvm.compile(mod, target=tgt)
    ensure_cuda_codegen(arch, fast_math)
    config = {"relax.backend.use_cuda_graph": bool(cuda_graph)}
    with tgt, tvm.transform.PassContext(opt_level=3, config=config):
        return tvm.compile(mod, target=tgt, relax_pipeline=gpu_pipeline(tgt))


def has_device_code(library: Path) -> bool:
    """True when a compiled library embeds a CUDA fatbin or cubin (not only CUDA source)."""
    data = Path(library).read_bytes()
    fatbin_magic = (0xBA55ED50).to_bytes(4, "little")
    return fatbin_magic in data or b"\x7fELF\x02\x01\x01\x33" in data  # cubin: ELF with CUDA OS ABI
