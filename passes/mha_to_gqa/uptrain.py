"""Short uptraining of the pooled K/V projections: distil the converted graph towards the MHA graph.

    min over the new Wk', bk', Wv', bv' of  mean over items and float outputs of |y_gqa − y_mha|² / mean(y_mha²)

on the calibration items (the MHA graph's outputs are the targets), Adam, `steps` steps cycling over the items.
Only the parameters the conversion created are trained (through a copy whose fused ops are their plain-torch
references, so that autograd differentiates every layer); everything else stays as the model had it. The relative
MSE over all items is reported before and after, with the seconds it took.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx
from torch.utils._pytree import tree_leaves

from fxopt import ops
from fxopt.calibration import as_call
from fxopt.errors import CalibrationError
from fxopt.pipeline import clone_graph_module


@dataclass(frozen=True)
class Uptraining:
    steps: int
    loss_before: float
    loss_after: float
    seconds: float

    def __str__(self) -> str:
        return (f"uptrained {self.steps} steps in {self.seconds:.1f} s: relative MSE to the MHA outputs "
                f"{self.loss_before:.3g} → {self.loss_after:.3g}")


def _floats(out: Any) -> list[torch.Tensor]:
    return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _loss(got: list[torch.Tensor], want: list[torch.Tensor]) -> torch.Tensor:
    return sum(((g - w) ** 2).mean() / (w ** 2).mean().clamp_min(1e-12) for g, w in zip(got, want)) / len(want)


def differentiable(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of gm (sharing its parameters) whose fxopt ops call their reference implementations: plain torch,
    so autograd differentiates them (the ops themselves register no backward)."""
    copy = clone_graph_module(gm)
    for n in copy.graph.nodes:
        if n.op == "call_function" and n.target in ops.REGISTRY:
            n.target = ops.REGISTRY[n.target].reference
    copy.recompile()
    return copy


def distill(before: fx.GraphModule, after: fx.GraphModule, trained: list[str], data: Iterable,
            example_kwargs: Mapping[str, Any], steps: int, lr: float) -> Uptraining:
    start = time.perf_counter()
    constants = {k: v for k, v in example_kwargs.items() if not isinstance(v, torch.Tensor)}
    calls = []
    for i, item in enumerate(data):
        args, kwargs = as_call(item, i)
        calls.append((args, {**constants, **kwargs}))
    if not calls:
        raise CalibrationError("pass 'mha_to_gqa': uptrain_steps needs calibration items; none were given")
    with torch.no_grad():
        targets = [_floats(before(*a, **k)) for a, k in calls]

    def mean_loss() -> float:
        with torch.no_grad():
            return float(sum(_loss(_floats(after(*a, **k)), t) for (a, k), t in zip(calls, targets)) / len(calls))

    first = mean_loss()
    params = [getattr(after, name) for name in trained]
    student = differentiable(after)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    try:
        for step in range(steps):
            (args, kwargs), want = calls[step % len(calls)], targets[step % len(calls)]
            opt.zero_grad()
            _loss(_floats(student(*args, **kwargs)), want).backward()
            opt.step()
    finally:
        for p in params:
            p.requires_grad_(False)
    return Uptraining(steps, first, mean_loss(), time.perf_counter() - start)
