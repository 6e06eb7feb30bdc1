// CUDA linear layers: y[m, n] = x[m, k] · w[n, k]ᵀ (+ bias) for FineQuant int4/int8 and dense weights.
//
// Three quantized paths (gemm.h GemmPath), all reading the device layout of gemm_layout.h:
//  - Gemv (small M): CUDA cores. Each warp owns 4 weight rows and its lanes stride along K in 16-byte
//    chunks (32 int4 / 16 int8 codes of one row, inside one group), so every weight byte is loaded
//    once, coalesced, with 4 loads in flight per lane. Codes become fp32 through the fp32 magic
//    number, a chunk's products are summed in fp32 and multiplied by the group scale once. Split-K
//    over grid.y only when the rows alone give fewer than 2 CTAs per SM (the partial sums then
//    cost a second kernel).
//  - TensorCore (mid M): a CTA owns a 128 (N) x 64 (M) output tile; k tiles of 64 stream through a
//    4-stage cp.async pipeline into shared memory, codes become exact fp16/bf16 integers through the
//    packed magic numbers, mma.sync m16n8k16 multiplies them with x in fp32, and the fp32 partial sum
//    of each group is multiplied by the group's scale when the group ends. Split-K over grid.z.
//  - DequantCublas (large M): dequantize the matrix to the activation dtype, one cublasGemmEx over
//    all of it (slabs of rows only when the device lacks the memory for the whole matrix).
// Dense weights (converted to the activation dtype at upload) always go to cuBLAS.
// Asymmetric matrices (per-group offsets, w = code · scale + offset) add offset · (sum of x over the
// group) once per group: the GEMV sums its chunk of x next to the products; the tensor-core kernel
// reads the group sums from a small pre-pass (group_sum_kernel) where a group truly ends; the
// dequantization of the large-M path adds the offset in its one FMA per element.
#include "kernels/cuda/gemm.h"

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <vector>

#include "kernels/base.h"
#include "kernels/cpu/validate.h"
#include "kernels/cuda/gemm_layout.h"
#include "kernels/half.h"

namespace fineserve::cuda {
namespace {

using layout::QuantLayout;

// ---- tunables (first guesses, written without a GPU: to be tuned with `fineserve bench gemm`) ----
// Auto's crossovers: Gemv for m <= kGemvMaxM, TensorCore up to kTensorCoreMaxM, then DequantCublas.
// The GEMV does (1 + m) fp32 ops per weight element, so it stops keeping up with the memory around
// m = 4; the tensor-core kernel reads the weights once per 64 tokens, cuBLAS wins once compute-bound.
constexpr int64_t kGemvMaxM = 4;
constexpr int64_t kTensorCoreMaxM = 256;
// Split-K (grids under layout::kNoSplitCtasPerSm CTAs per SM) aims for this many CTAs per SM ...
constexpr int64_t kTargetCtasPerSm = 4;
// ... with fp32 partial sums in a workspace of at most this size (reduced by a second kernel).
constexpr size_t kSplitWorkspaceBytes = size_t{32} << 20;
// DequantCublas dequantizes the whole matrix into a grow-only workspace of up to kDequantMaxBytes
// (OPT-175B's fc1 is 1.1 GiB of fp16), so one cuBLAS call sees all N and fills the GPU. It grows
// only while the device keeps kDequantKeepFreeBytes free afterwards; otherwise the rows go through
// the workspace in slabs, which is at least kDequantMinBytes.
constexpr size_t kDequantMinBytes = size_t{64} << 20;
constexpr size_t kDequantMaxBytes = size_t{2} << 30;
constexpr size_t kDequantKeepFreeBytes = size_t{2} << 30;

constexpr int kGemvWarps = 8;
// Occupancy the GEMV is built for: 2 CTAs (16 warps) per SM, i.e. at most 128 registers a thread
// (it needs ~120: 4 rows x 4 tokens of sums plus 4 x 16 bytes of codes in flight). A third CTA would
// cap it at 85 registers and spill; the 4 independent 16-byte loads per lane give the memory
// parallelism instead of more warps.
constexpr int kGemvMinCtasPerSm = 2;
constexpr int kGemvRows = 4;    // weight rows per warp
constexpr int kGemvTokens = 4;  // tokens per CTA (grid.z covers the rest)
constexpr int kGemvMinChunksPerSplit = 64;  // 16-byte chunks per row per split: 2 per lane at least

constexpr int kTcBN = static_cast<int>(layout::kRowAlign);  // 128 weight rows per CTA (8 warps x m16)
constexpr int kTcBM = 64;                                   // tokens per CTA (8 n8 tiles per warp)
constexpr int kTcBK = static_cast<int>(layout::kColAlign);  // 64 k per stage
constexpr int kTcWarps = 8;
constexpr int kTcStages = 4;
constexpr int kTcMinTilesPerSplit = 4;

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw Error(std::string("CUDA error in ") + what + ": " + cudaGetErrorString(e));
}
void check(cublasStatus_t s, const char* what) {
  if (s != CUBLAS_STATUS_SUCCESS) throw Error(std::string("cuBLAS error in ") + what + ": " + cublasGetStatusString(s));
}

// ---- activation dtype helpers ---------------------------------------------------------------------

template <typename T>
struct ActOps;
template <>
struct ActOps<__half> {
  static __device__ __forceinline__ float bits_to_float(uint16_t b) { return __half2float(__ushort_as_half(b)); }
  static __device__ __forceinline__ float2 pair_to_float2(uint32_t b) {
    return make_float2(bits_to_float(static_cast<uint16_t>(b)), bits_to_float(static_cast<uint16_t>(b >> 16)));
  }
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
};
template <>
struct ActOps<__nv_bfloat16> {
  // bf16 is the top half of an fp32: widening is a shift.
  static __device__ __forceinline__ float bits_to_float(uint16_t b) { return __uint_as_float(uint32_t{b} << 16); }
  static __device__ __forceinline__ float2 pair_to_float2(uint32_t b) {
    return make_float2(__uint_as_float(b << 16), __uint_as_float(b & 0xFFFF0000u));
  }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};

template <typename T>
__device__ __forceinline__ uint16_t to_bits(T v) {
  uint16_t b;
  memcpy(&b, &v, 2);
  return b;
}

// ---- epilogue: bias, rounding, or fp32 partial sums for split-K -----------------------------------

enum BiasKind : int { kNoBias = 0, kBiasF32, kBiasF16, kBiasBF16 };

struct Epilogue {
  void* y = nullptr;             // [m, n] of the activation dtype
  const void* bias = nullptr;    // [n]
  int bias_kind = kNoBias;
  float* partial = nullptr;      // [splits, m, n] when split-K, else null
  int64_t m = 0, n = 0;
};

__device__ __forceinline__ float load_bias(const Epilogue& e, int64_t col) {
  switch (e.bias_kind) {
    case kBiasF32: return static_cast<const float*>(e.bias)[col];
    case kBiasF16: return __half2float(static_cast<const __half*>(e.bias)[col]);
    case kBiasBF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(e.bias)[col]);
    default: return 0.0f;
  }
}

