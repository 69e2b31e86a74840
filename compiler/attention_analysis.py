"""Attention blocks: from each attention core back to the linears that feed q, k, v and on to the o projection.

Cores:  aten.scaled_dot_product_attention(q, k, v[, mask], is_causal, scale, enable_gqa)          kind "sdpa"
        matmul(softmax(matmul(q, kᵀ) [· scale] [+ mask], dim=-1), v)                          kind "explicit"
For each operand, the region between a linear's output and the core is replayed on `arange(out_features)`
(compiler/replay.py), a static KV cache's update (index_copy into a buffer) and RoPE looked through
(q·cos + rot(q)·sin, `rot` classified by replaying it on a probe:
rotate-half or interleaved pairs). That gives `rows[h, d]`, the output feature of the linear feeding head h,
dim d — fused or not. KV heads are the distinct k/v heads (repeat_kv's expand repeats them; SDPA's `enable_gqa`
shares them by h // n_rep). The o projection's `cols[h, d]` is its input feature reading head h, dim d.
Anything else is not understood, with the node and the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from .replay import SHAPE_OPS, Replay, ReplayError, index_tensor, shape, token_invariant
from .sites import CAST_TARGETS, LinearSite, is_call, val

aten = torch.ops.aten
SOFTMAX = (aten.softmax.int, aten._softmax.default, aten._safe_softmax.default)
_MATMUL = (aten.matmul.default, aten.bmm.default)
ROTATE_OPS = SHAPE_OPS | {aten.neg.default}


class NotUnderstood(Exception):
    def __init__(self, node: fx.Node, reason: str):
        super().__init__(f"{node.name}: {reason}")
        self.node, self.reason = node, reason


@dataclass(frozen=True, eq=False)
class Rope:
    pairing: str  # "rotate-half" (d ↔ d + D/2) or "interleaved" (2i ↔ 2i+1)
    dim: int  # rotated dims per head (partial rotary: fewer than head_dim)
    node: fx.Node  # the add that completes q·cos + rot(q)·sin


@dataclass(frozen=True, eq=False)
class Operand:
    site: LinearSite
    rows: torch.Tensor  # (heads as the core reads them, head_dim): output features of `site`
    rope: Rope | None
    node: fx.Node  # what the core reads
    scale: float = 1.0  # a constant factor applied on the way (q pre-scaled by 1/sqrt(head_dim): OPT)


@dataclass(frozen=True, eq=False)
class Core:
    kind: str  # "sdpa" | "explicit"
    node: fx.Node  # the SDPA node or the softmax
    q: fx.Node
    k: fx.Node  # as (B, H, S, D): the explicit form's kᵀ is looked through
    v: fx.Node
    output: fx.Node  # (B, H, S, D)
    mask: fx.Node | None
    causal: bool
    scale: float | None
    enable_gqa: bool = False
    k_transposed: fx.Node | None = None  # the explicit form's kᵀ node, when it is not a plain transpose


def _arg(n: fx.Node, i: int, name: str, default=None):
    return n.args[i] if len(n.args) > i else n.kwargs.get(name, default)


def sdpa_core(n: fx.Node) -> Core:
    return Core("sdpa", n, n.args[0], n.args[1], n.args[2], n, _arg(n, 3, "attn_mask"),
                bool(_arg(n, 5, "is_causal", False)), _arg(n, 6, "scale"), bool(_arg(n, 7, "enable_gqa", False)))


def explicit_core(sm: fx.Node) -> Core:
    """matmul(softmax(matmul(q, kᵀ) [· s] [+ mask]), v) around the softmax `sm`, or NotUnderstood."""
    x, dim = sm.args[0], sm.args[1]
    if dim % val(x).dim() != val(x).dim() - 1:
        raise NotUnderstood(sm, f"softmax over dim {dim}, not the key axis (the last dim of q·kᵀ)")
    mask, scale = None, None
    while not is_call(x, _MATMUL):
        if is_call(x, (aten.add.Tensor,)) and all(isinstance(a, fx.Node) for a in x.args[:2]):
            a, b = x.args[:2]
            x, mask = (a, b) if _reaches_matmul(a) else (b, a)
        elif is_call(x, (aten.mul.Tensor, aten.div.Tensor)) and isinstance(x.args[1], (int, float)):
            scale = (scale or 1.0) * (x.args[1] if x.target is aten.mul.Tensor else 1.0 / x.args[1])
            x = x.args[0]
        elif is_call(x, CAST_TARGETS):
            x = x.args[0]
        else:
            raise NotUnderstood(sm, f"softmax input {x.name} is not matmul(q, kᵀ) [· scale] [+ mask]")
    q, kt = x.args[:2]
    out = _single_matmul_reader(sm)
    nd = val(kt).dim()
    plain_t = (is_call(kt, (aten.transpose.int,)) and {a % nd for a in kt.args[1:3]} == {nd - 1, nd - 2})
    return Core("explicit", sm, q, kt.args[0] if plain_t else kt, out.args[1], out, mask, False, scale,
                k_transposed=None if plain_t else kt)


def _reaches_matmul(n: fx.Node, depth: int = 4) -> bool:
    for _ in range(depth):
        if is_call(n, _MATMUL):
            return True
        if not (isinstance(n, fx.Node) and n.op == "call_function" and n.args and isinstance(n.args[0], fx.Node)):
            return False
        n = n.args[0]
    return False


def _single_matmul_reader(sm: fx.Node) -> fx.Node:
    n = sm
    while True:
        users = list(n.users)
        if len(users) != 1:
            raise NotUnderstood(sm, f"the probabilities {n.name} have {len(users)} readers, not one matmul with v")
        (u,) = users
        if is_call(u, _MATMUL) and u.args[0] is n:
            return u
        if not is_call(u, CAST_TARGETS):
            raise NotUnderstood(sm, f"the probabilities are read by {u.name}, not by matmul(·, v)")
        n = u


def match_rope(n: fx.Node) -> tuple[fx.Node, Rope] | None:
    """(x, rope) when n = x·cos + rot(x)·sin (either order), rot a fixed rotation of x's last dim."""
    if not is_call(n, (aten.add.Tensor,)) or not all(is_call(a, (aten.mul.Tensor,)) for a in n.args[:2]):
        return None
    first, second = n.args[:2]
    for m1, m2 in ((first, second), (second, first)):
        for x in m1.args[:2]:
            for r in m2.args[:2]:
                pairing = _rotation(x, r) if isinstance(x, fx.Node) and isinstance(r, fx.Node) else None
                if pairing is not None:
                    return x, Rope(pairing, shape(x)[-1], n)
    return None


