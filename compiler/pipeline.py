"""The pipeline: a visible list of passes, run with requirements checked first and, after every pass,
structural verification and a numerics check against the graph before it (the pass's own tolerance)."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
import time
from collections.abc import Sequence

from torch import fx

from .errors import NumericsError, PassError, RequirementError
from .numerics import compare, overflowed, run_graph
from .pass_base import Pass, PassContext, Requirement
from .report import PassReport
from .verify import output_signature, verify_graph

log = logging.getLogger(__name__)


def check_requirements(passes: Sequence[Pass], ctx: PassContext) -> None:
    have = {Requirement.SHAPES}
    if ctx.example_args or ctx.example_kwargs:
        have.add(Requirement.EXAMPLE_INPUTS)
    if ctx.calibration is not None:
        have.add(Requirement.CALIBRATION)
    for p in passes:
        missing = [r.value for r in p.requires if r not in have]
        if missing:
            raise RequirementError(f"pass {p.name!r} requires {', '.join(missing)}, which were not given "
                                   f"(nothing has run)")


def clone_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy whose graph can be edited freely; parameters and buffers are shared, never copied."""
    memo = {id(t): t for t in itertools.chain(gm.parameters(), gm.buffers())}
    return copy.deepcopy(gm, memo)


def run_pipeline(gm: fx.GraphModule, passes: Sequence[Pass], ctx: PassContext, *,
                 check_numerics: bool = True) -> tuple[fx.GraphModule, list[PassReport]]:
    check_requirements(passes, ctx)
    reports: list[PassReport] = []
    signature = output_signature(gm)
    before = run_graph(gm, ctx.example_args, dict(ctx.example_kwargs)) if check_numerics else None
    for i, p in enumerate(passes):
        ran_before = [q.name for q in passes[:i]]
        start = time.perf_counter()
        try:
            result = p.run(clone_graph_module(gm), ctx)
        except Exception as e:
            raise PassError(p.name, ran_before, e) from e
        seconds = time.perf_counter() - start
        if not result.modified:
            why = result.reasons[0] if len(result.reasons) == 1 else (
                f"no candidate matched ({len(result.reasons)} near-misses)" if result.reasons
                else "no candidate pattern in the graph")
            log.info("pass %s did not apply: %s", p.name, why)
            reports.append(PassReport(p.name, False, p.exactness.value, seconds, {}, why, tuple(result.reasons)))
            continue
        verify_graph(result.graph_module, signature, p.name)
        numerics = None
        if check_numerics:
            try:
                after = run_graph(result.graph_module, ctx.example_args, dict(ctx.example_kwargs))
                blown = overflowed(gm, ctx.example_args, dict(ctx.example_kwargs), result.overflow_watch) \
                    if result.overflow_watch else []
            except Exception as e:  # noqa: BLE001 - the rewritten graph does not run: the pass is at fault
                raise PassError(p.name, ran_before, e) from e
            numerics = compare(before, after, p.tolerance)
            if blown:
                numerics = dataclasses.replace(
                    numerics, ok=True, detail=f"not compared: the graph before the pass overflowed or underflowed "
                    f"at {', '.join(blown)} on the example inputs")
            if not numerics.ok:
                raise NumericsError(f"pass {p.name!r} ({p.exactness.value}) broke its numerical contract "
                                    f"on the example inputs: {numerics.detail}")
            before = after
        gm = result.graph_module
        reports.append(PassReport(p.name, True, p.exactness.value, time.perf_counter() - start,
                                  dict(result.stats), None, tuple(result.reasons), numerics))
    return gm, reports
