"""N:M magnitude pruning along the input dimension of the chosen linears (the pattern sparse tensor cores run).

    W' = W ⊙ mask,  mask[r, 4g:4g+4] keeps the n largest |W[r, 4g:4g+4]|        (n:m, along in_features)

Run it after `permute_nm` (the same function, weights that keep more under the mask): the report's notes give,
per linear, the share of |W| the mask keeps, and beside it what it would have kept without the permutation (from
the record permute_nm leaves on the weight). Options: n, m; layers ("ffn": the MLP linears; "blocks": every
linear of the transformer blocks, the default; "all": every linear, an LM head included); min_cosine;
speed_table (a `benchmarks/sparse24_gpu.py` JSON: prune only the linears whose (K, N) that table measured faster
as 2:4 than dense at `tokens` tokens, the nearest measured token count at or below it; a shape it did not measure
is left dense, with the reason) and tokens.
Requires: SHAPES.  Exactness: APPROXIMATE: every output's cosine similarity to the unpruned graph's is at least
`min_cosine` on the example inputs. A linear whose in_features is not a multiple of m is left dense, with why.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from torch import fx

from fxopt.pass_base import ROUNDING, Exactness, Measure, Pass, PassContext, PassResult, Tolerance, int_at_least
from fxopt.rewrite import Rewriter
from fxopt.structure import analyze_graph, block_linears

from .permute_nm import check_pattern, out_in
from .permute_nm.rewrite import META
from .permute_nm.search import kept, nm_mask

_INF = float("inf")


def speedups(table: str | Path, tokens: int) -> dict[tuple[int, int], float]:
    """(K, N) -> the 2:4 speedup a sparse24_gpu.py table measured at its largest token count <= tokens."""
    best: dict[tuple[int, int], tuple[int, float]] = {}
    for c in json.loads(Path(table).read_text())["cells"]:
        key = (int(c["k"]), int(c["n"]))
        if c["m"] <= tokens and c["m"] >= best.get(key, (0, 0.0))[0]:
            best[key] = (c["m"], float(c["speedup"]))
    return {k: v for k, (_, v) in best.items()}


@dataclass(frozen=True)
class PruneNM(Pass):
    """Magnitude N:M masks on the chosen linears' weights."""

    n: int = 2
    m: int = 4
    layers: str = "blocks"
    min_cosine: float = 0.5
    speed_table: str | None = None
    tokens: int = 2048

    name: ClassVar[str] = "prune_nm"
    exactness: ClassVar = Exactness.APPROXIMATE
    option_checks: ClassVar = {
        "n": (int_at_least(1), "an int >= 1"), "m": (int_at_least(2), "an int >= 2"),
        "layers": (lambda v: v in ("ffn", "blocks", "all"), "'ffn', 'blocks' or 'all'"),
        "min_cosine": (lambda v: isinstance(v, (int, float)) and -1 <= v <= 1, "a number in [-1, 1]"),
        "speed_table": (lambda v: v is None or isinstance(v, (str, Path)), "None or a path"),
        "tokens": (int_at_least(1), "an int >= 1")}

    def __post_init__(self) -> None:
        super().__post_init__()
        check_pattern(self.name, self.n, self.m)
        if self.speed_table is not None:
            from fxopt.errors import PassOptionError
            try:
                speedups(self.speed_table, self.tokens)
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise PassOptionError(self.name, "speed_table", f"is not a sparse24_gpu.py table: {e}") from e

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        structure = analyze_graph(gm)
        if self.layers == "ffn":
            sites = [s for b in structure.blocks if b.mlp for s in (b.mlp.gate, b.mlp.up, b.mlp.down) if s]
        else:
            sites = block_linears(structure) if self.layers == "blocks" else list(structure.linears)
        todo, reasons, notes, kept_share, unpermuted = [], [], [], {}, {}
        speed = speedups(self.speed_table, self.tokens) if self.speed_table is not None else None
        for s in sites:
            key = (s.in_features, s.out_features)
            if s.in_features % self.m:
                reasons.append(f"{s.weight_name}: {s.in_features} inputs, not a multiple of {self.m}: left dense")
            elif speed is not None and key not in speed:
                reasons.append(f"{s.weight_name}: {key[0]}→{key[1]} at ≤ {self.tokens} tokens is not in the speed "
                               "table: left dense")
            elif speed is not None and speed[key] <= 1.0:
                reasons.append(f"{s.weight_name}: 2:4 measured {speed[key]:.2f}× dense for {key[0]}→{key[1]} at "
                               f"≤ {self.tokens} tokens: left dense")
            else:
                todo.append(s)
        if not todo:
            return PassResult(gm, False, reasons=reasons or [f"no linear to prune (layers={self.layers!r})"])
        rw = Rewriter(gm, self.name)
        for s in todo:  # masks computed from the weights as they are; one new constant per site
            w = out_in(gm, s)
            total = float(w.abs().double().sum()) or 1.0
            pruned = w * nm_mask(w, self.n, self.m)
            record = s.weight.meta.get(META, {})
            note = f"{s.weight_name}: kept {kept(w, self.n, self.m) / total:.4f} of |W|"
            if record.get("n") == self.n and record.get("m") == self.m:
                note += f" ({record['kept_before'] / total:.4f} without the permutation)"
                unpermuted[s.weight_name] = record["kept_before"] / total
            kept_share[s.weight_name] = kept(w, self.n, self.m) / total
            notes.append(note)
            rw.replace_constant_for(s.weight, s.node, pruned if s.layout == "out_in" else pruned.t().contiguous())
            rw.counts["pruned_linear"] += 1
        rw.finish()
        rw.drop_unread_attributes()
        tolerance = Tolerance(rtol={dt: _INF for dt in ROUNDING.rtol}, atol=_INF, min_cosine=self.min_cosine)
        measures = [Measure(f"share of |W| kept by {self.n}:{self.m} pruning, without → with the permutation",
                            "share of |W|", unpermuted, {k: kept_share[k] for k in unpermuted})] if unpermuted else []
        return PassResult(gm, True, dict(rw.counts), reasons=reasons, tolerance=tolerance, notes=notes,
                          measures=measures)