def _rotation(x: fx.Node, r: fx.Node) -> str | None:
    if x is r or val(x) is None or val(r) is None or tuple(val(x).shape) != tuple(val(r).shape):
        return None
    d = shape(x)[-1]
    probe = torch.arange(1, d + 1, dtype=torch.float64).expand(*shape(x))
    try:
        out = Replay({x: probe}, ROTATE_OPS)(r)
    except (ReplayError, RuntimeError, TypeError, IndexError):
        return None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(probe.shape) or d % 2:
        return None
    p = probe.reshape(-1, d)[0]
    half = torch.cat([-p[d // 2:], p[: d // 2]])
    pairs = torch.stack([-p[1::2], p[::2]], -1).flatten()
    for name, want in (("rotate-half", half), ("interleaved", pairs)):
        if bool((out == want).all()):
            return name
    return None


def cache_write(n: fx.Node) -> fx.Node | None:
    """The cache buffer of `index_copy(cache, dim, positions, x)` (a static KV cache's update: x's entries at
    `positions`, the cache's elsewhere), else None. For the rows, the new entries stand for the whole: the
    cache holds what the same projection wrote at earlier steps."""
    if is_call(n, (aten.index_copy.default,)) and isinstance(n.args[0], fx.Node) and n.args[0].op == "get_attr":
        return n.args[0]
    return None


def operand(core: Core, which: str, sites_by_output: dict[fx.Node, LinearSite]) -> Operand:
    """The linear feeding q, k or v of `core`, with rows[h, d] (output features of that linear)."""
    node = getattr(core, which)
    ropes: list[Rope] = []

    def shortcut(n: fx.Node):
        if cache_write(n) is not None:
            return n.args[3]
        found = match_rope(n)
        if found is None:
            return None
        ropes.append(found[1])
        return found[0]

    def source(n: fx.Node):
        site = sites_by_output.get(n)
        return None if site is None else index_tensor(n, site.out_features)

    rp = Replay(source, SHAPE_OPS, shortcut, scalar_identity=True)
    try:
        idx = rp(core.k_transposed if which == "k" and core.k_transposed is not None else node)
    except (ReplayError, RuntimeError, TypeError, IndexError) as e:
        where = e.node if isinstance(e, ReplayError) else node
        raise NotUnderstood(where, f"{which} of the attention at {core.node.name} does not come from one linear "
                                   f"through shape ops: {getattr(e, 'reason', e)}") from e
    used = list(dict.fromkeys(rp.used))
    if len(used) != 1:
        raise NotUnderstood(node, f"{which} reads {len(used)} linears ({', '.join(u.name for u in used)}), not one")
    if which == "k" and core.k_transposed is not None:
        idx = idx.transpose(-1, -2)
    if idx.dim() != 4:
        raise NotUnderstood(node, f"{which} is {idx.dim()}-d, not (batch, heads, seq, head_dim)")
    rows = token_invariant(idx, 0, 2)
    if rows is None:
        raise NotUnderstood(node, f"{which}'s weight rows differ between tokens: not a per-token projection")
    return Operand(sites_by_output[used[0]], rows.clone(), ropes[0] if ropes else None, node, rp.scale)


def o_projection(core: Core, sites: list[LinearSite]) -> tuple[LinearSite, torch.Tensor]:
    """The linear reading the attention output through shape ops, and cols[h, d] (its input features)."""
    by_input = {s.input: s for s in sites}
    b, h, s, d = shape(core.output)
    heads_dims = (torch.arange(h * d).view(1, h, 1, d)).expand(b, h, s, d)
    n, hops = core.output, 0
    while n not in by_input:
        users = [u for u in n.users if is_call(u, SHAPE_OPS | set(CAST_TARGETS))]
        if len(users) != 1 or len(n.users) != 1 or hops > 12:
            raise NotUnderstood(core.output, f"the attention output ({n.name}) does not reach one linear through "
                                             "shape ops")
        n, hops = users[0], hops + 1
    site = by_input[n]
    try:
        feats = Replay({core.output: heads_dims})(n)
    except (ReplayError, RuntimeError) as e:
        raise NotUnderstood(n, f"cannot replay the attention output to {site.weight_name}: {e}") from e
    per_token = token_invariant(feats, 0, 1) if feats.dim() == 3 else None
    if per_token is None or sorted(per_token.tolist()) != list(range(h * d)):
        raise NotUnderstood(n, f"{site.weight_name}'s input is not a per-token permutation of (head, dim)")
    cols = torch.empty(h * d, dtype=torch.long)
    cols[per_token] = torch.arange(h * d)
    return site, cols.view(h, d)