template <typename T>
__device__ __forceinline__ void store_output(const Epilogue& e, int split, int64_t row, int64_t col, float v) {
  if (e.partial) {
    e.partial[(split * e.m + row) * e.n + col] = v;
  } else {
    static_cast<T*>(e.y)[row * e.n + col] = ActOps<T>::from_float(v + load_bias(e, col));
  }
}

// y = Σ_s partial[s] + bias, rounded once.
template <typename T>
__global__ void splitk_reduce_kernel(int splits, Epilogue e) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t total = e.m * e.n;
  if (i >= total) return;
  float s = 0.0f;
  for (int k = 0; k < splits; ++k) s += e.partial[k * total + i];
  static_cast<T*>(e.y)[i] = ActOps<T>::from_float(s + (e.bias_kind == kNoBias ? 0.0f : load_bias(e, i % e.n)));
}

// The device-layout weights, as every kernel sees them.
struct DeviceWeights {
  const uint8_t* codes = nullptr;  // [padded_rows, row_bytes]
  const __half* scales = nullptr;  // [groups, padded_rows]
  const float* offsets = nullptr;  // [groups, padded_rows] fp32, asymmetric only (else null)
  int64_t padded_rows = 0, row_bytes = 0, group_eff = 0;
  int64_t n = 0, k = 0;  // logical rows, cols
  int group_shift = 0;   // k >> group_shift == k / group_eff (layout::group_shift): no division in kernels
};

// ---- Gemv ----------------------------------------------------------------------------------------

struct GemvArgs {
  DeviceWeights w;
  const void* x = nullptr;  // [m, k]
  int64_t m = 0;
  bool x_vec = false;  // x rows are 16-byte aligned: full chunks use vector loads
  int chunk_group_shift = 0;  // chunk c (kElems wide) is in group c >> chunk_group_shift
  int chunks_per_split = 0;
  Epilogue out;
};

// x[token][k0 + e] for the 8 (int4 word) or 4 (int8 word) elements that word j of a chunk holds, in
// the word's own order (element of nibble p / byte i), as fp32; zero past K.
template <typename T, int BITS>
__device__ __forceinline__ void gemv_load_x(const uint16_t* xrow, int64_t k, int64_t kc, int j, bool full,
                                            float (&xv)[BITS == 4 ? 8 : 4]) {
  if constexpr (BITS == 4) {
    const int64_t k0 = kc + 8 * j;  // the word's 8 consecutive k
    float xe[8];
    if (full) {
      const uint4 v = __ldg(reinterpret_cast<const uint4*>(xrow + k0));
      const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const float2 f = ActOps<T>::pair_to_float2(words[q]);
        xe[2 * q] = f.x;
        xe[2 * q + 1] = f.y;
      }
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) xe[e] = k0 + e < k ? ActOps<T>::bits_to_float(__ldg(xrow + k0 + e)) : 0.0f;
    }
#pragma unroll
    for (int p = 0; p < 8; ++p) xv[p] = xe[layout::int4_nibble_element(p)];
  } else {
    // Word j of an int8 block holds elements {2j, 2j+1, 2j+8, 2j+9}.
    const int64_t ka = kc + 2 * j, kb = kc + 2 * j + 8;
    if (full) {
      const float2 fa = ActOps<T>::pair_to_float2(__ldg(reinterpret_cast<const uint32_t*>(xrow + ka)));
      const float2 fb = ActOps<T>::pair_to_float2(__ldg(reinterpret_cast<const uint32_t*>(xrow + kb)));
      xv[0] = fa.x;
      xv[1] = fa.y;
      xv[2] = fb.x;
      xv[3] = fb.y;
    } else {
      const int64_t idx[4] = {ka, ka + 1, kb, kb + 1};
#pragma unroll
      for (int i = 0; i < 4; ++i) xv[i] = idx[i] < k ? ActOps<T>::bits_to_float(__ldg(xrow + idx[i])) : 0.0f;
    }
  }
}

