"""smoothquant's int8 embedding tables: per-row codes within half a scale of the float table, and never a second
copy of a table that a float reader (a tied LM head) still needs."""

from __future__ import annotations

import torch
from torch import nn

import fxopt
from fxopt.passes import FuseLayerNorm, SmoothQuant
from fxopt.quant_ops import QMAX
from fxopt.rewrite import get_attr
from fxopt.testing import count_ops
from tests.models.hf_families import FAMILIES

VOCAB, D = 50, 16


class TinyLM(nn.Module):
    """Embedding → pre-LN MLP block → LM head, the head tied to the embedding or not."""

    def __init__(self, tied: bool):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.ln, self.fc1, self.fc2 = nn.LayerNorm(D), nn.Linear(D, 4 * D), nn.Linear(4 * D, D)
        self.head = nn.Linear(D, VOCAB, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.fc2(torch.relu(self.fc1(self.ln(h))))
        return self.head(h)


def ids(seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(seed))


def quantize(model, **options):
    return fxopt.optimize(model, (ids(0),), passes=[FuseLayerNorm(), SmoothQuant(**options)],
                          calibration=[(ids(i),) for i in range(1, 4)])


def int8_tables(gm) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(codes, row scales) of every int8 table an embedding lookup reads."""
    found = {}
    for n in gm.graph.nodes:
        if n.target is torch.ops.aten.embedding.default and n.args[0].op == "get_attr":
            found.setdefault(n.args[1], []).append(get_attr(gm, n.args[0].target))
    pairs = [tables for tables in found.values() if len(tables) == 2 and torch.int8 in {t.dtype for t in tables}]
    return [(a, b) if a.dtype == torch.int8 else (b, a) for a, b in pairs]


def test_an_untied_table_is_stored_as_int8_rows_within_half_a_scale_of_the_float_table():
    model = TinyLM(tied=False).eval()
    opt = quantize(model)
    (codes, scales), = int8_tables(opt.graph_module)
    table = model.embed.weight.detach()
    assert codes.shape == table.shape and scales.shape == (VOCAB, 1)
    assert (codes.abs() <= QMAX).all()
    assert ((codes.float() * scales - table).abs() <= scales / 2 * (1 + 1e-6)).all()
    assert opt.report["smoothquant"].stats["int8_embedding"] == 1
    assert not any(torch.equal(t, table) for t in opt.graph_module.state_dict().values())  # no float copy left


def test_a_table_tied_to_a_float_lm_head_stays_float_and_the_report_says_why():
    opt = quantize(TinyLM(tied=True).eval())
    assert not int8_tables(opt.graph_module)
    assert "int8_embedding" not in opt.report["smoothquant"].stats
    (note,) = [n for n in opt.report["smoothquant"].notes if "embedding table left float" in n]
    assert "store it twice" in note


def test_a_tied_table_is_int8_once_when_the_lm_head_is_quantized_too():
    opt = quantize(TinyLM(tied=True).eval(), layers="all")
    assert len(int8_tables(opt.graph_module)) == 1
    assert not [t for t in opt.graph_module.state_dict().values() if t.dtype == torch.float32 and t.shape == (VOCAB, D)]


def test_gpt2s_position_table_is_int8_and_its_tied_token_table_stays_float():
    family = FAMILIES["gpt2"]
    args, kwargs = family.inputs()
    opt = fxopt.optimize(family.build("sdpa"), args, example_kwargs=kwargs, passes=[FuseLayerNorm(), SmoothQuant()],
                         calibration=[family.inputs(seed=i) for i in range(1, 4)])
    assert opt.report["smoothquant"].stats["int8_embedding"] == 1
    notes = opt.report["smoothquant"].notes
    (note,) = [n for n in notes if "embedding table left float" in n]  # the tied token table (under either name)
    assert "lm_head" in note or "linear" in note, note
    assert count_ops(opt.graph_module)["aten.embedding"] == 3  # wte (float), wpe codes and wpe row scales


def test_embeddings_false_keeps_every_table_float():
    opt = quantize(TinyLM(tied=False).eval(), embeddings=False)
    assert not int8_tables(opt.graph_module)
