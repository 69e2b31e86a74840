"""The pass contract: options as dataclass fields, declared requirements and exactness, one `run`."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import fx

from .errors import PassOptionError

if TYPE_CHECKING:
    from .calibration import CalibrationStats, Observe


class Requirement(enum.Enum):
    EXAMPLE_INPUTS = "example inputs"
    SHAPES = "shape/dtype metadata (node.meta['val'])"
    CALIBRATION = "calibration data"


class Exactness(enum.Enum):
    EXACT = "exact up to float rounding"
    APPROXIMATE = "approximate within a declared error metric"


@dataclass(frozen=True)
class Tolerance:
    """max|after - before| <= atol + rtol * max|before|, per output, where `before` is finite.

    `rtol` is given per dtype: rounding differences scale with the dtype's epsilon and with depth.
    `min_cosine` is checked too when set (approximate passes). With `whole_output_if_nonfinite`, an output
    where `before` has any inf/NaN is excluded entirely (a softmax row that overflowed is wrong everywhere,
    not only where it is inf).
    """

    rtol: Mapping[torch.dtype, float]
    atol: float = 0.0
    min_cosine: float | None = None
    whole_output_if_nonfinite: bool = False

    def relative(self, dtype: torch.dtype) -> float:
        return self.rtol.get(dtype, self.rtol.get(torch.float32, 1e-4))


# Reassociated float ops (a fused reduction instead of a decomposed one) differ by a few ulps per op; over
# a few dozen layers that stays within ~1e3 eps of the output scale.
ROUNDING = Tolerance(rtol={torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2,
                           torch.bfloat16: 5e-2}, atol=1e-6)


@dataclass(frozen=True)
class PassContext:
    """What a pass may read besides the graph. Passed explicitly; never global.

    `calibration` is the user's iterable, as given (never list()-ed). `stats` is set by the pipeline for a pass
    that requires calibration: it runs the pass with `dataclasses.replace(ctx, stats=...)`, the statistics its
    `calibration_spec` asked for, gathered on the graph as it was just before the pass (see fxopt.calibration).
    """

    example_args: tuple = ()
    example_kwargs: Mapping[str, Any] = field(default_factory=dict)
    calibration: Iterable | None = None
    stats: CalibrationStats | None = None


@dataclass(frozen=True)
class Measure:
    """One quantity per site before and after a pass, for the report's plots: activation abs-max before and after
    smoothing, kept magnitude without and with a permutation, K/V-cache bytes at MHA and at GQA."""

    title: str  # what is measured, e.g. "activation abs-max at the linears' input"
    unit: str  # "" for a plain number, "bytes", "share of |W|"
    before: Mapping[str, float]  # site -> value before the pass (or without what it did)
    after: Mapping[str, float]  # site -> value after it; the same sites
    log_scale: bool = False

    def __post_init__(self) -> None:
        if set(self.before) != set(self.after):
            raise ValueError(f"measure {self.title!r}: sites before and after differ "
                             f"({sorted(set(self.before) ^ set(self.after))[:3]})")

    def to_dict(self) -> dict[str, Any]:
        return {"title": self.title, "unit": self.unit, "before": dict(self.before), "after": dict(self.after),
                "log_scale": self.log_scale}


@dataclass(frozen=True)
class PassResult:
    graph_module: fx.GraphModule
    modified: bool
    stats: Mapping[str, int] = field(default_factory=dict)
    # why nothing (or not everything) was rewritten: "node: reason" lines, deterministic order
    reasons: Sequence[str] = ()
    # names of nodes of the graph *before* the pass whose values decide whether the exactness contract
    # applies: if one is inf/NaN or below the dtype's smallest normal on the example inputs, the original
    # overflowed or underflowed there, and outputs are not compared (e.g. a naive softmax's denominators)
    overflow_watch: Sequence[str] = ()
    # the bound this run promises, when it depends on what the pass did (an int8 pass: <= 2 * its scales);
    # None: the class's declared `tolerance`
    tolerance: Tolerance | None = None
    # what was done where, one line per site ("layer.0.q.weight: scale in norm ln_1, α=0.5, int8")
    notes: Sequence[str] = ()
    # per-site quantities before and after, for the report's plots
    measures: Sequence[Measure] = ()


@dataclass(frozen=True)
class Pass:
    """Base of every pass. Subclasses are frozen dataclasses whose fields are their options."""

    name: ClassVar[str]
    requires: ClassVar[frozenset[Requirement]] = frozenset({Requirement.SHAPES})
    exactness: ClassVar[Exactness] = Exactness.EXACT
    tolerance: ClassVar[Tolerance] = ROUNDING
    # True when the pass may leave non-canonical forms behind: the pipeline canonicalizes again after it
    leaves_noncanonical: ClassVar[bool] = False
    # True when the ops the pass introduces have device kernels that may move a quantizer's code by one where a
    # value lies on a rounding boundary (a reduction's order, a transcendental's ulp): an exact rewrite, yet a
    # deep network amplifies such flips without bound. On such devices the pipeline checks the pass on the ops'
    # reference implementations (both graphs), which proves the rewrite; the kernels answer to those references
    # in their own checks.
    check_on_references: ClassVar[bool] = False
    # options validated by __post_init__: field name -> (predicate, "what it must be")
    option_checks: ClassVar[Mapping[str, tuple[Any, str]]] = {}

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            check = self.option_checks.get(f.name)
            if check is not None and not check[0](value):
                raise PassOptionError(self.name, f.name, f"must be {check[1]}, got {value!r}")

    @classmethod
    def configure(cls, **options: Any) -> Pass:
        known = {f.name for f in dataclasses.fields(cls)}
        for key in options:
            if key not in known:
                raise PassOptionError(cls.name, key, f"is unknown; options are {sorted(known) or 'none'}")
        return cls(**options)

    def calibration_spec(self, gm: fx.GraphModule) -> Sequence[Observe]:
        """The statistics this pass needs, naming nodes of `gm` (the graph just before the pass). Called only
        for passes that require `Requirement.CALIBRATION`; the results arrive as `ctx.stats`."""
        return ()

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, gm: fx.GraphModule, ctx: PassContext | None = None) -> PassResult:
        return self.run(gm, ctx or PassContext())


def is_bool(v: Any) -> bool:
    return isinstance(v, bool)


def int_at_least(k: int):
    """An option check: an int (not a bool) >= k."""
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= k