// grid (ceil(n / 32), splits, ceil(m / kGemvTokens)), block kGemvWarps warps.
// Built for kGemvMinCtasPerSm CTAs per SM. The loop counts chunks in 32-bit ints (a row has fewer
// than 2^27 of them) and finds a chunk's group with a shift: no 64-bit division or modulo inside.
// ASYM: the matrix has offsets; each chunk also sums its x per token (kPerWord adds per word) and
// adds offset · that sum once (a symmetric matrix compiles without either).
template <typename T, int BITS, bool ASYM>
__global__ void __launch_bounds__(kGemvWarps * 32, kGemvMinCtasPerSm) gemv_kernel(GemvArgs a) {
  constexpr int kElems = BITS == 4 ? 32 : 16;  // k per 16-byte chunk
  constexpr int kPerWord = BITS == 4 ? 8 : 4;
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int64_t r0 = (static_cast<int64_t>(blockIdx.x) * kGemvWarps + warp) * kGemvRows;
  if (r0 >= a.w.n) return;  // whole warp; no block-wide barrier below
  const int64_t m0 = static_cast<int64_t>(blockIdx.z) * kGemvTokens;
  const int mc = static_cast<int>(min(static_cast<int64_t>(kGemvTokens), a.m - m0));
  const int n_chunks = static_cast<int>((a.w.k + kElems - 1) / kElems);
  const int c_begin = static_cast<int>(blockIdx.y) * a.chunks_per_split;
  const int c_end = min(n_chunks, c_begin + a.chunks_per_split);
  const auto* x = static_cast<const uint16_t*>(a.x);
  const uint8_t* wrow = a.w.codes + r0 * a.w.row_bytes;  // row r0; rows r0 + 1.. follow row_bytes apart
  const __half* srow = a.w.scales + r0;                  // group 0's scales of rows r0..r0+3

  float acc[kGemvRows][kGemvTokens] = {};
  for (int c = c_begin + lane; c < c_end; c += 32) {
    // Weights are read exactly once: a streaming (evict-first) load keeps x and the scales in cache.
    uint4 raw[kGemvRows];
#pragma unroll
    for (int r = 0; r < kGemvRows; ++r)
      raw[r] = __ldcs(reinterpret_cast<const uint4*>(wrow + r * a.w.row_bytes + c * 16));
    const int64_t kc = static_cast<int64_t>(c) * kElems;
    // The 4 rows' scales of this chunk's group: 8 contiguous bytes of the transposed scales.
    const uint2 sraw =
        __ldg(reinterpret_cast<const uint2*>(srow + static_cast<int64_t>(c >> a.chunk_group_shift) * a.w.padded_rows));
    const float scale[4] = {__half2float(__ushort_as_half(static_cast<uint16_t>(sraw.x))),
                            __half2float(__ushort_as_half(static_cast<uint16_t>(sraw.x >> 16))),
                            __half2float(__ushort_as_half(static_cast<uint16_t>(sraw.y))),
                            __half2float(__ushort_as_half(static_cast<uint16_t>(sraw.y >> 16)))};
    const bool full = a.x_vec && kc + kElems <= a.w.k;
    float part[kGemvRows][kGemvTokens] = {};
    float xsum[kGemvTokens] = {};  // ASYM only
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      float wv[kGemvRows][kPerWord];
#pragma unroll
      for (int r = 0; r < kGemvRows; ++r) {
        const uint32_t word = j == 0 ? raw[r].x : j == 1 ? raw[r].y : j == 2 ? raw[r].z : raw[r].w;
#pragma unroll
        for (int p = 0; p < kPerWord; ++p)
          wv[r][p] = BITS == 4 ? layout::int4_code_f32(word, p) : layout::int8_code_f32(word, p);
      }
#pragma unroll
      for (int t = 0; t < kGemvTokens; ++t) {
        if (t < mc) {
          float xv[kPerWord];
          gemv_load_x<T, BITS>(x + (m0 + t) * a.w.k, a.w.k, kc, j, full, xv);
          if constexpr (ASYM) {
#pragma unroll
            for (int p = 0; p < kPerWord; ++p) xsum[t] += xv[p];
          }
#pragma unroll
          for (int r = 0; r < kGemvRows; ++r)
#pragma unroll
            for (int p = 0; p < kPerWord; ++p) part[r][t] = fmaf(wv[r][p], xv[p], part[r][t]);
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kGemvRows; ++r)
#pragma unroll
      for (int t = 0; t < kGemvTokens; ++t) acc[r][t] = fmaf(scale[r], part[r][t], acc[r][t]);
    if constexpr (ASYM) {
      // The 4 rows' offsets of this chunk's group: 16 contiguous bytes of the transposed offsets.
      const float4 o = __ldg(reinterpret_cast<const float4*>(
          a.w.offsets + static_cast<int64_t>(c >> a.chunk_group_shift) * a.w.padded_rows + r0));
      const float off[4] = {o.x, o.y, o.z, o.w};
#pragma unroll
      for (int r = 0; r < kGemvRows; ++r)
#pragma unroll
        for (int t = 0; t < kGemvTokens; ++t) acc[r][t] = fmaf(off[r], xsum[t], acc[r][t]);
    }
  }
#pragma unroll
  for (int r = 0; r < kGemvRows; ++r)
#pragma unroll
    for (int t = 0; t < kGemvTokens; ++t)
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) acc[r][t] += __shfl_xor_sync(0xffffffffu, acc[r][t], off);
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < kGemvRows; ++r)
#pragma unroll
      for (int t = 0; t < kGemvTokens; ++t)
        if (t < mc && r0 + r < a.w.n) store_output<T>(a.out, static_cast<int>(blockIdx.y), m0 + t, r0 + r, acc[r][t]);
  }
}

// ---- TensorCore ----------------------------------------------------------------------------------

struct TcArgs {
  DeviceWeights w;
  const void* x = nullptr;  // [m, k]
  int64_t m = 0;
  bool x_vec = false;  // x rows 16-byte aligned and k % 8 == 0: cp.async for x
  int64_t k_tiles = 0, tiles_per_split = 0;
  layout::TcGroupEnds group_ends;  // which k-steps end a group, without dividing by the group size
  const float* gsum = nullptr;  // asymmetric only: [m, groups] sums of x per group (group_sum_kernel)
  int64_t groups = 0;
  Epilogue out;
};

// gsum[i, g] = Σ x[i, k] over the k < K of group g (group_eff wide), fp32: what an asymmetric
// matrix's offsets multiply. One warp per (token, group).
template <typename T>
__global__ void group_sum_kernel(const void* xp, int64_t m, int64_t k, int64_t group_eff, int64_t groups,
                                 float* gsum) {
  const int64_t wi = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x % 32);
  if (wi >= m * groups) return;  // whole warp
  const int64_t i = wi / groups, g = wi % groups;
  const auto* x = static_cast<const uint16_t*>(xp) + i * k;
  const int64_t k_end = min(k, (g + 1) * group_eff);
  float s = 0.0f;
  for (int64_t kk = g * group_eff + lane; kk < k_end; kk += 32) s += ActOps<T>::bits_to_float(x[kk]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
  if (lane == 0) gsum[wi] = s;
}

