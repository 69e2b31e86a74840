"""The optimized module owns its state: optimizing, calling and converting it never changes the user's model, and
changes to the user's model never reach it."""

import pytest
import torch
from torch import nn

import fxopt
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
