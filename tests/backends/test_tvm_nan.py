"""NaN on TVM as in torch: max/min-based ops pass NaN through and `x != x` finds it (review finding: TVM's relu,
clamp, maximum, amax dropped NaN, and its simplifier folded `x != x` to False)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("tvm")

import fxopt  # noqa: E402

NAN = float("nan")
WITH_NANS = torch.tensor([[NAN, 1.0, -2.0, 0.5], [0.1, NAN, 3.0, -1.0]])

OPS = {
    "relu": torch.relu,
    "clamp": lambda x: x.clamp(-0.5, 0.5),
    "clamp below": lambda x: x.clamp(min=0.0),
    "maximum": lambda x: torch.maximum(x, torch.zeros_like(x)),
    "minimum": lambda x: torch.minimum(x, x.flip(-1)),
    "amax": lambda x: x.amax(-1),
    "a NaN clean-up by x != x": lambda x: torch.where(x != x, 0.0, x),
    "x == x": lambda x: (x == x) * 1.0,
}


class Applies(nn.Module):
    def __init__(self, op):
        super().__init__()
        self.op = op

    def forward(self, x):
        return self.op(x)


@pytest.mark.parametrize("what", list(OPS))
def test_nan_comes_out_where_torch_puts_it(what):
    model = Applies(OPS[what])
    run = fxopt.compile(fxopt.optimize(model, (torch.randn(2, 4),)), backend="tvm")
    want, got = model(WITH_NANS), run(WITH_NANS)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(got.nan_to_num(0.0), want.nan_to_num(0.0))