template <int BITS>
struct TcSmem {
  // Row strides padded so the 8 rows a warp's lane groups read at once fall in distinct banks
  // (int4: 12 words, int8: 20 words apart) while staying 16-byte aligned for cp.async.
  static constexpr int kWStride = BITS == 4 ? 48 : 80;
  static constexpr int kXStride = (kTcBK + 8) * 2;  // 144 bytes: ldmatrix rows hit distinct banks
  static constexpr int kWBytes = kTcBN * kWStride;
  static constexpr int kXBytes = kTcBM * kXStride;
  static constexpr int kSBytes = 2 * kTcBN * 2;  // the scales of the tile's (at most) two groups
  static constexpr int kStageBytes = kWBytes + kXBytes + kSBytes;
  static constexpr int kBytes = kTcStages * kStageBytes;
};

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes) {
  // src_bytes < 16 zero-fills the rest: out-of-range rows / columns of x arrive as zeros.
  const auto s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(const void* smem, uint32_t (&r)[4]) {
  const auto s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}

// d += a (16x16, row) · b (16x8, col), fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// A packed pair of exact codes in the activation dtype from its magic-number bit pattern.
template <typename T>
__device__ __forceinline__ uint32_t magic_pair_sub(uint32_t bits, float bias) {
  uint32_t out;
  if constexpr (std::is_same_v<T, __half>) {
    __half2 h;
    memcpy(&h, &bits, 4);
    h = __hsub2(h, __float2half2_rn(bias));
    memcpy(&out, &h, 4);
  } else {
    __nv_bfloat162 h;
    memcpy(&h, &bits, 4);
    h = __hsub2(h, __float2bfloat162_rn(bias));
    memcpy(&out, &h, 4);
  }
  return out;
}

// The A fragment (weights rows row_lo / row_lo + 8, k16 step s of the tile) as exact codes.
template <typename T, int BITS>
__device__ __forceinline__ void tc_load_a(const uint8_t* ws, int row_lo, int s, int t, uint32_t (&a)[4]) {
  constexpr int kStride = TcSmem<BITS>::kWStride;
  const uint8_t* lo = ws + row_lo * kStride;
  const uint8_t* hi = lo + 8 * kStride;
  if constexpr (BITS == 4) {
    // The k16 step is words 2s (k 0..7) and 2s+1 (k 8..15) of the row; pair t of each.
    const uint2 wl = *reinterpret_cast<const uint2*>(lo + 8 * s);
    const uint2 wh = *reinterpret_cast<const uint2*>(hi + 8 * s);
    constexpr uint32_t kMagic = std::is_same_v<T, __half> ? layout::kF16Magic2 : layout::kBF16Magic2;
    constexpr float kSub = std::is_same_v<T, __half> ? layout::kF16MagicInt4 : layout::kBF16MagicInt4;
    a[0] = magic_pair_sub<T>(layout::int4_pair_magic(wl.x, t, kMagic), kSub);  // row g,   k 2t, 2t+1
    a[1] = magic_pair_sub<T>(layout::int4_pair_magic(wh.x, t, kMagic), kSub);  // row g+8, k 2t, 2t+1
    a[2] = magic_pair_sub<T>(layout::int4_pair_magic(wl.y, t, kMagic), kSub);  // row g,   k 2t+8, 2t+9
    a[3] = magic_pair_sub<T>(layout::int4_pair_magic(wh.y, t, kMagic), kSub);  // row g+8, k 2t+8, 2t+9
  } else {
    // The k16 step is one 16-byte block; word t holds {2t, 2t+1, 2t+8, 2t+9}.
    const uint32_t wl = *reinterpret_cast<const uint32_t*>(lo + 16 * s + layout::tc_a_word_offset(8, t));
    const uint32_t wh = *reinterpret_cast<const uint32_t*>(hi + 16 * s + layout::tc_a_word_offset(8, t));
    if constexpr (std::is_same_v<T, __half>) {
      a[0] = magic_pair_sub<T>(layout::int8_pair_magic_f16(wl, 0), layout::kF16MagicInt8);
      a[1] = magic_pair_sub<T>(layout::int8_pair_magic_f16(wh, 0), layout::kF16MagicInt8);
      a[2] = magic_pair_sub<T>(layout::int8_pair_magic_f16(wl, 1), layout::kF16MagicInt8);
      a[3] = magic_pair_sub<T>(layout::int8_pair_magic_f16(wh, 1), layout::kF16MagicInt8);
    } else {
      a[0] = layout::int8_pair_bf16(wl, 0);
      a[1] = layout::int8_pair_bf16(wh, 0);
      a[2] = layout::int8_pair_bf16(wl, 1);
      a[3] = layout::int8_pair_bf16(wh, 1);
    }
  }
}

// grid (ceil(m / 64), padded_rows / 128, splits), block 256, dynamic smem TcSmem<BITS>::kBytes.
// Warp w computes weight rows [16w, 16w + 16) of the CTA's 128 against its 64 tokens (8 n8 tiles).
template <typename T, int BITS, bool ASYM>
__global__ void __launch_bounds__(kTcWarps * 32, 2) tc_kernel(TcArgs a) {
  using S = TcSmem<BITS>;
  extern __shared__ __align__(16) uint8_t smem[];
  const int tid = static_cast<int>(threadIdx.x), warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kTcBM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kTcBN;
  const int split = static_cast<int>(blockIdx.z);
  const int64_t kt_begin = split * a.tiles_per_split;
  const int64_t kt_end = min(a.k_tiles, kt_begin + a.tiles_per_split);
  const int k_count = static_cast<int>(kt_end - kt_begin);  // k tiles this CTA computes
  const int m_rows = static_cast<int>(min(static_cast<int64_t>(kTcBM), a.m - m0));  // real tokens here
  const int m_rows16 = min(kTcBM, (m_rows + 15) / 16 * 16);  // rows staged (ldmatrix reads 16 at a time)
  const auto* x = static_cast<const uint16_t*>(a.x);
  const int64_t k = a.w.k;

  auto load_tile = [&](int stage, int64_t kt) {
    uint8_t* st = smem + stage * S::kStageBytes;
    // Weights: 128 rows x (32 or 64) bytes, always in bounds (padded layout).
    constexpr int kChunksPerRow = kTcBK * BITS / 8 / 16;
    const int64_t kbyte = kt * (kTcBK * BITS / 8);
    for (int i = tid; i < kTcBN * kChunksPerRow; i += kTcWarps * 32) {
      const int row = i / kChunksPerRow, part = i % kChunksPerRow;
      cp_async16(st + row * S::kWStride + part * 16, a.w.codes + (n0 + row) * a.w.row_bytes + kbyte + part * 16, 16);
    }
    // x: m_rows16 rows x 8 chunks of 8 elements; zeros past m and past k.
    uint8_t* xs = st + S::kWBytes;
    const int64_t k0 = kt * kTcBK;
    for (int i = tid; i < m_rows16 * 8; i += kTcWarps * 32) {
      const int row = i / 8, part = i % 8;
      const int64_t kk = k0 + part * 8;
      const bool row_in = row < m_rows;
      if (a.x_vec) {
        const bool in = row_in && kk + 8 <= k;  // k % 8 == 0: a chunk is wholly in or out
        cp_async16(xs + row * S::kXStride + part * 16, in ? x + (m0 + row) * k + kk : x, in ? 16 : 0);
      } else {
        uint16_t v[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] = row_in && kk + e < k ? x[(m0 + row) * k + kk + e] : uint16_t{0};
        uint4 packed;
        memcpy(&packed, v, 16);
        *reinterpret_cast<uint4*>(xs + row * S::kXStride + part * 16) = packed;
      }
    }
    // Scales of the groups holding k0 and k0 + 32, for the CTA's 128 rows (contiguous: transposed).
    uint8_t* ss = st + S::kWBytes + S::kXBytes;
    constexpr int kScaleChunks = kTcBN * 2 / 16;
    for (int i = tid; i < 2 * kScaleChunks; i += kTcWarps * 32) {
      const int h = i / kScaleChunks, part = i % kScaleChunks;
      const int64_t gi = (k0 + 32 * h) >> a.w.group_shift;
      cp_async16(ss + h * kTcBN * 2 + part * 16, a.w.scales + gi * a.w.padded_rows + n0 + part * 8, 16);
    }
  };

  float acc[8][4] = {};   // [n8 tile][c0..c3]: the running sum over finished groups
  float gacc[8][4] = {};  // the current group's unscaled sum
  const int row_lo = warp * 16 + g;

  // The usual multi-stage cp.async pipeline: kTcStages - 1 tiles in flight while one is computed.
#pragma unroll
  for (int s = 0; s < kTcStages - 1; ++s) {
    if (s < k_count) load_tile(s, kt_begin + s);
    cp_async_commit();
  }
  for (int i = 0; i < k_count; ++i) {
    cp_async_wait<kTcStages - 2>();  // this thread's copies of tile i have landed
    __syncthreads();                 // everyone's have; and everyone is done computing tile i - 1
    {
      const int next = i + kTcStages - 1;  // refills the stage tile i - 1 used
      if (next < k_count) load_tile(next % kTcStages, kt_begin + next);
      cp_async_commit();
    }
    const uint8_t* st = smem + (i % kTcStages) * S::kStageBytes;
    const uint8_t* xs = st + S::kWBytes;
    const auto* ss = reinterpret_cast<const __half*>(st + S::kWBytes + S::kXBytes);
    // Does this tile end a group (after its last k-step), or the slice? Decided once per tile; the
    // unrolled k-steps below test only compile-time step numbers against these.
    const bool tile_ends_group = ((kt_begin + i + 1) & a.group_ends.tile_mask) == 0 || i == k_count - 1;
#pragma unroll
    for (int s = 0; s < kTcBK / 16; ++s) {
      uint32_t af[4];
      tc_load_a<T, BITS>(st, row_lo, s, t, af);
#pragma unroll
      for (int jj = 0; jj < 4; ++jj) {  // pairs of n8 tiles: tokens [16jj, 16jj + 16)
        if (16 * jj < m_rows) {
          // ldmatrix.x4: lane l addresses row l % 8 of matrix l / 8; matrices = (tokens +0/+8) x (k +0/+8).
          const int q = lane / 8;
          const uint8_t* addr = xs + (16 * jj + 8 * (q >> 1) + lane % 8) * S::kXStride + (16 * s + 8 * (q & 1)) * 2;
          uint32_t b[4];
          ldmatrix_x4(addr, b);
          mma16816<T>(gacc[2 * jj], af, b[0], b[1]);
          if (16 * jj + 8 < m_rows) mma16816<T>(gacc[2 * jj + 1], af, b[2], b[3]);
        }
      }
      // At a group's end (or the split's), scale the group's sum once and fold it into acc.
      const bool group_end = s == kTcBK / 16 - 1 ? tile_ends_group : s == 1 && a.group_ends.half_tile;
      if (group_end) {
        const int h = s >= 2 ? 1 : 0;
        const float s_lo = __half2float(ss[h * kTcBN + row_lo]);
        const float s_hi = __half2float(ss[h * kTcBN + row_lo + 8]);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          if (8 * j >= m_rows) break;  // tiles past m were never multiplied
          acc[j][0] = fmaf(s_lo, gacc[j][0], acc[j][0]);
          acc[j][1] = fmaf(s_lo, gacc[j][1], acc[j][1]);
          acc[j][2] = fmaf(s_hi, gacc[j][2], acc[j][2]);
          acc[j][3] = fmaf(s_hi, gacc[j][3], acc[j][3]);
          gacc[j][0] = gacc[j][1] = gacc[j][2] = gacc[j][3] = 0.0f;
        }
        if constexpr (ASYM) {
          // The offsets' part, once per group: where the group truly ends (a split boundary inside
          // a group only ends that slice's part of the sum; the slice holding its last step adds it).
          const int64_t kt = kt_begin + i;
          const bool true_end = s == 1 || ((kt + 1) & a.group_ends.tile_mask) == 0 || kt + 1 == a.k_tiles;
          if (true_end) {
            const int64_t gi = (kt * kTcBK + 32 * h) >> a.w.group_shift;
            const float o_lo = a.w.offsets[gi * a.w.padded_rows + n0 + row_lo];
            const float o_hi = a.w.offsets[gi * a.w.padded_rows + n0 + row_lo + 8];
#pragma unroll
            for (int j = 0; j < 8; ++j) {
              if (8 * j >= m_rows) break;
#pragma unroll
              for (int c = 0; c < 2; ++c) {
                const int64_t tk = m0 + 8 * j + 2 * t + c;
                const float gs = tk < a.m ? a.gsum[tk * a.groups + gi] : 0.0f;
                acc[j][c] = fmaf(o_lo, gs, acc[j][c]);
                acc[j][2 + c] = fmaf(o_hi, gs, acc[j][2 + c]);
              }
            }
          }
        }
      }
    }
  }
  cp_async_wait<0>();

  // C fragment of n8 tile j: c0/c1 = (row g, tokens 2t, 2t+1), c2/c3 = (row g + 8, same tokens).
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const int64_t tok = m0 + 8 * j + 2 * t;
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int64_t row = n0 + row_lo + (c >= 2 ? 8 : 0);
      const int64_t tk = tok + (c & 1);
      if (tk < a.m && row < a.w.n) store_output<T>(a.out, split, tk, row, acc[j][c]);
    }
  }
}

