"""fxopt's CUTLASS int8 GEMM for Hopper (sm_90a), compiler/kernels/gemm_sm90.cu, built on demand with nvcc.

CUTLASS 3's warp-specialized kernels (ping-pong, cooperative) overlap one tile's epilogue with the next tile's
main loop across warp groups; Triton 3.6 does not warp-specialize on Hopper. The epilogue is the Triton GEMM's
arithmetic, an epilogue visitor tree in the reference's order of roundings,

    out = fp16(((float(acc) · s_tok[m]) · s_w[n]) + bias[n])      [then fp16(out + residual)]

built with `--fmad=false` (no contraction the reference does not do), so it gives the Triton kernel's values.

    build()        fetch CUTLASS's headers (the `nvidia-cutlass` wheel, through pip) unless given a CUTLASS
                   checkout, and compile the library into the cache (`fxopt build-kernels` runs this)
    library(dev)   the built library on an sm_90 device, else None
    gemm(...)      the epilogue GEMM through the library where it covers the call, else None

Once the library is in the cache, the CUDA kernels of `int8_linear` and `int8_linear_epilogue`
(compiler/triton_int8.py) call it for what it covers: int8 operands, fp16 out, per-token and per-channel fp32
scales, an fp16 bias and residual, no activation, K a multiple of 16 and N of 8; the rest stays Triton's.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from .errors import FxoptError

SOURCE = Path(__file__).parent / "kernels" / "gemm_sm90.cu"
CUTLASS_WHEEL = "nvidia-cutlass==4.2.0.0"
NVCC_FLAGS = ("-std=c++17", "-O3", "-arch=sm_90a", "--expt-relaxed-constexpr", "-DNDEBUG", "--fmad=false",
              "-Xcompiler", "-fPIC", "-shared")
WORKSPACE_BYTES = 4 << 20
# cfg ids of gemm_sm90.cu's CFGS: (tile M x N, schedule)
PINGPONG_128x128, COOPERATIVE_128x256, PINGPONG_128x128_CLUSTER_2x1, PINGPONG_64x128 = 0, 1, 2, 4


def cache_dir() -> Path:
    """Where built kernels live: $FXOPT_CACHE_DIR, else $XDG_CACHE_HOME/fxopt, else ~/.cache/fxopt."""
    if os.environ.get("FXOPT_CACHE_DIR"):
        return Path(os.environ["FXOPT_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fxopt"


def library_path() -> Path:
    """The library's file for this source, CUTLASS version and flags: a changed kernel gets a new name."""
    digest = hashlib.sha256(SOURCE.read_bytes() + repr((CUTLASS_WHEEL, NVCC_FLAGS)).encode()).hexdigest()[:16]
    return cache_dir() / f"gemm_sm90-{digest}.so"


def _cutlass_headers(work: Path) -> Path:
    """CUTLASS's source tree from the nvidia-cutlass wheel (headers only), downloaded with pip into `work`."""
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", CUTLASS_WHEEL, "-d", str(work)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(work.glob("nvidia_cutlass-*.whl"))
    if done.returncode or not wheels:
        raise FxoptError(f"could not download {CUTLASS_WHEEL} with pip (pass cutlass=DIR, a CUTLASS checkout): "
                         f"{done.stderr.strip()[-400:]}")
    with zipfile.ZipFile(wheels[0]) as z:
        z.extractall(work / "wheel")
    return work / "wheel" / "cutlass_library" / "source"


def build(out: Path | str | None = None, cutlass: Path | str | None = None, nvcc: str | None = None) -> Path:
    """Compiles gemm_sm90.cu (about 3 minutes on 2 cores; no GPU needed) to `out` (default: library_path(), the
    one file fxopt loads; another `out` is for benchmarks/int8_cutlass.py --lib). `cutlass`: a CUTLASS 3.5+ source
    tree (with include/ and tools/util/include/); default: the pinned wheel's."""
    compiler = nvcc or shutil.which("nvcc")
    if compiler is None:
        raise FxoptError("building the CUTLASS GEMM needs nvcc (CUDA 12.3 or newer) on PATH, or nvcc=PATH")
    target = Path(out) if out is not None else library_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(cutlass) if cutlass is not None else _cutlass_headers(Path(tmp))
        if not (root / "include" / "cutlass" / "cutlass.h").is_file():
            raise FxoptError(f"cutlass={str(root)!r} holds no include/cutlass/cutlass.h: not a CUTLASS source tree")
        # written beside the target, then renamed over it: a process that has the old library mapped keeps it,
        # and none ever loads a half-written one
        handle, part = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        os.close(handle)
        cmd = [compiler, *NVCC_FLAGS, f"-I{root / 'include'}", f"-I{root / 'tools' / 'util' / 'include'}",
               str(SOURCE), "-o", part]
        try:
            try:
                done = subprocess.run(cmd, capture_output=True, text=True)
            except OSError as e:
                raise FxoptError(f"could not run nvcc={compiler!r}: {e}") from e
            if done.returncode:
                raise FxoptError(f"nvcc failed on {SOURCE.name} (exit {done.returncode}): "
                                 f"{done.stderr.strip()[-800:]}")
            os.replace(part, target)
        finally:
            if os.path.exists(part):
                os.unlink(part)
    library.cache_clear()
    return target


