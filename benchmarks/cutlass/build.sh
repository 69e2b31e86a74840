#!/usr/bin/env bash
# Builds libgemm_sm90.so (CUTLASS 4.2 headers from the nvidia-cutlass wheel; nvcc >= 12.3 for sm_90a; no GPU needed).
# Usage: bash benchmarks/cutlass/build.sh [OUT_DIR]   (default: benchmarks/cutlass/build; about 6 min on 2 cores)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/build}
mkdir -p "$out"
if [ ! -d "$out/cutlass/cutlass_library/source/include" ]; then
  python3 -m pip download -q --no-deps nvidia-cutlass==4.2.0.0 -d "$out"
  python3 -m zipfile -e "$out"/nvidia_cutlass-4.2.0.0-py3-none-any.whl "$out/cutlass"
fi
src=$out/cutlass/cutlass_library/source
nvcc -std=c++17 -O3 -arch=sm_90a --expt-relaxed-constexpr -DNDEBUG --fmad=false -Xcompiler -fPIC -shared \
  -I"$src/include" -I"$src/tools/util/include" "$here/gemm_sm90.cu" -o "$out/libgemm_sm90.so"
echo "$out/libgemm_sm90.so"
