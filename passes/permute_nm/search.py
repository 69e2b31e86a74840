"""The permutation search: which input channels share an M-group, so that N:M masks keep the most magnitude.

    kept(W, π) = Σ_rows Σ_stripes (sum of the N largest |W[r, π[j]]| over the stripe's M columns j)

Only the partition of columns into stripes matters (the order within a stripe and of the stripes does not), so
the search moves columns between stripes:
  1. channel swaps with bounded regressions (annealed): a random swap of two columns of different stripes is
     taken when it improves kept, and a worsening one with probability exp(gain / T), T falling geometrically;
     the best permutation seen is kept. A swap's gain costs O(rows): with the other M-1 columns of a stripe
     sorted v1 ≥ … ≥ v(M-1) per row, the top N of them plus a new column c is Σ_{k<N} v_k + max(v_N, c);
  2. stripe-group exhaustive search (Pool & Yu 2021, window 8): for every pair of stripes the best of the 35
     partitions of their 8 columns, the best non-overlapping ones applied, to convergence.
Deterministic in (matrix, seed); never below the identity's kept. `efficacy` is the paper's quality metric: the
share of the gap between plain N:M and the N/M-per-row unstructured bound that the permutation closes.
"""

from __future__ import annotations

import itertools
import math
from functools import cache

import numpy as np
import torch

EXHAUSTIVE_MAX_STRIPES = 64  # the window pass scores stripes²/2 pairs × 35 partitions: beyond this, swaps only


