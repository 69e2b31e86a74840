// fxopt's CUTLASS GEMM beside its Triton GEMM (compiler/triton_int8.py): CUTLASS 3's warp-specialized sm90a GEMM on
// int8 (int32 accumulation) or e4m3 (fp32 accumulation) operands, with fxopt's dequantize epilogue as an epilogue
// visitor tree: fp16(((float(acc) * s_tok[m]) * s_w[n]) + bias[n]) [then + residual, rounded again]: the order of
// roundings of quant_ops._dequantize (built with --fmad=false, so no contraction the reference does not do).
// Built by `fxopt build-kernels` (compiler/cutlass_gemm.py), which also loads and calls it; timed and checked
// against the Triton kernel by benchmarks/int8_cutlass.py.
#include <cstdint>
#include <cuda_runtime.h>
#include "cutlass/cutlass.h"
#include "cutlass/numeric_types.h"
#include "cute/tensor.hpp"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/epilogue/dispatch_policy.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/sm90_visitor_tma_warpspecialized.hpp"
#include "cutlass/util/packed_stride.hpp"

using namespace cute;
namespace fus = cutlass::epilogue::fusion;
constexpr auto RN = cutlass::FloatRoundStyle::round_to_nearest;

template <class Tile, class EOut>
using Dequant = fus::Sm90EVT<fus::Sm90Compute<cutlass::multiplies, float, float, RN>,
    fus::Sm90EVT<fus::Sm90Compute<cutlass::multiplies, float, float, RN>, fus::Sm90AccFetch,
                 fus::Sm90ColBroadcast<0, Tile, float, float, Stride<_1, _0, int64_t>>>,
    fus::Sm90RowBroadcast<0, Tile, float, float, Stride<_0, _1, int64_t>>>;
template <class Tile, class EOut>
using WithBias = fus::Sm90EVT<fus::Sm90Compute<cutlass::plus, EOut, float, RN>, Dequant<Tile, EOut>,
    fus::Sm90RowBroadcast<0, Tile, EOut, float, Stride<_0, _1, int64_t>>>;
template <class Tile, class EOut>
using WithRes = fus::Sm90EVT<fus::Sm90Compute<cutlass::plus, EOut, float, RN>, WithBias<Tile, EOut>,
    fus::Sm90SrcFetch<EOut>>;

template <class EIn, class Tile, class Cluster, class KSched, class ESched, bool RES>
struct Int8Gemm {
  using EAcc = std::conditional_t<std::is_same_v<EIn, int8_t>, int32_t, float>;
  using EOut = cutlass::half_t;
  using EC = std::conditional_t<RES, EOut, void>;
  using Fusion = std::conditional_t<RES, WithRes<Tile, EOut>, WithBias<Tile, EOut>>;
  using Epi = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Tile, Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, EAcc, float,
      EC, cutlass::layout::RowMajor, 8, EOut, cutlass::layout::RowMajor, 8, ESched, Fusion>::CollectiveOp;
  using Main = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, EIn, cutlass::layout::RowMajor, 16,
      EIn, cutlass::layout::ColumnMajor, 16, EAcc, Tile, Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epi::SharedStorage))>,
      KSched>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Main, Epi>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using EC_ptr_t = std::conditional_t<RES, EOut, void>;

  static int run(const EIn* A, const EIn* B, EOut* D, const float* sa, const float* sb, const EOut* bias,
                 const EOut* res, int M, int N, int K, void* ws, size_t ws_bytes, cudaStream_t stream) {
    using SA = typename Kernel::StrideA; using SB = typename Kernel::StrideB;
    using SC = typename Kernel::StrideC; using SD = typename Kernel::StrideD;
    SA sA = cutlass::make_cute_packed_stride(SA{}, {M, K, 1});
    SB sB = cutlass::make_cute_packed_stride(SB{}, {N, K, 1});
    SC sC = cutlass::make_cute_packed_stride(SC{}, {M, N, 1});
    SD sD = cutlass::make_cute_packed_stride(SD{}, {M, N, 1});
    using DQ = Dequant<Tile, EOut>; using WB = WithBias<Tile, EOut>;
    typename DQ::Arguments dq{{{}, {sa, 0.f, {}}, {}}, {sb, 0.f, {}}, {}};
    typename WB::Arguments wb{dq, {bias, EOut(0), {}}, {}};
    typename Fusion::Arguments fa;
    if constexpr (RES) fa = typename Fusion::Arguments{wb, {}, {}}; else fa = wb;
    typename Gemm::Arguments args{cutlass::gemm::GemmUniversalMode::kGemm, {M, N, K, 1}, {A, sA, B, sB},
                                  {fa, reinterpret_cast<const EC_ptr_t*>(res), sC, D, sD}};
    Gemm gemm;
    if (gemm.can_implement(args) != cutlass::Status::kSuccess) return 1;
    if (Gemm::get_workspace_size(args) > ws_bytes) return 2;
    if (gemm.initialize(args, ws, stream) != cutlass::Status::kSuccess) return 3;
    if (gemm.run(stream) != cutlass::Status::kSuccess) return 4;
    return 0;
  }
};

