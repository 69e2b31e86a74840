"""ONNX Runtime on CPU: torch eager vs ORT on a plain export vs ORT after ORT's own transformer optimizer vs
fxopt (exact passes + export), on BERT-base- and GPT-2-small-shaped models (random weights, fp32).

    python benchmarks/ort_cpu.py [--threads 2] [--runs 10] [--out benchmarks/results/ort_cpu.md]

One run produces the whole table: median latency per (model, batch, seq), ratio to torch eager (>1 = faster),
and the max abs difference of the first output against eager. Every ORT session uses the same options
(ORT_ENABLE_ALL, intra_op_num_threads=--threads); torch runs with torch.set_num_threads(--threads).
Where ORT's optimizer fails, the failure is recorded in the table and fxopt is compared with plain ORT.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import platform
import statistics
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

import fxopt
from fxopt import passes
from fxopt.backends import onnxruntime as ort_backend

log = logging.getLogger("ort_cpu")
SHAPES = ((1, 128), (8, 128))


def build(name: str) -> tuple[torch.nn.Module, dict, str]:
    import transformers as tf

    torch.manual_seed(0)
    if name == "bert-base":
        cfg = tf.BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                            attn_implementation="sdpa")
        return tf.BertModel(cfg).eval(), {}, "bert"
    cfg = tf.GPT2Config(n_embd=768, n_layer=12, n_head=12, attn_implementation="sdpa")
    return tf.GPT2LMHeadModel(cfg).eval(), {"use_cache": False}, "gpt2"


def inputs(batch: int, seq: int, extra: dict) -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(batch * 1000 + seq)
    ids = torch.randint(0, 1000, (batch, seq), generator=g)
    return (ids,), {"attention_mask": torch.ones(batch, seq, dtype=torch.long), **extra}


def block_medians(fns: dict[str, Callable[[], Any]], runs: int, blocks: int = 2,
                  warmup: int = 2) -> dict[str, tuple[float, float]]:
    """(median, min) ms per function. Each function runs in blocks of consecutive calls, the blocks of all
    functions alternating (A B C A B C), so that slow drift in background load falls on every variant.
    Calls are not interleaved one by one: an ORT session's idle threads spin for a while after a run and
    would slow whatever runs next; a pause before each block lets them settle."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    per_block = max(1, runs // blocks)
    for block in range(blocks):
        for label, fn in fns.items():
            time.sleep(0.5)
            for _ in range(warmup if block == 0 else 1):
                fn()
            for _ in range(per_block):
                start = time.perf_counter()
                fn()
                times[label].append((time.perf_counter() - start) * 1e3)
    return {k: (statistics.median(v), min(v)) for k, v in times.items()}


def first_output(out: Any) -> np.ndarray:
    if isinstance(out, (list, tuple)) and not hasattr(out, "keys"):
        out = out[0]
    elif hasattr(out, "keys"):
        out = next(iter(out.values()))
    return out.detach().numpy() if isinstance(out, torch.Tensor) else np.asarray(out)


def plain_export(model: torch.nn.Module, args: tuple, kwargs: dict, path: Path) -> Path:
    dyn = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}
    dyn.update({k: None for k in kwargs if k not in dyn})
    torch.onnx.export(model, args, str(path), kwargs=kwargs, dynamo=True, dynamic_shapes=dyn, external_data=False,
                      verbose=False)
    return path


def ort_optimizer(src: Path, dst: Path, model_type: str, hidden: int, heads: int) -> tuple[Path, Counter]:
    from onnxruntime.transformers.optimizer import optimize_model

    optimized = optimize_model(str(src), model_type=model_type, num_heads=heads, hidden_size=hidden)
    optimized.save_model_to_file(str(dst))
    return dst, ort_backend.op_counts(dst)


