"""SmoothQuant's scales (algorithms.md §4.1), computed in float64:

    w_max[j] = max(max over the group's linears and output rows |W[:, j]|, 1e-5)
    s[j]     = max(act_max[j]^α / w_max[j]^(1-α), 1e-5)

so that X·Wᵀ = (X·diag(s)⁻¹)·(W·diag(s))ᵀ. At α = 0.5 with one consumer the smoothed maxima balance:
max|X'_j| = max|W'_j| = sqrt(act_max[j]·w_max[j]). `alpha="auto"` picks, per group, the α of ALPHA_GRID whose
fake-quantized outputs on the kept calibration tokens are closest (squared error) to the float ones, or no
smoothing at all (s ≡ 1; α = 0 is not the identity) when that is closer still.
"""

from __future__ import annotations

import torch

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


def _fake(t: torch.Tensor, act: str) -> torch.Tensor:
    """The activation quantizer `act` (SmoothQuant's option) applied and undone."""
    if act == "tensor_asym":
        q, s, z = torch.ops.fxopt.quantize_uint8.default(t, None)
        return (q.to(t.dtype) - z.to(t.dtype)) * s
    return _round_trip(t, act == "token")


def quantized_error(x: torch.Tensor, weights: list[torch.Tensor], s: torch.Tensor, act: str,
                    per_channel: bool, reference: list[torch.Tensor] | None = None) -> float:
    """Σ over the group's linears of ||Q(x/s)·Q(W·s)ᵀ - x·Wᵀ||², in float32 (`reference`: the x·Wᵀ, if known)."""
    xs = _fake((x / s).float(), act)
    reference = reference or [x.float() @ w.float().t() for w in weights]
    total = 0.0
    for w, ref in zip(weights, reference):
        ws = _round_trip((w.double() * s).float(), per_channel)
        total += float(((xs @ ws.t()) - ref).pow(2).sum())
    return total


def tokens(samples: list[torch.Tensor]) -> torch.Tensor:
    """Up to MAX_TOKENS calibration tokens, evenly spaced, as [tokens, channels] float64."""
    x = torch.cat([t.reshape(-1, t.shape[-1]).double() for t in samples])
    step = max(1, x.shape[0] // MAX_TOKENS)
    return x[::step][:MAX_TOKENS]


def best_alpha(x: torch.Tensor, weights: list[torch.Tensor], act_max: torch.Tensor, act: str,
               per_channel: bool, tie=None) -> float | None:
    """The α of ALPHA_GRID with the smallest error, or None when not smoothing is better than every α; `tie`
    (s -> s) is applied to each candidate's s as the pass will apply it (V→O under GQA: one s per v row)."""
    w_max = weight_max(weights)
    tie = tie or (lambda s: s)
    reference = [x.float() @ w.float().t() for w in weights]  # the float products, once for every candidate
    errors = {a: quantized_error(x, weights, tie(smoothing_scale(act_max, w_max, a)), act, per_channel, reference)
              for a in ALPHA_GRID}
    best = min(errors, key=lambda a: (errors[a], abs(a - 0.5)))
    unsmoothed = quantized_error(x, weights, torch.ones_like(act_max, dtype=torch.float64), act, per_channel,
                                 reference)
    return None if unsmoothed < errors[best] else best
