"""Calibration as a service: what a pass asks for is what it gets, in bounded memory, from any iterable;
missing, empty or malformed calibration data is refused with a typed error before anything runs."""

import tracemalloc
from dataclasses import dataclass, field
from typing import ClassVar

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import fxopt
from fxopt import Pass, PassResult, Requirement
from fxopt.calibration import (
    BlockIO,
    BlockSamples,
    CalibrationStats,
    ChannelAbsMax,
    Histogram,
    MinMax,
    TokenAbsMax,
    calibrate,
)
from fxopt.errors import CalibrationError, CalibrationInputError, PassOptionError
from fxopt.pipeline import CanonicalizeStep
from fxopt.testing import assert_within, capture_graph

aten = torch.ops.aten


class FeedForward(nn.Module):
    def __init__(self, d: int = 8, hidden: int = 16):
        super().__init__()
        self.up, self.down = nn.Linear(d, hidden), nn.Linear(hidden, d)
        self.calls = 0  # forward runs (capture included)

    def forward(self, x, mask=None):
        self.calls += 1
        h = F.silu(self.up(x))
        return self.down(h if mask is None else h * mask)


def down_input(gm) -> str:
    """The node feeding the last linear (the activation SmoothQuant would smooth)."""
    linears = [n for n in gm.graph.nodes if n.target == aten.linear.default]
    return linears[-1].args[0].name


@dataclass(frozen=True)
class RecordStats(Pass):
    """Asks for statistics of the last linear's input and records what it receives."""

    name: ClassVar[str] = "record_stats"
    requires: ClassVar = frozenset({Requirement.SHAPES, Requirement.CALIBRATION})
    seen: list = field(default_factory=list, compare=False)

    def calibration_spec(self, gm):
        x = down_input(gm)
        return [ChannelAbsMax(x), TokenAbsMax(x, bins=64), Histogram(x, bins=64), MinMax(x)]

    def run(self, gm, ctx):
        self.seen.append((down_input(gm), ctx.stats))
        return PassResult(gm, False, reasons=("only records",))


def reference_inputs_of_down(model: FeedForward, items) -> torch.Tensor:
    """Every value the model's `down` linear reads over `items`, flattened to (tokens, hidden), from eager."""
    got = []
    hook = model.down.register_forward_pre_hook(lambda mod, inputs: got.append(inputs[0].detach()))
    with torch.no_grad():
        for args, kwargs in items:
            model(*args, **kwargs)
    hook.remove()
    return torch.cat([g.reshape(-1, g.shape[-1]) for g in got])


def batches(n: int, seed: int = 0, shape=(2, 5, 8)):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        yield torch.randn(*shape, generator=g)


def test_a_pass_receives_the_statistics_of_the_calibration_set():
    model = FeedForward()
    data = list(batches(6))
    p = RecordStats()
    fxopt.optimize(model, (data[0],), passes=[p], calibration=data)
    (node, stats), = p.seen
    ref = reference_inputs_of_down(model, [((x,), {}) for x in data])
    assert isinstance(stats, CalibrationStats) and stats.batches == len(data)
    assert torch.equal(stats.of(ChannelAbsMax(node)), ref.abs().amax(0))
    assert stats.of(MinMax(node)).min == ref.min().item() and stats.of(MinMax(node)).max == ref.max().item()
    tokens = stats.of(TokenAbsMax(node, bins=64))
    assert tokens.count == ref.shape[0] and tokens.max == ref.abs().amax(1).max().item()
    hist = stats.of(Histogram(node, bins=64))
    assert hist.count == ref.numel() and hist.counts.sum() == ref.numel()
    width = (hist.hi - hist.lo) / 64
    for q in (1, 50, 99):  # a histogram's percentile is exact to one bin
        assert abs(hist.percentile(q) - torch.quantile(ref.double().flatten(), q / 100).item()) <= width
    assert set(stats[node]) == {ChannelAbsMax(node), TokenAbsMax(node, bins=64), Histogram(node, bins=64),
                                MinMax(node)}


