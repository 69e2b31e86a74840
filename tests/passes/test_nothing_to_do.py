"""Every pass, on a model with nothing for it to rewrite, returns the graph it was given: same code, not modified.

The models are random programs over ops that occur around norms and softmaxes (means, exps, sums, squares,
subtractions, views, linears, activations) without the op that would complete either pattern (no division, no
square root), so any change a pass makes is a change it had no right to make.
"""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fxopt.passes import FuseLayerNorm, StabilizeSoftmax
from fxopt.testing import capture_graph, run_pass

WIDTH = 8
STEPS = {
    "linear": lambda m, h, prev: m.linear(h),
    "gelu": lambda m, h, prev: torch.nn.functional.gelu(h),
    "silu": lambda m, h, prev: torch.nn.functional.silu(h),
    "residual": lambda m, h, prev: h + prev,
    "centre": lambda m, h, prev: h - h.mean(-1, keepdim=True),
    "square_mean": lambda m, h, prev: h * h.pow(2).mean(-1, keepdim=True),
    "exp_sum": lambda m, h, prev: torch.exp(h) * torch.exp(h).sum(-1, keepdim=True),
    "scale": lambda m, h, prev: h * 0.5 + 1.0,
    "heads": lambda m, h, prev: h.view(*h.shape[:-1], 2, WIDTH // 2).transpose(-2, -3).transpose(-2, -3)
                                 .reshape(h.shape),
    "tanh": lambda m, h, prev: torch.tanh(h),
}


class RandomProgram(nn.Module):
    def __init__(self, steps):
        super().__init__()
        self.steps, self.linear = steps, nn.Linear(WIDTH, WIDTH)

    def forward(self, x):
        prev, h = x, x
        for step in self.steps:
            prev, h = h, STEPS[step](self, h, prev)
        return h


@settings(max_examples=12, deadline=None)
@given(steps=st.lists(st.sampled_from(sorted(STEPS)), min_size=1, max_size=6),
       dtype=st.sampled_from([torch.float32, torch.float16]))
def test_a_pass_with_nothing_to_do_returns_the_graph_it_was_given(steps, dtype):
    model = RandomProgram(steps).to(dtype)
    x = torch.randn(2, 3, WIDTH, dtype=dtype)
    gm = capture_graph(model, x)
    for p in (FuseLayerNorm(), StabilizeSoftmax()):
        result = run_pass(p, gm, x)
        assert not result.modified, (p.name, steps, result.stats)
        assert result.graph_module.code == gm.code, (p.name, steps)
