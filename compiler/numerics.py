"""Numerics: compare a graph's outputs with those of the graph before a pass, by the pass's own tolerance."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree

from .pass_base import Tolerance


@dataclass(frozen=True)
class Numerics:
    max_abs: float
    max_rel: float  # max_abs / max|before|
    cosine: float  # worst over outputs
    bound: float  # the worst allowed max_abs (atol + rtol * max|before|) of the worst output
    nonfinite_before: int  # positions excluded because the graph before the pass was inf/NaN there
    ok: bool
    detail: str = ""
    compared: int = 0  # finite floating-point output values compared (0 with every output non-finite: unchecked)

    def summary(self) -> str:
        """What was checked, for a report line: a max error only over values that could be compared."""
        if self.nonfinite_before and not self.compared:
            return f"not checked: all {self.nonfinite_before} output values were non-finite before the pass"
        return f"{self.nonfinite_before} non-finite output values not compared" if self.nonfinite_before else ""


@contextlib.contextmanager
def preserved_buffers(gm: torch.nn.Module) -> Iterator[None]:
    """Buffers the graph writes (a call counter, a cache) are put back afterwards: every check starts from the
    same state, and a check leaves the module as it found it."""
    saved = [(b, b.detach().clone()) for b in gm.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)


def run_graph(gm: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
    with torch.no_grad(), preserved_buffers(gm):
        return gm(*args, **kwargs)


def overflowed(gm: torch.fx.GraphModule, args: tuple, kwargs: dict, names: Sequence[str]) -> list[str]:
    """Those of the named nodes whose value on these inputs is non-finite or below the smallest normal."""
    watched = set(names)
    found: list[str] = []

    class Probe(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.name in watched and isinstance(out, torch.Tensor) and out.is_floating_point():
                tiny = torch.finfo(out.dtype).tiny
                if not torch.isfinite(out).all() or bool((out.abs() < tiny).any()):
                    found.append(n.name)
            return out

    flat = pytree.tree_leaves((args, kwargs)) if not hasattr(gm, "_in_spec") else \
        torch.fx._pytree.tree_flatten_spec((args, kwargs), gm._in_spec)
    with torch.no_grad(), preserved_buffers(gm):
        Probe(gm).run(*flat)
    return found


def compare(before: Any, after: Any, tol: Tolerance) -> Numerics:
    leaves_b, spec_b = pytree.tree_flatten(before)
    leaves_a, spec_a = pytree.tree_flatten(after)
    if spec_b != spec_a:
        return Numerics(float("inf"), float("inf"), -1.0, 0.0, 0, False, "output structure changed")
    worst_abs, worst_rel, worst_cos, worst_bound, excluded, failures, compared = 0.0, 0.0, 1.0, 0.0, 0, [], 0
    for i, (b, a) in enumerate(zip(leaves_b, leaves_a)):
        if not isinstance(b, torch.Tensor):
            if b != a:
                failures.append(f"output {i}: {a!r} != {b!r}")
            continue
        if a.shape != b.shape or a.dtype != b.dtype:
            failures.append(f"output {i}: {tuple(a.shape)}/{a.dtype} != {tuple(b.shape)}/{b.dtype}")
            continue
        if not b.is_floating_point():
            if not torch.equal(a, b):
                failures.append(f"output {i}: integer output differs")
            continue
        finite = torch.isfinite(b)
        if tol.whole_output_if_nonfinite and not finite.all():
            finite = torch.zeros_like(finite)
        excluded += int((~finite).sum())
        b64, a64 = b.double()[finite], a.double()[finite]
        if b64.numel() == 0:
            continue
        compared += b64.numel()
        err = (a64 - b64).abs().max().item() if a64.numel() else 0.0
        if not torch.isfinite(a64).all():  # inf/NaN where the graph before was finite: wrong under any contract
            err = float("inf")
            failures.append(f"output {i}: {int((~torch.isfinite(a64)).sum())} non-finite values where the graph "
                            "before was finite")
        scale = b64.abs().max().item()
        bound = tol.atol + tol.relative(b.dtype) * scale
        cos = torch.nn.functional.cosine_similarity(a64.flatten(), b64.flatten(), dim=0, eps=1e-30).item()
        cos = cos if math.isfinite(cos) else -1.0  # a NaN cosine (non-finite values) is the worst, never the best
        rel = err / scale if scale > 0 else err
        if err > bound:
            failures.append(f"output {i}: max|err| {err:.3g} > {bound:.3g} (atol {tol.atol:g} + rtol "
                            f"{tol.relative(b.dtype):g} x max|ref| {scale:.3g})")
        if tol.min_cosine is not None and cos < tol.min_cosine:
            failures.append(f"output {i}: cosine {cos:.6f} < {tol.min_cosine}")
        if err >= worst_abs:
            worst_abs, worst_bound = err, bound
        worst_rel, worst_cos = max(worst_rel, rel), min(worst_cos, cos)
    return Numerics(worst_abs, worst_rel, worst_cos, worst_bound, excluded, not failures, "; ".join(failures),
                    compared)
