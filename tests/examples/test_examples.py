"""Every numbered example runs on CPU, as a user would start it, and prints what its docstring promises (issue 15).
The README's quickstart is built from these."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run_example(name: str, cwd: Path, *args: str) -> str:
    path = EXAMPLES / name
    command = ["bash", str(path), *args] if path.suffix == ".sh" else [sys.executable, str(path), *args]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    res = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_every_example_is_numbered_and_smoke_tested_here():
    names = sorted(p.name for p in EXAMPLES.iterdir() if p.suffix in (".py", ".sh"))
    assert names and all(re.match(r"\d\d_", n) for n in names)
    tested = set(re.findall(r'run_example\("(\d\d_\w+\.\w+)"', Path(__file__).read_text()))
    assert tested == set(names)


def test_01_the_exact_pipeline_on_minilm_keeps_the_outputs_and_writes_a_report(tmp_path):
    out = run_example("01_optimize_minilm.py", tmp_path)
    assert re.search(r"^fuse_layernorm\s+True", out, re.M)
    err = float(re.search(r"max \|err\| = (\S+) ", out).group(1))
    assert err < 1e-4  # the exact pipeline: rounding (ROUNDING's fp32 bound on MiniLM's output scale)
    assert (tmp_path / "report-01.html").read_text().startswith("<!DOCTYPE html>")


def test_02_smoothquant_w8a8_on_minilm_runs_the_same_in_onnx_runtime_and_shrinks_the_file(tmp_path):
    out = run_example("02_int8_smoothquant.py", tmp_path, "--out", "q")
    torch_cos, ort_cos = (float(v) for v in re.search(r"torch int8 (\S+) .*ONNX Runtime (\S+)", out).groups())
    assert abs(torch_cos - ort_cos) <= 1e-3  # the backend computes what the torch int8 graph computes
    assert float(re.search(r"\((\S+)x smaller\)", out).group(1)) >= 3.5  # int8 weights and embeddings
    assert (tmp_path / "q" / "report.html").is_file()


def test_03_gqa_shrinks_the_kv_cache_by_h_over_g(tmp_path):
    out = run_example("03_gqa_decode.py", tmp_path)
    mha, gqa = (int(v) for v in re.findall(r"KV cache (\d+) bytes per token", out))
    assert mha == 4 * gqa and "the cache is 4x smaller" in out


def test_04_the_permutation_keeps_at_least_as_much_under_the_2_4_mask(tmp_path):
    out = run_example("04_nm_sparsity.py", tmp_path)
    pairs = [(float(a), float(b)) for a, b in re.findall(r": (0\.\d+) -> (0\.\d+)$", out, re.M)]
    assert len(pairs) == 6 and all(b >= a for a, b in pairs)


def test_05_the_command_line_gets_from_a_model_to_an_export_and_a_report(tmp_path):
    out = run_example("05_command_line.sh", tmp_path, "run")
    assert "block 0: attn" in out and "fuse_layernorm: applied" in out
    assert {"model.pt2", "model.onnx", "report.json", "report.md", "report.html"} <= {
        p.name for p in (tmp_path / "run").iterdir()}
