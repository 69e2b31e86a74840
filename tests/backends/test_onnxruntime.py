"""ONNX Runtime backend: export with fused ops as ONNX / ORT contrib ops, run in onnxruntime (CPU).

The contract: ORT's outputs equal the optimized graph's within ROUNDING (ORT evaluates the same float
functions with its own kernels: a different reduction order, not a different function), in the model's own
output structure; each fused fxopt op becomes exactly one ONNX node of the intended type.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import fx, nn

import fxopt
import fxopt.testing
from fxopt import ops, passes
from fxopt.numerics import compare
from fxopt.pass_base import ROUNDING, Pass, PassContext, PassResult
from fxopt.rewrite import Rewriter
from tests.models import toy

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
transformers = pytest.importorskip("transformers")

from fxopt.backends import onnxruntime as ort_backend  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

# fused fxopt op -> the ONNX node it must become (ONNX op counts are keyed "domain.op_type", bare for ai.onnx)
INTENDED = {
    torch.ops.aten.layer_norm.default: "LayerNormalization",
    ops.rms_norm: "RMSNormalization",
    ops.add_layer_norm: "com.microsoft.SkipLayerNormalization",
    ops.add_rms_norm: "com.microsoft.SkipSimplifiedLayerNormalization",
}


def assert_close(ref, out) -> None:
    result = compare(ref, out, ROUNDING)
    assert result.ok, result.detail


def fused_nodes(gm: fx.GraphModule) -> Counter:
    return Counter(n.target for n in gm.graph.nodes if n.target in INTENDED)


def assert_fused_ops_in_onnx(opt, run) -> None:
    want = fused_nodes(opt.graph_module)
    for target, count in want.items():
        assert run.op_counts.get(INTENDED[target], 0) == count, (INTENDED[target], dict(run.op_counts))


# -- Hugging Face models (tiny configs, random weights) ------------------------------------------------------

def hf_model(name: str, attn: str):
    common = dict(vocab_size=100, attn_implementation=attn)
    if name == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0, **common))
    elif name == "opt":
        model = transformers.OPTForCausalLM(transformers.OPTConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64, max_position_embeddings=64,
            word_embed_proj_dim=32, **common))
    elif name == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, max_position_embeddings=64, **common))
    else:
        model = transformers.BertModel(transformers.BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64, **common))
    return model.eval()


def hf_inputs(name: str, batch: int, seq: int, pad: int = 0):
    """Right padding: every query row sees at least one key, so no row is fully masked (where sdpa
    implementations legitimately disagree)."""
    ids = torch.randint(0, 100, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad:
        mask[0, -pad:] = 0
    kwargs = {"attention_mask": mask}
    if name != "bert":
        kwargs["use_cache"] = False
    return (ids,), kwargs


PASS_SETS = {"stabilize_softmax": ["stabilize_softmax"], "fuse_layernorm": ["fuse_layernorm"],
             "exact_pipeline": list(passes.EXACT_PIPELINE)}


# stabilize_softmax rewrites hand-written softmaxes, which none of these models has (HF calls torch.softmax or
# sdpa): after it the graph is the capture's, and fuse_layernorm alone gives the exact pipeline's graph, so
# those cases run with the slow ones (`pytest -m slow`); the toy LM below covers stabilize_softmax applied.
@pytest.mark.parametrize("passes_name", [pytest.param("stabilize_softmax", marks=pytest.mark.slow),
                                         pytest.param("fuse_layernorm", marks=pytest.mark.slow), "exact_pipeline"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("name", ["gpt2", "opt", "llama", "bert"])
def test_hf_model_runs_in_ort_like_torch(name, attn, passes_name):
    model = hf_model(name, attn)
    args, kwargs = hf_inputs(name, 2, 8)
    opt = fxopt.optimize(model, args, passes=PASS_SETS[passes_name], example_kwargs=kwargs)
    run = fxopt.compile(opt, backend="onnxruntime", target="cpu")

    # another batch size and sequence length than at capture, with padding
    args, kwargs = hf_inputs(name, 3, 11, pad=3)
    with torch.no_grad():
        ref = opt(*args, **kwargs)
    out = run(*args, **kwargs)
    assert type(out) is type(ref)
    assert_close(ref, out)
    assert_fused_ops_in_onnx(opt, run)
    if passes_name != "stabilize_softmax":
        skip = "com.microsoft.SkipSimplifiedLayerNormalization" if name == "llama" else \
            "com.microsoft.SkipLayerNormalization"
        assert run.op_counts.get(skip, 0) >= 2, dict(run.op_counts)  # one per residual add + norm at least


# -- each fused op, contrib form and fallback form -----------------------------------------------------------

class FusedOps(nn.Module):
    """Calls fxopt's fused ops directly: once in the shapes the ORT contrib ops take, once in others."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.w, self.b = nn.Parameter(torch.rand(d) + 0.5), nn.Parameter(torch.randn(d))
        self.w2 = nn.Parameter(torch.rand(3, d) + 0.5)

    def forward(self, x, r, x4, r4):
        d = x.shape[-1]
        ln, s1 = ops.add_layer_norm(x, r, [d], self.w, self.b, 1e-5)
        ln0, s2 = ops.add_layer_norm(x, r, [d], None, None, 1e-5)
        rms, s3 = ops.add_rms_norm(x, r, [d], self.w, 1e-6)
        rms0 = ops.rms_norm(x, [d], self.w, 1e-6)
        rms1 = ops.rms_norm(x, [d], None, 1e-6)
        # not the contrib ops' form: 4-d input, two normalized dims
        ln4, s4 = ops.add_layer_norm(x4, r4, [d], self.w, self.b, 1e-5)
        ln2d, s5 = ops.add_layer_norm(x4, r4, [3, d], self.w2, None, 1e-5)
        rms4, s6 = ops.add_rms_norm(x4, r4, [3, d], self.w2, 1e-6)
        return ln, s1, ln0, s2, rms, s3, rms0, rms1, ln4, s4, ln2d, s5, rms4, s6


