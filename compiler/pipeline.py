"""The pipeline: a visible list of passes, run with requirements checked first and, after every pass,
structural verification and a numerics check against the graph before it (the pass's own tolerance).

Steps, in order: "canonicalize" (when there is any pass), then each pass, with "canonicalize" again after a
pass that declares `leaves_noncanonical`. Canonicalization is a step like a pass: run on a copy, verified,
numerics-checked (exact, ROUNDING), reported with its counts per rule, not applied when nothing changed.
Before a pass that requires calibration, the graph as it is then runs over `ctx.calibration`, feeding the
observers of the pass's `calibration_spec`; the pass gets the results as `ctx.stats`.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import fx
from torch.utils import _pytree as pytree
from tqdm.auto import tqdm

from .calibration import calibrate, check_source, show_progress
from .canonicalize import canonicalize_graph
from .errors import ExampleInputsError, NumericsError, PassError, RequirementError
from .numerics import Numerics, compare, overflowed, run_graph
from .pass_base import Pass, PassContext, PassResult, Requirement
from .report import PassReport, tensor_bytes
from .torch_kernels import decomposed_graph, reference_table
from .verify import output_signature, verify_graph

log = logging.getLogger(__name__)


def calibrating(passes: Sequence[Pass]) -> list[Pass]:
    return [p for p in passes if Requirement.CALIBRATION in p.requires]


def check_requirements(passes: Sequence[Pass], ctx: PassContext) -> None:
    """Refuse, before anything runs, what the pipeline cannot provide (calibration: see fxopt.calibration)."""
    have = {Requirement.SHAPES, Requirement.CALIBRATION}
    if ctx.example_args or ctx.example_kwargs:
        have.add(Requirement.EXAMPLE_INPUTS)
    for p in passes:
        missing = [r.value for r in p.requires if r not in have]
        if missing:
            raise RequirementError(f"pass {p.name!r} requires {', '.join(missing)}, which were not given "
                                   f"(nothing has run)")
    check_source(ctx.calibration, [p.name for p in calibrating(passes)])


def clone_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy whose graph can be edited freely; parameters and buffers are shared, never copied."""
    memo = {id(t): t for t in itertools.chain(gm.parameters(), gm.buffers())}
    return copy.deepcopy(gm, memo)


@dataclass(frozen=True)
class CanonicalizeStep(Pass):
    """`fxopt.canonicalize.canonicalize_graph` as a pipeline step; its stats are the counts per rule."""

    name: ClassVar[str] = "canonicalize"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        counts = canonicalize_graph(gm)
        return PassResult(gm, bool(counts), counts, () if counts else ("the graph is already canonical",))


def with_canonicalization(passes: Sequence[Pass]) -> list[Pass]:
    """The steps the pipeline runs: canonicalization first (when there is any pass), and again after each pass
    that declares `leaves_noncanonical`."""
    steps: list[Pass] = [CanonicalizeStep()] if passes else []
    for p in passes:
        steps += [p, CanonicalizeStep()] if p.leaves_noncanonical else [p]
    return steps


@dataclass
class _Run:
    gm: fx.GraphModule
    ctx: PassContext
    signature: list[str]
    before: Any  # outputs of `gm` on the example inputs (None: numerics not checked)
    check_numerics: bool
    progress: bool | None


def run_pipeline(gm: fx.GraphModule, passes: Sequence[Pass], ctx: PassContext, *, check_numerics: bool = True,
                 progress: bool | None = None) -> tuple[fx.GraphModule, list[PassReport]]:
    """Run `passes` (with canonicalization steps) on `gm`; `progress`: a bar over the steps and one per
    calibration (None: when stderr is a terminal)."""
    check_requirements(passes, ctx)
    steps = with_canonicalization(passes)
    before = _reference_run(gm, ctx) if check_numerics else None
    state = _Run(gm, ctx, output_signature(gm), before, check_numerics, progress)
    reports = []
    with tqdm(total=len(steps), desc="fxopt passes", unit="pass", leave=False,
              disable=not show_progress(progress)) as bar:
        for i, p in enumerate(steps):
            bar.set_postfix_str(p.name)
            reports.append(_step(state, p, [q.name for q in steps[:i]]))
            bar.update()
    return state.gm, reports


def _reference_run(gm: fx.GraphModule, ctx: PassContext) -> Any:
    """The captured graph's outputs on the example inputs, which every pass is checked against."""
    tensors = [t for t in (*gm.parameters(), *gm.buffers(), *pytree.tree_leaves((ctx.example_args,
               dict(ctx.example_kwargs)))) if isinstance(t, torch.Tensor)]
    if any(t.is_meta for t in tensors):
        raise ExampleInputsError("the model or its example inputs are on the meta device, where outputs have no "
                                 "values to check; pass check_numerics=False, or use real tensors")
    try:
        return run_graph(gm, ctx.example_args, dict(ctx.example_kwargs))
    except Exception as e:
        dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors if t.is_floating_point()})
        raise ExampleInputsError(f"the captured model does not run on its example inputs ({type(e).__name__}: "
                                 f"{str(e).strip().splitlines()[0][:300]}); floating dtypes among its weights and "
                                 f"inputs: {', '.join(dtypes) or 'none'}") from e


def _graph_code(gm: fx.GraphModule) -> str:
    return gm.graph.python_code(root_module="self").src


