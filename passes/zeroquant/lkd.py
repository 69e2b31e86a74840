"""LKD: layer-by-layer knowledge distillation (ZeroQuant §4.3; algorithms.md §6.4), one transformer block at a time.

    for each block k:  min over the block's latent weights W_k of  Σ_outputs |B̂_k(H_k; W_k) − B_k(H_k)|² / |B_k(H_k)|²

H_k are block k's inputs in the ORIGINAL graph (the teacher) on the calibration data, B_k(H_k) its outputs there
(both gathered by the pipeline as `BlockIO` on the graph just before the pass), and B̂_k the same region with every
quantized linear computed as the pass will compute it: token-wise int8 activations and group-wise b-bit weights,
both fake-quantized with a straight-through estimator (the rounding's gradient taken as 1; scales recomputed from
the latents each step, without gradient). Adam with a learning rate of `lr` quantization steps (each linear's
mean scale), `steps` steps per block cycling over the kept batches; only block k's latents are parameters at step
k, so memory is one block's weights, gradients and optimizer state (the kept block inputs/outputs are
`lkd_batches` batches of each block boundary, on CPU). The loss over all kept batches is measured before and after;
a block whose loss did not go down keeps its original weights. Blocks are graph regions (regions.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import fx
from torch.utils._pytree import tree_leaves

from fxopt import ops
from fxopt.calibration import BlockIO, CalibrationStats
from fxopt.errors import CalibrationError
from fxopt.quant_ops import codes, qmax_of, scale_of
from fxopt.sites import val

from .plan import LinearPlan
from .regions import Region, block_regions, reader


@dataclass(frozen=True)
class BlockFit:
    label: str
    steps: int
    loss_before: float
    loss_after: float
    seconds: float
    kept: bool  # the trained weights were kept (the loss went down)

    def __str__(self) -> str:
        return (f"LKD {self.label}: {self.steps} steps in {self.seconds:.1f} s, relative MSE to the original block "
                f"{self.loss_before:.3g} → {self.loss_after:.3g}" + ("" if self.kept else " (not lower: original "
                                                                      "weights kept)"))


class _STE(torch.autograd.Function):
    """Forward: the fake-quantized value; backward: the gradient passes unchanged (straight-through)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        return fake

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def fake_step(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """The mean quantization step (scale) of a [out, in] weight's groups."""
    return scale_of(w.detach().abs().reshape(w.shape[0] // group_size, -1).amax(-1), qmax_of(bits)).mean()


def fake_weight(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Q_b(W)·s of a [out, in] latent, the op family's convention, as quantize_weight_groups computes it."""
    with torch.no_grad():
        qmax = qmax_of(bits)
        peak = w.abs().reshape(w.shape[0] // group_size, -1).amax(-1)
        s = scale_of(peak, qmax).repeat_interleave(group_size)[:, None]
        fake = codes(w, s, qmax).to(w.dtype) * s
    return _STE.apply(w, fake)


def fake_tokens(x: torch.Tensor) -> torch.Tensor:
    """quantize_int8(x, "token") dequantized, straight-through."""
    with torch.no_grad():
        q, s = ops.REGISTRY[ops.quantize_int8].reference(x, None, None, "token")
        fake = (q.to(s.dtype) * s).to(x.dtype)
    return _STE.apply(x, fake)


def _student(gm: fx.GraphModule, region: Region) -> tuple[fx.GraphModule, list[LinearPlan]]:
    """The region as its own module: placeholders (inputs..., latent weights...), fxopt ops as their references,
    each quantized linear reading fake_tokens(x) and fake_weight(latent) (in its layout)."""
    g, env = fx.Graph(), {}
    for n in region.inputs:
        env[n] = g.placeholder(f"in_{n.name}")
    weights = {p.site.weight: p for p in region.plans}
    latents = {p: g.placeholder(f"w_{i}") for i, p in enumerate(region.plans)}
    for p, ph in latents.items():
        fake = g.call_function(fake_weight, (ph, p.bits, p.group_size))
        fake = fake if p.site.layout == "out_in" else g.call_function(torch.t, (fake,))
        env[p.site.weight] = g.call_function(torch.Tensor.to, (fake, val(p.site.weight).dtype))
    readers = {reader(p): p for p in region.plans}

    def copy(n: fx.Node) -> fx.Node:
        if n in env:
            return env[n]
        if n.op == "get_attr" and n not in weights:
            env[n] = g.get_attr(n.target)
            return env[n]
        for a in n.all_input_nodes:
            copy(a)
        p = readers.get(n)
        mapping = dict(env)
        if p is not None:
            mapping[p.site.input] = g.call_function(fake_tokens, (env[p.site.input],))
        new = g.node_copy(n, lambda a: mapping[a])
        if new.op == "call_function" and new.target in ops.REGISTRY:
            new.target = ops.REGISTRY[new.target].reference  # plain torch: autograd differentiates it
        env[n] = new
        return new

    for n in region.nodes:
        copy(n)
    g.output(tuple(env[n] for n in region.outputs))
    return fx.GraphModule(gm, g), list(latents)


def _floats(values) -> list[torch.Tensor]:
    return [t for t in tree_leaves(values) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _loss(got, want) -> torch.Tensor:
    pairs = list(zip(_floats(got), _floats(want)))
    return sum(((g.float() - w.float()) ** 2).sum() / (w.float() ** 2).sum().clamp_min(1e-12)
               for g, w in pairs) / len(pairs)


def distill_block(student: fx.GraphModule, plans: list[LinearPlan], latents: dict[LinearPlan, torch.Tensor],
                  samples, steps: int, lr: float, label: str) -> BlockFit:
    """Train `latents[p]` for the `plans` of one block (and no other entry of `latents`) on `samples`."""
    start = time.perf_counter()
    batches = list(zip(samples.inputs, samples.outputs))
    if not batches:
        raise CalibrationError("pass 'zeroquant': lkd_steps needs calibration items; none were kept")
    params = [latents[p].detach().float().clone().requires_grad_(True) for p in plans]
    # the step size is relative to each linear's quantization step, so one lr suits int8 and int4, any weight scale
    steps_of = [float(fake_step(latents[p], p.bits, p.group_size)) for p in plans]

    def mean_loss() -> float:
        with torch.no_grad():
            return float(sum(_loss(student(*xs, *params), ys) for xs, ys in batches) / len(batches))

    before = mean_loss()
    opt = torch.optim.Adam([{"params": [t], "lr": lr * q} for t, q in zip(params, steps_of)])
    for step in range(steps):
        xs, ys = batches[step % len(batches)]
        opt.zero_grad()
        _loss(student(*xs, *params), ys).backward()
        opt.step()
    after = mean_loss()
    kept = after < before
    if kept:
        for p, t in zip(plans, params):
            latents[p] = t.detach().to(latents[p].dtype)
    return BlockFit(label, steps, before, after if kept else before, time.perf_counter() - start, kept)


def distill_blocks(gm: fx.GraphModule, plans: list[LinearPlan], latents: dict[LinearPlan, torch.Tensor],
                   stats: CalibrationStats | None, steps: int, lr: float, batches: int) -> list[BlockFit]:
    """LKD over every block, in order; `latents` (plan -> [out, in] float weight) updated in place."""
    if stats is None:
        raise CalibrationError("pass 'zeroquant': lkd_steps > 0 needs calibration data (the pipeline gathers "
                               "the original blocks' inputs and outputs from it)")
    fits = []
    for region in block_regions(gm, plans):
        samples = stats.of(BlockIO(region.input_names, region.output_names, batches))
        student, order = _student(gm, region)
        fits.append(distill_block(student, order, latents, samples, steps, lr, f"block {region.index}"))
    return fits