def fused_inputs(batch=2, seq=5, d=8):
    return (torch.randn(batch, seq, d), torch.randn(batch, seq, d), torch.randn(batch, 2, 3, d),
            torch.randn(batch, 2, 3, d))


@pytest.mark.parametrize("opset", [20, 23])
def test_each_fused_op_translates_and_matches_torch(opset):
    opt = fxopt.optimize(FusedOps(), fused_inputs())
    run = fxopt.compile(opt, backend="onnxruntime", opset=opset)
    counts = run.op_counts
    assert counts["com.microsoft.SkipLayerNormalization"] == 2
    assert counts["com.microsoft.SkipSimplifiedLayerNormalization"] == 1
    assert counts["LayerNormalization"] == 2  # the two add_layer_norm fallbacks: Add + LayerNormalization
    # RMSNormalization is an ONNX op from opset 23; below it RMSNorm is written in primitive ops
    assert counts.get("RMSNormalization", 0) == (3 if opset >= 23 else 0)
    x = fused_inputs(3, 7)
    with torch.no_grad():
        ref = opt(*x)
    assert_close(ref, run(*x))


def test_residual_sum_is_the_contrib_ops_fourth_output(tmp_path):
    """SkipLayerNormalization's outputs are (out, mean, inv_std, input+skip): the sum must come from index 3."""
    opt = fxopt.optimize(FusedOps(), fused_inputs())
    path = ort_backend.export(opt, tmp_path / "fused.onnx")
    model = onnx.load(str(path))
    graph_outputs = {o.name for o in model.graph.output}
    for node in model.graph.node:
        if node.op_type.startswith("Skip"):
            assert node.output[3] in graph_outputs, (node.op_type, list(node.output))


# -- toy models through the pipeline -------------------------------------------------------------------------

def test_toy_lm_after_the_exact_pipeline_keeps_its_dict_output():
    model = toy.HandWrittenLM()
    ids = torch.randint(0, 50, (2, 7))
    opt = fxopt.optimize(model, (ids,), passes=list(passes.EXACT_PIPELINE))
    run = fxopt.compile(opt)
    ids = torch.randint(0, 50, (4, 9))
    with torch.no_grad():
        ref = opt(ids)
    out = run(ids)
    assert isinstance(out, dict) and list(out) == list(ref)
    assert_close(ref, out)
    assert_fused_ops_in_onnx(opt, run)
    assert run.op_counts["Softmax"] == 2  # stabilize_softmax's softmax op
    assert run.output_names == ["logits", "hidden"]