// ---- DequantCublas: dequantize a slab of rows ------------------------------------------------------

// out[r - r_begin][padded_cols] = code * scale (+ offset) (rounded once to T) for rows [r_begin, r_end);
// one thread per 16-byte chunk of codes.
template <typename T, int BITS>
__global__ void dequant_rows_kernel(DeviceWeights w, int64_t r_begin, int64_t r_end, T* __restrict__ out) {
  constexpr int kElems = BITS == 4 ? 32 : 16;
  const int64_t chunks_per_row = w.row_bytes / 16;
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= (r_end - r_begin) * chunks_per_row) return;
  const int64_t rr = i / chunks_per_row, c = i % chunks_per_row, r = r_begin + rr;
  const uint4 raw = *reinterpret_cast<const uint4*>(w.codes + r * w.row_bytes + c * 16);
  const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
  const int64_t kc = c * kElems;
  const int64_t gi = (kc >> w.group_shift) * w.padded_rows + r;
  const float scale = __half2float(w.scales[gi]);
  const float offset = w.offsets ? w.offsets[gi] : 0.0f;  // code * scale + offset, rounded once to T
  uint16_t vals[kElems];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    if constexpr (BITS == 4) {
#pragma unroll
      for (int p = 0; p < 8; ++p)
        vals[8 * j + layout::int4_nibble_element(p)] =
            to_bits(ActOps<T>::from_float(fmaf(layout::int4_code_f32(words[j], p), scale, offset)));
    } else {
#pragma unroll
      for (int b = 0; b < 4; ++b)
        vals[layout::int8_byte_element(4 * j + b)] =
            to_bits(ActOps<T>::from_float(fmaf(layout::int8_code_f32(words[j], b), scale, offset)));
    }
  }
  T* dst = out + rr * (w.row_bytes * 8 / BITS) + kc;
#pragma unroll
  for (int q = 0; q < kElems / 8; ++q) {
    uint4 v;
    memcpy(&v, vals + 8 * q, 16);
    reinterpret_cast<uint4*>(dst)[q] = v;
  }
}

// y[m, n] = bias (rounded to T), so that cuBLAS can add the product with beta = 1.
template <typename T>
__global__ void fill_bias_kernel(Epilogue e) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= e.m * e.n) return;
  static_cast<T*>(e.y)[i] = ActOps<T>::from_float(load_bias(e, i % e.n));
}

