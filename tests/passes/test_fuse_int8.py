"""fuse_int8: quantizers fused into their norm/activation producers, dequantize into the GEMM epilogue; the
graph after the pass computes what it computed before, bit for bit on the CPU (the fused ops' references are the
compositions they replace)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

import fxopt
from fxopt import ops
from fxopt.passes import FuseInt8, FuseLayerNorm, SmoothQuant, ZeroQuant
from tests.models import hf

f = torch.ops.fxopt


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.rand(d) + 0.5), eps

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class SwiGLUBlock(nn.Module):
    """A pre-norm decoder block the way people write one: attention stand-in, then a SwiGLU MLP."""

    def __init__(self, d: int = 16, hidden: int = 32):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(d), RMSNorm(d)
        self.mix = nn.Linear(d, d, bias=False)
        self.gate, self.up = nn.Linear(d, hidden, bias=False), nn.Linear(d, hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        x = x + self.mix(self.norm1(x))
        h = self.norm2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class GeluBlock(nn.Module):
    """Pre-LN MLP with a GELU (GPT-2 style) and a ReLU branch whose output is also returned as a float."""

    def __init__(self, d: int = 16, hidden: int = 32):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)
        self.side = nn.Linear(d, d)

    def forward(self, x):
        h = self.ln(x)
        side = torch.relu(self.side(h))  # read as a float: the ReLU goes into the GEMM's epilogue
        return x + self.fc2(F.gelu(self.fc1(h))), side


class PostLN(nn.Module):
    """BERT's order: the norm's output is also the next residual (a float reader besides the quantizer)."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.ln, self.fc = nn.LayerNorm(d), nn.Linear(d, d)

    def forward(self, x):
        h = self.ln(x)
        return h + self.fc(h)


class PostLNBlocks(nn.Module):
    """Two post-LN blocks as BERT writes them: LayerNorm(sublayer(h) + h), each norm's output both the next
    sublayer's input and the next residual."""

    def __init__(self, d: int = 16, hidden: int = 32, norm=nn.LayerNorm):
        super().__init__()
        self.ln0, self.ln1, self.ln2 = norm(d), norm(d), norm(d)
        self.mix, self.fc1, self.fc2 = nn.Linear(d, d), nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        h = self.ln0(x)
        h = self.ln1(self.mix(h) + h)
        return self.ln2(self.fc2(F.gelu(self.fc1(h))) + h)


class PostRMSNormBlocks(PostLNBlocks):
    def __init__(self):
        super().__init__(norm=RMSNorm)


class PostLNWithSum(PostLNBlocks):
    """The residual sum is read as well (returned): the add stays in the norm, which says why it cannot fuse."""

    def forward(self, x):
        h = self.ln0(x)
        s = self.mix(h) + h
        h = self.ln1(s)
        return self.fc1(h), h, s


def quantized(model, x, fuse: bool, **options):
    g = torch.Generator().manual_seed(7)  # the same calibration for the fused and the unfused graph
    calib = [(torch.randn(x.shape, generator=g, dtype=x.dtype),) for _ in range(2)]
    passes = [FuseLayerNorm(), SmoothQuant(**{"smooth": False, "act": "token", "layers": "all", **options})]
    return fxopt.optimize(model.eval(), (x,), passes=[*passes, FuseInt8()] if fuse else passes, calibration=calib)


def counts(opt) -> Counter:
    return Counter(n.target._schema.name.split("::")[-1] for n in opt.graph_module.graph.nodes
                   if n.op == "call_function" and getattr(n.target, "namespace", None) == "fxopt")


def outputs(value) -> list[torch.Tensor]:
    return list(value) if isinstance(value, tuple | list) else [value]