def test_standalone_rms_norm_becomes_rms_normalization_at_the_default_opset():
    opt = fxopt.optimize(toy.LlamaStyleRMSNorm(16), (torch.randn(2, 5, 16),), passes=["fuse_layernorm"])
    run = fxopt.compile(opt)
    assert run.export_info.opset == 23 and run.op_counts["RMSNormalization"] == 1
    x = torch.randn(3, 4, 16)
    assert_close(opt(x), run(x))


# -- the file --------------------------------------------------------------------------------------------

def test_export_writes_a_checked_file_with_dynamic_batch_and_sequence(tmp_path):
    opt = fxopt.optimize(toy.HandWrittenLM(), (torch.randint(0, 50, (2, 7)),), passes=["fuse_layernorm"])
    path = fxopt.export_onnx(opt, tmp_path / "lm.onnx")
    assert path.exists() and not path.with_name(path.name + ".data").exists()
    onnx.checker.check_model(str(path), full_check=True)
    (ids,) = onnx.load(str(path)).graph.input
    dims = [d.dim_param or d.dim_value for d in ids.type.tensor_type.shape.dim]
    assert all(isinstance(d, str) for d in dims), dims

    static = fxopt.export_onnx(opt, tmp_path / "static.onnx", dynamic=False)
    (ids,) = onnx.load(str(static)).graph.input
    assert [d.dim_value for d in ids.type.tensor_type.shape.dim] == [2, 7]


