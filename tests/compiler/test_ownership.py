"""The optimized module owns its state: optimizing, calling and converting it never changes the user's model, and
changes to the user's model never reach it."""

from collections import deque

import pytest
import torch
from torch import nn

import fxopt
from fxopt import capture as capture_module
from fxopt.passes import EXACT_PIPELINE
from fxopt.testing import assert_within
from tests.models import hf


class Stateful(nn.Module):
    """A call counter and a cache written by forward, and an output that depends on both."""

    def __init__(self):
        super().__init__()
        self.proj, self.norm = nn.Linear(8, 8), nn.LayerNorm(8)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("cache", torch.zeros(2, 3, 8))

    def forward(self, x):
        self.calls += 1
        self.cache.copy_(self.proj(x))
        scores = torch.exp(self.cache) / torch.exp(self.cache).sum(-1, keepdim=True)
        return self.norm(x + scores) * self.calls


def snapshot(model: nn.Module) -> dict:
    state = {k: (v.clone(), v.dtype, v.device, v.data_ptr()) for k, v in model.state_dict(keep_vars=True).items()}
    return {"state": state, "training": [m.training for m in model.modules()]}


def assert_unchanged(model: nn.Module, before: dict) -> None:
    now = snapshot(model)
    assert now["training"] == before["training"]
    assert now["state"].keys() == before["state"].keys()
    for k, (value, dtype, device, ptr) in before["state"].items():
        v2, dtype2, device2, ptr2 = now["state"][k]
        assert (dtype2, device2, ptr2) == (dtype, device, ptr), k
        assert torch.equal(v2, value), f"{k} changed"


@pytest.mark.parametrize("passes", [[], list(EXACT_PIPELINE)])
def test_optimizing_and_calling_a_stateful_model_leaves_it_as_it_was(passes):
    model, x = Stateful().train(), torch.randn(2, 3, 8)
    before = snapshot(model)
    opt = fxopt.optimize(model, (x,), passes=passes)
    assert_unchanged(model, before)
    first, second = opt(x), opt(x)
    assert_unchanged(model, before)
    model.eval()
    with torch.no_grad():
        want_first, want_second = model(x), model(x)  # the model's own counter: 1, then 2
    assert_within(first, want_first)
    assert_within(second, want_second)  # the optimized module counts its own calls


def test_a_stateful_model_is_not_blamed_on_a_pass():
    """Each numerics check starts from the captured state, so the counter does not look like a broken pass."""
    opt = fxopt.optimize(Stateful(), (torch.randn(2, 3, 8),), passes=["stabilize_softmax", "fuse_layernorm"])
    assert all(p.applied for p in opt.report.passes)


def test_converting_either_side_never_reaches_the_other():
    model, x = Stateful().eval(), torch.randn(2, 3, 8)
    opt = fxopt.optimize(model, (x,), passes=list(EXACT_PIPELINE))
    with torch.no_grad():
        want = opt(x)
    model.double()
    model.proj.weight.data.mul_(3)
    with torch.no_grad():
        assert_within(opt(x), want * 2)  # its second call; its weights are its own
    before = snapshot(model)
    opt.half()
    opt.graph_module.get_parameter("proj.weight").data.zero_()
    assert_unchanged(model, before)


def test_shared_weights_share_storage_but_not_conversions():
    model, x = Stateful().eval(), torch.randn(2, 3, 8)
    opt = fxopt.optimize(model, (x,), passes=[], share_weights=True)
    assert opt.graph_module.get_parameter("proj.weight").data_ptr() == model.proj.weight.data_ptr()
    assert opt.graph_module.get_buffer("cache").data_ptr() != model.cache.data_ptr()  # state is never shared
    opt.half()
    assert model.proj.weight.dtype == torch.float32


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_hugging_face_model_is_bit_identical_after_optimize_calls_and_conversion(family):
    model, key = hf.build(family, "sdpa")
    args, kwargs = hf.inputs(family, 2, 9)
    before = snapshot(model)
    opt = fxopt.optimize(model, args, passes=list(EXACT_PIPELINE), example_kwargs=kwargs)
    with torch.no_grad():
        opt(*args, **kwargs)
    tied = {p.data_ptr() for p in model.parameters()}
    assert len({p.data_ptr() for p in opt.graph_module.parameters()}) == len(tied)  # ties kept, nothing doubled twice
    opt.half()
    assert_unchanged(model, before)


