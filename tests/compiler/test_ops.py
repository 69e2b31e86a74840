"""The op registry: every fxopt op is declared once, its fake kernel keeps the reference's memory layout, and
the registry check reports an op that a backend cannot lower."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

from fxopt import ops
from fxopt.backends import BACKENDS, missing_lowerings
from fxopt.ops import OpDecl
from fxopt.quant_ops import pack_int4, quantize_weight_groups, quantize_weight_int8
from tests.compiler import quant_fused_cases

QUANTIZE_UINT8, UINT8_LINEAR = torch.ops.fxopt.quantize_uint8.default, torch.ops.fxopt.uint8_linear.default
INT4_LINEAR = torch.ops.fxopt.int4_linear.default

SHAPE = (2, 3, 4, 8)  # the last dim is normalized
LAYOUTS = [p for p in itertools.permutations(range(4))]  # memory order of the dims


def laid_out(order: tuple[int, ...], dtype: torch.dtype, step: int = 1) -> torch.Tensor:
    """A tensor of SHAPE whose dims are stored in `order` (outermost first); step > 1 strides the last dim."""
    stored = [SHAPE[d] for d in order]
    stored[order.index(3)] *= step
    t = torch.randn(stored, dtype=torch.float32).to(dtype).permute(*[order.index(d) for d in range(4)])
    return t[..., ::step] if step > 1 else t


def quant_args(op: torch._ops.OpOverload, x: torch.Tensor, with_weight: bool) -> list:
    """The int8 family: `x` (laid out) is quantized; int8_linear reads its codes and per-token scales."""
    channels = SHAPE[-1]
    pre = torch.rand(channels) + 0.5 if with_weight else None
    if op is ops.quantize_int8:
        return [x, pre, None, "token" if with_weight else "tensor"]
    if op is QUANTIZE_UINT8:
        return [x, pre]
    wq, ws = quantize_weight_int8(torch.randn(5, channels))
    bias = torch.randn(5) if with_weight else None
    if op is UINT8_LINEAR:
        return [*QUANTIZE_UINT8(x, pre), wq, ws, bias, x.dtype]
    if op is INT4_LINEAR:
        w4, s4 = quantize_weight_groups(torch.randn(5, channels), 4, 1)
        return [*ops.quantize_int8(x, pre, None, "token"), pack_int4(w4), s4, bias, x.dtype]
    return [*ops.quantize_int8(x, pre, None, "token"), wq, ws, bias, x.dtype]


def op_args(op: torch._ops.OpOverload, x: torch.Tensor, other: torch.Tensor, with_weight: bool) -> list:
    """Arguments for `op` from its schema: tensors named x / residual get the laid-out inputs."""
    if op in quant_fused_cases.OPS:
        return quant_fused_cases.args(op, x, other, with_weight)
    if op in (ops.quantize_int8, ops.int8_linear, QUANTIZE_UINT8, UINT8_LINEAR, INT4_LINEAR):
        return quant_args(op, x, with_weight)
    args = []
    for a in op._schema.arguments:
        kind = str(a.type)
        if a.name == "x":
            args.append(x)
        elif a.name == "residual":
            args.append(other)
        elif kind in ("SymInt[]", "List[int]"):
            args.append([SHAPE[-1]])
        elif kind in ("Tensor?", "Optional[Tensor]"):
            args.append(torch.rand(SHAPE[-1], dtype=x.dtype) + 0.5 if with_weight else None)
        elif kind == "float":
            args.append(1e-5)
        else:
            raise AssertionError(f"{op}: no test input for argument {a.name}: {kind}")
    return args


def outputs(value) -> list[torch.Tensor]:
    return list(value) if isinstance(value, tuple | list) else [value]


def assert_fake_matches_reference(op, args) -> None:
    real = outputs(op(*args))
    with FakeTensorMode() as mode:
        fake = outputs(op(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]))
    for i, (r, f) in enumerate(zip(real, fake, strict=True)):
        assert (f.shape, f.dtype, f.stride()) == (r.shape, r.dtype, r.stride()), (op, i)


@settings(max_examples=40, deadline=None)
@given(op=st.sampled_from(list(ops.REGISTRY)), order=st.sampled_from(LAYOUTS), other=st.sampled_from(LAYOUTS),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), step=st.sampled_from([1, 2]),
       with_weight=st.booleans())
def test_fake_kernels_keep_the_reference_layout(op, order, other, dtype, step, with_weight):
    x, r = laid_out(order, dtype, step), laid_out(other, dtype)
    assert_fake_matches_reference(op, op_args(op, x, r, with_weight))


def test_a_norm_after_a_head_transpose_keeps_the_transposed_layout():
    """Gemma3's q/k-norm: the output of a norm over head_dim on [B, H, T, D] stored [B, T, H, D] must be stored
    [B, T, H, D] too, so that the model's `.transpose(1, 2).view(B, T, -1)` is valid on the fake as in eager."""
    x = torch.randn(2, 5, 4, 8).transpose(1, 2)
    with FakeTensorMode() as mode:
        y = ops.rms_norm(mode.from_tensor(x), [8], None, 1e-6)
        assert y.transpose(1, 2).is_contiguous()