class OrtRunner:
    def __init__(self, path: Path, threads: int):
        import onnxruntime as ort

        so = ort_backend.session_options("all", threads)
        self.session = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.session.get_inputs()]

    def feeds(self, args: tuple, kwargs: dict) -> dict:
        values = {"input_ids": args[0], **kwargs}
        return {n: values[n].numpy() for n in self.names}

    def run(self, feeds: dict) -> list:
        return self.session.run(None, feeds)


FUSED = ("com.microsoft.SkipLayerNormalization", "LayerNormalization", "com.microsoft.Attention",
         "com.microsoft.MultiHeadAttention", "Attention", "com.microsoft.BiasGelu", "com.microsoft.FastGelu",
         "Gelu", "com.microsoft.Gelu", "com.microsoft.SkipSimplifiedLayerNormalization", "RMSNormalization")


def fused_summary(counts: Counter | dict) -> str:
    return ", ".join(f"{k.split('.')[-1]}×{counts[k]}" for k in FUSED if counts.get(k)) or "none"


def bench_model(name: str, threads: int, runs: int, workdir: Path) -> tuple[list[dict], list[str]]:
    model, extra, model_type = build(name)
    cfg = model.config
    hidden, heads = cfg.hidden_size, cfg.num_attention_heads
    ex_args, ex_kwargs = inputs(2, SHAPES[0][1], extra)  # batch 2: a size-1 dim would be captured static
    notes: list[str] = []
    variants: dict[str, Any] = {}

    t = time.perf_counter()
    plain = plain_export(model, ex_args, ex_kwargs, workdir / f"{name}_plain.onnx")
    variants["ORT plain export"] = OrtRunner(plain, threads)
    notes.append(f"{name}: plain export {time.perf_counter() - t:.0f} s; ops: "
                 f"{fused_summary(ort_backend.op_counts(plain))}")

    try:
        t = time.perf_counter()
        peer, counts = ort_optimizer(plain, workdir / f"{name}_ortopt.onnx", model_type, hidden, heads)
        variants["ORT + its optimizer"] = OrtRunner(peer, threads)  # inside the try: ORT may reject it
        notes.append(f"{name}: ORT optimize_model(model_type={model_type!r}) {time.perf_counter() - t:.0f} s; "
                     f"fused ops: {fused_summary(counts)}")
    except Exception as e:  # noqa: BLE001 - the peer's failure is a result
        last = traceback.extract_tb(e.__traceback__)[-1]
        notes.append(f"{name}: ORT optimize_model(model_type={model_type!r}) FAILED: {type(e).__name__}: "
                     f"{str(e)[:200]} (at {Path(last.filename).name}:{last.lineno}); fxopt is compared with "
                     f"plain ORT")

    t = time.perf_counter()
    opt = fxopt.optimize(model, ex_args, passes=list(passes.EXACT_PIPELINE), example_kwargs=ex_kwargs)
    applied = {p.name: dict(p.stats) if p.applied else f"not applied: {p.why_not}" for p in opt.report.passes}
    t_opt = time.perf_counter() - t
    for label, fusions in (("fxopt (passes + export)", False), ("fxopt + onnxscript ORT fusions", True)):
        t = time.perf_counter()
        info = ort_backend.export_file(opt, workdir / f"{name}_fxopt{'_f' if fusions else ''}.onnx",
                                       ort_fusions=fusions)
        variants[label] = OrtRunner(info.path, threads)
        extra_note = f"; onnxscript fusions: {info.fusion_counts}" if fusions else ""
        if info.fusion_error:
            extra_note += f" — ORT REJECTED the fused graph ({info.fusion_error}); this column runs the export " \
                          f"without them"
        notes.append(f"{name}: {label}: export {time.perf_counter() - t:.0f} s (opset {info.opset}); ops: "
                     f"{fused_summary(info.op_counts)}{extra_note}")
    notes.append(f"{name}: fxopt passes ({t_opt:.0f} s): {applied}")

    rows = []
    for batch, seq in SHAPES:
        args, kwargs = inputs(batch, seq, extra)
        n = runs if batch == 1 else max(3, runs // 2)
        with torch.inference_mode():
            ref = first_output(model(*args, **kwargs))
        fns: dict[str, Callable[[], Any]] = {"torch eager": _eager(model, args, kwargs)}
        errs = {"torch eager": 0.0}
        for label, runner in variants.items():
            feeds = runner.feeds(args, kwargs)
            errs[label] = float(np.abs(runner.run(feeds)[0] - ref).max())
            fns[label] = functools.partial(runner.run, feeds)
        medians = block_medians(fns, n)
        row = {"model": name, "batch": batch, "seq": seq, "runs": n,
               **{label: (medians[label][0], errs[label], medians[label][1]) for label in fns}}
        rows.append(row)
        log.info("%s", row)
    return rows, notes


def _eager(model: torch.nn.Module, args: tuple, kwargs: dict) -> Callable[[], Any]:
    def run() -> Any:
        with torch.inference_mode():
            return model(*args, **kwargs)

    return run


COLUMNS = ("torch eager", "ORT plain export", "ORT + its optimizer", "fxopt (passes + export)",
           "fxopt + onnxscript ORT fusions")


def table(rows: list[dict], stat: int = 0) -> list[str]:
    """stat 0: medians (with errors); 2: best of the runs."""
    head = "| model | batch × seq | " + " | ".join(COLUMNS) + " | fxopt vs best peer ORT |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 3)]
    for r in rows:
        eager = r["torch eager"][stat]
        cells = []
        for c in COLUMNS:
            if c not in r:
                cells.append("failed")
                continue
            ms, err = r[c][stat], r[c][1]
            cell = f"{ms:.1f} ms ({eager / ms:.2f}×)"
            cells.append(cell + (f", err {err:.1e}" if c != "torch eager" and stat == 0 else ""))
        peers = [r[c][stat] for c in ("ORT plain export", "ORT + its optimizer") if c in r]
        best = min(r[c][stat] for c in COLUMNS[3:] if c in r)
        vs = f"{min(peers) / best:.2f}×" if peers else "-"
        lines.append(f"| {r['model']} | {r['batch']} × {r['seq']} | " + " | ".join(cells) + f" | {vs} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--models", default="bert-base,gpt2-small")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "ort_cpu.md"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("torch", "onnxscript", "fxopt", "onnxruntime", "transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)

    import onnxruntime as ort
    import transformers

    rows, notes = [], []
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="fxopt_ort_bench_") as tmp:
        for name in args.models.split(","):
            r, n = bench_model(name, args.threads, args.runs, Path(tmp))
            rows += r
            notes += n
    load_end = os.getloadavg()[0]
    env = (f"{platform.machine()}, {os.cpu_count()} cores, load average {load_start:.1f} at start and "
           f"{load_end:.1f} at the end (other work on the machine shows here), {args.threads} threads "
           f"(torch.set_num_threads, ORT intra_op_num_threads), "
           f"fp32; torch {torch.__version__}, onnxruntime {ort.__version__}, transformers {transformers.__version__}")
    text = ["# ONNX Runtime CPU benchmark (`benchmarks/ort_cpu.py`)", "", env, "",
            "Median latency per forward (ratio = torch eager / variant, >1 is faster); err = max |output - eager| "
            "on the first output (BERT: last_hidden_state, GPT-2: logits). Random weights, attention mask of "
            "ones, `attn_implementation=\"sdpa\"`. \"fxopt vs best peer ORT\": the best ORT peer's time over the "
            "best fxopt column's (>1: fxopt faster).", "", *table(rows), "",
            "Best of the runs (the least disturbed run of each variant):", "", *table(rows, stat=2), "",
            "## Notes", "",
            *[f"- {n}" for n in notes], ""]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(text))
    print("\n".join(text))


if __name__ == "__main__":
    main()
