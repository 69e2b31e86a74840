"""Ops no backend translates, written in core ATen before lowering (both backends apply `for_backends`).

grouped matmul (mixture-of-experts: `transformers`' `grouped_mm_fallback` custom op, `aten._grouped_mm`):
rows of `x` (S, K) are sorted by expert and `offs` (E,) holds the cumulative row counts, so row s belongs to
expert e(s) = #{e : offs[e] <= s}, and

    out[s] = x[s] @ w[e(s)]        (rows at or past offs[-1] belong to no expert: 0)

    = Σ_e where(e(s) == e, (x @ w[e])[s], 0)

— one batched matmul over every expert and a select, with static shapes (E× the FLOPs of the grouped kernel,
the price of a graph without data-dependent row ranges). The select adds exact zeros, so each row is its own
expert's product, rounded once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def grouped_mm_dense(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    experts = w.shape[0]
    rows = torch.arange(x.shape[0], device=x.device)
    expert_of_row = (offs.to(torch.int64)[:, None] <= rows[None, :]).sum(0)  # (S,)
    mine = expert_of_row[None, :] == torch.arange(experts, device=x.device)[:, None]  # (E, S)
    products = torch.bmm(x.unsqueeze(0).expand(experts, -1, -1), w)  # (E, S, N)
    return torch.where(mine[..., None], products, torch.zeros((), dtype=products.dtype)).sum(0)


def _aten_grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: Any = None, bias: Any = None,
                     out_dtype: Any = None) -> Any:
    if x.dim() != 2 or w.dim() != 3 or offs is None or bias is not None or out_dtype not in (None, x.dtype):
        return NotImplemented  # other forms of the op are left as they are
    return grouped_mm_dense(x, w, offs)


def backend_decompositions() -> dict[Any, Callable]:
    """{op overload: decomposition} for the ops above that exist in this process."""
    table: dict[Any, Callable] = {torch.ops.aten._grouped_mm.default: _aten_grouped_mm}
    if hasattr(torch.ops.transformers, "grouped_mm_fallback"):  # registered when transformers' MoE code loads
        table[torch.ops.transformers.grouped_mm_fallback.default] = grouped_mm_dense
    return table


def for_backends(ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """`ep` with the ops of `backend_decompositions` written in core ATen (unchanged where it has none)."""
    table = backend_decompositions()
    if not any(n.target in table for n in ep.graph.nodes if n.op == "call_function"):
        return ep
    return ep.run_decompositions(table)


def without_constant_outputs(ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """`ep` (a program of fxopt's own: edited in place) without the outputs that are Python constants (a returned
    `k`, a None): backends return tensors only, and the runner's signature (made before this) puts the constants
    back where the model returned them."""
    from torch.export.graph_signature import ConstantArgument

    output = next(n for n in ep.graph.nodes if n.op == "output")
    specs = ep.graph_signature.output_specs
    keep = [i for i, s in enumerate(specs) if not isinstance(s.arg, ConstantArgument)]
    if len(keep) == len(specs):
        return ep
    values = output.args[0]
    output.args = (tuple(values[i] for i in keep),)
    specs[:] = [specs[i] for i in keep]
    from torch.utils import _pytree as pytree

    users = sum(1 for spec in specs if spec.kind.name == "USER_OUTPUT")
    flat = pytree.tree_structure(tuple(range(users)))  # the program now returns its tensors, flat
    for entry in ep.module_call_graph[:1]:
        if entry.signature is not None:
            entry.signature.out_spec = flat
    ep.graph_module.recompile()
    return ep
