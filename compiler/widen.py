"""bfloat16 on backends that have no bfloat16 kernels: computed in float32, inputs and outputs kept bfloat16.

ONNX Runtime's CPU provider has no bfloat16 MatMul/Mul, TVM's layer_norm takes float32 and float16 only, and
`transformers` builds some bfloat16 tensors even inside float32 models. `widened(opt)` is a copy of the optimized
module with every bfloat16 parameter, buffer, constant and dtype argument made float32; a backend exports that
instead, and its runner (`Signature.widened`) casts bfloat16 inputs up and the outputs the model returns in
bfloat16 back down. The result is torch's bfloat16 model computed more precisely (each op rounds once to
float32, not to bfloat16), so it matches the bf16 module within bfloat16's rounding (TOLERANCE), not bitwise.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
from torch import fx
from torch.utils import _pytree as pytree

from .capture import SIGNATURE
from .decompositions import backend_decompositions, for_backends
from .pass_base import ROUNDING, Tolerance

# the contract of a widened program against the module it was widened from: bfloat16's rounding on every output
# (a float32 output of a model that rounds to bfloat16 inside carries that rounding)
TOLERANCE = Tolerance({dt: max(r, ROUNDING.rtol[torch.bfloat16]) for dt, r in ROUNDING.rtol.items()}, ROUNDING.atol)

NOTE = ("bfloat16 computed in float32 (the backend has no bfloat16 kernels); bfloat16 inputs and outputs stay "
        "bfloat16")


def has_bfloat16(gm: fx.GraphModule, args: tuple, kwargs: dict) -> bool:
    tensors = [*gm.parameters(), *gm.buffers(), *(t for t in pytree.tree_leaves((args, kwargs))
                                                   if isinstance(t, torch.Tensor))]
    if any(t.dtype == torch.bfloat16 for t in tensors):
        return True
    return any(_mentions_bfloat16(n) for n in gm.graph.nodes)


def _mentions_bfloat16(node: fx.Node) -> bool:
    """A bfloat16 dtype argument (`.to(torch.bfloat16)`, a factory's dtype=): every other op that computes in
    bfloat16 reads a bfloat16 input, parameter or constant."""
    return torch.bfloat16 in pytree.tree_leaves((node.args, node.kwargs))


def _float32(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.dtype == torch.bfloat16:
        return value.float()
    return torch.float32 if value is torch.bfloat16 else value


def widened(opt: Any) -> Any | None:
    """A float32 copy of `opt` (an OptimizedModule) where it computes anything in bfloat16; else None."""
    from .api import OptimizedModule

    gm = opt.graph_module
    if not has_bfloat16(gm, opt.example_inputs, opt.example_kwargs):
        return None
    table = backend_decompositions()
    if any(n.target in table for n in gm.graph.nodes if n.op == "call_function"):
        # ops with a bfloat16-only kernel (aten._grouped_mm on CPU) are written in core ATen first
        wide = for_backends(opt.exported_program()).module()
    else:
        wide = copy.deepcopy(gm)
    for name, t in [*wide.named_parameters(), *wide.named_buffers()]:
        if t.dtype == torch.bfloat16:
            owner, _, attr = name.rpartition(".")
            module = wide.get_submodule(owner) if owner else wide
            is_param = isinstance(t, torch.nn.Parameter)
            value = torch.nn.Parameter(t.detach().float(), requires_grad=False) if is_param else t.float()
            setattr(module, attr, value)
    for name, value in list(vars(wide).items()):  # lifted tensor constants
        if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
            setattr(wide, name, _float32(value))
    for node in wide.graph.nodes:
        node.args, node.kwargs = pytree.tree_map(_float32, (node.args, node.kwargs))
    wide.recompile()
    signature = gm.meta.get(SIGNATURE)
    if signature is not None:
        wide.meta[SIGNATURE] = dataclasses.replace(signature, widened=True)
    args, kwargs = pytree.tree_map(_float32, (opt.example_inputs, opt.example_kwargs))
    return OptimizedModule(wide, opt.report, args, kwargs, opt.dynamic_shapes)
