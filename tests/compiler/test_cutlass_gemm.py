"""The CUTLASS GEMM library (compiler/cutlass_gemm.py): where it is looked for, how its build fails, what it
covers. Its values and speed are checked on an sm_90 GPU by benchmarks/int8_cutlass.py and int8_gpu.py; here,
with no GPU, the int8 ops run their references and the library is never loaded."""

from __future__ import annotations

import ctypes
import shutil

import pytest
import torch

from fxopt import cli, cutlass_gemm
from fxopt.errors import FxoptError


def test_the_library_lives_in_the_cache_named_for_its_source_and_flags(monkeypatch, tmp_path):
    monkeypatch.setenv("FXOPT_CACHE_DIR", str(tmp_path))
    path = cutlass_gemm.library_path()
    assert path.parent == tmp_path and path.name.startswith("gemm_sm90-") and path.suffix == ".so"
    monkeypatch.setattr(cutlass_gemm, "NVCC_FLAGS", (*cutlass_gemm.NVCC_FLAGS, "-lineinfo"))
    assert cutlass_gemm.library_path() != path  # other flags: another library, never a stale one


def test_without_the_cache_variable_the_cache_is_the_users(monkeypatch, tmp_path):
    monkeypatch.delenv("FXOPT_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cutlass_gemm.library_path().parent == tmp_path / "fxopt"


def test_building_without_nvcc_says_what_it_needs(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(FxoptError, match="needs nvcc"):
        cutlass_gemm.build()


def test_building_from_a_directory_that_is_not_cutlass_names_it(tmp_path):
    with pytest.raises(FxoptError, match="not a CUTLASS source tree") as e:
        cutlass_gemm.build(tmp_path / "lib.so", cutlass=tmp_path, nvcc="nvcc")
    assert str(tmp_path) in str(e.value)
    assert not (tmp_path / "lib.so").exists()


def test_an_nvcc_that_cannot_run_is_a_clear_error_with_its_cause(tmp_path):
    tree = tmp_path / "cutlass"
    (tree / "include" / "cutlass").mkdir(parents=True)
    (tree / "include" / "cutlass" / "cutlass.h").write_text("")
    with pytest.raises(FxoptError, match="could not run nvcc") as e:
        cutlass_gemm.build(tmp_path / "lib.so", cutlass=tree, nvcc=str(tmp_path / "no-such-nvcc"))
    assert isinstance(e.value.__cause__, OSError)


def test_a_failed_compile_reports_nvccs_message_and_writes_nothing(tmp_path):
    if shutil.which("nvcc") is None:
        pytest.skip("no nvcc")
    tree = tmp_path / "cutlass"
    (tree / "include" / "cutlass").mkdir(parents=True)
    (tree / "include" / "cutlass" / "cutlass.h").write_text("#error this is not CUTLASS\n")
    with pytest.raises(FxoptError, match="nvcc failed on gemm_sm90.cu") as e:
        cutlass_gemm.build(tmp_path / "lib.so", cutlass=tree)
    assert "this is not CUTLASS" in str(e.value)
    assert not (tmp_path / "lib.so").exists()


def test_the_command_line_refuses_a_bad_cutlass_directory_in_one_line(capsys, tmp_path):
    code = cli.main(["build-kernels", "--cutlass", str(tmp_path), "-o", str(tmp_path / "lib.so")])
    err = capsys.readouterr().err
    assert code == cli.EXIT_REFUSED and err.startswith("fxopt: error:") and "not a CUTLASS source tree" in err


def _operands(m=64, k=64, n=32, device="cpu"):
    q = torch.randint(-127, 128, (m, k), dtype=torch.int8, device=device)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=device)
    return q, torch.rand(m, 1, device=device), w, torch.rand(n, device=device)


def test_it_covers_nothing_off_the_gpu_so_cpu_calls_never_reach_it():
    q, s, w, ws = _operands()
    assert not cutlass_gemm.covers(q, s, w, ws, None, "none", None, torch.float16)
    assert cutlass_gemm.gemm(q, s, w, ws, None, "none", None, torch.float16, 132) is None


@pytest.mark.parametrize("change", ["activation", "bf16 out", "fp32 bias", "K not a multiple of 16",
                                    "one activation scale", "one weight scale"])
def test_it_declines_what_its_epilogue_does_not_compute(monkeypatch, change):
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda t: True))  # coverage is decided on metadata
    q, s, w, ws = _operands(k=72 if change == "K not a multiple of 16" else 64)
    args = dict(q2=q, sa=s, wq=w, ws=ws, bias=None, activation="none", res2=None, out_dtype=torch.float16)
    assert change == "K not a multiple of 16" or cutlass_gemm.covers(**args)
    args.update({"activation": {"activation": "gelu"},
                 "bf16 out": {"out_dtype": torch.bfloat16},
                 "fp32 bias": {"bias": torch.zeros(w.shape[0])},
                 "K not a multiple of 16": {},
                 "one activation scale": {"sa": torch.ones(())},
                 "one weight scale": {"ws": torch.ones(1)}}[change])
    assert not cutlass_gemm.covers(**args)


@pytest.mark.slow
def test_the_library_builds_and_exports_its_gemm(tmp_path):
    """nvcc and CUTLASS's headers (downloaded with pip): about 3 minutes on 2 cores, no GPU needed."""
    if shutil.which("nvcc") is None:
        pytest.skip("no nvcc")
    path = cutlass_gemm.build(tmp_path / "gemm.so")
    assert path == tmp_path / "gemm.so" and path.stat().st_size > 100_000
    assert hasattr(ctypes.CDLL(str(path)), "fxopt_cutlass_gemm")


def test_the_tile_is_the_one_with_the_fewest_waves_and_few_rows_stay_on_triton():
    c = cutlass_gemm
    assert c.tile(16, 6144) is None and c.tile(64, 2048) is None  # Triton's small-M tiles are faster there
    assert c.tile(2048, 2048) == c.COOPERATIVE_128x256  # 128 tiles: one wave on 132 SMs
    assert c.tile(2048, 11264) == c.PINGPONG_128x128_CLUSTER_2x1  # 10.7 waves of 128x128 against 5.3 of 128x256
    assert c.tile(512, 2048) == c.PINGPONG_64x128  # 32 tiles of 128x256 would leave 100 SMs idle