def test_histogram_range_grows_without_losing_counts():
    gm = capture_graph(FeedForward(), torch.randn(2, 5, 8))
    g = torch.Generator().manual_seed(0)
    items = [torch.randn(2, 5, 8, generator=g) * scale for scale in (1e-3, 1e3, -1e3)]  # doubles up, then down
    stats = calibrate(gm, [Histogram("x", bins=16)], items, progress=False)
    hist = stats.of(Histogram("x", bins=16))
    values = torch.cat(items).double().flatten()
    in_one_pass = ((values - hist.lo) * (16 / (hist.hi - hist.lo))).floor().long().bincount(minlength=16)
    assert hist.count == values.numel() and hist.lo <= hist.min and hist.max < hist.hi
    assert torch.equal(hist.counts, in_one_pass.double())  # as if binned once over the final range


def _growth(gm, specs, n: int) -> tuple[int, CalibrationStats]:
    """Peak traced memory of one calibration run over `n` batches, above what was held before it."""
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    stats = calibrate(gm, specs, batches(n), progress=False)
    return tracemalloc.get_traced_memory()[1] - held, stats


def test_memory_stays_flat_over_a_thousand_batches():
    gm = capture_graph(FeedForward(), torch.randn(2, 5, 8))
    node = down_input(gm)
    keep = BlockIO(inputs=(node,), outputs=(gm.graph.output_node().args[0][0].name,), max_batches=3)
    specs = [ChannelAbsMax(node), TokenAbsMax(node), Histogram(node), MinMax(node), keep]
    tracemalloc.start()
    try:
        _growth(gm, specs, 300)  # warm up: torch's and fx's caches fill over the first few hundred runs
        small, _ = _growth(gm, specs, 10)
        large, stats = _growth(gm, specs, 1000)
    finally:
        tracemalloc.stop()
    assert stats.batches == 1000
    assert large < 2 * small, f"peak traced memory grew {large} B over 1,000 batches, {small} B over 10"
    samples = stats.of(keep)
    assert isinstance(samples, BlockSamples) and len(samples.inputs) == len(samples.outputs) == 3


def test_missing_or_empty_calibration_is_refused_before_capture():
    empty_loader = DataLoader(TensorDataset(torch.randn(0, 5, 8)), batch_size=2)
    for calibration, why in ((None, "not given"), ([], "empty"), (empty_loader, "empty")):
        model, p = FeedForward(), RecordStats()
        with pytest.raises(CalibrationError, match=f"record_stats.*{why}"):
            fxopt.optimize(model, (torch.randn(2, 5, 8),), passes=[p], calibration=calibration)
        assert model.calls == 0 and p.seen == []


def test_one_shot_iterator_for_two_calibrating_passes_is_refused_before_capture():
    model, first, second = FeedForward(), RecordStats(), RecordStats()
    with pytest.raises(CalibrationError, match="one-shot iterator.*DataLoader"):
        fxopt.optimize(model, (torch.randn(2, 5, 8),), passes=[first, second], calibration=batches(3))
    assert model.calls == 0 and first.seen == second.seen == []


def test_empty_iterable_without_len_is_refused_before_its_pass_runs():
    model, p = FeedForward(), RecordStats()
    with pytest.raises(CalibrationError, match="record_stats.*yielded no items"):
        fxopt.optimize(model, (torch.randn(2, 5, 8),), passes=[p], calibration=batches(0))
    assert p.seen == []


def test_a_dataloader_works_and_is_iterated_by_each_pass():
    model, first, second = FeedForward(), RecordStats(), RecordStats()
    xs = torch.randn(10, 5, 8)
    loader = DataLoader(TensorDataset(xs), batch_size=4)  # items are [x] lists; 3 batches
    fxopt.optimize(model, (xs[:2],), passes=[first, second], calibration=loader)
    ref = reference_inputs_of_down(model, [((xs,), {})]).abs().amax(0)
    for p in (first, second):
        (node, stats), = p.seen
        assert stats.batches == len(loader) and torch.equal(stats.of(ChannelAbsMax(node)), ref)