unsigned blocks_for(int64_t n, int threads) { return static_cast<unsigned>((n + threads - 1) / threads); }

template <typename T, int BITS>
void set_tc_smem_limit() {
  check(cudaFuncSetAttribute(tc_kernel<T, BITS, false>, cudaFuncAttributeMaxDynamicSharedMemorySize, TcSmem<BITS>::kBytes),
        "cudaFuncSetAttribute (tensor-core GEMM shared memory)");
  check(cudaFuncSetAttribute(tc_kernel<T, BITS, true>, cudaFuncAttributeMaxDynamicSharedMemorySize, TcSmem<BITS>::kBytes),
        "cudaFuncSetAttribute (tensor-core GEMM shared memory)");
}

}  // namespace

struct Gemm::Impl {
  DType act = DType::F16;
  cudaStream_t stream = nullptr;
  cublasHandle_t cublas = nullptr;
  int sm_count = 1;
  GemmOptions options;
  std::vector<void*> owned;                               // uploaded weights
  std::unordered_map<const void*, QuantLayout> uploads;  // data pointer -> layout (bits 0: dense)
  float* split_ws = nullptr;                              // kSplitWorkspaceBytes, on first use
  float* gsum_ws = nullptr;                               // group sums of x (asymmetric), grown on demand
  size_t gsum_bytes = 0;
  void* dequant_ws = nullptr;                             // dequant_bytes, grown on demand
  size_t dequant_bytes = 0;

  void* alloc(size_t bytes) {
    void* p = nullptr;
    check(cudaMalloc(&p, bytes), "cudaMalloc (Gemm::upload)");
    owned.push_back(p);
    return p;
  }
  void poison(void* p, size_t bytes) {
    // 0xFF bytes: NaN in fp32, fp16 and bf16.
    if (options.poison_workspaces) check(cudaMemsetAsync(p, 0xFF, bytes, stream), "cudaMemsetAsync (poison)");
  }
  // Frees `ws` and allocates `bytes` in its place (the old contents are not kept).
  template <typename T>
  static void reallocate(T*& ws, size_t& ws_bytes, size_t bytes, const char* free_what, const char* malloc_what) {
    if (ws) check(cudaFree(ws), free_what);
    ws = nullptr;
    ws_bytes = 0;
    check(cudaMalloc(&ws, bytes), malloc_what);
    ws_bytes = bytes;
  }
  float* gsum_workspace(size_t bytes) {
    if (bytes > gsum_bytes)
      reallocate(gsum_ws, gsum_bytes, bytes, "cudaFree (GEMM group-sum workspace)", "cudaMalloc (GEMM group-sum workspace)");
    poison(gsum_ws, gsum_bytes);
    return gsum_ws;
  }
  float* split_workspace() {
    if (!split_ws) check(cudaMalloc(&split_ws, kSplitWorkspaceBytes), "cudaMalloc (GEMM split-K workspace)");
    poison(split_ws, kSplitWorkspaceBytes);
    return split_ws;
  }
  // A workspace of `want` bytes when it exists or the device can spare it (see kDequantMaxBytes),
  // else the largest one there is (>= kDequantMinBytes); its size lands in dequant_bytes.
  void* dequant_workspace(size_t want) {
    const size_t max_bytes = options.max_dequant_bytes ? options.max_dequant_bytes : kDequantMaxBytes;
    const size_t min_bytes = std::min(kDequantMinBytes, max_bytes);
    want = std::max(want, min_bytes);
    if (want > dequant_bytes) {
      size_t free_b = 0, total_b = 0;
      check(cudaMemGetInfo(&free_b, &total_b), "cudaMemGetInfo");
      const bool spare = want <= max_bytes && free_b + dequant_bytes >= want + kDequantKeepFreeBytes;
      const size_t grow = spare ? want : std::max(dequant_bytes, min_bytes);
      if (grow > dequant_bytes)
        reallocate(dequant_ws, dequant_bytes, grow, "cudaFree (GEMM dequant workspace)", "cudaMalloc (GEMM dequant workspace)");
    }
    poison(dequant_ws, dequant_bytes);
    return dequant_ws;
  }
  layout::SplitPlan plan(int64_t base_ctas, int64_t units, int64_t min_units, int64_t max_splits) const {
    if (options.force_splits > 0) return layout::plan_forced_split(units, options.force_splits, max_splits);
    return layout::plan_split(base_ctas, layout::split_target_ctas(base_ctas, sm_count, kTargetCtasPerSm), units,
                              min_units, max_splits);
  }

  template <typename T>
  void run_gemv(const QuantLayout& l, const DeviceWeights& dw, const void* x, int64_t m, const Epilogue& out);
  template <typename T>
  void run_tc(const QuantLayout& l, const DeviceWeights& dw, const void* x, int64_t m, const Epilogue& out);
  template <typename T>
  void run_dequant_cublas(const QuantLayout& l, const DeviceWeights& dw, const void* x, int64_t m,
                          const Epilogue& out);
  void cublas_gemm(const void* w, int64_t ldw, int64_t n, int64_t k, const void* x, int64_t m, void* y, int64_t ldy,
                   bool accumulate);
  template <typename T>
  void reduce_splits(int splits, const Epilogue& out);
};

namespace {
bool x_vector_ok(const void* x, int64_t k) { return k % 8 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0; }
}  // namespace

template <typename T>
void Gemm::Impl::reduce_splits(int splits, const Epilogue& out) {
  splitk_reduce_kernel<T><<<blocks_for(out.m * out.n, 256), 256, 0, stream>>>(splits, out);
  check(cudaGetLastError(), "split-K reduce launch");
}