using KPing = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
using KCoop = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
using EPing = cutlass::epilogue::TmaWarpSpecialized;
using ECoop = cutlass::epilogue::TmaWarpSpecializedCooperative;
using KPing8 = cutlass::gemm::KernelTmaWarpSpecializedPingpongFP8FastAccum;
using KCoop8 = cutlass::gemm::KernelTmaWarpSpecializedCooperativeFP8FastAccum;
using E4M3 = cutlass::float_e4m3_t;

#define CFGS(X) \
  X(0, Shape<_128 COMMA _128 COMMA _128>, Shape<_1 COMMA _1 COMMA _1>, KPing, EPing) \
  X(1, Shape<_128 COMMA _256 COMMA _128>, Shape<_1 COMMA _1 COMMA _1>, KCoop, ECoop) \
  X(2, Shape<_128 COMMA _128 COMMA _128>, Shape<_2 COMMA _1 COMMA _1>, KPing, EPing) \
  X(3, Shape<_256 COMMA _128 COMMA _128>, Shape<_1 COMMA _1 COMMA _1>, KCoop, ECoop) \
  X(4, Shape<_64 COMMA _128 COMMA _128>, Shape<_1 COMMA _1 COMMA _1>, KPing, EPing) \
  X(5, Shape<_128 COMMA _256 COMMA _128>, Shape<_2 COMMA _1 COMMA _1>, KCoop, ECoop)
#define FP8_CFGS(X) \
  X(0, Shape<_128 COMMA _128 COMMA _128>, Shape<_1 COMMA _1 COMMA _1>, KPing8, EPing) \
  X(1, Shape<_128 COMMA _256 COMMA _128>, Shape<_1 COMMA _1 COMMA _1>, KCoop8, ECoop) \
  X(2, Shape<_128 COMMA _128 COMMA _128>, Shape<_2 COMMA _1 COMMA _1>, KPing8, EPing)
#define COMMA ,

// cfg selects the tile (CFGS / FP8_CFGS); fp8 != 0: A and B are e4m3. bias and res may be null. Returns 0, or
// 1 (cannot implement), 2 (workspace too small), 3 (initialize failed), 4 (launch failed), 9 (no such cfg).
extern "C" int fxopt_cutlass_gemm(int fp8, int cfg, const void* A, const void* B, void* D, const float* sa,
                                       const float* sb, const void* bias, const void* res, int M, int N, int K,
                                       void* ws, size_t ws_bytes, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  auto d = static_cast<cutlass::half_t*>(D);
  auto b = static_cast<const cutlass::half_t*>(bias);
  auto r = static_cast<const cutlass::half_t*>(res);
  if (fp8) {
    auto a8 = static_cast<const E4M3*>(A); auto b8 = static_cast<const E4M3*>(B);
#define CASE8(i, T, C, K1, E1) case i: return r ? Int8Gemm<E4M3, T, C, K1, E1, true>::run(a8, b8, d, sa, sb, b, r, M, N, K, ws, ws_bytes, st) \
                                               : Int8Gemm<E4M3, T, C, K1, E1, false>::run(a8, b8, d, sa, sb, b, r, M, N, K, ws, ws_bytes, st);
    switch (cfg) { FP8_CFGS(CASE8) default: return 9; }
  }
  auto a8 = static_cast<const int8_t*>(A); auto b8 = static_cast<const int8_t*>(B);
#define CASE(i, T, C, K1, E1) case i: return r ? Int8Gemm<int8_t, T, C, K1, E1, true>::run(a8, b8, d, sa, sb, b, r, M, N, K, ws, ws_bytes, st) \
                                              : Int8Gemm<int8_t, T, C, K1, E1, false>::run(a8, b8, d, sa, sb, b, r, M, N, K, ws, ws_bytes, st);
  switch (cfg) { CFGS(CASE) default: return 9; }
}