def main(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out[0]


def assert_same_function(model, x, **options):
    torch.manual_seed(0)
    before, after = quantized(model, x, False, **options), quantized(model, x, True, **options)
    fresh = torch.randn(3, 5, x.shape[-1])
    for a, b in zip(outputs(before(fresh)), outputs(after(fresh)), strict=True):
        assert torch.equal(a, b)
    return after


def test_a_swiglu_block_fuses_norms_activation_and_residual_bitwise():
    torch.manual_seed(0)
    opt = assert_same_function(SwiGLUBlock(), torch.randn(2, 6, 16))
    c = counts(opt)
    # norm1 -> rms_norm_quantize; the residual add before norm2 became add_rms_norm -> add_rms_norm_quantize;
    # silu(gate)·up -> one GEMM with the SwiGLU in its epilogue, whose output only down's quantizer reads, so it
    # requantizes it; down + x -> the epilogue's residual; the other int8_linears -> the epilogue op
    assert c == Counter({"rms_norm_quantize_int8": 1, "add_rms_norm_quantize_int8": 1,
                         "int8_linear_swiglu_quantize": 1, "int8_linear_epilogue": 2})
    residual = [n for n in opt.graph_module.graph.nodes if n.target is f.int8_linear_epilogue.default
                and n.args[6] is not None]
    assert len(residual) == 1
    assert opt.report["fuse_int8"].stats == {"norm_quantize": 2, "int8_linear_swiglu": 1, "int8_linear_epilogue": 2,
                                             "requantize": 1}


class SwiGLUWithAProbe(SwiGLUBlock):
    """The gate's pre-activation is also returned: the GEMMs cannot merge, SiLU·up still fuses into its quantizer."""

    def forward(self, x):
        h = self.norm2(x + self.mix(self.norm1(x)))
        gate = self.gate(h)
        return self.down(F.silu(gate) * self.up(h)), gate


class SwiGLUOutput(SwiGLUBlock):
    """The SwiGLU product is the output (nothing quantizes it): the GEMMs still merge."""

    def forward(self, x):
        h = self.norm2(x)
        return F.silu(self.gate(h)) * self.up(h)


def int8_bytes(opt) -> dict[str, int]:
    gm = opt.graph_module
    return {k: t.numel() for k, t in gm.named_buffers() if t.dtype == torch.int8}


def test_the_swiglu_gemm_keeps_one_interleaved_copy_of_the_gate_and_up_weights():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 16)
    before, after = (quantized(SwiGLUBlock(), x, fuse) for fuse in (False, True))
    assert sum(int8_bytes(after).values()) == sum(int8_bytes(before).values())  # moved, not copied
    swiglu = next(n for n in after.graph_module.graph.nodes if n.target is f.int8_linear_swiglu_quantize.default)
    w = swiglu.args[2].meta["val"]
    assert tuple(w.shape) == (64, 16)  # gate and up rows, interleaved


class TwiceTiedMLP(nn.Module):
    """One SwiGLU MLP applied twice (weights tied across depth, as ALBERT-style sharing does), with biases."""

    def __init__(self, d: int = 16, hidden: int = 32):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(d, hidden), nn.Linear(d, hidden, bias=False), nn.Linear(hidden, d)

    def forward(self, x):
        for _ in range(2):
            x = x + self.down(F.silu(self.gate(x)) * self.up(x))
        return x


def zeroquantized(model, x, fuse: bool):
    passes = [ZeroQuant(weight_bits=8, group_size=1, act="token")]
    return fxopt.optimize(model.eval(), (x,), passes=[*passes, FuseInt8()] if fuse else passes)


def test_tied_swiglu_blocks_share_one_interleaved_copy_without_autograd_history():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 16)
    model = TwiceTiedMLP()
    before, after = zeroquantized(model, x, False), zeroquantized(model, x, True)
    assert counts(after)["int8_linear_swiglu_quantize"] == 2
    assert sum(int8_bytes(after).values()) == sum(int8_bytes(before).values())
    for name, t in after.graph_module.named_buffers():  # plain tensors: deepcopy (bf16 widening) needs them so
        assert not t.requires_grad and t.grad_fn is None, name
    fresh = torch.randn(3, 5, 16)
    assert torch.equal(before(fresh), after(fresh))


def test_the_onnx_file_runs_each_swiglu_as_one_gemm_on_an_initializer(tmp_path):
    pytest.importorskip("onnxruntime")
    from fxopt.backends.onnxruntime.export import export_file

    torch.manual_seed(0)
    x = torch.randn(2, 6, 64)
    opt = zeroquantized(TwiceTiedMLP(64, 9000), x, True)  # weights beyond onnxscript's 8192-value folding limit
    result = export_file(opt, tmp_path / "swiglu.onnx")
    ops_in_file = result.op_counts  # gate and up: one GEMM each SwiGLU, down: one; no per-call weight Transpose
    assert ops_in_file["com.microsoft.MatMulIntegerToFloat"] == 4 and "Transpose" not in ops_in_file, ops_in_file
    got = fxopt.compile(opt, "onnxruntime")(x)
    assert F.cosine_similarity(got.flatten().double(), opt(x).flatten().double(), dim=0) >= 1 - 1e-6


