"""Quiet by default: a whole session (optimize, save, load, both backends) prints nothing a user of fxopt
cannot act on: no warnings (even with Python's `-W default`, which shows deprecations and unclosed
resources), no log lines, no graph dumps."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("tvm")

SESSION = textwrap.dedent("""
    import sys, tempfile, torch
    from torch import nn
    import fxopt

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj, self.norm = nn.Linear(8, 8), nn.LayerNorm(8)

        def forward(self, x, scale=1.0):
            return self.norm(self.proj(x) + x).softmax(-1) * scale

    x = torch.randn(2, 5, 8)
    opt = fxopt.optimize(Block().eval(), (x,), passes=["fuse_layernorm", "stabilize_softmax"])
    back = fxopt.load(fxopt.save(opt, tempfile.mkdtemp() + "/block.pt2"))
    for backend in ["onnxruntime", "tvm"]:
        fxopt.compile(back, backend=backend)(x)

    from tests.models.hf_families import FAMILIES  # embeddings, SDPA masks folded on the first call

    family = FAMILIES["llama_gqa"]
    args, kwargs = family.inputs()
    llama = fxopt.optimize(family.build("sdpa"), args, example_kwargs=kwargs, passes=["fuse_layernorm"])
    llama(*args, **kwargs)
    fxopt.compile(llama, backend="tvm")(*args, **kwargs)
    print("done")
""")


def test_a_whole_session_prints_no_warnings_and_no_log_lines():
    """Issue 10: torch's LeafSpec FutureWarning on every export and (un)pickling, the ONNX exporter's
    torchvision lines, ORT's temporary directory left to the garbage collector."""
    res = subprocess.run([sys.executable, "-W", "default", "-c", SESSION], capture_output=True, text=True,
                         cwd=Path(__file__).parents[2])
    assert res.returncode == 0, res.stderr
    assert res.stdout == "done\n" and res.stderr == ""


FAILED_CAPTURE = textwrap.dedent("""
    import torch
    from torch import nn
    import fxopt

    class DataDependent(nn.Module):
        def forward(self, x):
            print("the model's own line", file=__import__("sys").stderr)
            return x * 2 if x.sum() > 0 else x[x > 0]

    try:
        fxopt.optimize(DataDependent(), (torch.randn(2, 8),))
    except fxopt.CaptureError as e:
        print(type(e).__name__)
""")


def test_a_failed_capture_prints_only_its_error():
    """Issue 10: torch.export printed the partial graph's code (about 3 KB) to stderr on every failed attempt."""
    res = subprocess.run([sys.executable, "-c", FAILED_CAPTURE], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "CaptureError\n" and res.stderr == ""


def test_progress_shows_bars_over_the_capture_and_the_passes(capsys):
    """Issue 10: a 12-layer model optimized for 40 s without a word; `progress=None` shows bars on a terminal."""
    import torch
    from torch import nn

    import fxopt

    fxopt.optimize(nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)), (torch.randn(2, 8),),
                   passes=["fuse_layernorm"], progress=True)
    err = capsys.readouterr().err
    assert "fxopt capture Sequential" in err and "fxopt passes" in err and "fuse_layernorm" in err
    fxopt.optimize(nn.Sequential(nn.Linear(8, 8)), (torch.randn(2, 8),), progress=False)
    assert capsys.readouterr().err == ""