def test_external_data_keeps_weights_beside_the_file(tmp_path):
    opt = fxopt.optimize(toy.HandWrittenLM(), (torch.randint(0, 50, (2, 7)),))
    path = fxopt.export_onnx(opt, tmp_path / "lm.onnx", external_data=True)
    assert path.with_name(path.name + ".data").stat().st_size > 0
    onnx.checker.check_model(str(path), full_check=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids = torch.randint(0, 50, (2, 7))
    (logits, _) = session.run(None, {"ids": ids.numpy()})
    assert_close(opt(ids)["logits"], torch.from_numpy(logits))


def test_session_options_are_configurable():
    opt = fxopt.optimize(toy.HandWrittenLM(), (torch.randint(0, 50, (2, 7)),), passes=["fuse_layernorm"])
    run = fxopt.compile(opt, graph_optimization_level="disable", intra_op_num_threads=1)
    ids = torch.randint(0, 50, (2, 7))
    assert_close(opt(ids), run(ids))
    with pytest.raises(ValueError, match="graph_optimization_level"):
        fxopt.compile(opt, graph_optimization_level="max")


@pytest.mark.parametrize("name", ["gpt2", "opt", "llama", "bert"])
def test_ort_fusions_report_counts_and_keep_numerics(name):
    model = hf_model(name, "eager")
    args, kwargs = hf_inputs(name, 2, 8)
    opt = fxopt.optimize(model, args, passes=list(passes.EXACT_PIPELINE), example_kwargs=kwargs)
    run = fxopt.compile(opt, ort_fusions=True)
    assert isinstance(run.fusion_counts, dict)
    if run.export_info.fusion_error is None:
        assert run.fusion_counts, "onnxscript fused nothing"
    # our fused ops are kept as they are (onnxscript may fuse more residual adds than fuse_layernorm did)
    for target, count in fused_nodes(opt.graph_module).items():
        if target is not torch.ops.aten.layer_norm.default:
            assert run.op_counts.get(INTENDED[target], 0) >= count, (INTENDED[target], dict(run.op_counts))
    args, kwargs = hf_inputs(name, 3, 11, pad=3)
    with torch.no_grad():
        ref = opt(*args, **kwargs)
    assert_close(ref, run(*args, **kwargs))


# -- bad input -------------------------------------------------------------------------------------------

_lib = torch.library.Library("fxopt_test_ort", "DEF")
_lib.define("scaled_gelu(Tensor x) -> Tensor")


@torch.library.impl(_lib, "scaled_gelu", "CompositeExplicitAutograd")
def _scaled_gelu(x):
    return torch.nn.functional.gelu(x)


@torch.library.register_fake("fxopt_test_ort::scaled_gelu", lib=_lib)
def _scaled_gelu_fake(x):
    return torch.empty_like(x)


@dataclass(frozen=True)
class GeluToCustomOp(Pass):
    """Replaces every GELU by an op no backend knows (an exact rewrite)."""

    name: ClassVar[str] = "gelu_to_custom_op"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        rw = Rewriter(gm, self.name)
        for node in list(gm.graph.nodes):
            if node.target == torch.ops.aten.gelu.default:
                new = rw.call(torch.ops.fxopt_test_ort.scaled_gelu.default, (node.args[0],), before=node,
                              like=node)
                rw.replace(node, new, "gelu")
                rw.erase_dead([node])
        stats = dict(rw.counts)
        rw.finish()
        return PassResult(gm, bool(stats), stats)


def test_untranslatable_ops_are_all_listed_before_exporting(tmp_path):
    opt = fxopt.optimize(toy.HandWrittenLM(), (torch.randint(0, 50, (2, 7)),), passes=[GeluToCustomOp()])
    path = tmp_path / "never.onnx"
    with pytest.raises(fxopt.UnsupportedOpError) as info:
        fxopt.export_onnx(opt, path)
    assert len(info.value.nodes) == 2 and all("fxopt_test_ort.scaled_gelu" in n for n in info.value.nodes)
    assert "introduced by pass 'gelu_to_custom_op'" in str(info.value)
    assert not path.exists()
    with pytest.raises(fxopt.UnsupportedOpError):
        fxopt.compile(opt)


def test_a_failed_export_names_the_node_and_the_pass_that_introduced_it(tmp_path):
    opt = fxopt.optimize(toy.HandWrittenLM(), (torch.randint(0, 50, (2, 7)),), passes=[GeluToCustomOp()])

    def broken(x):
        raise RuntimeError("no kernel for this")

    with pytest.raises(ort_backend.OnnxExportError) as info:
        fxopt.export_onnx(opt, tmp_path / "broken.onnx",
                          extra_translations={torch.ops.fxopt_test_ort.scaled_gelu.default: broken})
    assert info.value.pass_name == "gelu_to_custom_op"
    assert info.value.node.startswith("scaled_gelu")
    assert "introduced by pass 'gelu_to_custom_op'" in str(info.value)


def test_a_user_translation_extends_the_table():
    from onnxscript import opset18 as op

    opt = fxopt.optimize(toy.HandWrittenLM(), (torch.randint(0, 50, (2, 7)),), passes=[GeluToCustomOp()])

    def scaled_gelu(x):
        half = op.CastLike(op.Constant(value_float=0.5), x)
        root = op.CastLike(op.Constant(value_float=2 ** -0.5), x)
        return op.Mul(op.Mul(x, half), op.Add(op.Erf(op.Mul(x, root)), op.CastLike(op.Constant(value_float=1.0), x)))

    run = fxopt.compile(opt, extra_translations={torch.ops.fxopt_test_ort.scaled_gelu.default: scaled_gelu})
    ids = torch.randint(0, 50, (3, 5))
    assert_close(opt(ids), run(ids))


def test_cuda_target_without_onnxruntime_gpu_says_so():
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed")
    opt = fxopt.optimize(nn.Linear(4, 4), (torch.randn(2, 4),))
    with pytest.raises(ort_backend.RuntimeUnavailableError, match="onnxruntime-gpu"):
        fxopt.compile(opt, backend="onnxruntime", target="cuda")


def test_inputs_structured_unlike_the_export_are_refused():
    model = hf_model("gpt2", "eager")
    args, kwargs = hf_inputs("gpt2", 2, 8)
    opt = fxopt.optimize(model, args, passes=["fuse_layernorm"], example_kwargs=kwargs)
    run = fxopt.compile(opt)
    with pytest.raises(ort_backend.InputMismatchError, match="token_type_ids"):
        run(*args, **kwargs, token_type_ids=torch.zeros_like(args[0]))
    with pytest.raises(ort_backend.InputMismatchError, match="use_cache"):
        run(*args, **dict(kwargs, use_cache=True))
    # a constant at export may be left out only where forward's default is that value: GPT-2's use_cache=None
    # means the config's (True), which returns a cache the graph does not compute
    with pytest.raises(ort_backend.InputMismatchError, match="'use_cache': left out.*default is None"):
        run(*args, attention_mask=kwargs["attention_mask"])


def test_legalize_accepts_every_node_of_the_hf_graphs():
    for name in ("gpt2", "llama"):
        args, kwargs = hf_inputs(name, 2, 8)
        opt = fxopt.optimize(hf_model(name, "sdpa"), args, passes=list(passes.EXACT_PIPELINE),
                             example_kwargs=kwargs)
        assert ort_backend.legalize(opt) == []


@pytest.mark.parametrize("opset", [9, 17, 10_000, "20", True])
def test_an_opset_the_exporter_cannot_write_is_refused_before_anything_is_written(opset, tmp_path):
    opt = fxopt.optimize(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)), (torch.randn(2, 4),), passes=[])
    with pytest.raises(fxopt.PassOptionError, match="opset"):
        fxopt.export_onnx(opt, tmp_path / "m.onnx", opset=opset)
    assert not (tmp_path / "m.onnx").exists()