class WeightsAsInputs(nn.Module):
    """A SwiGLU on int8 weights that arrive as inputs: nothing to interleave once, ahead of time."""

    def __init__(self):
        super().__init__()
        self.register_buffer("ws", torch.full((8,), 0.01))

    def forward(self, x, wq_gate, wq_up, wq_down):
        q, s = ops.quantize_int8(x, None, None, "token")
        gate = ops.int8_linear(q, s, wq_gate, self.ws, None, x.dtype)
        h, t = ops.quantize_int8(F.silu(gate) * ops.int8_linear(q, s, wq_up, self.ws, None, x.dtype), None, None,
                                 "token")
        return ops.int8_linear(h, t, wq_down, self.ws[:4], None, x.dtype)


def test_swiglu_weights_that_are_not_constants_keep_two_gemms_and_say_why():
    x = torch.randn(2, 3, 4)
    wg, wu, wd = (torch.randint(-127, 128, shape, dtype=torch.int8) for shape in ((8, 4), (8, 4), (4, 8)))
    opt = fxopt.optimize(WeightsAsInputs(), (x, wg, wu, wd), passes=[FuseInt8()])
    c = counts(opt)
    assert "int8_linear_swiglu" not in c and c["int8_linear_epilogue"] == 3 and c["silu_mul_quantize_int8"] == 1
    assert any("not a constant" in r for r in opt.report["fuse_int8"].reasons), opt.report["fuse_int8"].reasons


class SwiGLUOfWeightInputs(nn.Module):
    """The SwiGLU product is the output, its int8 weights inputs: the GEMMs become plain epilogue GEMMs."""

    def __init__(self):
        super().__init__()
        self.register_buffer("ws", torch.full((8,), 0.01))

    def forward(self, x, wq_gate, wq_up):
        q, s = ops.quantize_int8(x, None, None, "token")
        return F.silu(ops.int8_linear(q, s, wq_gate, self.ws, None, x.dtype)) * ops.int8_linear(q, s, wq_up,
                                                                                                self.ws, None, x.dtype)


def test_a_swiglu_that_a_lesser_fusion_took_still_says_why_it_stayed_two_gemms():
    x = torch.randn(2, 3, 4)
    wg, wu = (torch.randint(-127, 128, (8, 4), dtype=torch.int8) for _ in range(2))
    opt = fxopt.optimize(SwiGLUOfWeightInputs(), (x, wg, wu), passes=[FuseInt8()])
    assert counts(opt)["int8_linear_epilogue"] == 2 and "int8_linear_swiglu" not in counts(opt)
    assert any("not a constant" in r for r in opt.report["fuse_int8"].reasons), opt.report["fuse_int8"].reasons


def test_a_gate_read_elsewhere_keeps_two_gemms_and_says_why():
    torch.manual_seed(0)
    opt = assert_same_function(SwiGLUWithAProbe(), torch.randn(2, 6, 16))
    c = counts(opt)
    assert "int8_linear_swiglu" not in c and "int8_linear_swiglu_quantize" not in c
    assert c["silu_mul_quantize_int8"] == 1 and c["int8_linear_epilogue"] == 4
    assert any("gate GEMM" in r and "also read by" in r for r in opt.report["fuse_int8"].reasons)


class TwoProductsOfOneGate(SwiGLUBlock):
    """One silu(gate) feeds two products: merging either would run the gate GEMM twice."""

    def __init__(self):
        super().__init__()
        self.up2 = nn.Linear(16, 32, bias=False)

    def forward(self, x):
        h = self.norm2(x)
        a = F.silu(self.gate(h))
        return self.down(a * self.up(h)) + self.down(a * self.up2(h))


def test_a_gate_shared_by_two_products_is_not_merged_twice():
    torch.manual_seed(0)
    opt = assert_same_function(TwoProductsOfOneGate(), torch.randn(2, 6, 16))
    assert "int8_linear_swiglu" not in counts(opt) and "int8_linear_swiglu_quantize" not in counts(opt)


