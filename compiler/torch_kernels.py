"""Fast torch-runtime kernels for fxopt's fused norm ops on CUDA (Triton), and the torch.compile path.

Eager: `rms_norm_cuda`, `add_layer_norm_cuda`, `add_rms_norm_cuda` are the ops' CUDA-key kernels (ops.py's
`cuda_kernel` slot). One Triton program per row reads x (and the residual) once, writes the sum and the norm
once, where the reference launches 4-8 kernels. They compute what the reference computes, in its order of
roundings: the residual sum is rounded to the input dtype before the statistics (as `x + residual` is), the
statistics are fp32, an RMSNorm is rounded to the input dtype before the weight multiply. Inputs the kernel does
not cover (not contiguous, mixed dtypes, fp64, rows wider than `MAX_ROW`, no Triton) run the reference, so the
output's layout is always the reference's (contiguous in, contiguous out).

torch.compile: `decomposed_graph(gm)` is a copy of an optimized graph whose fused-op calls are replaced by the
ops' declared decompositions (plain ATen code), so Inductor fuses the norm with its neighbours instead of
calling an opaque op. `OptimizedModule.forward` runs it while Dynamo traces; exported graphs keep the op.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping

import torch
from torch import fx

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the CUDA kernels fall back to the reference
    triton = None

log = logging.getLogger(__name__)

MAX_ROW = 32768  # one row lives in registers; wider rows run the reference
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

if triton is not None:

    @triton.jit
    def _norm_kernel(X, R, W, B, Y, S, N, eps, HAS_R: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                     RMS: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        keep = cols < N
        offs = row * N + cols
        x = tl.load(X + offs, mask=keep, other=0.0)
        if HAS_R:
            x = x + tl.load(R + offs, mask=keep, other=0.0)  # rounded to the input dtype, as x + residual is
            tl.store(S + offs, x, mask=keep)
        xf = x.to(tl.float32)
        if RMS:
            rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / N + eps)
            y = (xf * rstd).to(x.dtype).to(tl.float32)  # the reference rounds before the weight multiply
            if HAS_W:
                y = y * tl.load(W + cols, mask=keep, other=0.0).to(tl.float32)
        else:
            mean = tl.sum(xf, axis=0) / N
            d = tl.where(keep, xf - mean, 0.0)
            y = d * (1.0 / tl.sqrt(tl.sum(d * d, axis=0) / N + eps))
            if HAS_W:
                y = y * tl.load(W + cols, mask=keep, other=0.0).to(tl.float32)
            if HAS_B:
                y = y + tl.load(B + cols, mask=keep, other=0.0).to(tl.float32)
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=keep)


def _row_width(x: torch.Tensor, normalized_shape) -> int:
    n = 1
    for d in normalized_shape:
        n *= int(d)
    return n


def triton_covers(x: torch.Tensor, normalized_shape, *others: torch.Tensor | None) -> bool:
    """Whether the Triton kernel computes this call (else the reference does)."""
    if triton is None or not x.is_cuda or x.dtype not in _DTYPES or not x.is_contiguous() or x.numel() == 0:
        return False
    n = _row_width(x, normalized_shape)
    if n > MAX_ROW or tuple(x.shape[x.dim() - len(normalized_shape):]) != tuple(normalized_shape):
        return False
    for t in others:
        if t is not None and (t.dtype != x.dtype or not t.is_contiguous() or t.device != x.device):
            return False
    return True


def _launch(x, residual, weight, bias, eps: float, rms: bool, n: int):
    y = torch.empty_like(x)
    s = torch.empty_like(x) if residual is not None else None
    block = triton.next_power_of_2(n)
    warps = 1 if block <= 512 else 4 if block <= 4096 else 8 if block <= 8192 else 16
    _norm_kernel[(x.numel() // n,)](
        x, residual if residual is not None else x, weight if weight is not None else x,
        bias if bias is not None else x, y, s if s is not None else y, n, eps,
        HAS_R=residual is not None, HAS_W=weight is not None, HAS_B=bias is not None, RMS=rms, BLOCK=block,
        num_warps=warps)
    return y, s


def _reference(name: str) -> Callable:
    from . import ops  # ops imports this module to fill its cuda_kernel slots

    return getattr(ops, f"_{name}_ref")


def _weight_ok(x: torch.Tensor, weight, normalized_shape) -> bool:
    return weight is None or tuple(weight.shape) == tuple(normalized_shape)


def rms_norm_cuda(x, normalized_shape, weight, eps):
    if not (triton_covers(x, normalized_shape, weight) and _weight_ok(x, weight, normalized_shape)):
        return _reference("rms_norm")(x, normalized_shape, weight, eps)
    return _launch(x, None, weight, None, eps, True, _row_width(x, normalized_shape))[0]


def add_rms_norm_cuda(x, residual, normalized_shape, weight, eps):
    if not (triton_covers(x, normalized_shape, residual, weight) and residual.shape == x.shape
            and _weight_ok(x, weight, normalized_shape)):
        return _reference("add_rms_norm")(x, residual, normalized_shape, weight, eps)
    return _launch(x, residual, weight, None, eps, True, _row_width(x, normalized_shape))


def add_layer_norm_cuda(x, residual, normalized_shape, weight, bias, eps):
    if not (triton_covers(x, normalized_shape, residual, weight, bias) and residual.shape == x.shape
            and _weight_ok(x, weight, normalized_shape) and _weight_ok(x, bias, normalized_shape)):
        return _reference("add_layer_norm")(x, residual, normalized_shape, weight, bias, eps)
    return _launch(x, residual, weight, bias, eps, False, _row_width(x, normalized_shape))


def decomposed_graph(gm: fx.GraphModule, table: Mapping | None = None) -> fx.GraphModule:
    """A copy of `gm` (sharing its parameters; `gm` is left as it is) whose fused-op calls run the ops'
    decompositions instead (or the functions of `table`, keyed by op overload)."""
    from . import ops

    table = ops.decomposition_table() if table is None else table
    graph = fx.Graph()
    graph._codegen = copy.deepcopy(gm.graph._codegen)  # keeps the exported module's pytree signature
    out, old_output = graph.graph_copy(gm.graph, {}, return_output_node=True)
    graph.output(out, type_expr=old_output.type)
    return _retarget(gm, graph, table)


def reference_table() -> dict:
    """{op overload: its reference implementation}, for every fxopt op."""
    from . import ops

    return {op: decl.reference for op, decl in ops.REGISTRY.items()}


def eager_table() -> dict:
    """{op overload: the function eager runs for it}: the CUDA kernel where one is declared (it falls back to the
    reference off CUDA), else the reference. Calling it directly skips the dispatcher's Python-kernel hop
    (~10-30 us a call, measured: it made small fp16 models slower than the original on an H200)."""
    from . import ops

    return {op: decl.cuda_kernel or decl.reference for op, decl in ops.REGISTRY.items()}


def _retarget(gm: fx.GraphModule, graph: fx.Graph, table: Mapping) -> fx.GraphModule:
    swapped = 0
    for node in graph.nodes:
        if node.op == "call_function" and node.target in table:
            node.target = table[node.target]
            swapped += 1
    copy = fx.GraphModule(gm, graph, class_name="DecomposedGraphModule")
    for attr in ("_in_spec", "_out_spec"):
        if hasattr(gm, attr):
            setattr(copy, attr, getattr(gm, attr))
    log.debug("decomposed_graph: %d fused-op calls run their decompositions", swapped)
    return copy