template <typename T>
void Gemm::Impl::run_gemv(const QuantLayout& l, const DeviceWeights& dw, const void* x, int64_t m,
                          const Epilogue& out) {
  constexpr int kRowsPerCta = kGemvWarps * kGemvRows;
  const int64_t elems = l.bits == 4 ? 32 : 16;
  const int64_t n_chunks = (l.cols + elems - 1) / elems;
  const int64_t row_blocks = (l.rows + kRowsPerCta - 1) / kRowsPerCta;
  const int64_t token_blocks = (m + kGemvTokens - 1) / kGemvTokens;
  const layout::SplitPlan plan =
      this->plan(row_blocks * token_blocks, n_chunks, kGemvMinChunksPerSplit,
                 static_cast<int64_t>(kSplitWorkspaceBytes / sizeof(float)) / (m * l.rows));
  GemvArgs a;
  a.w = dw;
  a.x = x;
  a.m = m;
  a.x_vec = x_vector_ok(x, l.cols);
  // A group holds group_eff / elems chunks, a power of two (groups >= 32 >= elems), or all of them.
  // (A column-wise shift of 62 becomes 31: every int chunk index still maps to group 0.)
  a.chunk_group_shift = std::min(dw.group_shift - (l.bits == 4 ? 5 : 4), 31);
  FS_ASSERT(n_chunks <= INT32_MAX / 2, "GEMV: K too large");
  a.chunks_per_split = static_cast<int>(plan.per_split);
  a.out = out;
  if (plan.splits > 1) a.out.partial = split_workspace();
  FS_ASSERT(row_blocks <= INT32_MAX && plan.splits <= 65535 && token_blocks <= 65535, "GEMV grid too large");
  const dim3 grid(static_cast<unsigned>(row_blocks), static_cast<unsigned>(plan.splits),
                  static_cast<unsigned>(token_blocks));
  const bool asym = dw.offsets != nullptr;
  if (l.bits == 4)
    asym ? gemv_kernel<T, 4, true><<<grid, kGemvWarps * 32, 0, stream>>>(a)
         : gemv_kernel<T, 4, false><<<grid, kGemvWarps * 32, 0, stream>>>(a);
  else
    asym ? gemv_kernel<T, 8, true><<<grid, kGemvWarps * 32, 0, stream>>>(a)
         : gemv_kernel<T, 8, false><<<grid, kGemvWarps * 32, 0, stream>>>(a);
  check(cudaGetLastError(), "GEMV launch");
  if (plan.splits > 1) reduce_splits<T>(static_cast<int>(plan.splits), a.out);
}

template <typename T>
void Gemm::Impl::run_tc(const QuantLayout& l, const DeviceWeights& dw, const void* x, int64_t m, const Epilogue& out) {
  const int64_t k_tiles = l.padded_cols / kTcBK;
  const int64_t m_tiles = (m + kTcBM - 1) / kTcBM;
  const int64_t n_tiles = l.padded_rows / kTcBN;
  const layout::SplitPlan plan =
      this->plan(m_tiles * n_tiles, k_tiles, kTcMinTilesPerSplit,
                 static_cast<int64_t>(kSplitWorkspaceBytes / sizeof(float)) / (m * l.rows));
  TcArgs a;
  a.w = dw;
  a.x = x;
  a.m = m;
  a.x_vec = x_vector_ok(x, l.cols);
  a.k_tiles = k_tiles;
  a.tiles_per_split = plan.per_split;
  a.group_ends = layout::tc_group_ends(l);
  a.out = out;
  if (plan.splits > 1) a.out.partial = split_workspace();
  FS_ASSERT(n_tiles <= 65535 && plan.splits <= 65535 && m_tiles <= INT32_MAX, "tensor-core GEMM grid too large");
  const dim3 grid(static_cast<unsigned>(m_tiles), static_cast<unsigned>(n_tiles), static_cast<unsigned>(plan.splits));
  const bool asym = dw.offsets != nullptr;
  if (asym) {
    a.groups = l.groups;
    a.gsum = gsum_workspace(static_cast<size_t>(m * l.groups) * sizeof(float));
    group_sum_kernel<T><<<blocks_for(m * l.groups * 32, 256), 256, 0, stream>>>(x, m, l.cols, l.group_eff, l.groups,
                                                                              const_cast<float*>(a.gsum));
    check(cudaGetLastError(), "group-sum launch");
  }
  if (l.bits == 4)
    asym ? tc_kernel<T, 4, true><<<grid, kTcWarps * 32, TcSmem<4>::kBytes, stream>>>(a)
         : tc_kernel<T, 4, false><<<grid, kTcWarps * 32, TcSmem<4>::kBytes, stream>>>(a);
  else
    asym ? tc_kernel<T, 8, true><<<grid, kTcWarps * 32, TcSmem<8>::kBytes, stream>>>(a)
         : tc_kernel<T, 8, false><<<grid, kTcWarps * 32, TcSmem<8>::kBytes, stream>>>(a);
  check(cudaGetLastError(), "tensor-core GEMM launch");
  if (plan.splits > 1) reduce_splits<T>(static_cast<int>(plan.splits), a.out);
}

