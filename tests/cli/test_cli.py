"""The `fxopt` command line: each subcommand on a small Hugging Face architecture, on the trained MiniLM and on a
user's own factory; documented exit codes and one-line errors for bad input (issue 15, first step)."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import pytest
import torch

import fxopt
from fxopt import cli
from fxopt.passes import PASSES

pytest.importorskip("transformers")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_passes_lists_every_pass_with_its_exactness_and_options(capsys):
    code, out, _ = run(capsys, "passes")
    assert code == cli.EXIT_OK
    for name, cls in PASSES.items():
        assert f"{name}  ({cls.exactness.value}" in out
    assert "fuse_residual_add=True" in out and "requires calibration, shapes" in out


def test_analyze_names_the_blocks_heads_and_mlp_of_an_architecture(capsys):
    code, out, _ = run(capsys, "analyze", "LlamaForCausalLM")
    assert code == cli.EXIT_OK
    assert "block 1: attn sdpa 4 heads (2 kv)" in out and "mlp gated silu" in out


def test_optimize_writes_a_loadable_program_its_report_and_an_onnx_file(capsys, tmp_path):
    code, out, _ = run(capsys, "optimize", "minilm", "--shape", "2,12", "-o", str(tmp_path), "--export", "onnx")
    assert code == cli.EXIT_OK and "fuse_layernorm" in out
    assert {p.name for p in tmp_path.iterdir()} == {"model.pt2", "report.json", "report.txt", "run.json", "model.onnx"}
    opt = fxopt.load(tmp_path / "model.pt2")
    assert opt.report.to_json() == (tmp_path / "report.json").read_text()
    ids = torch.randint(2, 1000, (3, 7))
    out = opt(ids, attention_mask=torch.ones(3, 7, dtype=torch.long))
    assert out.last_hidden_state.shape == (3, 7, 384)
    code, out, _ = run(capsys, "report", str(tmp_path))
    assert code == cli.EXIT_OK and (tmp_path / "report.html").is_file()
    assert "trained all-MiniLM-L6-v2" in (tmp_path / "report.md").read_text()  # the run record, read beside it


FACTORY = textwrap.dedent("""
    import torch
    from torch import nn

    class RMSNorm(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(dim))

        def forward(self, x):
            return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    def make():
        return nn.Sequential(nn.Linear(8, 8), RMSNorm(8)), (torch.randn(2, 5, 8),)
