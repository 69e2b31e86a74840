"""CUDA (sm_90) artifact built on a machine without a GPU: it must hold device code (a fatbin,
not CUDA source) and load with the TVM runtime only. Nothing here launches a kernel; the GPU run
is benchmarks/tvm_gpu.py (results in benchmarks/results/tvm_gpu.md)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

pytest.importorskip("tvm")
if shutil.which("nvcc") is None or (shutil.which("cc") or shutil.which("gcc")) is None:
    pytest.skip("the CUDA build needs nvcc and a C compiler", allow_module_level=True)

import fxopt  # noqa: E402
from fxopt import passes  # noqa: E402
from fxopt.backends import tvm as fxtvm  # noqa: E402
from fxopt.backends.tvm import build  # noqa: E402

from .test_tvm import ToyBlock  # noqa: E402

LOAD_RUNTIME_ONLY = """
import ctypes, os, sys
if sys.argv[2]:  # no driver on this machine: the build stub stands in for libcuda.so.1
    ctypes.CDLL(sys.argv[2], mode=ctypes.RTLD_GLOBAL)
sys.path.insert(0, sys.argv[1])
import loader
tvm = loader.import_tvm_runtime(cuda=True)
import tvm.base
assert "tvm_compiler" not in tvm.base._LOADED_LIBS, "the compiler library was loaded"
lib = tvm.runtime.load_module(os.path.join(sys.argv[1], "model.so"))
kinds, todo = [], [lib]
while todo:
    m = todo.pop()
    kinds.append(m.kind)
    todo.extend(m.imports)
print(" ".join(kinds))
"""


@pytest.fixture(scope="module")
def cuda_artifact(tmp_path_factory):
    model, ids = ToyBlock().eval(), torch.randint(0, 50, (2, 8))
    opt = fxopt.optimize(model, (ids,), passes=list(passes.EXACT_PIPELINE))
    return fxtvm.export(opt, tmp_path_factory.mktemp("cuda") / "toy", target="cuda")


def test_cuda_artifact_holds_sm90_device_code_and_no_weights(cuda_artifact):
    lib = (cuda_artifact / "model.so").read_bytes()
    assert build.has_device_code(cuda_artifact / "model.so"), "no fatbin/cubin: CUDA source only?"
    assert b"__global__" not in lib, "CUDA source embedded"
    assert b"sm_90" in lib
    manifest = json.loads((cuda_artifact / "manifest.json").read_text())
    assert manifest["device"] == "cuda" and manifest["extern"] is True
    weights = sum(p.numel() * p.element_size() for p in ToyBlock().parameters())
    assert (cuda_artifact / "params.bin").stat().st_size >= weights
    assert len(lib) < 2 * 1024 * 1024  # kernels only


def test_cuda_artifact_loads_with_the_runtime_only(cuda_artifact):
    driver = shutil.which("nvidia-smi") is not None
    stub = "" if driver else str(build._build_stub())
    env = dict(os.environ, TVM_USE_RUNTIME_LIB="1")
    res = subprocess.run([sys.executable, "-c", LOAD_RUNTIME_ONLY, str(cuda_artifact), stub],
                         env=env, capture_output=True, text=True, check=True)
    assert "cuda" in res.stdout.split(), res.stdout + res.stderr


def test_a_w8a8_llama_builds_cuda_code_with_static_shapes_where_dynamic_dims_fail(tmp_path):
    # TVM's schedule of the tiny Llama's RoPE table stages a symbolic-size buffer in shared memory, which its
    # CUDA build refuses: the artifact is built at the example inputs' shapes instead, and says so
    from fxopt.passes import FuseInt8, FuseLayerNorm, ZeroQuant
    from tests.models import hf

    model, _ = hf.build("llama", attn="sdpa", layers=1)
    args, kwargs = hf.inputs("llama", 2, 8)
    opt = fxopt.optimize(model, args, example_kwargs=kwargs,
                         passes=[FuseLayerNorm(), ZeroQuant(weight_bits=8, group_size=1, act="token"), FuseInt8()])
    path = fxtvm.export(opt, tmp_path / "w8a8", target="cuda")
    assert build.has_device_code(path / "model.so")
    manifest = json.loads((path / "manifest.json").read_text())
    assert any("build failed with dynamic dims" in n for n in manifest["notes"])
    shapes = [leaf["shape"] for a in manifest["signature"]["arguments"] for leaf in a["leaves"] if leaf["shape"]]
    assert shapes == [[2, 8]]