def test_an_unquantized_swiglu_product_still_merges_its_gemms():
    torch.manual_seed(0)
    opt = assert_same_function(SwiGLUOutput(), torch.randn(2, 6, 16))
    c = counts(opt)
    assert c["int8_linear_swiglu"] == 1 and "activation_quantize_int8" not in c


def test_gelu_goes_into_fc1s_requantizing_epilogue_and_a_float_read_relu_into_the_epilogue():
    torch.manual_seed(0)
    opt = assert_same_function(GeluBlock(), torch.randn(2, 6, 16))
    c = counts(opt)
    assert c["layer_norm_quantize_int8"] == 1 and "activation_quantize_int8" not in c
    requant = [n for n in opt.graph_module.graph.nodes if n.target is f.int8_linear_quantize.default]
    assert [n.args[5] for n in requant] == ["gelu"]  # fc1: GELU, then requantized for fc2
    acts = sorted(n.args[5] for n in opt.graph_module.graph.nodes if n.target is f.int8_linear_epilogue.default)
    assert acts == ["none", "relu"]  # fc2 (+ residual), side (ReLU, read as a float)
    assert "quantize_int8" not in c and "int8_linear" not in c


class GeluProbe(GeluBlock):
    """fc1's output is also returned as a float: its GEMM must write it, so its quantizer stays a row kernel."""

    def forward(self, x):
        a = self.fc1(self.ln(x))
        return x + self.fc2(F.gelu(a)), a


def test_a_gemm_output_read_as_a_float_is_not_requantized_in_its_epilogue():
    torch.manual_seed(0)
    opt = assert_same_function(GeluProbe(), torch.randn(2, 6, 16))
    c = counts(opt)
    assert "int8_linear_quantize" not in c and c["activation_quantize_int8"] == 1
    assert "requantize" not in opt.report["fuse_int8"].stats


class SwiGLUThenReLU(SwiGLUBlock):
    """An activation after the SwiGLU product: the quantizer applies it, which the requantizing SwiGLU cannot."""

    def forward(self, x):
        h = self.norm2(x)
        return x + self.down(torch.relu(F.silu(self.gate(h)) * self.up(h)))


def test_an_activation_after_a_swiglu_keeps_its_row_quantizer_and_says_why():
    torch.manual_seed(0)
    opt = assert_same_function(SwiGLUThenReLU(), torch.randn(2, 6, 16))
    c = counts(opt)
    assert c["int8_linear_swiglu"] == 1 and "int8_linear_swiglu_quantize" not in c
    assert any("applies relu to the SwiGLU GEMM's output" in r for r in opt.report["fuse_int8"].reasons)


class TwoActivationsOfOneGemm(GeluBlock):
    """fc1's output feeds two quantizers (GELU and ReLU branches): requantizing both would run fc1 twice."""

    def __init__(self):
        super().__init__()
        self.fc3 = nn.Linear(32, 16)

    def forward(self, x):
        a = self.fc1(self.ln(x))
        return x + self.fc2(F.gelu(a)) + self.fc3(torch.relu(a))


def test_a_gemm_read_by_two_quantizers_is_computed_once():
    torch.manual_seed(0)
    opt = assert_same_function(TwoActivationsOfOneGemm(), torch.randn(2, 6, 16))
    c = counts(opt)
    assert "int8_linear_quantize" not in c and c["activation_quantize_int8"] == 2
    assert c["int8_linear_epilogue"] == 3  # fc1 once, fc2 and fc3


@pytest.mark.parametrize("block", [SwiGLUBlock, GeluBlock, PostLNBlocks, PostRMSNormBlocks])
@pytest.mark.parametrize("backend", ["onnxruntime", "tvm"])
def test_requantizing_gemms_with_smoothing_pre_scales_lower_to_both_backends(block, backend):
    pytest.importorskip({"onnxruntime": "onnxruntime", "tvm": "tvm"}[backend])
    torch.manual_seed(0)
    x = torch.randn(2, 6, 16)
    opt = quantized(block(), x, True, smooth=True)
    requant = [n for n in opt.graph_module.graph.nodes
               if n.target in (f.int8_linear_quantize.default, f.int8_linear_swiglu_quantize.default)]
    assert len(requant) == 1 and requant[0].args[-2] is not None  # down's / fc2's smoothing pre-scale
    fresh = torch.randn(3, 5, 16)
    with torch.no_grad():
        want, got = main(opt(fresh)), main(fxopt.compile(opt, backend)(fresh))
    cos = F.cosine_similarity(want.flatten().double(), got.flatten().double(), dim=0)
    assert cos >= 1 - 1e-6, cos


