"""The permutation search on the standard case: random uniform 128-row × 64-column matrices (apex
permutation_test.py's `np.random.rand(filters, channels)`), efficacy and seconds per seed, with an upper bound on
what any permutation can reach (the LP relaxation of the set partition: every column in exactly one 4-column
stripe, each stripe scored by its kept magnitude; needs scipy).

  python benchmarks/nm_search.py --seeds 20 --lp 8 --out benchmarks/results

Efficacy = (kept(π) − kept(identity)) / (50%-rows bound − kept(identity)) (Pool & Yu; apex reports 35.5 % for
stripe groups of 8 and 36.6 % for 12 on one such matrix, V100).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from fxopt.passes.permute_nm.search import efficacy, kept, search, unstructured_bound


def lp_bound(w: torch.Tensor) -> float:
    """An upper bound on max_π kept(w[:, π]) for 2:4: the LP relaxation over all 4-column stripes."""
    from scipy.optimize import linprog
    from scipy.sparse import csc_matrix

    a = w.abs().double().numpy()
    cols = a.shape[1]
    quads = np.array(list(itertools.combinations(range(cols), 4)), dtype=np.int32)
    scores = np.empty(len(quads))
    for i in range(0, len(quads), 20000):
        v = np.sort(a[:, quads[i:i + 20000]], axis=2)
        scores[i:i + 20000] = v[:, :, 2:].sum(axis=(0, 2))
    cover = csc_matrix((np.ones(quads.size), (quads.ravel(), np.repeat(np.arange(len(quads)), 4))),
                       shape=(cols, len(quads)))
    res = linprog(-scores, A_eq=cover, b_eq=np.ones(cols), bounds=(0, 1), method="highs")
    return -res.fun


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--lp", type=int, default=0, help="compute the LP bound for the first N seeds (~35 s each)")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    rows = []
    for seed in range(a.seeds):
        w = torch.rand(128, 64, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        start = time.perf_counter()
        pi = search(w)
        seconds = time.perf_counter() - start
        base, bound = kept(w, 2, 4), unstructured_bound(w, 2, 4)
        ub = (lp_bound(w) - base) / (bound - base) if seed < a.lp else None
        rows.append((seed, efficacy(w, pi, 2, 4), ub, seconds))
        print(rows[-1], flush=True)
    effs = [r[1] for r in rows]
    lines = ["# N:M permutation search on the standard case (random uniform 128 × 64, 2:4)", "",
             f"`search()` defaults (annealed channel swaps, 6000 per column, then stripe-pair exhaustive), "
             f"{torch.get_num_threads()} threads. LP bound: no permutation can exceed it.", "",
             "| seed | efficacy | LP upper bound on efficacy | seconds |", "|---|---|---|---|"]
    lines += [f"| {s} | {e:.3f} | {'' if u is None else f'{u:.3f}'} | {t:.2f} |" for s, e, u, t in rows]
    ubs = [r[2] for r in rows if r[2] is not None]
    lines += ["", f"Mean efficacy {statistics.mean(effs):.3f} (min {min(effs):.3f}); median seconds "
              f"{statistics.median(r[3] for r in rows):.2f} (max {max(r[3] for r in rows):.2f})."]
    if ubs:
        there = statistics.mean(effs[:len(ubs)])
        lines.append(f"Mean LP bound over the first {len(ubs)} seeds: {statistics.mean(ubs):.3f}; mean efficacy there "
                     f"{there:.3f} ({there / statistics.mean(ubs):.0%} of the bound).")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "nm_search.md").write_text(text)


if __name__ == "__main__":
    main()