def _step(state: _Run, p: Pass, ran_before: list[str]) -> PassReport:
    start = time.perf_counter()
    work = clone_graph_module(state.gm)
    ctx = _calibrated(state, p, work, ran_before)
    code = _graph_code(work)
    try:
        result = p.run(work, ctx)
        if not result.modified and _graph_code(result.graph_module) != code:
            raise ValueError("it returned modified=False but changed the graph")
    except Exception as e:
        raise PassError(p.name, ran_before, e) from e
    if not result.modified:
        why = result.reasons[0] if len(result.reasons) == 1 else (
            f"no candidate matched ({len(result.reasons)} near-misses)" if result.reasons
            else "no candidate pattern in the graph")
        log.info("pass %s did not apply: %s", p.name, why)
        return PassReport(p.name, False, p.exactness.value, time.perf_counter() - start, {}, why,
                          tuple(result.reasons))
    verify_graph(result.graph_module, state.signature, p.name)
    numerics = _check_numerics(state, p, result, ran_before) if state.check_numerics else None
    weights = (tensor_bytes(state.gm), tensor_bytes(result.graph_module))
    state.gm = result.graph_module
    return PassReport(p.name, True, p.exactness.value, time.perf_counter() - start, dict(result.stats), None,
                      tuple(result.reasons), numerics, result.tolerance or p.tolerance, tuple(result.notes),
                      tuple(result.measures), weights)


def _calibrated(state: _Run, p: Pass, gm: fx.GraphModule, ran_before: list[str]) -> PassContext:
    """`ctx` with the statistics `p` asks for, gathered on `gm` (the graph just before `p`, a copy)."""
    if Requirement.CALIBRATION not in p.requires:
        return state.ctx
    try:
        specs = tuple(p.calibration_spec(gm))
    except Exception as e:
        raise PassError(p.name, ran_before, e) from e
    stats = calibrate(gm, specs, state.ctx.calibration, label=p.name,
                      example_kwargs=state.ctx.example_kwargs, progress=state.progress) if specs else None
    return dataclasses.replace(state.ctx, stats=stats)


def _on_a_device(gm: fx.GraphModule, args: tuple, kwargs: dict) -> bool:
    """Whether the graph runs anywhere but the CPU (its weights or its inputs), where op kernels replace the
    references."""
    leaves = [*gm.parameters(), *gm.buffers(), *pytree.tree_leaves((args, kwargs))]
    return any(isinstance(t, torch.Tensor) and t.device.type != "cpu" for t in leaves)


def _on_references(gm: fx.GraphModule, args: tuple, kwargs: dict) -> Any:
    return run_graph(decomposed_graph(gm, reference_table()), args, kwargs)


def _new_nonfinite(reference: Any, kernels: Any) -> bool:
    pairs = zip(pytree.tree_leaves(reference), pytree.tree_leaves(kernels), strict=False)
    return any(isinstance(r, torch.Tensor) and isinstance(k, torch.Tensor) and r.is_floating_point()
               and r.shape == k.shape and bool((torch.isfinite(r) & ~torch.isfinite(k)).any()) for r, k in pairs)


def _check_numerics(state: _Run, p: Pass, result: PassResult, ran_before: list[str]) -> Numerics:
    args, kwargs = state.ctx.example_args, dict(state.ctx.example_kwargs)
    # on a device, a pass whose ops' kernels may move a code by one is checked on the references (both graphs):
    # the rewrite, not the kernels' rounding; the kernels' own difference is reported beside it
    on_references = p.check_on_references and _on_a_device(state.gm, args, kwargs)
    try:
        after = run_graph(result.graph_module, args, kwargs)
        blown = overflowed(state.gm, args, kwargs, result.overflow_watch) if result.overflow_watch else []
        before, checked = ((_on_references(state.gm, args, kwargs), _on_references(result.graph_module, args, kwargs))
                           if on_references else (state.before, after))
    except Exception as e:  # noqa: BLE001 - the rewritten graph does not run: the pass is at fault
        raise PassError(p.name, ran_before, e) from e
    tolerance = result.tolerance or p.tolerance
    numerics = compare(before, checked, tolerance)
    where = ""
    if on_references:
        where = " on the ops' reference implementations"
        kernels = compare(state.before, after, tolerance)
        numerics = dataclasses.replace(numerics, detail="; ".join(filter(None, (
            numerics.detail, f"checked{where}; the device kernels: max|err| {kernels.max_abs:.3g}, "
            f"cosine {kernels.cosine:.6f} (a code moved by one where a value lies on a rounding boundary)"))))
        if _new_nonfinite(checked, after):
            raise NumericsError(f"pass {p.name!r}: its ops' device kernels give inf/NaN where their reference "
                                f"implementations are finite, on the example inputs")
    if blown:
        numerics = dataclasses.replace(
            numerics, ok=True, detail=f"not compared: the graph before the pass overflowed or underflowed "
            f"at {', '.join(blown)} on the example inputs")
    if not numerics.ok:
        again = (compare(before, _on_references(state.gm, args, kwargs), tolerance) if on_references else
                 compare(state.before, run_graph(state.gm, args, kwargs), tolerance))
        if not again.ok:  # the graph before the pass does not reproduce its own outputs
            raise NumericsError(f"the model's outputs differ between two runs on the same inputs (randomness "
                                f"or state the forward keeps outside its buffers), so pass {p.name!r} cannot be "
                                f"checked: {again.detail}")
        own = " (the bound it stated for this run)" if result.tolerance is not None else ""
        raise NumericsError(f"pass {p.name!r} ({p.exactness.value}) broke its numerical contract{own} "
                            f"on the example inputs{where}: {numerics.detail}")
    state.before = after
    return numerics