def test_a_post_ln_norm_keeps_its_output_and_quantizes_in_the_same_kernel():
    torch.manual_seed(0)
    opt = assert_same_function(PostLN(), torch.randn(2, 6, 16))
    c = counts(opt)
    assert c["layer_norm_and_quantize_int8"] == 1 and "activation_quantize_int8" not in c
    assert "layer_norm" not in {getattr(n.target, "__name__", "") for n in opt.graph_module.graph.nodes}
    assert not opt.report["fuse_int8"].reasons


@pytest.mark.parametrize("blocks, norm", [(PostLNBlocks, "layer_norm"), (PostRMSNormBlocks, "rms_norm")])
def test_post_ln_blocks_move_the_residual_add_into_the_gemm_and_fuse_every_norm_quantizer(blocks, norm):
    torch.manual_seed(0)
    opt = assert_same_function(blocks(), torch.randn(2, 6, 16))
    c = counts(opt)
    # ln0 and ln1 feed GEMMs and the next residual; mix + h and fc2 + h move into their GEMMs' epilogues (the
    # norms' sums are read by nothing else); ln2 is the output (no quantizer) and stays a plain norm
    assert c[f"{norm}_and_quantize_int8"] == 2 and f"add_{norm}" not in c
    assert "activation_quantize_int8" not in c  # fc1 + GELU requantize for fc2 in fc1's epilogue
    with_residual = [n for n in opt.graph_module.graph.nodes if n.target is f.int8_linear_epilogue.default
                     and n.args[6] is not None]
    assert len(with_residual) == 2
    assert opt.report["fuse_int8"].stats["residual_into_epilogue"] == 2
    assert not opt.report["fuse_int8"].reasons


def test_a_post_ln_norm_whose_residual_sum_is_read_stays_with_its_reason():
    torch.manual_seed(0)
    opt = assert_same_function(PostLNWithSum(), torch.randn(2, 6, 16))
    c = counts(opt)
    assert c["add_layer_norm"] == 1 and c["layer_norm_and_quantize_int8"] == 1  # ln1 stays; ln0 fuses
    assert any("also read as a float" in r and "cannot move into a GEMM" in r for r in opt.report["fuse_int8"].reasons)


def test_per_tensor_codes_stay_with_int8_linear():
    torch.manual_seed(0)
    opt = assert_same_function(PostLN(), torch.randn(2, 6, 16), act="tensor")
    c = counts(opt)
    assert c["quantize_int8"] == 1 and c["int8_linear"] == 1 and "int8_linear_epilogue" not in c
    assert any("per-tensor or static codes" in r for r in opt.report["fuse_int8"].reasons)


def test_the_pass_is_idempotent_and_says_why_without_int8_ops():
    torch.manual_seed(0)
    opt = quantized(SwiGLUBlock(), torch.randn(2, 6, 16), True)
    gm = opt.graph_module
    again = FuseInt8().run(gm, None)
    assert not again.modified
    plain = fxopt.optimize(SwiGLUBlock().eval(), (torch.randn(2, 6, 16),), passes=[FuseInt8()])
    assert not plain.report["fuse_int8"].applied
    assert any("smoothquant or zeroquant" in r for r in plain.report["fuse_int8"].reasons)


@pytest.fixture(scope="module", params=[("llama", "smoothquant"), ("bert", "smoothquant"), ("llama", "zeroquant")])
def hf_fused(request):
    family, quantizer = request.param
    model, _ = hf.build(family, attn="sdpa", layers=2)
    args, kwargs = hf.inputs(family, 2, 8)
    calib = [hf.inputs(family, 2, 8, seed=s) for s in range(1, 3)]
    passes = [FuseLayerNorm(), SmoothQuant(smooth=False, act="token") if quantizer == "smoothquant" else
              ZeroQuant(weight_bits=8, group_size=1, act="token")]
    before = fxopt.optimize(model, args, passes=passes, example_kwargs=kwargs, calibration=calib)
    after = fxopt.optimize(model, args, passes=[*passes, FuseInt8()], example_kwargs=kwargs, calibration=calib)
    return family, before, after, hf.inputs(family, 3, 9, seed=7)