def nm_mask(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The magnitude N:M mask of `w` [rows, cols] along cols (cols % m == 0): the n largest |w| of every m."""
    rows, cols = w.shape
    groups = w.abs().reshape(rows, cols // m, m)
    keep = groups.topk(n, dim=-1).indices
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True).reshape(rows, cols)


def kept(w: torch.Tensor, n: int, m: int) -> float:
    """Magnitude kept by the N:M mask of `w`."""
    a = w.detach().abs().double()
    return float(a.reshape(a.shape[0], -1, m).topk(n, dim=-1).values.sum())


def unstructured_bound(w: torch.Tensor, n: int, m: int) -> float:
    """Magnitude kept by pruning each row to n/m density, unstructured: no permutation can do better."""
    a = w.detach().abs().double()
    return float(a.topk(a.shape[1] * n // m, dim=1).values.sum())


def efficacy(w: torch.Tensor, perm: torch.Tensor, n: int, m: int) -> float:
    base, bound = kept(w, n, m), unstructured_bound(w, n, m)
    return 1.0 if bound <= base else (kept(w[:, perm], n, m) - base) / (bound - base)


@cache
def partitions(m: int, stripes: int) -> torch.Tensor:
    """All partitions of stripes·m slots into `stripes` unordered groups of m, as slot orders; row 0 is the
    identity. (35 for two stripes of 4, 5775 for three.)"""
    def split(rest: tuple[int, ...]):
        if not rest:
            yield ()
            return
        first, others = rest[0], rest[1:]
        for mates in itertools.combinations(others, m - 1):
            left = tuple(x for x in others if x not in mates)
            for tail in split(left):
                yield (first, *mates, *tail)

    return torch.tensor(list(split(tuple(range(stripes * m)))), dtype=torch.long)


def canonical_count(cols: int, m: int) -> int:
    """Distinct partitions of `cols` columns into stripes of m: cols! / ((m!)^(cols/m) (cols/m)!)."""
    return math.factorial(cols) // (math.factorial(m) ** (cols // m) * math.factorial(cols // m))


class _Stripes:
    """The current partition (perm[slot] = column) with per-stripe kept and, per column, what its stripe keeps
    without it: P (sum of the top n-1 of the others, per row summed) and Q (their n-th largest, per row)."""

    def __init__(self, a: np.ndarray, n: int, m: int, perm: np.ndarray):
        self.a, self.n, self.m = a, n, m  # a: (cols, rows), |W| transposed
        self.perm = perm.copy()
        self.slot = np.empty_like(perm)
        self.slot[perm] = np.arange(perm.size)
        cols, rows = a.shape
        self.kept = np.zeros(cols // m)
        self.P, self.Q = np.zeros(cols), np.zeros((cols, rows))
        for s in range(cols // m):
            self.refresh(s)

    def refresh(self, s: int) -> None:
        n, m = self.n, self.m
        cols = self.perm[s * m:(s + 1) * m]
        vals = self.a[cols]  # (m, rows)
        order = np.argsort(-vals, axis=0, kind="stable")
        v = np.take_along_axis(vals, order, axis=0)
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.arange(m)[:, None], axis=0)
        top_n, top_n1 = v[:n].sum(0), v[:n - 1].sum(0)
        self.kept[s] = top_n.sum()
        inside = rank < n  # without a column among the top n, the others' top n-1 are the top n but it
        self.P[cols] = np.where(inside, top_n - vals, top_n1).sum(1)
        self.Q[cols] = np.where(inside, v[n], v[n - 1])

    def stripe(self, cols: np.ndarray) -> np.ndarray:
        return self.slot[cols] // self.m

    def gains(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """kept after swapping columns x[i] and y[i] (of different stripes) minus kept now."""
        a = self.a
        return (self.P[x] + np.maximum(self.Q[x], a[y]).sum(1) + self.P[y] + np.maximum(self.Q[y], a[x]).sum(1)
                - self.kept[self.stripe(x)] - self.kept[self.stripe(y)])

    def swap(self, x: int, y: int) -> None:
        sx, sy = self.slot[x], self.slot[y]
        self.perm[sx], self.perm[sy] = y, x
        self.slot[x], self.slot[y] = sy, sx
        self.refresh(sx // self.m)
        self.refresh(sy // self.m)


def _anneal(st: _Stripes, swaps: int, rng: np.random.RandomState, batch: int = 256) -> np.ndarray:
    cols = st.perm.size
    x, y = rng.randint(cols, size=2048), rng.randint(cols, size=2048)
    apart = st.stripe(x) != st.stripe(y)
    scale = float(np.abs(st.gains(x[apart], y[apart])).mean()) if apart.any() else 0.0
    if scale == 0.0:
        return st.perm.copy()
    t_hi, t_lo = 0.3 * scale, 0.003 * scale  # regressions of ~a third of a typical swap early, ~none late
    current = best = float(st.kept.sum())
    best_perm = st.perm.copy()
    for done in range(0, swaps, batch):
        temperature = t_hi * (t_lo / t_hi) ** (done / swaps)
        x, y, u = rng.randint(cols, size=batch), rng.randint(cols, size=batch), rng.random_sample(batch)
        g = np.full(batch, -np.inf)
        apart = st.stripe(x) != st.stripe(y)
        g[apart] = st.gains(x[apart], y[apart])
        with np.errstate(over="ignore"):
            take = np.nonzero((g > 0) | (u < np.exp(g / temperature)))[0]
        touched: set[int] = set()
        for k in take:  # gains were scored before this batch's swaps: only untouched stripes' still hold
            sx, sy = int(st.stripe(x[k])), int(st.stripe(y[k]))
            if sx in touched or sy in touched:
                continue
            touched.update((sx, sy))
            st.swap(int(x[k]), int(y[k]))
            current += float(g[k])
            if current > best:
                best, best_perm = current, st.perm.copy()
    return best_perm


def _window_pass(a: torch.Tensor, perm: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Stripe pairs re-partitioned exhaustively, best non-overlapping first, to convergence."""
    stripes = perm.numel() // m
    pairs = torch.tensor(list(itertools.combinations(range(stripes), 2)), dtype=torch.long)
    parts = partitions(m, 2)
    perm = perm.clone()
    while True:
        gains, moves = [], []
        for chunk in pairs.split(256):
            cand = perm.view(stripes, m)[chunk].reshape(len(chunk), 2 * m)[:, parts]  # (pairs, P, 2m)
            score = a[:, cand].reshape(a.shape[0], len(chunk), len(parts), 2, m).topk(n, -1).values.sum((0, 3, 4))
            best, arg = score.max(dim=1)
            gains.append(best - score[:, 0])
            moves.append(cand[torch.arange(len(chunk)), arg])
        gain, move = torch.cat(gains), torch.cat(moves)
        touched: set[int] = set()
        for i in torch.argsort(gain, descending=True).tolist():
            if gain[i] <= 1e-12 * float(a.sum()):
                break
            s1, s2 = pairs[i].tolist()
            if s1 in touched or s2 in touched:
                continue
            touched.update((s1, s2))
            perm[s1 * m:(s1 + 1) * m], perm[s2 * m:(s2 + 1) * m] = move[i, :m], move[i, m:]
        if not touched:
            return perm


def search(w: torch.Tensor, n: int = 2, m: int = 4, swaps_per_column: int = 6000, max_swaps: int = 500_000,
           seed: int = 0) -> torch.Tensor:
    """A permutation π of w's columns (w [rows, cols]) with kept(w[:, π]) ≥ kept(w); identity when there is
    nothing to choose (cols % m, fewer than two stripes, n ≥ m, or an all-zero w)."""
    rows, cols = w.shape
    identity = torch.arange(cols)
    if cols % m or cols < 2 * m or n >= m or n < 1:
        return identity
    a = w.detach().abs().double()
    st = _Stripes(np.ascontiguousarray(a.t().numpy()), n, m, identity.numpy())
    perm = torch.from_numpy(_anneal(st, min(swaps_per_column * cols, max_swaps), np.random.RandomState(seed)))
    if cols // m <= EXHAUSTIVE_MAX_STRIPES:
        perm = _window_pass(a, perm, n, m)
    return perm if kept(a[:, perm], n, m) > kept(a, n, m) else identity
