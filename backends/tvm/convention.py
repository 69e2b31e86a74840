"""The calling convention between TVM-compiled code and the library functions registered at load time.

With ``extern=True`` (the CUDA default) GEMMs and attention are not TVM kernels: the compiled code calls
packed functions by name, which ``runtime.register_torch_externs`` registers with the TVM runtime when an
artifact is loaded; they run cuBLAS and torch's fused attention through torch. This module is the one
statement of that interface. The emitters (``convert.py``, ``attention.py``) and the runtime import it, the
manifest records ``VERSION`` and what the functions need at run time (``manifest_entry``), and the loader
refuses an artifact whose convention it does not speak, or whose requirements are missing, before loading
the library (``check_manifest``). Bump ``VERSION`` on any change to a name or an argument layout below.

    fxopt.linear(x[..., K], w[N, K], [bias[N]], out[..., N'])   out = x @ w.T + bias; N' >= N (N padded to a
                                                                 multiple of 8: rows N.. of w are zeros)
    fxopt.addmm(bias[N], x[M, K], w[K, N], out[M, N])            out = bias + x @ w
    fxopt.matmul(a, b, out)                                      out = a @ b (batched, broadcast)
    fxopt.sdpa(q, k, v, [mask], scale, is_causal, out_bshd, qview, kview, vview) -> out
        not destination-passing (returns a new tensor); mask is additive float; each view is 4 ints
        (mode, offset, heads, width): mode 0 the tensor is [B, H, S, D]; 1 it is [B, S, H, D]; 2 it is [B, S, X]
        holding this input at [..., offset : offset + width], width = heads * D. out is [B, S, H, D] when
        out_bshd, else q's layout.

This file is copied into every TVM artifact (as ``fxopt_convention.py``): standard library only.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Mapping, Sequence
from typing import Any

VERSION = 1
PROVIDER = "torch"  # who implements the functions at run time
REQUIRES = ("torch",)  # Python packages the provider needs at run time

LINEAR = "fxopt.linear"
ADDMM = "fxopt.addmm"
MATMUL = "fxopt.matmul"
SDPA = "fxopt.sdpa"
FUNCTIONS = (LINEAR, ADDMM, MATMUL, SDPA)

VIEW_BHSD, VIEW_BSHD, VIEW_PACKED = 0, 1, 2
SDPA_SCALARS = 3 + 3 * 4  # scale, is_causal, out_bshd, three views

if __package__ == "fxopt.backends.tvm":
    from fxopt.errors import FxoptError as _Base
else:  # the copy inside a TVM artifact

    class _Base(Exception):  # type: ignore[no-redef]
        """Stands in for fxopt.errors.FxoptError where fxopt is not installed."""


class ConventionError(_Base, RuntimeError):
    """An artifact's library calls cannot be served here: another convention version, or a missing package."""


@dataclasses.dataclass(frozen=True)
class View:
    mode: int = VIEW_BHSD
    offset: int = 0
    heads: int = 0
    width: int = 0


@dataclasses.dataclass(frozen=True)
class SdpaCall:
    scale: float
    is_causal: bool
    out_bshd: bool
    views: tuple[View, View, View]


def sdpa_scalars(call: SdpaCall) -> list[Any]:
    """The scalar arguments of ``fxopt.sdpa`` after the tensors, in order."""
    views = [x for v in call.views for x in (v.mode, v.offset, v.heads, v.width)]
    return [float(call.scale), int(call.is_causal), int(call.out_bshd), *views]


def decode_sdpa(rest: Sequence[Any]) -> tuple[Any, SdpaCall]:
    """(mask or None, call) from the arguments after q, k, v."""
    if len(rest) not in (SDPA_SCALARS, SDPA_SCALARS + 1):
        raise ConventionError(f"{SDPA} takes {SDPA_SCALARS} scalars after q, k, v[, mask]; got {len(rest)} "
                              f"arguments (convention {VERSION})")
    mask = rest[0] if len(rest) == SDPA_SCALARS + 1 else None
    s = list(rest[-SDPA_SCALARS:])
    views = tuple(View(*(int(x) for x in s[3 + 4 * i:7 + 4 * i])) for i in range(3))
    return mask, SdpaCall(float(s[0]), bool(s[1]), bool(s[2]), views)


def manifest_entry() -> dict[str, Any]:
    return {"convention": VERSION, "functions": list(FUNCTIONS), "provider": PROVIDER, "requires": list(REQUIRES)}


def check_manifest(entry: Mapping[str, Any] | None) -> None:
    """Fail fast when this runtime cannot serve the artifact's library calls (None: it makes none)."""
    if entry is None:
        return
    if entry.get("convention") != VERSION:
        raise ConventionError(f"the artifact calls library functions by convention version "
                              f"{entry.get('convention')!r}; this loader implements version {VERSION}. Export "
                              f"it again with this fxopt, or load it with the loader.py written beside it")
    missing = [p for p in entry.get("requires", []) if importlib.util.find_spec(p) is None]
    if missing:
        raise ConventionError(f"the artifact's GEMMs and attention run through {entry.get('provider')} at run time "
                              f"(functions {', '.join(entry.get('functions', []))}), but {', '.join(missing)} "
                              f"is not installed; install it, or export with extern=False (TVM kernels only)")