def test_hf_models_fuse_per_layer_and_compute_the_same_function(hf_fused):
    family, before, after, (args, kwargs) = hf_fused
    c, layers = counts(after), 2
    if family == "llama":  # per layer: both norms; gate and up one GEMM; o_proj's and down's inputs quantized alone
        assert c["rms_norm_quantize_int8"] + c["add_rms_norm_quantize_int8"] == 2 * layers
        # the SwiGLU GEMM requantizes for down; o_proj's input (attention's output) is quantized alone
        assert c["int8_linear_swiglu_quantize"] == layers and c["activation_quantize_int8"] == layers
        assert c["int8_linear_epilogue"] == 5 * layers and "silu_mul_quantize_int8" not in c
    else:  # BERT is post-LN: each norm keeps its output (the next residual) and quantizes it in one kernel, the
        # residual adds before them move into the GEMMs' epilogues; fc1 + GELU requantize for fc2; attention's
        # output is quantized alone
        assert c["layer_norm_and_quantize_int8"] == 2 * layers  # the embeddings' norm and the attention block's
        assert c["activation_quantize_int8"] == layers and c["int8_linear_quantize"] == layers
        assert c["int8_linear_epilogue"] == 5 * layers
        assert after.report["fuse_int8"].stats["residual_into_epilogue"] == 2 * layers
        assert not after.report["fuse_int8"].reasons
    assert "int8_linear" not in c and "quantize_int8" not in c
    with torch.no_grad():
        assert torch.equal(main(before(*args, **kwargs)), main(after(*args, **kwargs)))


def test_the_fused_graph_exports_to_onnx_runtime(hf_fused):
    pytest.importorskip("onnxruntime")
    _, _, after, (args, kwargs) = hf_fused
    with torch.no_grad():
        want = main(after(*args, **kwargs))
        got = main(fxopt.compile(after, "onnxruntime")(*args, **kwargs))
    cos = F.cosine_similarity(want.flatten().double(), got.flatten().double(), dim=0)
    assert cos >= 1 - 1e-6, cos


def test_every_fused_op_is_in_the_registry():
    names = {d.name for d in ops.REGISTRY.values()}
    assert {"rms_norm_quantize_int8", "layer_norm_quantize_int8", "add_rms_norm_quantize_int8",
            "add_layer_norm_quantize_int8", "silu_mul_quantize_int8", "activation_quantize_int8",
            "int8_linear_epilogue", "int8_linear_swiglu", "int8_linear_quantize",
            "int8_linear_swiglu_quantize", "rms_norm_and_quantize_int8", "layer_norm_and_quantize_int8"} <= names


def test_gemma_s_norms_scaled_by_one_plus_w_in_fp32_fuse_their_quantizers():
    # Gemma's RMSNorm multiplies by (1 + w) in fp32 and casts back with type_as: canonicalization folds the
    # weight's expression into a constant and drops the same-dtype cast, so the norm and its quantizer fuse
    transformers = pytest.importorskip("transformers")
    config = transformers.GemmaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                      head_dim=8, intermediate_size=64, vocab_size=100, bos_token_id=0,
                                      eos_token_id=0, hidden_activation="gelu_pytorch_tanh", attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.GemmaForCausalLM(config).eval()
    ids = torch.randint(2, 100, (2, 8))
    passes = [FuseLayerNorm(), ZeroQuant(weight_bits=8)]
    before = fxopt.optimize(model, (ids,), example_kwargs={"use_cache": False}, passes=passes)
    after = fxopt.optimize(model, (ids,), example_kwargs={"use_cache": False}, passes=[*passes, FuseInt8()])
    assert after.report["fuse_int8"].stats["norm_quantize"] == 2 * 2 and not after.report["fuse_int8"].reasons
    fresh = torch.randint(2, 100, (3, 9))
    with torch.no_grad():
        assert torch.equal(main(before(fresh, use_cache=False)), main(after(fresh, use_cache=False)))
