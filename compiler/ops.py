"""fxopt's fused operators: each declared once, as an `OpDecl`, and defined as a torch.library op from it.

    rms_norm(x, shape, w, eps)             = w * (x32 * rsqrt(mean(x32², trailing dims) + eps)).to(x.dtype)
    add_layer_norm(x, r, shape, w, b, eps) = (layer_norm(x + r, shape, w, b, eps), x + r)
    add_rms_norm(x, r, shape, w, eps)      = (rms_norm(x + r, shape, w, eps), x + r)

The sum output gives SkipLayerNormalization semantics: the residual stream stays available to later users.
RMSNorm statistics are computed in fp32 (fp64 for fp64 inputs), as Llama-style implementations do.
Each op's decomposition is its reference (already plain ATen code), so torch.compile computes the same function;
the CUDA kernels are Triton (compiler/torch_kernels.py).

`REGISTRY` maps each op overload to its declaration; the backends' lowering tables are checked against it
(`fxopt.backends.missing_lowerings`). A declaration holds:

  schema         the torch.library schema (without the name)
  reference      the eager implementation (CompositeExplicitAutograd): the op's definition
  fake           the shape/dtype/stride function for FakeTensor tracing; None means the reference itself run on
                 fake tensors, so the output layout (strides) is the reference's by construction. A hand-written
                 fake must return the reference's strides too (tests/compiler/test_ops.py checks every op).
  decomposition  optional: the op in ATen ops that torch.compile (Inductor) can fuse through, with the
                 reference's signature; `decomposition_table()` hands them to a compiler (e.g.
                 `torch.compile(..., options=...)` or `torch._inductor.decomposition.register_decomposition`).
                 Left out of torch.export, so exported graphs keep the fused op for the backends.
  cuda_kernel    optional: a fast eager kernel registered for the CUDA dispatch key (the reference serves every
                 other device); it must return the reference's values (within the op's rounding) and layout.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from . import quant_asym, quant_fused, quant_ops, torch_kernels

NAMESPACE = "fxopt"


@dataclass(frozen=True)
class OpDecl:
    """One fused op, declared once; `define` makes it a torch.library op and returns its overload."""

    name: str
    schema: str  # "(Tensor x, ...) -> Tensor"
    reference: Callable
    doc: str
    fake: Callable | None = None
    decomposition: Callable | None = None
    cuda_kernel: Callable | None = None

    def define(self, lib: torch.library.Library) -> torch._ops.OpOverload:
        lib.define(f"{self.name}{self.schema}")
        lib.impl(self.name, self.reference, "CompositeExplicitAutograd")
        torch.library.register_fake(f"{lib.ns}::{self.name}", self.fake or self.reference, lib=lib)
        if self.cuda_kernel is not None:
            lib.impl(self.name, self.cuda_kernel, "CUDA")
        return getattr(getattr(torch.ops, lib.ns), self.name).default


def define_all(decls: tuple[OpDecl, ...], lib: torch.library.Library) -> dict[torch._ops.OpOverload, OpDecl]:
    """Define `decls` in `lib`; the registry of the result (overload -> declaration), in declaration order."""
    return {decl.define(lib): decl for decl in decls}


def _rms_norm_ref(x: torch.Tensor, normalized_shape, weight, eps: float) -> torch.Tensor:
    if x.dtype in (torch.float32, torch.float64) and (weight is None or weight.dtype == x.dtype) \
            and x.is_contiguous():  # (its output is contiguous: a transposed input keeps the composition)
        # the same roundings (statistics in x's dtype, the weight multiply last) in one ATen kernel, which on
        # the CPU is ~1.4x faster than the composition below for rows up to 2048 wide
        return torch.nn.functional.rms_norm(x, list(normalized_shape), weight, eps)
    dims = tuple(range(-len(normalized_shape), 0))
    xc = x.to(torch.promote_types(x.dtype, torch.float32))  # fp32 statistics, or fp64 for fp64
    y = (xc * torch.rsqrt(xc.pow(2).mean(dims, keepdim=True) + eps)).to(x.dtype)
    return y if weight is None else weight * y


def _add_layer_norm_ref(x, residual, normalized_shape, weight, bias, eps):
    s = x + residual
    return torch.nn.functional.layer_norm(s, normalized_shape, weight, bias, eps), s


def _add_rms_norm_ref(x, residual, normalized_shape, weight, eps):
    s = x + residual
    return _rms_norm_ref(s, normalized_shape, weight, eps), s


DECLARATIONS = (
    OpDecl("rms_norm", "(Tensor x, SymInt[] normalized_shape, Tensor? weight, float eps) -> Tensor",
           _rms_norm_ref, doc="RMSNorm over the trailing `normalized_shape` dims, fp32 statistics",
           decomposition=_rms_norm_ref, cuda_kernel=torch_kernels.rms_norm_cuda),
    OpDecl("add_layer_norm", "(Tensor x, Tensor residual, SymInt[] normalized_shape, Tensor? weight, "
           "Tensor? bias, float eps) -> (Tensor, Tensor)",
           _add_layer_norm_ref, doc="(layer_norm(x + residual), x + residual): residual add + LayerNorm",
           decomposition=_add_layer_norm_ref),  # aten.layer_norm is a fused kernel already: a Triton one
           # saved less than its launch costs on an H200 (benchmarks/results/torch_gpu.md)
    OpDecl("add_rms_norm", "(Tensor x, Tensor residual, SymInt[] normalized_shape, Tensor? weight, "
           "float eps) -> (Tensor, Tensor)",
           _add_rms_norm_ref, doc="(rms_norm(x + residual), x + residual): residual add + RMSNorm",
           decomposition=_add_rms_norm_ref, cuda_kernel=torch_kernels.add_rms_norm_cuda),
    *quant_ops.declarations(),  # quantize_int8, int8_linear (the int8 family's convention: compiler/quant_ops.py)
    *quant_asym.declarations(),  # asymmetric per-tensor activations (uint8 codes with a zero point)
    *quant_fused.declarations(),  # quantize fused into its producer, dequantize into the GEMM epilogue
)

_lib = torch.library.Library(NAMESPACE, "DEF")
REGISTRY: Mapping[torch._ops.OpOverload, OpDecl] = define_all(DECLARATIONS, _lib)


def decomposition_table(registry: Mapping[torch._ops.OpOverload, OpDecl] = REGISTRY) -> dict:
    """{op overload: decomposition} for the ops that declare one (for torch.compile / Inductor)."""
    return {op: decl.decomposition for op, decl in registry.items() if decl.decomposition is not None}


rms_norm = torch.ops.fxopt.rms_norm.default
add_layer_norm = torch.ops.fxopt.add_layer_norm.default
add_rms_norm = torch.ops.fxopt.add_rms_norm.default
quantize_int8 = torch.ops.fxopt.quantize_int8.default
int8_linear = torch.ops.fxopt.int8_linear.default
FUSED_OPS = tuple(REGISTRY)