""")


def test_a_factory_in_a_users_file_is_a_model(capsys, tmp_path):
    (tmp_path / "mine.py").write_text(FACTORY)
    code, out, _ = run(capsys, "optimize", f"{tmp_path / 'mine.py'}:make", "-o", str(tmp_path / "out"))
    assert code == cli.EXIT_OK and re.search(r"^fuse_layernorm\s+True", out, re.M)


@pytest.mark.parametrize("argv, named", [
    (["optimize", "LlamaForCausalLM", "--passes", "fuse_layernrom"], "fuse_layernrom"),
    (["analyze", "NoSuchModelForAnything"], "NoSuchModelForAnything"),
    (["analyze", "LlamaForCausalLM", "--shape", "2"], "--shape"),
    (["optimize", "nowhere.py:make"], "nowhere.py"),
])
def test_bad_input_is_one_line_naming_what_is_wrong_with_exit_code_3(capsys, argv, named):
    code, _, err = run(capsys, *argv)
    assert code == cli.EXIT_REFUSED
    assert err.startswith("fxopt: error: ") and named in err and err.count("\n") == 1


@pytest.mark.parametrize("returns, named", [("42", "returned int"), ("(torch.nn.Linear(4, 4),)", "tuple of 1"),
                                             ("(torch.nn.Linear(4, 4), 'x')", "returned (Linear, str)")])
def test_a_factory_returning_something_else_than_a_model_is_refused_with_what_it_returned(capsys, tmp_path, returns,
                                                                                          named):
    (tmp_path / "odd.py").write_text(f"import torch\n\n\ndef make():\n    return {returns}\n")
    code, _, err = run(capsys, "optimize", f"{tmp_path / 'odd.py'}:make", "-o", str(tmp_path / "out"))
    assert code == cli.EXIT_REFUSED and named in err and "it must return an nn.Module" in err


def test_an_output_path_that_is_a_file_is_refused_before_the_run(capsys, tmp_path):
    (tmp_path / "taken").write_text("")
    code, _, err = run(capsys, "optimize", "NoSuchModelForAnything", "-o", str(tmp_path / "taken"))
    assert code == cli.EXIT_REFUSED and "exists and is not a directory" in err


def test_a_reader_that_stops_early_is_not_an_error():
    # `true` exits without reading: fxopt writes into a closed pipe
    res = subprocess.run(["bash", "-c", f"set -o pipefail; {sys.executable} -m fxopt.cli passes | true"],
                         capture_output=True, text=True)
    assert res.returncode == 0 and res.stderr == ""


def test_the_console_script_is_installed_and_usage_errors_exit_2():
    res = subprocess.run([sys.executable, "-m", "fxopt.cli", "passes"], capture_output=True, text=True)
    assert res.returncode == 0 and "smoothquant" in res.stdout
    res = subprocess.run([sys.executable, "-m", "fxopt.cli", "frobnicate"], capture_output=True, text=True)
    assert res.returncode == cli.EXIT_USAGE and "invalid choice" in res.stderr


NEAR_MISSES = textwrap.dedent("""
    import torch
    from torch import nn

    class Norms(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(8))

        def forward(self, x):
            sample_std = torch.sqrt(x.var(-1, keepdim=True, unbiased=True) + 1e-5)  # not LayerNorm's variance
            a = (x - x.mean(-1, keepdim=True)) / sample_std * self.weight
            b = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight  # an RMSNorm
            c = b / (b.pow(2).mean(-1, keepdim=True).sqrt() + 1e-6)  # eps outside the root: not an RMSNorm
            return a + b + c

    def make():
        return Norms(), (torch.randn(2, 5, 8),)
""")


def test_explain_names_each_near_miss_with_its_reason_and_source_line(capsys, tmp_path):
    (tmp_path / "norms.py").write_text(NEAR_MISSES)
    code, out, _ = run(capsys, "explain", f"{tmp_path / 'norms.py'}:make", "--pass", "fuse_layernorm")
    assert code == cli.EXIT_OK
    assert "fuse_layernorm: applied" in out and "rms_norm x1" in out
    lines = out.splitlines()
    near = [(ln, lines[i + 1]) for i, ln in enumerate(lines) if "near-miss" in ln]
    assert len(near) == 2
    (variance, at_variance), (eps, at_eps) = near
    assert "unbiased variance (correction=1)" in variance
    assert "norms.py, line 11, in forward" in at_variance and "code: sample_std = torch.sqrt(x.var(" in at_variance
    assert "eps is added outside the square root" in eps
    assert "norms.py, line 14, in forward" in at_eps and "code: c = b / (b.pow(2)" in at_eps


def test_analyze_and_explain_read_the_trained_minilm(capsys):
    code, out, _ = run(capsys, "analyze", "minilm", "--shape", "2,8")
    assert code == cli.EXIT_OK
    blocks = [ln for ln in out.splitlines() if ln.startswith("block ")]
    assert len(blocks) == 6 and all("12 heads (12 kv) × 32" in b for b in blocks)
    code, out, _ = run(capsys, "explain", "minilm", "--shape", "2,8", "--pass", "fuse_layernorm")
    assert code == cli.EXIT_OK and "applied: add_norm x12" in out
    # the embeddings' sum broadcasts its position rows: named, at the model's own source line (not torch's)
    assert "near-miss layer_norm: the add" in out and "modeling_bert.py" in out and "module embeddings.LayerNorm" in out
