"""The transformer structure of a canonical graph, as plain data: `analyze_graph(gm)` / `fxopt.analyze(model, ...)`.

    Structure.linears        every linear site (compiler/sites.py)
    Structure.norm_groups    norm → consumer linears, with the norm output's other readers
    Structure.blocks         in graph order: .attention (heads, kv heads, head dim, q/k/v/o sites and rows, rope,
                             kind, mask, norm) and .mlp (plain/gated, up/gate/down sites, activation, norm)
    Structure.not_understood "node: reason" for everything seen and not classified

MLP chains: down(act(up(x))) ("plain") or down(act(gate(x)) * up(x)) ("gated"), views and casts looked through.
The activation is classified by evaluating the graph's own elementwise region from the linear's output on a
float64 probe and comparing it with the known activations; a written-out tanh GELU is therefore "gelu_tanh" like
the op. Nothing is guessed: an unclassified region is reported with its reason. The graph is never mutated.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
from torch import fx

from . import ops
from .attention_analysis import SOFTMAX, Core, NotUnderstood, Operand, explicit_core, o_projection, operand, sdpa_core
from .replay import SHAPE_OPS, Replay, ReplayError, shape
from .sites import LinearSite, NormGroup, find_linear_sites, find_norm_groups, is_call, through

aten = torch.ops.aten
log = logging.getLogger(__name__)

ELEMENTWISE = SHAPE_OPS | {
    aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.div.Tensor, aten.pow.Tensor_Scalar, aten.tanh.default,
    aten.sigmoid.default, aten.erf.default, aten.exp.default, aten.neg.default, aten.gelu.default,
    aten.silu.default, aten.relu.default, aten.rsub.Scalar, aten.reciprocal.default, aten.sqrt.default,
    aten.clamp_min.default, aten.maximum.default, aten.mish.default, aten.softplus.default, aten.log1p.default,
    aten.log.default, aten.abs.default, aten.erfc.default}
F = torch.nn.functional
ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "silu": F.silu,
               "relu": F.relu, "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x)}
# float64 rounding over a dozen ops is ~1e-15; the closest distinct activations (gelu, gelu_tanh) differ by 1e-4
MATCH_TOL = torch.finfo(torch.float64).eps ** 0.5


@dataclass(frozen=True, eq=False)
class Attention:
    kind: str  # "sdpa" | "explicit"
    core: Core
    num_heads: int
    num_kv_heads: int
    head_dim: int
    q: LinearSite
    k: LinearSite
    v: LinearSite
    o: LinearSite
    q_rows: torch.Tensor  # (num_heads, head_dim): q's output features of `q`
    k_rows: torch.Tensor  # (num_kv_heads, head_dim)
    v_rows: torch.Tensor  # (num_kv_heads, head_dim)
    o_cols: torch.Tensor  # (num_heads, head_dim): o's input features
    kv_head_of: tuple[int, ...]  # q head -> kv head
    layout: str  # "separate" | "fused" | "mixed"
    rope: str | None  # "rotate-half" | "interleaved" | None
    rope_dim: int | None
    mask: bool
    norm: NormGroup | None = None
    residual: fx.Node | None = None  # the add (or fused add+norm) that adds o's output to the stream
    q_scale: float = 1.0  # constant factor on q between its linear and the core (OPT's q_proj(x) * scaling)
    k_scale: float = 1.0


@dataclass(frozen=True, eq=False)
class MLP:
    kind: str  # "plain" | "gated"
    up: LinearSite
    gate: LinearSite | None
    down: LinearSite
    activation: str
    norm: NormGroup | None = None
    residual: fx.Node | None = None


@dataclass(frozen=True, eq=False)
class Block:
    index: int
    attention: Attention | None
    mlp: MLP | None

    def __str__(self) -> str:
        parts = []
        a, m = self.attention, self.mlp
        if a is not None:
            lay = "q/k/v/o separate" if a.layout == "separate" else f"qkv {a.layout} + o"
            parts.append(f"attn {a.kind} {a.num_heads} heads ({a.num_kv_heads} kv) × {a.head_dim}, {lay}, "
                         + (f"rope {a.rope}" + (f" ({a.rope_dim} dims)" if a.rope_dim != a.head_dim else "")
                            if a.rope else "no rope") + (", mask" if a.mask else ""))
        if m is not None:
            parts.append(f"mlp {m.kind} {m.activation} {m.up.in_features}→{m.up.out_features}→"
                         f"{m.down.out_features}")
        return f"block {self.index}: " + " | ".join(parts)


@dataclass(frozen=True, eq=False)
class Structure:
    blocks: tuple[Block, ...]
    linears: tuple[LinearSite, ...]
    norm_groups: tuple[NormGroup, ...]
    not_understood: tuple[str, ...] = field(default=())

    def __str__(self) -> str:
        lines = [str(b) for b in self.blocks] or ["no transformer blocks"]
        lines += [f"not understood: {r}" for r in self.not_understood]
        return "\n".join(lines)


def _group_of(site: LinearSite, groups) -> NormGroup | None:
    return next((g for g in groups if any(s is site for s in g.linears)), None)


def _residual(out: fx.Node) -> fx.Node | None:
    """The add (or fused add+norm) reading `out` through views/casts."""
    n = out
    for _ in range(8):
        users = list(n.users)
        if len(users) != 1:
            return None
        (u,) = users
        if is_call(u, (aten.add.Tensor, ops.add_layer_norm, ops.add_rms_norm)):
            return u
        if through(u) is not n:
            return None
        n = u
    return None


def _kv(k: Operand, v: Operand, heads: int, enable_gqa: bool) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """Distinct kv heads and the q head -> kv head map; NotUnderstood unless grouped by h // (heads / kv)."""
    if k.rows.shape != v.rows.shape:
        raise NotUnderstood(k.node, f"k {tuple(k.rows.shape)} and v {tuple(v.rows.shape)} heads differ")
    firsts: dict[tuple, int] = {}
    of = [firsts.setdefault((tuple(a.tolist()), tuple(b.tolist())), len(firsts)) for a, b in zip(k.rows, v.rows)]
    n = len(firsts)
    if len(of) == heads:
        kv_of = tuple(of)
    elif enable_gqa and heads % len(of) == 0 and n == len(of):
        kv_of = tuple(h // (heads // n) for h in range(heads))
    else:
        raise NotUnderstood(k.node, f"{len(of)} k/v heads for {heads} q heads")
    if heads % n or kv_of != tuple(h // (heads // n) for h in range(heads)):
        raise NotUnderstood(k.node, f"kv heads are not shared by consecutive q heads: {kv_of}")
    pick = [of.index(i) for i in range(n)]
    return k.rows[pick], v.rows[pick], kv_of


def attention_block(core: Core, sites: list[LinearSite], groups) -> Attention:
    by_output = {s.output: s for s in sites}
    q, k, v = (operand(core, w, by_output) for w in ("q", "k", "v"))
    heads, head_dim = q.rows.shape
    if len(set(q.rows.flatten().tolist())) != q.rows.numel():
        raise NotUnderstood(core.q, "q heads repeat rows")
    k_rows, v_rows, kv_of = _kv(k, v, heads, core.enable_gqa)
    o, o_cols = o_projection(core, sites)
    distinct = len({id(q.site), id(k.site), id(v.site)})
    if q.rope is not None and k.rope is not None and q.rope.pairing != k.rope.pairing:
        raise NotUnderstood(q.rope.node, f"q rope {q.rope.pairing}, k rope {k.rope.pairing}")
    if (q.rope is None) != (k.rope is None):
        raise NotUnderstood(core.node, "rope on only one of q and k")
    return Attention(core.kind, core, int(heads), len(set(kv_of)), int(head_dim), q.site, k.site, v.site, o,
                     q.rows, k_rows, v_rows, o_cols, kv_of,
                     {1: "fused", 3: "separate"}.get(distinct, "mixed"),
                     q.rope.pairing if q.rope else None, q.rope.dim if q.rope else None,
                     core.mask is not None or core.causal, _group_of(q.site, groups), _residual(o.output),
                     q.scale, k.scale)


def classify_activation(src: fx.Node, out: fx.Node) -> str:
    """The name of f where out = f(src) elementwise, by evaluating the graph's own region on a probe."""
    dims = shape(src)
    probe = torch.linspace(-4, 4, math.prod(dims), dtype=torch.float64).view(dims)
    try:
        y = Replay({src: probe}, ELEMENTWISE)(out)
    except (ReplayError, RuntimeError, TypeError) as e:
        raise NotUnderstood(getattr(e, "node", out), f"activation region is not elementwise: {e}") from e
    if not isinstance(y, torch.Tensor) or y.shape != probe.shape:
        raise NotUnderstood(out, "activation region changes the shape")
    scale = max(float(y.abs().max()), 1.0)
    for name, fn in ACTIVATIONS.items():
        if float((y - fn(probe)).abs().max()) <= MATCH_TOL * scale:
            return name
    raise NotUnderstood(out, f"activation is none of {', '.join(ACTIVATIONS)}")


def _source_sites(n: fx.Node, by_output: dict) -> list[LinearSite]:
    rp = Replay(lambda m: torch.zeros(shape(m)) if m in by_output else None, ELEMENTWISE)
    try:
        rp(n)
    except (ReplayError, RuntimeError, TypeError):
        return []
    return [by_output[u] for u in dict.fromkeys(rp.used)]


def mlp_chain(down: LinearSite, by_output: dict, groups) -> MLP | None:
    """The MLP ending in `down`, or None when down's input is not an activation of other linears."""
    h = through(down.input)
    srcs = _source_sites(h, by_output)
    if len(srcs) == 1:
        up = srcs[0]
        return MLP("plain", up, None, down, classify_activation(up.output, h), _group_of(up, groups),
                   _residual(down.output))
    if len(srcs) == 2 and is_call(h, (aten.mul.Tensor,)):
        a, b = (through(x) for x in h.args[:2])
        for act_side, lin_side in ((a, b), (b, a)):
            up = by_output.get(lin_side)
            gate = next((s for s in srcs if s is not up), None)
            if up is not None and gate is not None and act_side is not gate.output:
                act = classify_activation(gate.output, act_side)
                return MLP("gated", up, gate, down, act, _group_of(up, groups), _residual(down.output))
        raise NotUnderstood(h, "gated product is not act(gate) * up")
    return None


def _cores(gm: fx.GraphModule, problems: list[str]) -> list[Core]:
    cores = []
    for n in gm.graph.nodes:
        try:
            if is_call(n, (aten.scaled_dot_product_attention.default,)):
                cores.append(sdpa_core(n))
            elif is_call(n, SOFTMAX):
                cores.append(explicit_core(n))
        except NotUnderstood as e:
            problems.append(str(e))
    return cores


def _unfused_norms(gm: fx.GraphModule) -> list[str]:
    return [f"{n.name}: decomposed normalization ({n.target.__name__}) not fused into a norm op"
            for n in gm.graph.nodes if is_call(n, (aten.rsqrt.default, aten.var.correction, aten.var.dim))]


def analyze_graph(gm: fx.GraphModule) -> Structure:
    """The structure of a canonical graph (norms fused), as plain data. Never mutates `gm`."""
    sites = find_linear_sites(gm)
    groups = find_norm_groups(gm, sites)
    problems = _unfused_norms(gm)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    attentions = []
    for core in _cores(gm, problems):
        try:
            attentions.append(attention_block(core, sites, groups))
        except NotUnderstood as e:
            problems.append(str(e))
    claimed = {id(s) for a in attentions for s in (a.q, a.k, a.v, a.o)}
    by_output = {s.output: s for s in sites}
    mlps = []
    for site in sites:
        if id(site) in claimed:
            continue
        try:
            mlp = mlp_chain(site, by_output, groups)
        except NotUnderstood as e:
            problems.append(str(e))
            continue
        if mlp is not None:
            mlps.append(mlp)
    if not attentions:
        problems.append("graph: no attention core (no scaled_dot_product_attention, no softmax(q·kᵀ)·v)")
    blocks = _blocks(attentions, mlps, order)
    return Structure(tuple(blocks), tuple(sites), tuple(groups), tuple(problems))


def _blocks(attentions: list[Attention], mlps: list[MLP], order: dict) -> list[Block]:
    """Each attention with the MLP whose down projection comes after it and before the next attention."""
    starts = [order[a.core.node] for a in attentions]
    blocks: list[list] = [[a, None] for a in attentions]
    for m in mlps:
        at = order[m.down.node]
        i = max((j for j, s in enumerate(starts) if s < at), default=None)
        if i is None or blocks[i][1] is not None:
            blocks.append([None, m])
        else:
            blocks[i][1] = m
    blocks.sort(key=lambda b: order[b[0].core.node] if b[0] is not None else order[b[1].down.node])
    return [Block(i, a, m) for i, (a, m) in enumerate(blocks)]


def module_of_block(weight_name: str) -> str | None:
    """The repeated module a parameter lives in: its name up to the first index ("model.layers.3" of
    "model.layers.3.mlp.up_proj.weight"), or None where no module list holds it."""
    parts = weight_name.split(".")
    i = next((i for i, p in enumerate(parts[:-1]) if p.isdigit()), None)
    return None if i is None else ".".join(parts[:i + 1])


def role_linears(structure: Structure) -> dict[LinearSite, tuple[int, bool]]:
    """(block index, is an attention projection) of each linear the analysis gave a role: q/k/v/o, gate/up/down."""
    found: dict[LinearSite, tuple[int, bool]] = {}
    for b in structure.blocks:
        for s in (b.attention.q, b.attention.k, b.attention.v, b.attention.o) if b.attention is not None else ():
            found.setdefault(s, (b.index, True))
        for s in (b.mlp.gate, b.mlp.up, b.mlp.down) if b.mlp is not None else ():
            if s is not None:
                found.setdefault(s, (b.index, False))
    return found


_SELECTIONS = ("topk", "argmax", "argmin", "argsort", "sort", "max.dim", "min.dim")


def selects(site: LinearSite, hops: int = 6) -> bool:
    """Whether the linear's output decides a selection (top-k, arg-max, a sort) within a few ops: a mixture of
    experts' router, whose every rounding can send a token to another expert."""
    frontier, seen = [site.output], set()
    for _ in range(hops):
        frontier = [u for n in frontier for u in n.users if u not in seen]
        seen.update(frontier)
        if any(u.op == "call_function" and any(w in str(u.target) for w in _SELECTIONS) for u in frontier):
            return True
    return False


def unplaced_block_linears(structure: Structure) -> dict[LinearSite, int]:
    """Block index of each linear with no role that lives in the module-list entry of a block's role linears (a
    fused gate/up split by chunk, q/k normalized per head): still the block's. Heads, poolers and embedding
    projections live outside the module list; a router (its output chooses experts: `selects`) is not counted."""
    roles, modules = role_linears(structure), {}
    for s, (index, _) in roles.items():
        if module_of_block(s.weight_name) is not None:
            modules.setdefault(module_of_block(s.weight_name), index)
    return {s: modules[module_of_block(s.weight_name)] for s in structure.linears
            if s not in roles and module_of_block(s.weight_name) in modules and not selects(s)}


def block_linears(structure: Structure) -> list[LinearSite]:
    """The linears of every transformer block (not an LM head, a pooler or a classifier): those with a role, then
    the others of the blocks' modules (unplaced_block_linears)."""
    return [*role_linears(structure), *unplaced_block_linears(structure)]


def analyze(model: torch.nn.Module, example_inputs=None, example_kwargs=None) -> Structure:
    """Capture `model` (never touched), canonicalize, stabilize softmax, fuse norms; return its structure."""
    from fxopt import passes

    from .canonicalize import canonicalize_graph
    from .capture import capture
    from .errors import MissingInputsError
    from .pass_base import PassContext

    if example_inputs is None and not example_kwargs:
        raise MissingInputsError("fxopt.analyze needs example inputs: example_inputs=(tensor, ...) "
                                 "and/or example_kwargs={...}")
    args = (() if example_inputs is None else example_inputs if isinstance(example_inputs, tuple)
            else tuple(example_inputs) if isinstance(example_inputs, list) else (example_inputs,))
    kwargs = dict(example_kwargs or {})
    gm, _, _ = capture(model, args, kwargs)
    canonicalize_graph(gm)
    ctx = PassContext(args, kwargs)
    # both exact: a hand-written softmax becomes the op the attention core is recognised by, norms become ops
    gm = passes.StabilizeSoftmax().run(gm, ctx).graph_module
    structure = analyze_graph(passes.FuseLayerNorm().run(gm, ctx).graph_module)
    log.info("fxopt structure\n%s", structure)
    return structure
