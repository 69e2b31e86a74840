"""The exact pipeline on real model code: HF GPT-2, OPT, Llama, BERT (eager and sdpa) and trained MiniLM."""

import pytest
import torch

import fxopt
from fxopt.pass_base import ROUNDING
from fxopt.passes import EXACT_PIPELINE
from fxopt.testing import assert_within, count_ops
from tests.models import hf

# the norms each family writes, and how fuse_layernorm leaves them
EXPECTED = {"gpt2": {"aten.layer_norm": 1, "fxopt.add_layer_norm": 4},
            "opt": {"aten.layer_norm": 0, "fxopt.add_layer_norm": 5},
            "llama": {"fxopt.rms_norm": 1, "fxopt.add_rms_norm": 4},
            "bert": {"aten.layer_norm": 1, "fxopt.add_layer_norm": 4}}


def assert_same_outputs(a, b, key):
    scale = b[key].abs().max().item()
    err = (a[key] - b[key]).abs().max().item()
    assert err <= ROUNDING.atol + ROUNDING.relative(torch.float32) * scale, (err, scale)
    assert type(a) is type(b) and a.keys() == b.keys()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", hf.FAMILIES)
def test_exact_pipeline_on_hf_model(family, attn):
    model, key = hf.build(family, attn)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    args, kwargs = hf.inputs(family, 2, 9)
    opt = fxopt.optimize(model, args, passes=list(EXACT_PIPELINE), example_kwargs=kwargs)

    ops = count_ops(opt.graph_module)
    assert {k: ops[k] for k in EXPECTED[family]} == EXPECTED[family], ops
    assert opt.report["fuse_layernorm"].applied
    if family == "llama":  # Llama's RMSNorms are decomposed pow/mean/rsqrt: all 5 are fused and counted
        assert opt.report["fuse_layernorm"].stats["rms_norm"] == 5
    assert opt.report.capture.dynamic_dims["input_ids"] == [0, 1]

    for batch, seq in [(2, 9), (3, 17), (1, 5)]:  # the example shape, and others
        args2, kwargs2 = hf.inputs(family, batch, seq, seed=batch)
        with torch.no_grad():
            assert_same_outputs(opt(*args2, **kwargs2), model(*args2, **kwargs2), key)
    after = model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state), "the user's model was mutated"


def test_hand_written_model_is_fully_rewritten():
    from tests.models.toy import HandWrittenLM

    model = HandWrittenLM(layers=2)
    ids = torch.randint(0, 50, (2, 7))
    opt = fxopt.optimize(model, (ids,), passes=list(EXACT_PIPELINE))
    ops = count_ops(opt.graph_module)
    assert ops["aten.softmax"] == 2 and ops["aten.exp"] == 0
    assert ops["aten.mean"] == ops["aten.rsqrt"] == ops["aten.sqrt"] == ops["aten.pow"] == 0, ops
    assert ops["fxopt.add_layer_norm"] + ops["aten.layer_norm"] == 3  # ln1, ln2 of block 0, final norm
    assert ops["fxopt.add_rms_norm"] + ops["fxopt.rms_norm"] == 2  # block 1 is RMSNorm
    ids2 = torch.randint(0, 50, (3, 11))
    with torch.no_grad():
        got, want = opt(ids2), model(ids2)
    assert got.keys() == want.keys()
    assert_within(got["logits"], want["logits"])


def test_trained_minilm_weights():
    transformers = pytest.importorskip("transformers")
    path = hf.minilm_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    batch = tok(["fxopt fuses layer norms", "a second, longer sentence to pad the batch with"],
                return_tensors="pt", padding=True)
    opt = fxopt.optimize(model, (batch["input_ids"],),
                         example_kwargs={"attention_mask": batch["attention_mask"]}, passes=list(EXACT_PIPELINE))
    assert count_ops(opt.graph_module)["fxopt.add_layer_norm"] == 12  # 6 layers x (attention, FFN)
    other = tok(["one more"], return_tensors="pt")
    with torch.no_grad():
        got = opt(other["input_ids"], attention_mask=other["attention_mask"]).last_hidden_state
        want = model(**other).last_hidden_state
    assert_within(got, want)
