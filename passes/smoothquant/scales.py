"""SmoothQuant's scales (algorithms.md §4.1), computed in float64:

    w_max[j] = max(max over the group's linears and output rows |W[:, j]|, 1e-5)
    s[j]     = max(act_max[j]^α / w_max[j]^(1-α), 1e-5)

so that X·Wᵀ = (X·diag(s)⁻¹)·(W·diag(s))ᵀ. At α = 0.5 with one consumer the smoothed maxima balance:
max|X'_j| = max|W'_j| = sqrt(act_max[j]·w_max[j]). `alpha="auto"` picks, per group, the α of ALPHA_GRID whose
fake-quantized outputs on the kept calibration tokens are closest (squared error) to the float ones, or no
smoothing at all (s ≡ 1; α = 0 is not the identity) when that is closer still. The error is cross-fitted: the
kept batches are folds, and each fold is scored with the s computed from the other folds' act_max, so the search
sees what deployment sees (tokens whose channels exceed the calibration maxima); scoring s on the very tokens it
was computed from prefers α near 1, which fits those maxima exactly and generalises worst. A per-tensor quantizer
takes its range from the whole batch, as it does at run time, not from the evaluated subset of tokens (a fixed-seed
random subset: a strided one lines up with sequence starts).

Bias correction (Nagel et al. 2019, empirical form): the quantized linear's mean output error over the kept
calibration tokens, E[x·Wᵀ − Q(x/s)·Q(W·s)ᵀ] per output channel, is added to its bias, so the int8 linear is
unbiased on the calibration distribution (a channel whose value barely varies, a [CLS] token's massive
activation, rounds the same way every time: a systematic error that bias correction removes). It is linear in the
tokens, E[x/s]·Wᵀ − E[Q(x/s)]·Ŵᵀ, so every kept token counts at the cost of two matrix-vector products; a
corrected half-precision bias is kept in fp32, the precision the int8 ops' epilogue adds it in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fxopt.quant_asym import uint8_codes, uint8_grid
from fxopt.quant_ops import codes, scale_of

CLAMP = 1e-5  # the reference code's floor for w_max and s: a dead channel gives no inf/NaN
ALPHA_GRID = tuple(i / 20 for i in range(21))
MAX_TOKENS = 1024  # calibration tokens the α search evaluates per group


def out_in(weight: torch.Tensor, layout: str) -> torch.Tensor:
    return weight if layout == "out_in" else weight.t()


def weight_max(weights: list[torch.Tensor]) -> torch.Tensor:
    """Per input channel abs-max over every [out, in] weight of the group."""
    return torch.stack([w.detach().double().abs().amax(0) for w in weights]).amax(0).clamp_min(CLAMP)


def smoothing_scale(act_max: torch.Tensor, w_max: torch.Tensor, alpha: float) -> torch.Tensor:
    return (act_max.double().pow(alpha) / w_max.pow(1 - alpha)).clamp_min(CLAMP)


def _round_trip(t: torch.Tensor, per_row: bool) -> torch.Tensor:
    s = scale_of(t.abs().amax(-1, keepdim=True) if per_row else t.abs().amax())
    return codes(t, s).to(t.dtype) * s


def _fake(t: torch.Tensor, act: str, batch: torch.Tensor, static: torch.Tensor | None = None) -> torch.Tensor:
    """The activation quantizer `act` (SmoothQuant's option) applied to the tokens `t` of `batch` and undone; a
    per-tensor quantizer takes its range from the whole batch, as it does at run time ("tensor_static": the
    calibrated scale `static`)."""
    if act == "token":
        return _round_trip(t, True)
    if act == "tensor_static":
        return codes(t, static.float()).to(t.dtype) * static.float()
    if act == "tensor_asym":  # quantize_uint8's grid, from the batch
        s, z = uint8_grid(batch)
        return (uint8_codes(t, s, z) - z) * s
    s = scale_of(batch.abs().amax())
    return codes(t, s).to(t.dtype) * s


def fake_inputs(x: Tokens, s: torch.Tensor, act: str, act_max: torch.Tensor) -> torch.Tensor:
    """Q(x/s) dequantized, float32, for the tokens of `x` (`act_max`: for "tensor_static"'s calibrated scale)."""
    static = scale_of((act_max.double() / s).amax()) if act == "tensor_static" else None  # rewrite.static_scale
    return torch.cat([_fake((b[rows] / s).float(), act, (b / s).float(), static) for b, rows in x.batches])


def quantized_error(x, weights: list[torch.Tensor], s: torch.Tensor, act: str, per_channel: bool,
                    reference: list[torch.Tensor] | None = None, act_max: torch.Tensor | None = None) -> float:
    """Σ over the group's linears of ||Q(x/s)·Q(W·s)ᵀ - x·Wᵀ||², in float32 (`reference`: the x·Wᵀ, if known);
    x: [tokens, channels], or a Tokens (the evaluated tokens and the batches they came from)."""
    x = x if isinstance(x, Tokens) else Tokens(x, ((x, slice(None)),))
    xs = fake_inputs(x, s, act, x.values.abs().amax(0) if act_max is None else act_max)
    x = x.values
    reference = reference or [x.float() @ w.float().t() for w in weights]
    total = 0.0
    for w, ref in zip(weights, reference):
        ws = _round_trip((w.double() * s).float(), per_channel)
        total += float(((xs @ ws.t()) - ref).pow(2).sum())
    return total


@dataclass(frozen=True)
class Tokens:
    """The calibration tokens the α search evaluates ([tokens, channels] float64) and where they come from: per
    kept batch, all its tokens and the rows of them evaluated (a per-tensor quantizer's range is the batch's)."""

    values: torch.Tensor
    batches: tuple[tuple[torch.Tensor, torch.Tensor], ...]


def tokens(samples: list[torch.Tensor], limit: int = MAX_TOKENS) -> Tokens:
    """About `limit` calibration tokens spread over the batches `samples`: a fixed-seed random subset of each, so
    no sequence position (a [CLS] or BOS token at position 0) is over- or under-sampled."""
    flat = [t.reshape(-1, t.shape[-1]).double() for t in samples if t.numel()]
    step = max(1, -(-sum(len(b) for b in flat) // limit))
    g = torch.Generator().manual_seed(0)
    batches = tuple((b, torch.randperm(len(b), generator=g)[:-(-len(b) // step)].sort().values) for b in flat)
    values = torch.cat([b[rows] for b, rows in batches]) if batches else torch.zeros(0, 0, dtype=torch.float64)
    return Tokens(values, batches)


def folds(samples: list[torch.Tensor]) -> list[torch.Tensor]:
    """The kept calibration batches as folds for cross-fitting; one batch of several sequences splits in two
    (each half then takes its per-tensor range from itself); a lone batch of one sequence is one fold, scored
    in-sample."""
    samples = [t for t in samples if t.numel()]
    if len(samples) == 1 and samples[0].dim() > 2 and samples[0].shape[0] > 1:
        half = samples[0].shape[0] // 2
        return [samples[0][:half], samples[0][half:]]
    return samples


def best_alpha(samples: list[torch.Tensor], weights: list[torch.Tensor], act_max: torch.Tensor, act: str,
               per_channel: bool, tie=None) -> float | None:
    """The α of ALPHA_GRID with the smallest error, or None when not smoothing is better than every α; `tie`
    (s -> s) is applied to each candidate's s as the pass will apply it (V→O under GQA: one s per v row)."""
    w_max = weight_max(weights)
    tie = tie or (lambda s: s)
    parts = folds(samples)
    if not parts:  # no calibration token reached this group
        return None
    if len(parts) == 1:
        plan = [(act_max, tokens(parts))]
    else:
        maxima = [p.reshape(-1, p.shape[-1]).double().abs().amax(0) for p in parts]
        share = max(1, MAX_TOKENS // len(parts))  # MAX_TOKENS evaluated in all, whatever the number of folds
        plan = [(torch.stack(maxima[:k] + maxima[k + 1:]).amax(0), tokens([p], share)) for k, p in enumerate(parts)]
    refs = [[x.values.float() @ w.float().t() for w in weights] for _, x in plan]
    errors = {a: sum(quantized_error(x, weights, tie(smoothing_scale(am, w_max, a)), act, per_channel, ref, am)
                     for (am, x), ref in zip(plan, refs)) for a in ALPHA_GRID}
    best = min(errors, key=lambda a: (errors[a], abs(a - 0.5)))
    one = torch.ones_like(act_max, dtype=torch.float64)
    unsmoothed = sum(quantized_error(x, weights, one, act, per_channel, ref, am) for (am, x), ref in zip(plan, refs))
    return None if unsmoothed < errors[best] else best


def input_means(samples: list[torch.Tensor], s: torch.Tensor, act: str,
                act_max: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(E[x/s], E[Q(x/s)]) over every kept calibration token, float64 [in]; None without tokens."""
    flat = [t.reshape(-1, t.shape[-1]).double() for t in samples if t.numel()]
    if not flat:
        return None
    x = Tokens(torch.cat(flat), tuple((b, torch.arange(len(b))) for b in flat))
    return x.values.div(s).mean(0), fake_inputs(x, s, act, act_max).double().mean(0)


def bias_correction(means: tuple[torch.Tensor, torch.Tensor], w: torch.Tensor,
                    w_dequantized: torch.Tensor) -> torch.Tensor:
    """E[(x/s)·Wᵀ − Q(x/s)·Ŵᵀ] = E[x/s]·Wᵀ − E[Q(x/s)]·Ŵᵀ, float64 [out]: W the smoothed weight [out, in]
    (columns times s), Ŵ its int8 codes times their scales; what the quantized linear's bias gains to be unbiased."""
    mean_x, mean_q = means
    return mean_x @ w.t() - mean_q @ w_dequantized.t()