class Library:
    """The loaded library: fxopt_cutlass_gemm through ctypes, launched on torch's current stream (so CUDA graphs
    and torch.compile's reduce-overhead capture it like any kernel)."""

    def __init__(self, path: Path, device: int):
        self.lib = ctypes.CDLL(str(path))
        p, i = ctypes.c_void_p, ctypes.c_int
        self.lib.fxopt_cutlass_gemm.restype = i
        self.lib.fxopt_cutlass_gemm.argtypes = [i, i, p, p, p, p, p, p, p, i, i, i, p, ctypes.c_size_t, p]
        self.workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=f"cuda:{device}")

    def run(self, cfg: int, q2, sa, wq, ws, bias, res2, out) -> int:
        """out [M, N] fp16 = the epilogue GEMM of q2 [M, K] and wq [N, K] (int8, or e4m3 with FP8_CFGS' cfg ids);
        0, else the library's error code."""
        m, k = q2.shape
        return self.lib.fxopt_cutlass_gemm(
            int(q2.dtype != torch.int8), cfg, q2.data_ptr(), wq.data_ptr(), out.data_ptr(), sa.data_ptr(),
            ws.data_ptr(),
            None if bias is None else bias.data_ptr(), None if res2 is None else res2.data_ptr(),
            m, wq.shape[0], k, self.workspace.data_ptr(), WORKSPACE_BYTES,
            torch.cuda.current_stream(q2.device).cuda_stream)


@functools.cache
def library(device: int) -> Library | None:
    """The built library for an sm_90 device, or None (not built, another architecture, not loadable)."""
    path = library_path()
    if not path.is_file() or torch.cuda.get_device_capability(device) != (9, 0):
        return None
    try:
        return Library(path, device)
    except OSError:  # built for another toolkit or corrupted: the Triton kernels run instead
        return None


# (cfg id, tile rows, tile columns, relative throughput of a full wave): measured on an H100 (benchmarks/
# int8_cutlass.py, 2026-12-08): at 2048 rows the 128x256 cooperative and the 128x128 ping-pong (cluster 2x1) tile
# run a full wave alike; the 64x128 tile only wins where the bigger ones leave SMs idle
TILES = [(COOPERATIVE_128x256, 128, 256, 1.0), (PINGPONG_128x128_CLUSTER_2x1, 128, 128, 1.0),
         (PINGPONG_64x128, 64, 128, 0.8)]
MIN_ROWS = 65  # up to 64 rows, Triton's small-M tiles are faster (16 rows: 8.0 us vs CUTLASS's 9.4 at N = 6144)


def tile(m: int, n: int, sms: int = 132) -> int | None:
    """The library's tile config for an [m, n] output, or None where the Triton kernel is faster (few rows):
    the fewest waves of tiles over the SMs, weighted by a tile's size and throughput (ties: the larger tile)."""
    if m < MIN_ROWS:
        return None

    def cost(entry):
        _, bm, bn, speed = entry
        return -(-(-(-m // bm) * -(-n // bn)) // sms) * bm * bn / speed
    return min(TILES, key=cost)[0]


def _aligned(*tensors) -> bool:
    return all(t is None or (t.is_contiguous() and t.data_ptr() % 16 == 0) for t in tensors)


def covers(q2, sa, wq, ws, bias, activation: str, res2, out_dtype) -> bool:
    """What the library computes exactly as the Triton GEMM does: see the module docstring."""
    m, k = q2.shape
    n = wq.shape[0]
    return (q2.is_cuda and q2.dtype == torch.int8 and wq.dtype == torch.int8 and activation == "none"
            and out_dtype == torch.float16 and k % 16 == 0 and n % 8 == 0 and 0 < m < 2**31 and n < 2**31
            and m * n < 2**31 and m * k < 2**31 and n * k < 2**31  # the library's int sizes and offsets
            and sa.dtype == torch.float32 and sa.numel() == m and ws.dtype == torch.float32 and ws.numel() == n
            and (bias is None or (bias.dtype == torch.float16 and bias.numel() == n))
            and (res2 is None or (res2.dtype == torch.float16 and tuple(res2.shape) == (m, n)))
            and _aligned(q2, sa, wq, ws, bias, res2))


def gemm(q2, sa, wq, ws, bias, activation: str, res2, out_dtype, sms: int) -> torch.Tensor | None:
    """The epilogue GEMM [M, K] x [N, K]ᵀ through the library on a device of `sms` SMs, or None where it is not
    built or does not cover the call (the caller runs the Triton kernel)."""
    if not covers(q2, sa, wq, ws, bias, activation, res2, out_dtype):
        return None
    device = q2.device.index if q2.device.index is not None else torch.cuda.current_device()
    lib = library(device)
    cfg = None if lib is None else tile(q2.shape[0], wq.shape[0], sms)
    if cfg is None:
        return None
    out = torch.empty((q2.shape[0], wq.shape[0]), dtype=torch.float16, device=q2.device)
    return out if lib.run(cfg, q2, sa, wq, ws, bias, res2, out) == 0 else None