def test_args_kwargs_pairs_dicts_and_constant_keywords_are_calibration_items():
    model, p = FeedForward(), RecordStats()
    xs, masks = list(batches(3)), list(batches(3, seed=1, shape=(2, 5, 16)))
    items = [((xs[0],), {"mask": masks[0]}), {"x": xs[1], "mask": masks[1]}, ([xs[2]], {"mask": masks[2]})]
    fxopt.optimize(model, (xs[0],), passes=[p], example_kwargs={"mask": masks[0]}, calibration=items)
    (node, stats), = p.seen
    ref = reference_inputs_of_down(model, [((x,), {"mask": m}) for x, m in zip(xs, masks)])
    assert stats.batches == 3 and torch.equal(stats.of(ChannelAbsMax(node)), ref.abs().amax(0))


@pytest.mark.parametrize("bad, argument, problem", [
    (torch.randn(2, 5, 7), "x", "size 7 in dim 2"),
    (torch.randn(2, 5, 8).double(), "x", "float64"),
    (((torch.randn(2, 5, 8),), {"scale": torch.randn(2)}), "scale", "not an argument"),
    ("text", None, "is a str"),
])
def test_an_item_that_does_not_match_the_signature_is_named_by_index(bad, argument, problem):
    items = [torch.randn(2, 5, 8), torch.randn(3, 4, 8), bad]
    with pytest.raises(CalibrationInputError, match=problem) as e:
        fxopt.optimize(FeedForward(), (torch.randn(2, 5, 8),), passes=[RecordStats()], calibration=items)
    assert e.value.index == 2 and e.value.argument == argument and "calibration item 2" in str(e.value)


def test_a_spec_naming_a_node_the_graph_lacks_is_a_typed_error():
    gm = capture_graph(FeedForward(), torch.randn(2, 5, 8))
    with pytest.raises(CalibrationError, match="'no_such_node'"):
        calibrate(gm, [ChannelAbsMax("no_such_node")], [torch.randn(2, 5, 8)], label="mine")
    with pytest.raises(PassOptionError, match="max_batches"):
        BlockIO(inputs=("x",), outputs=(), max_batches=0)


def test_progress_bar_names_the_pass_and_can_be_turned_off(capsys):
    for progress, shown in ((True, True), (False, False)):
        fxopt.optimize(FeedForward(), (torch.randn(2, 5, 8),), passes=[RecordStats()],
                       calibration=list(batches(2)), progress=progress)
        assert ("calibrating record_stats" in capsys.readouterr().err) is shown


@dataclass(frozen=True)
class RecordLinearInputs(Pass):
    """Asks for the per-channel abs-max at the input of every linear, in graph order."""

    name: ClassVar[str] = "record_linear_inputs"
    requires: ClassVar = frozenset({Requirement.SHAPES, Requirement.CALIBRATION})
    seen: list = field(default_factory=list, compare=False)

    def calibration_spec(self, gm):
        return [ChannelAbsMax(n.args[0].name) for n in gm.graph.nodes if n.target == aten.linear.default]

    def run(self, gm, ctx):
        self.seen.append(ctx.stats)
        return PassResult(gm, False, reasons=("only records",))


def test_a_hugging_face_model_calibrates_on_dict_items_of_other_lengths():
    hf = pytest.importorskip("tests.models.hf")
    model, _ = hf.build("llama")
    (ids,), kwargs = hf.inputs("llama", 2, 8)
    items = [{"input_ids": hf.inputs("llama", 2, seq, seed=seq)[0][0]} for seq in (5, 8, 12)]
    p = RecordLinearInputs()
    fxopt.optimize(model, (ids,), passes=[p], example_kwargs=kwargs, calibration=items)  # use_cache=False kept
    (stats,) = p.seen
    q_proj = model.model.layers[0].self_attn.q_proj  # the first linear of the graph
    got = []
    hook = q_proj.register_forward_pre_hook(lambda mod, inputs: got.append(inputs[0].detach()))
    with torch.no_grad():
        for item in items:
            model(**item, **kwargs)
    hook.remove()
    want = torch.cat([g.reshape(-1, g.shape[-1]) for g in got]).abs().amax(0)
    first = next(iter(stats.results))
    assert stats.batches == 3
    assert_within(stats.of(first), want, CanonicalizeStep.tolerance)  # the graph is the canonicalized capture