def test_the_registry_lists_every_fxopt_op_once_with_its_declaration():
    assert list(ops.REGISTRY) == list(ops.FUSED_OPS)
    names = [decl.name for decl in ops.REGISTRY.values()]
    assert len(names) == len(set(names))
    assert {"rms_norm", "add_layer_norm", "add_rms_norm", "quantize_int8", "int8_linear"} <= set(names)
    defined = {n for n in dir(torch.ops.fxopt) if isinstance(getattr(torch.ops.fxopt, n), torch._ops.OpOverloadPacket)}
    assert defined == set(names)  # nothing defined in the namespace outside the registry
    for op, decl in ops.REGISTRY.items():
        assert op.namespace == ops.NAMESPACE and op._schema.name == f"fxopt::{decl.name}" and decl.doc


def test_every_fxopt_op_lowers_in_every_backend():
    assert missing_lowerings() == []
    for op in ops.REGISTRY:
        assert all(op in backend.lowerings for backend in BACKENDS.values()), op


_test_lib = torch.library.Library("fxopt_test_registry", "DEF")


def _double(x):
    return x * 2


THROWAWAY = ops.define_all((OpDecl("double", "(Tensor x) -> Tensor", _double, doc="2x",
                                   decomposition=_double),), _test_lib)


def test_the_registry_check_reports_an_op_without_a_tvm_lowering():
    (op,) = THROWAWAY
    registry = {**ops.REGISTRY, **THROWAWAY}
    tables = {name: dict(backend.lowerings) for name, backend in BACKENDS.items()}
    tables["onnxruntime"][op] = object()  # an ONNX translation, but no TVM lowering
    assert missing_lowerings(registry, tables) == [f"tvm: {op}"]
    tables["tvm"][op] = object()
    assert missing_lowerings(registry, tables) == []


def test_a_declared_op_runs_its_reference_and_exposes_its_decomposition():
    (op,) = THROWAWAY
    x = torch.randn(3, 4).t()
    assert torch.equal(op(x), 2 * x)
    assert_fake_matches_reference(op, [x])
    assert ops.decomposition_table({**ops.REGISTRY, **THROWAWAY})[op] is _double
    # every fused norm and quantizer declares one (torch.compile fuses through it); the int8 linears are opaque
    decomposed = set(ops.decomposition_table())
    assert {ops.rms_norm, ops.add_rms_norm, ops.add_layer_norm, ops.quantize_int8, QUANTIZE_UINT8} <= decomposed
    assert not decomposed & {ops.int8_linear, UINT8_LINEAR}


@pytest.mark.parametrize("op", list(ops.REGISTRY))
def test_registry_ops_match_their_reference_in_eager(op):
    x, r = laid_out((0, 2, 1, 3), torch.float32), laid_out((0, 1, 2, 3), torch.float32)
    args = op_args(op, x, r, with_weight=True)
    ref = outputs(ops.REGISTRY[op].reference(*args))
    for a, b in zip(outputs(op(*args)), ref, strict=True):
        assert torch.equal(a, b)