// y[m, n] (ld ldy) (+)= x[m, k] · w[n, k]ᵀ (w with leading dimension ldw), fp32 accumulation.
// cuBLAS is column-major: there this is yᵀ[n, m] = w[k, n]ᵀ · xᵀ[k, m].
void Gemm::Impl::cublas_gemm(const void* w, int64_t ldw, int64_t n, int64_t k, const void* x, int64_t m, void* y,
                             int64_t ldy, bool accumulate) {
  FS_ASSERT(n <= INT32_MAX && k <= INT32_MAX && m <= INT32_MAX && ldw <= INT32_MAX && ldy <= INT32_MAX);
  const cudaDataType_t t = act == DType::F16 ? CUDA_R_16F : CUDA_R_16BF;
  const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
  check(cublasGemmEx(cublas, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(n), static_cast<int>(m), static_cast<int>(k),
                     &alpha, w, t, static_cast<int>(ldw), x, t, static_cast<int>(k), &beta, y, t,
                     static_cast<int>(ldy), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
        "cublasGemmEx");
}

template <typename T>
void Gemm::Impl::run_dequant_cublas(const QuantLayout& l, const DeviceWeights& dw, const void* x, int64_t m,
                                    const Epilogue& out) {
  if (out.bias_kind != kNoBias) {
    fill_bias_kernel<T><<<blocks_for(m * l.rows, 256), 256, 0, stream>>>(out);
    check(cudaGetLastError(), "bias fill launch");
  }
  const int64_t row_elems = l.padded_cols;
  // The whole matrix when the workspace can hold it: one cuBLAS call over all N rows. Otherwise
  // slabs of rows, as many as fit, in multiples of 128 rows.
  T* ws = static_cast<T*>(dequant_workspace(static_cast<size_t>(l.rows * row_elems) * sizeof(T)));
  int64_t slab = static_cast<int64_t>(dequant_bytes / sizeof(T)) / row_elems;
  if (slab < 1) throw Error("GEMM: a row of " + std::to_string(l.cols) + " columns exceeds the dequantization workspace");
  if (slab < l.rows && slab >= kTcBN) slab = slab / kTcBN * kTcBN;
  for (int64_t r = 0; r < l.rows; r += slab) {
    const int64_t r_end = std::min(l.rows, r + slab);
    const int64_t threads = (r_end - r) * (l.row_bytes() / 16);
    if (l.bits == 4)
      dequant_rows_kernel<T, 4><<<blocks_for(threads, 256), 256, 0, stream>>>(dw, r, r_end, ws);
    else
      dequant_rows_kernel<T, 8><<<blocks_for(threads, 256), 256, 0, stream>>>(dw, r, r_end, ws);
    check(cudaGetLastError(), "dequantize launch");
    cublas_gemm(ws, row_elems, r_end - r, l.cols, x, m, static_cast<T*>(out.y) + r, l.rows,
                out.bias_kind != kNoBias);
  }
}

Gemm::Gemm(DType act, cudaStream_t stream, const GemmOptions& options) : impl_(std::make_unique<Impl>()) {
  if (act != DType::F16 && act != DType::BF16)
    throw Error("CUDA GEMM: activations must be F16 or BF16, got " + std::string(dtype_name(act)));
  impl_->act = act;
  impl_->options = options;
  impl_->stream = stream;
  int device = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&impl_->sm_count, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  check(cublasCreate(&impl_->cublas), "cublasCreate");
  check(cublasSetStream(impl_->cublas, stream), "cublasSetStream");
  set_tc_smem_limit<__half, 4>();
  set_tc_smem_limit<__half, 8>();
  set_tc_smem_limit<__nv_bfloat16, 4>();
  set_tc_smem_limit<__nv_bfloat16, 8>();
}

Gemm::~Gemm() {
  if (impl_->cublas) cublasDestroy(impl_->cublas);
  for (void* p : impl_->owned) cudaFree(p);
  if (impl_->split_ws) cudaFree(impl_->split_ws);
  if (impl_->gsum_ws) cudaFree(impl_->gsum_ws);
  if (impl_->dequant_ws) cudaFree(impl_->dequant_ws);
}

WeightMatrix Gemm::upload(const WeightMatrix& host) {
  cpu::validate_weight(host, "Gemm::upload");
  WeightMatrix d = host;
  if (host.quantized()) {
    const layout::DeviceImage img = layout::relayout(host);
    void* codes = impl_->alloc(img.codes.size());
    void* scales = impl_->alloc(img.scales.size() * sizeof(uint16_t));
    check(cudaMemcpy(codes, img.codes.data(), img.codes.size(), cudaMemcpyHostToDevice), "cudaMemcpy (GEMM codes)");
    check(cudaMemcpy(scales, img.scales.data(), img.scales.size() * sizeof(uint16_t), cudaMemcpyHostToDevice),
          "cudaMemcpy (GEMM scales)");
    d.data = codes;
    d.scales = static_cast<const uint16_t*>(scales);
    d.offsets = nullptr;
    if (!img.offsets.empty()) {
      void* offsets = impl_->alloc(img.offsets.size() * sizeof(float));
      check(cudaMemcpy(offsets, img.offsets.data(), img.offsets.size() * sizeof(float), cudaMemcpyHostToDevice),
            "cudaMemcpy (GEMM offsets)");
      d.offsets = static_cast<const float*>(offsets);
    }
    impl_->uploads[codes] = img.layout;
  } else {
    const size_t n = static_cast<size_t>(host.rows * host.cols);
    std::vector<uint16_t> conv(n);
    const bool to_f16 = impl_->act == DType::F16;
    for (size_t i = 0; i < n; ++i) {
      float v;
      if (host.dtype == DType::F32) v = static_cast<const float*>(host.data)[i];
      else if (host.dtype == DType::F16) v = half_to_float(static_cast<const uint16_t*>(host.data)[i]);
      else v = bf16_to_float(static_cast<const uint16_t*>(host.data)[i]);
      conv[i] = to_f16 ? float_to_half(v) : float_to_bf16(v);
    }
    void* data = impl_->alloc(n * sizeof(uint16_t));
    check(cudaMemcpy(data, conv.data(), n * sizeof(uint16_t), cudaMemcpyHostToDevice), "cudaMemcpy (GEMM dense)");
    d.data = data;
    d.dtype = impl_->act;
    d.scales = nullptr;
    d.offsets = nullptr;
    QuantLayout dense;
    dense.rows = host.rows;
    dense.cols = host.cols;
    impl_->uploads[data] = dense;
  }
  return d;
}

GemmPath Gemm::choose(const WeightMatrix& w, int64_t m) const {
  if (!w.quantized() || m > kTensorCoreMaxM) return GemmPath::DequantCublas;
  return m <= kGemvMaxM ? GemmPath::Gemv : GemmPath::TensorCore;
}

void Gemm::linear(const WeightMatrix& w, const void* x, int64_t m, const void* bias, DType bias_dtype, void* y,
                  GemmPath path) {
  FS_ASSERT(m >= 0, "linear: negative token count");
  if (m == 0) return;
  FS_ASSERT(x != nullptr && y != nullptr);
  const auto it = impl_->uploads.find(w.data);
  FS_ASSERT(it != impl_->uploads.end(), "linear: the weight did not come from this Gemm's upload()");
  const QuantLayout& l = it->second;
  FS_ASSERT(l.rows == w.rows && l.cols == w.cols && l.bits == w.bits, "linear: weight shape differs from upload");
  Epilogue out;
  out.y = y;
  out.m = m;
  out.n = w.rows;
  if (bias) {
    FS_ASSERT(is_float(bias_dtype), "linear: bias must be F32, F16 or BF16");
    out.bias = bias;
    out.bias_kind = bias_dtype == DType::F32 ? kBiasF32 : bias_dtype == DType::F16 ? kBiasF16 : kBiasBF16;
  }
  const bool f16 = impl_->act == DType::F16;

  if (!w.quantized()) {  // dense: cuBLAS at every m
    if (bias) {
      if (f16)
        fill_bias_kernel<__half><<<blocks_for(m * w.rows, 256), 256, 0, impl_->stream>>>(out);
      else
        fill_bias_kernel<__nv_bfloat16><<<blocks_for(m * w.rows, 256), 256, 0, impl_->stream>>>(out);
      check(cudaGetLastError(), "bias fill launch");
    }
    impl_->cublas_gemm(w.data, w.cols, w.rows, w.cols, x, m, y, w.rows, bias != nullptr);
    return;
  }

  DeviceWeights dw;
  dw.codes = static_cast<const uint8_t*>(w.data);
  dw.scales = reinterpret_cast<const __half*>(w.scales);
  dw.offsets = w.offsets;
  dw.padded_rows = l.padded_rows;
  dw.row_bytes = l.row_bytes();
  dw.group_eff = l.group_eff;
  dw.group_shift = layout::group_shift(l);
  dw.n = l.rows;
  dw.k = l.cols;
  if (path == GemmPath::Auto) path = choose(w, m);
  switch (path) {
    case GemmPath::Gemv:
      f16 ? impl_->run_gemv<__half>(l, dw, x, m, out) : impl_->run_gemv<__nv_bfloat16>(l, dw, x, m, out);
      break;
    case GemmPath::TensorCore:
      f16 ? impl_->run_tc<__half>(l, dw, x, m, out) : impl_->run_tc<__nv_bfloat16>(l, dw, x, m, out);
      break;
    case GemmPath::DequantCublas:
    case GemmPath::Auto:
      f16 ? impl_->run_dequant_cublas<__half>(l, dw, x, m, out)
          : impl_->run_dequant_cublas<__nv_bfloat16>(l, dw, x, m, out);
      break;
  }
}

}  // namespace fineserve::cuda