def test_a_model_that_does_not_reproduce_its_outputs_is_named_as_the_cause():
    class Noisy(nn.Module):
        def forward(self, x):
            mu = x.mean(-1, keepdim=True)
            return (x - mu) / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + 1e-5) + torch.rand_like(x)

    with pytest.raises(fxopt.NumericsError, match="differ between two runs on the same inputs"):
        fxopt.optimize(Noisy(), (torch.randn(2, 3, 8),), passes=["fuse_layernorm"])


def test_a_converted_module_runs_in_its_new_dtype():
    x = torch.randn(2, 3, 8)
    opt = fxopt.optimize(nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)).eval(), (x,), passes=list(EXACT_PIPELINE))
    with torch.no_grad():
        want = opt(x)
        got = opt.to(torch.float64)(x.double())
    assert got.dtype == torch.float64
    assert_within(got.float(), want)


def test_a_keyword_captured_as_a_constant_must_be_passed():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(8)

        def forward(self, x, scale: float = 1.0):
            return self.norm(x) * scale

    x = torch.randn(2, 3, 8)
    opt = fxopt.optimize(Scaled().eval(), (x,), example_kwargs={"scale": 2.0}, passes=["fuse_layernorm"])
    with pytest.raises(fxopt.InputMismatchError, match="'scale'.*captured with scale=2.0 and forward's default is 1.0"):
        opt(x)  # the model would use its default 1.0: never answer with the captured 2.0 silently


def test_a_forward_the_user_set_on_the_instance_is_kept():
    model = KeywordsOnlyWithHook()
    hook = model.forward
    fxopt.optimize(model, (torch.randn(2, 3, 8),), example_kwargs={"bias": torch.randn(2, 3, 8)},
                   passes=["fuse_layernorm"])
    assert vars(model)["forward"] is hook