def test_the_requested_opset_is_the_one_written(tmp_path):
    opt = fxopt.optimize(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)), (torch.randn(2, 4),), passes=[])
    path = fxopt.export_onnx(opt, tmp_path / "m.onnx", opset=19)
    written = {o.domain: o.version for o in onnx.load(str(path)).opset_import}
    assert written[""] == 19


def test_a_file_onnx_checker_rejects_is_an_export_error_naming_the_node():
    """Review finding: `b + b` on bool tensors raised onnx's own InferenceError."""

    class AddsBools(nn.Module):
        def forward(self, b):
            return b + b

    opt = fxopt.optimize(AddsBools(), (torch.rand(2, 3) > 0.5,))
    with pytest.raises(ort_backend.OnnxExportError, match=r"fails onnx.checker .*node_add"):
        fxopt.compile(opt, backend="onnxruntime")


@pytest.mark.parametrize("ids", [torch.full((2, 6), 50), torch.full((2, 6), -1), torch.randint(0, 50, (2, 17))],
                         ids=["an id past the vocabulary", "a negative id (Gather would wrap it)",
                              "more positions than the table"])
def test_ids_outside_an_embedding_table_are_refused_as_torch_refuses_them(ids):
    model = toy.TinyLM().eval()
    run = fxopt.compile(fxopt.optimize(model, (torch.randint(0, 50, (2, 6)),), passes=["fuse_layernorm"]))
    with pytest.raises(IndexError):
        model(ids)
    with pytest.raises(fxopt.InputMismatchError, match="'ids'.*(rows of the embedding table|table of 16 rows)"):
        run(ids)
    inside = torch.randint(0, 50, (3, 16))
    with torch.no_grad():
        fxopt.testing.assert_within(run(inside), model(inside))


def test_a_failed_run_is_a_backend_error_naming_the_file(monkeypatch):
    run = fxopt.compile(fxopt.optimize(toy.TinyLM().eval(), (torch.randint(0, 50, (2, 6)),)))
    monkeypatch.setattr(type(run), "feeds", lambda self, *a, **k: {"ids": torch.zeros(2, 6).numpy()})  # float ids
    with pytest.raises(fxopt.BackendError, match="onnxruntime: running model.onnx failed") as e:
        run(torch.zeros(2, 6, dtype=torch.long))
    assert e.value.__cause__ is not None


def test_positions_past_gpt2s_table_are_refused_as_torch_refuses_them():
    """GPT-2 numbers its positions `arange(length) + past length` along the attention mask's length."""
    tf = pytest.importorskip("transformers")
    model = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=16)).eval()
    ids, mask = torch.randint(0, 64, (2, 6)), torch.ones(2, 6, dtype=torch.long)
    run = fxopt.compile(fxopt.optimize(model, (ids,), example_kwargs={"attention_mask": mask, "use_cache": False}))
    long_ids, long_mask = torch.randint(0, 64, (2, 17)), torch.ones(2, 17, dtype=torch.long)
    with pytest.raises(IndexError):
        model(long_ids, attention_mask=long_mask, use_cache=False)
    with pytest.raises(fxopt.InputMismatchError, match="'attention_mask': dim 1 is 17.*table of 16 rows"):
        run(long_ids, attention_mask=long_mask, use_cache=False)
