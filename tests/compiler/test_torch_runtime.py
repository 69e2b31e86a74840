"""The optimized module in torch: torch.compile sees the fused ops' decompositions; CUDA runs Triton kernels
that compute the reference within fuse_layernorm's contract and keep its layout; the reference serves the rest."""

import pytest
import torch
from torch import nn

import fxopt
from fxopt import ops, torch_kernels
from fxopt.passes import get
from fxopt.testing import assert_within

TOL = get("fuse_layernorm").tolerance


class Block(nn.Module):
    """A pre-norm residual block, as users write one (HF Llama-style RMSNorm, torch LayerNorm)."""

    def __init__(self, d=32):
        super().__init__()
        self.w = nn.Parameter(torch.rand(d) + 0.5)
        self.proj, self.ln = nn.Linear(d, d), nn.LayerNorm(d)

    def rms(self, h):
        h32 = h.to(torch.float32)
        return self.w * (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(h.dtype)

    def forward(self, x):
        h = x + self.proj(self.rms(x))
        return self.ln(h + self.proj(h))


def _fused_calls(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in ops.REGISTRY]


def test_torch_compile_traces_decompositions_and_keeps_the_graph():
    model, x = Block().eval(), torch.randn(2, 5, 32)
    opt = fxopt.optimize(model, (x,), passes=["fuse_layernorm"])
    assert _fused_calls(opt.graph_module), "the pass must fuse something for this test to mean anything"
    traced = []

    def backend(gm, example_inputs):
        traced.append(gm)
        return gm.forward

    with torch.no_grad():
        got, want = torch.compile(opt, backend=backend)(x), opt(x)
    assert traced and not any("fxopt" in str(n.target) for g in traced for n in g.graph.nodes)
    assert _fused_calls(opt.graph_module)  # the optimized graph (what backends export) keeps the ops
    assert_within(got, want, TOL)
    with torch.no_grad():
        assert_within(torch.compile(opt)(x), model(x), TOL)


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_cuda_entry_points_fall_back_to_the_reference_where_triton_does_not_run(layout):
    x = torch.randn(3, 4, 16)
    x = x if layout == "contiguous" else x.transpose(0, 1)
    r, w, b = torch.randn_like(x), torch.rand(16), torch.randn(16)
    assert not torch_kernels.triton_covers(x, [16], r, w)  # CPU tensors (or no Triton): the reference runs
    pairs = [(torch_kernels.rms_norm_cuda(x, [16], w, 1e-6), ops._rms_norm_ref(x, [16], w, 1e-6)),
             (torch_kernels.add_rms_norm_cuda(x, r, [16], w, 1e-6), ops._add_rms_norm_ref(x, r, [16], w, 1e-6)),
             (torch_kernels.add_layer_norm_cuda(x, r, [16], w, b, 1e-5),
              ops._add_layer_norm_ref(x, r, [16], w, b, 1e-5))]
    for got, want in pairs:
        for g, e in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            assert torch.equal(g, e) and g.stride() == e.stride()


needs_triton = pytest.mark.skipif(not torch.cuda.is_available() or torch_kernels.triton is None,
                                  reason="Triton kernels run on CUDA only")


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(4, 7, 768), (2, 33, 2048), (5, 1000), (3, 4, 8, 12)])
def test_triton_kernels_match_the_reference_within_the_pass_contract(dtype, shape):
    g = torch.Generator(device="cuda").manual_seed(hash((str(dtype), shape)) % 2**31)
    x, r = (torch.randn(shape, device="cuda", generator=g).mul(3).to(dtype) for _ in range(2))
    norm = list(shape[-2:]) if len(shape) == 4 else [shape[-1]]
    w, b = (torch.randn(norm, device="cuda", generator=g).to(dtype) for _ in range(2))
    assert torch_kernels.triton_covers(x, norm, r, w, b)
    for fused, ref, extra in ((ops.rms_norm, ops._rms_norm_ref, ()), (ops.add_rms_norm, ops._add_rms_norm_ref, (r,)),
                              (ops.add_layer_norm, ops._add_layer_norm_ref, (r,))):
        params = (w, b) if fused is ops.add_layer_norm else (w,)
        got, want = fused(x, *extra, norm, *params, 1e-5), ref(x, *extra, norm, *params, 1e-5)
        got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
        for g_, e in zip(got, want):
            assert g_.dtype == e.dtype and g_.stride() == e.stride() and torch.isfinite(g_).all()
            assert_within(g_, e, TOL)
        if extra:
            assert torch.equal(got[1], want[1])  # the residual sum is the same rounding of x + r


def _sdpa(gm):
    return list(gm.graph.find_nodes(op="call_function", target=torch.ops.aten.scaled_dot_product_attention.default))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_shape_only_causal_mask_runs_sdpa_causal_from_the_second_call(family):
    from tests.models import hf

    model, _ = hf.build(family, attn="sdpa")
    (ids,), kwargs = hf.inputs(family, 2, 12)
    opt = fxopt.optimize(model, (ids,), passes=["fuse_layernorm"], example_kwargs=kwargs)
    runner = opt._runtime()[1]
    assert len(runner.sdpa) == len(_sdpa(opt.graph_module)) == 2  # the captured graph builds the mask
    (other,), _ = hf.inputs(family, 3, 7, seed=1)
    with torch.no_grad():
        for _ in range(2):  # the first call records the masks, the second runs the folded copy
            assert_within(opt(other, **kwargs).logits, model(other, **kwargs).logits, TOL)
    (folded,) = runner.by_shape.values()
    assert all(n.kwargs["is_causal"] and n.kwargs["attn_mask"] is None for n in _sdpa(folded))
    assert len(folded.graph.nodes) < len(runner.graph.graph.nodes)  # the mask's subgraph is gone
    assert all(n.kwargs.get("attn_mask", n.args[3:4]) for n in _sdpa(opt.graph_module))  # exported graph kept


def test_a_mask_that_reads_input_values_is_not_folded():
    from tests.models import hf

    model, _ = hf.build("bert", attn="sdpa")
    (ids,), kwargs = hf.inputs("bert", 2, 12)
    opt = fxopt.optimize(model, (ids,), passes=["fuse_layernorm"], example_kwargs=kwargs)
    assert opt._runtime()[1].sdpa == [] and _sdpa(opt.graph_module)
    with torch.no_grad():
        assert_within(opt(ids, **kwargs)[0], model(ids, **kwargs)[0], TOL)


def test_classify_names_only_the_kept_all_and_causal_masks():
    from fxopt.torch_runtime import classify

    tril = torch.ones(4, 4, dtype=torch.bool).tril()
    assert classify(tril.expand(2, 1, 4, 4), 4, 4) == "causal"
    assert classify(torch.ones(1, 1, 4, 4, dtype=torch.bool), 4, 4) == "none"
    assert classify(torch.zeros(4, 4).masked_fill(~tril, float("-inf")), 4, 4) == "causal"
    assert classify(tril.clone().fill_diagonal_(False), 4, 4) is None
    assert classify(torch.zeros(4, 4).masked_fill(~tril, -1.0), 4, 4) is None  # a bias, not a mask
    assert classify(torch.ones(4, 5, dtype=torch.bool).tril(), 4, 5) is None  # causal needs Lq == Lk