class KeywordsOnlyWithHook(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(8)
        original = type(self).forward
        self.forward = lambda x, **kw: original(self, x, **kw)  # what accelerate-style hooks do

    def forward(self, x, **kwargs):
        return self.norm(x + kwargs["bias"])


def test_attributes_the_forward_assigns_while_traced_do_not_stay_on_the_model():
    """Review finding: `self.cache = x * 1` left a FakeTensor on the user's model, `self.last_shape` SymInts."""

    class Remembers(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj, self.cache = nn.Linear(4, 4), None

        def forward(self, x):
            self.cache = x * 1
            self.last_shape = x.shape
            return self.proj(x)

    model = Remembers()
    before = dict(vars(model))
    fxopt.optimize(model, (torch.randn(2, 4),))
    assert model.cache is None and "last_shape" not in vars(model) and vars(model).keys() == before.keys()


def plain_state(model: nn.Module) -> dict:
    """Each module's attributes other than its parameters, buffers and submodules, as plain Python: every container
    and tensor with its identity, so that a list emptied again but replaced by a new one is a difference."""
    def plain(value, seen):
        if id(value) in seen:
            return ("seen", id(value))
        if isinstance(value, torch.Tensor):
            return ("tensor", id(value), value.data_ptr(), value.dtype, value.tolist())
        if isinstance(value, (list, tuple, deque, dict, set, bytearray)):
            seen = seen | {id(value)}
        if isinstance(value, dict):
            return ("dict", id(value), [(repr(k), plain(v, seen)) for k, v in value.items()])
        if isinstance(value, (list, tuple, deque)):
            return (type(value).__name__, id(value), [plain(v, seen) for v in value])
        if isinstance(value, (set, bytearray)):
            return (type(value).__name__, id(value), sorted(map(repr, value)))
        return (type(value).__name__, repr(value))  # a SymInt left in a list shows as one

    internals = set(vars(nn.Module()))
    return {(path, name): plain(value, set()) for path, module in model.named_modules()
            for name, value in vars(module).items() if name not in internals}


class CountsCalls(nn.Module):
    """Review finding: a list of the batch sizes seen and a call counter, both changed in place by forward."""

    def __init__(self):
        super().__init__()
        self.proj, self.norm = nn.Linear(8, 8), nn.LayerNorm(8)
        self.seen_batch_sizes = []
        self.stats = {"calls": 0}

    def forward(self, x):
        self.seen_batch_sizes.append(x.shape[0])
        self.stats["calls"] += 1
        return self.norm(self.proj(x))


def test_a_call_counter_and_a_list_of_seen_batch_sizes_are_as_they_were_after_optimize():
    model = CountsCalls().eval()
    seen, stats, before = model.seen_batch_sizes, model.stats, plain_state(model)
    fxopt.optimize(model, (torch.randn(2, 8),), passes=["fuse_layernorm"])
    assert model.seen_batch_sizes is seen and seen == [] and model.stats is stats and stats == {"calls": 0}
    assert plain_state(model) == before


def test_a_cache_forward_fills_and_reads_is_left_empty_in_the_same_list():
    class CachesKeys(nn.Module):
        def __init__(self):
            super().__init__()
            self.key, self.value = nn.Linear(8, 8), nn.Linear(8, 8)
            self.cache = []  # the keys of every step so far

        def forward(self, x):
            self.cache.append(self.key(x))
            keys = torch.cat(self.cache, dim=1)
            return (x @ keys.transpose(-1, -2)).softmax(-1) @ self.value(keys)

    model = CachesKeys().eval()
    before = plain_state(model)
    opt = fxopt.optimize(model, (torch.randn(2, 3, 8),), passes=["stabilize_softmax"])
    assert plain_state(model) == before and model.cache == []
    x = torch.randn(2, 3, 8)
    with torch.no_grad():
        assert_within(opt(x), model(x))  # the model's first step, as captured


class Decoder(nn.Module):
    """Nested state written by forward: a history dict of lists, a deque of recent shapes, a set of seen dtypes, a
    list inside a tuple, and a log shared with its parent."""

    def __init__(self, log: dict):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.history = {"steps": [[0]], "by_layer": {"proj": []}}
        self.recent_shapes = deque(maxlen=4)
        self.dtypes_seen = {torch.float64}
        self.limits = ([1.0], "clamp")
        self.log = log

    def forward(self, x):
        self.history["steps"][0].append(1)
        self.history["steps"].append([x.shape[0]])
        self.history["by_layer"]["proj"].append(x.shape)
        self.history["last"] = x.shape[-1]
        self.recent_shapes.append(tuple(x.shape))
        self.dtypes_seen.add(x.dtype)
        self.limits[0].append(2.0)
        self.log["decoder"].append("called")
        return self.proj(x)


def test_nested_containers_forward_changes_are_put_back_into_the_same_objects():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.log = {"decoder": [], "model": bytearray(b"")}
            self.decoder, self.norm = Decoder(self.log), nn.LayerNorm(8)

        def forward(self, x):
            self.log["model"].extend(b"called")
            return self.norm(self.decoder(x))

    model = Model().eval()
    steps, by_layer = model.decoder.history["steps"][0], model.decoder.history["by_layer"]
    before = plain_state(model)
    fxopt.optimize(model, (torch.randn(2, 8),), passes=["fuse_layernorm"])
    assert plain_state(model) == before
    assert model.decoder.history["steps"][0] is steps and model.decoder.history["by_layer"] is by_layer
    assert model.decoder.log is model.log


class RunningScale(nn.Module):
    """Scales its inputs by a running variance, an exponential moving average kept in a plain tensor attribute (not
    a buffer), the way BatchNorm keeps its statistics."""

    def __init__(self, as_buffer: bool = False):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        if as_buffer:
            self.register_buffer("running_var", torch.ones(8), persistent=False)
        else:
            self.running_var = torch.ones(8)

    def forward(self, x):
        self.running_var.mul_(0.9).add_(x.var(0), alpha=0.1)
        return self.proj(x / torch.sqrt(self.running_var + 1e-5))


class Normalized(nn.Module):
    def __init__(self, as_buffer: bool = False):
        super().__init__()
        self.scale, self.head = RunningScale(as_buffer), nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.scale(x))


def test_a_tensor_attribute_forward_updates_in_place_is_a_capture_error_naming_it_and_is_left_as_it_was():
    model = Normalized().eval()
    var, before = model.scale.running_var, plain_state(model)
    with pytest.raises(fxopt.CaptureError, match=r"'running_var' of submodule 'scale' \(RunningScale\).*"
                                                 r"register it as a buffer") as e:
        fxopt.optimize(model, (torch.randn(4, 8),), passes=["fuse_layernorm"])
    assert isinstance(e.value.__cause__, RuntimeError)  # torch.export's own error, chained
    assert model.scale.running_var is var and plain_state(model) == before
    assert torch.equal(var, torch.ones(8))  # export ran `mul_(0.9)` on it for real


def test_the_same_tensor_registered_as_a_buffer_captures_and_the_users_buffer_is_unchanged():
    """What the error above advises works: export carries a buffer as state, and the user's stays as it was."""
    model, x = Normalized(as_buffer=True).eval(), torch.randn(4, 8)
    before = snapshot(model)
    opt = fxopt.optimize(model, (x,), passes=["fuse_layernorm"])
    assert_unchanged(model, before)
    assert torch.equal(model.scale.running_var, torch.ones(8))
    with torch.no_grad():
        assert_within(opt(x), model(x))  # both from the initial variance: the optimized module's own state


def test_every_capture_attempt_finds_the_model_as_the_user_left_it(monkeypatch):
    """The dynamic attempt runs forward, then fails (as it does for some models); the static attempt that follows
    must not see what the first one did to the model."""
    export, found = capture_module._export, []

    def dynamic_fails(model, args, kwargs, dynamic_shapes):
        found.append((list(model.seen_batch_sizes), dict(model.stats), "last_input" in vars(model)))
        program = export(model, args, kwargs, dynamic_shapes)
        model.last_input = args[0]  # an attribute the attempt left behind
        if dynamic_shapes is not None:
            raise RuntimeError("dynamic capture failed")
        return program

    monkeypatch.setattr(capture_module, "_export", dynamic_fails)
    model = CountsCalls().eval()
    before = plain_state(model)
    opt = fxopt.optimize(model, (torch.randn(2, 8),), passes=["fuse_layernorm"])
    assert opt.report.capture.method == "torch.export(strict=False, static shapes)"
    assert found == [([], {"calls": 0}, False)] * 2
    assert plain_state(model) == before


def test_a_program_that_cannot_be_functionalized_is_a_capture_error_with_the_cause_chained(monkeypatch):
    failure = NotImplementedError("no functionalization rule for an op")

    def run_decompositions(self, table):
        raise failure

    monkeypatch.setattr(torch.export.ExportedProgram, "run_decompositions", run_decompositions)
    model = CountsCalls().eval()
    before = plain_state(model)
    with pytest.raises(fxopt.CaptureError, match=r"static shapes\): NotImplementedError: no functionalization") as e:
        fxopt.optimize(model, (torch.randn(2, 8),), passes=["fuse_layernorm"])
    assert e.value.__cause__ is failure
    assert plain_state(model) == before


def test_tensor_attributes_forward_never_writes_are_not_touched(monkeypatch):
    """Put back only where written (the version counter moved): never compared, so a meta tensor, which cannot
    be compared, and NaNs, which compare unequal to themselves, are not written to."""
    class Holds(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)
            self.shape_only, self.unknown = torch.empty(3, device="meta"), torch.full((2,), float("nan"))

        def forward(self, x):
            return self.proj(x)

    model = Holds().eval()
    written, copy = [], torch.Tensor.copy_
    monkeypatch.setattr(torch.Tensor, "copy_", lambda t, *a, **k: written.append(t) or copy(t, *a, **k))
    fxopt.optimize(model, (torch.randn(2, 8),), passes=["fuse_layernorm"])
    assert not [t for t in written if t is model.unknown or t is model.shape_only]
    assert torch.isnan(model.unknown).all() and model.shape_only.is_meta
