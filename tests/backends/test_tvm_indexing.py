"""Advanced indexing on TVM with torch's semantics, and `fxopt.compile`'s check of every compiled model against
the optimized torch module (issue 10, finding 11: negative constant indices read out of bounds, silently)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("tvm")

import fxopt  # noqa: E402
import fxopt.backends.tvm  # noqa: E402
from fxopt.backends.tvm import table  # noqa: E402
from fxopt.testing import assert_within  # noqa: E402
from tests.models import toy  # noqa: E402

ROWS, COLS = torch.tensor([-1, 0, 3]), torch.tensor([1, -2, 5])

INDEXING = {  # written as users write them; i and j hold negative entries
    "a negative constant index list": lambda x, i, j: x[:, :, [-2], :],
    "a negative integer index (Falcon's head split)": lambda x, i, j: x[:, :, -2, :],
    "a negative integer index in a dynamic dim": lambda x, i, j: x[:, -1],
    "negative constants in the first dim": lambda x, i, j: x[[-1, 0]],
    "an index tensor with negatives": lambda x, i, j: x[:, :, i],
    "two index tensors side by side after a slice": lambda x, i, j: x[:, i, j],
    "two index tensors with a slice between": lambda x, i, j: x[:, i, :, j],
    "index tensors that broadcast together": lambda x, i, j: x[:, i[:, None], j],
}


class Indexes(nn.Module):
    def __init__(self, pick):
        super().__init__()
        self.pick = pick

    def forward(self, x, i, j):
        return {"picked": self.pick(x, i, j) * 1.0, "doubled": x * 2}


@pytest.mark.parametrize("what", list(INDEXING))
def test_advanced_indexing_matches_torch(what):
    x = torch.randn(2, 16, 6, 8)
    model = Indexes(INDEXING[what])
    run = fxopt.compile(fxopt.optimize(model, (x, ROWS, COLS)), backend="tvm", check_numerics=False)
    x2 = torch.randn(3, 16, 6, 8)  # another batch: the dynamic dim
    got, want = run(x2, ROWS.flip(0), COLS), model(x2, ROWS.flip(0), COLS)
    assert got["picked"].shape == want["picked"].shape
    assert_within(got, want)


def test_compile_refuses_a_model_whose_compiled_outputs_differ_and_names_the_output(monkeypatch):
    """With the TVM importer's own index conversion (negative indices read out of bounds) compile raises."""
    monkeypatch.setattr(table, "index_tensor", lambda node, imp: type(imp)._index_tensor(imp, node))
    x = torch.randn(2, 16, 6, 8)
    opt = fxopt.optimize(Indexes(INDEXING["a negative constant index list"]), (x, ROWS, COLS))
    with pytest.raises(fxopt.BackendMismatchError, match=r"tvm \(cpu\).*output \['picked'\]") as info:
        fxopt.compile(opt, backend="tvm")
    assert info.value.output == "['picked']" and info.value.backend == "tvm"
    fxopt.compile(opt, backend="tvm", check_numerics=False)  # told not to check: returned as it is


class RepeatedBySize(nn.Module):
    def forward(self, x):
        return x.repeat(1, x.shape[1], 1) * 2


def test_ops_the_importer_got_wrong_compile_with_dynamic_dims():
    """Issue 10, finding 12: `repeat` by a size, int / int true division feeding `log`, int `clamp(min=1)`
    raised the importer's TypeError (or a build error); `histc` and `any()` over all dims had no translation."""

    class Mixed(nn.Module):
        def forward(self, x):
            positions = torch.arange(x.shape[1])[:, None] - torch.arange(x.shape[1])[None, :]
            buckets = torch.log(positions.abs().clamp(min=1) / 4)  # T5's relative-position buckets
            counts = torch.histc(x, bins=5, min=-2, max=2)
            flags = (x > 0).any() * 1.0 + (x > 1).any(dim=(0, 2), keepdim=True) + (x > -3).all(-1, keepdim=True)
            return x.repeat(1, x.shape[1], 1).sum(1) + buckets.sum() + counts.sum() + flags.sum(1)

    x = torch.randn(2, 4, 6)
    opt = fxopt.optimize(Mixed(), (x,))
    assert fxopt.backends.tvm.legalize(opt) == []
    run = fxopt.compile(opt, backend="tvm")  # checked against torch on the example inputs
    assert run.notes == []  # dynamic dims kept
    x2 = torch.randn(3, 5, 6)
    assert_within(run(x2), Mixed()(x2))


def test_a_failing_dynamic_import_falls_back_to_static_shapes_and_says_so(monkeypatch):
    """With the importer's own `repeat` (integers only) the dynamic import fails and the static one works."""
    monkeypatch.setattr(table, "repeat", lambda node, imp: type(imp)._repeat(imp, node))
    x = torch.randn(2, 4, 6)
    opt = fxopt.optimize(RepeatedBySize(), (x,))
    run = fxopt.compile(opt, backend="tvm")
    assert len(run.notes) == 1 and "static shapes" in run.notes[0] and "repeat" in run.notes[0]
    assert_within(run(x), RepeatedBySize()(x))
    with pytest.raises(fxopt.InputMismatchError):
        run(torch.randn(3, 4, 6))


def test_an_importer_failure_is_an_unsupported_op_error_naming_the_node(monkeypatch):
    def broken(node, imp):
        raise TypeError("Mismatched type on argument #1")

    monkeypatch.setattr(table, "repeat", broken)
    opt = fxopt.optimize(RepeatedBySize(), (torch.randn(2, 4, 6),))
    with pytest.raises(fxopt.UnsupportedOpError, match=r"repeat: aten.repeat.default: the TVM importer failed "
                                                        r"\(TypeError: Mismatched type") as info:
        fxopt.backends.tvm.legalize(opt)
    assert isinstance(info.value.__cause__, TypeError)


@pytest.fixture(scope="module")
def tiny_lm_on_tvm():
    model = toy.TinyLM().eval()
    opt = fxopt.optimize(model, (torch.randint(0, 50, (2, 6)),), passes=["fuse_layernorm"])
    return model, fxopt.compile(opt, backend="tvm")


@pytest.mark.parametrize("ids", [torch.full((2, 6), 50), torch.full((2, 6), -1), torch.randint(0, 50, (2, 17))],
                         ids=["an id past the vocabulary", "a negative id", "more positions than the table"])
def test_ids_outside_an_embedding_table_are_refused_as_torch_refuses_them(tiny_lm_on_tvm, ids):
    model, run = tiny_lm_on_tvm
    with pytest.raises(IndexError):
        model(ids)
    with pytest.raises(fxopt.InputMismatchError, match="'ids'.*(rows of the embedding table|table of 16 rows)"):
        run(ids)


def test_ids_inside_the_tables_run_at_any_length_up_to_the_positions(tiny_lm_on_tvm):
    model, run = tiny_lm_on_tvm
    for ids in (torch.randint(0, 50, (3, 16)), torch.tensor([[0, 49]])):
        with torch.no_grad():
            assert_within(run(ids), model(ids))
