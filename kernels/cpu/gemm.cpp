// Fast CPU linear layer (see gemm.h).
//
// Packed layout (built by pack_weight at upload time). Rows go in tiles of 4, columns in blocks of
// 32 (both zero padded). For each tile the blocks follow each other along K and each block holds
// the 4 rows' 32 columns back to back, so one tile streams from memory as one sequential run: the
// hardware prefetcher follows one stream instead of four, which took single-core int4 GEMV from
// ~6 to ~12 GB/s on the machine this was tuned on. Per row and block:
//  - F32 / F16 / BF16: the 32 values in order (128 / 64 / 64 bytes);
//  - int8: the 32 codes in order (32 bytes);
//  - int4: 16 bytes = four 32-bit words; nibble j (bits 4j..4j+3) of word i holds column
//    8*(j/2) + 4*(j%2) + i. One 128-bit load broadcast to both halves of a 256-bit register and
//    ANDed with a per-lane mask then yields columns 8s..8s+7 of step s in order, each nibble still
//    at bit 4j of its lane. Nibbles 0..6 hold code + 8 (0..15), nibble 7 (bits 28..31, columns
//    28..31) holds the code in two's complement, so that an AND keeps its sign.
// Scales: fp16 [tile][group][4 rows]; offsets of an asymmetric matrix: [tile][group][4 rows], fp16
// when all are exactly fp16 values, else fp32 (gemm.h).
//
// GEMV (m <= 3 per pass, the decode hot spot, memory-bound): per step AND + int->float convert +
// FMA, with no per-element shift: the 2^(4j) left in each masked lane is folded into a copy of x
// scaled by 2^-(4j) once per call (exact: a power-of-two scaling), and the +8 offset is removed
// once per group as 8 * (sum of x over the group's offset columns), also precomputed per call.
// Each group's partial dot products are reduced and multiplied by the group scale once. An
// asymmetric matrix's offsets add Σ_group offset · (sum of x over the group): one 4-row FMA per
// group and tile with the group sums of x computed once per call; a symmetric one skips that branch.
// GEMM (m > 3; m > 6 for quantized weights, m > 32 on AVX-512): a 16-row x 256-column tile of W
// is dequantized once into an L1-resident fp32 buffer (exactly: code * scale has at most 19
// significant bits; code * scale + offset rounded once more when asymmetric) and reused by every
// row of x through a 3 x 4 register-blocked FMA microkernel (6 x 4 with 512-bit vectors on the
// AVX-512 path).
// AVX-512 (Isa::Avx512Vnni), same layout: quantized weights take a 512-bit GEMV that scales each
// weight vector before its FMAs and so serves up to 6 rows of x per pass, in passes up to m = 32
// (kGemvMaxRows512); the GEMM runs a 6 x 4 512-bit microkernel; dense weights' GEMV and the tile
// dequantization stay AVX2.
#include "kernels/cpu/gemm.h"

// GCC 12's AVX-512 intrinsics start some wrappers (_mm512_broadcast_i32x4, _mm512_cvtepi32_ps, ...)
// from a deliberately undefined vector, which -Wuninitialized reports once inlined (GCC PR 105593).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "kernels/base.h"
#include "kernels/cpu/convert.h"
#include "kernels/cpu/dispatch.h"
#include "kernels/cpu/simd.h"
#include "kernels/cpu/validate.h"
#include "kernels/half.h"

namespace fineserve::cpu {
namespace {

enum class Kind { Q4, Q8, F16, BF16, F32 };

constexpr int64_t kTileRows = 4;
constexpr int64_t kBlockCols = 32;

Kind kind_of(const WeightMatrix& w) {
  if (w.bits == 4) return Kind::Q4;
  if (w.bits == 8) return Kind::Q8;
  if (w.dtype == DType::F16) return Kind::F16;
  if (w.dtype == DType::BF16) return Kind::BF16;
  return Kind::F32;
}

constexpr int64_t block_bytes(Kind k) {
  switch (k) {
    case Kind::Q4: return 16;
    case Kind::Q8: return 32;
    case Kind::F16:
    case Kind::BF16: return 64;
    case Kind::F32: return 128;
  }
  return 0;
}

// The power-of-two exponent j*4 that column c of a block sits at in the int4 layout.
constexpr int q4_shift(int64_t c) {
  const int64_t in_block = c % kBlockCols;
  return static_cast<int>(4 * (2 * (in_block / 8) + (in_block % 8 >= 4 ? 1 : 0)));
}

int8_t source_code(const WeightMatrix& w, int64_t r, int64_t c) {
  if (w.bits == 8) return static_cast<const int8_t*>(w.data)[r * w.cols + c];
  const uint8_t byte = static_cast<const uint8_t*>(w.data)[r * (w.cols / 2) + c / 2];
  return static_cast<int8_t>((c % 2 == 0 ? byte & 0xf : byte >> 4) - 8);
}

// ---- GEMV -----------------------------------------------------------------------------------

struct GemvArgs {
  const uint8_t* codes = nullptr;
  const uint16_t* scales = nullptr;
  int64_t blocks = 0, groups = 1, blocks_per_group = 0;
  const float* x = nullptr;     // [M, blocks * 32], padded (and scaled per column for int4)
  const float* xsum = nullptr;  // [M, groups]: int4 only, sum of x over each group's +8 columns
  const void* offsets = nullptr;   // [tiles][groups][4] (asymmetric only) or null
  bool offsets_f16 = false;        // offsets are fp16, else fp32
  const float* gsum = nullptr;     // [M, groups]: with offsets, the sum of x over each whole group
  const float* bias = nullptr;  // [tiles * 4] fp32, zero padded, or null
  float* y = nullptr;           // [M, rows]
  int64_t rows = 0;
};

// How far ahead of the current block to prefetch (bytes): a few KiB in flight per core keeps the
// DRAM pipe full; the stream is sequential so the distance needs no per-shape tuning.
constexpr int64_t kPrefetchBytes = 2048;

// Writes one tile's 4 results per x row: y = tot (+ the offsets' share) (+ bias), rows past N dropped.
template <int M>
FS_AVX2 void store_tile(const GemvArgs& a, int64_t t, __m128 (&tot)[M], const __m128 (&otot)[M]) {
  const int64_t row0 = t * kTileRows;
  for (int i = 0; i < M; ++i) {
    if (a.offsets) tot[i] = _mm_add_ps(tot[i], otot[i]);
    if (a.bias) tot[i] = _mm_add_ps(tot[i], _mm_loadu_ps(a.bias + row0));
    float* yi = a.y + i * a.rows + row0;
    if (row0 + kTileRows <= a.rows) {
      _mm_storeu_ps(yi, tot[i]);
    } else {
      alignas(16) float out[4];
      _mm_store_ps(out, tot[i]);
      for (int64_t r = 0; r < a.rows - row0; ++r) yi[r] = out[r];
    }
  }
}

template <Kind KD, int M>
FS_AVX2 void gemv_tiles(const GemvArgs& a, int64_t t0, int64_t t1) {
  // One accumulator per (x row, W row) is enough to hide FMA latency when M >= 2; M = 1 needs two.
  constexpr int NA = M == 1 ? 2 : 1;
  constexpr int64_t BB = block_bytes(KD);
  constexpr bool quantized = KD == Kind::Q4 || KD == Kind::Q8;
  const int64_t xs = a.blocks * kBlockCols;
  const __m256i mask0 = _mm256_setr_epi32(0xf, 0xf, 0xf, 0xf, 0xf0, 0xf0, 0xf0, 0xf0);
  const __m256i mask[4] = {mask0, _mm256_slli_epi32(mask0, 8), _mm256_slli_epi32(mask0, 16),
                           _mm256_slli_epi32(mask0, 24)};
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* tile = a.codes + t * a.blocks * kTileRows * BB;
    __m128 tot[M];
    for (int i = 0; i < M; ++i) tot[i] = _mm_setzero_ps();
    // M = 1 keeps each W row's total as a vector and scales the group's partial sums in vector
    // form: no horizontal reduction per group (that cost ~20% at group 128), one per tile.
    __m256 tot1[kTileRows];
    for (int r = 0; r < kTileRows; ++r) tot1[r] = _mm256_setzero_ps();
    __m128 otot[M];  // Σ_group offset · gsum (asymmetric only)
    for (int i = 0; i < M; ++i) otot[i] = _mm_setzero_ps();
    for (int64_t g = 0; g < a.groups; ++g) {
      if constexpr (quantized) {
        if (a.offsets) {
          const __m128 off = simd::load4_f16_or_f32(a.offsets, a.offsets_f16, (t * a.groups + g) * kTileRows);
          for (int i = 0; i < M; ++i) otot[i] = _mm_fmadd_ps(off, _mm_set1_ps(a.gsum[i * a.groups + g]), otot[i]);
        }
      }
      __m256 acc[M][kTileRows][NA];
      for (int i = 0; i < M; ++i)
        for (int r = 0; r < kTileRows; ++r)
          for (int k = 0; k < NA; ++k) acc[i][r][k] = _mm256_setzero_ps();
      const int64_t b0 = g * a.blocks_per_group, b1 = std::min(b0 + a.blocks_per_group, a.blocks);
      for (int64_t b = b0; b < b1; ++b) {
        const uint8_t* blk = tile + b * kTileRows * BB;
        for (int64_t line = 0; line < kTileRows * BB; line += 64)
          _mm_prefetch(reinterpret_cast<const char*>(blk + kPrefetchBytes + line), _MM_HINT_T0);
        const float* xb = a.x + b * kBlockCols;
        // With one row of x, its 32 values for this block stay in registers for all 4 W rows:
        // a quarter of the loads (the load ports, not the ALUs, limited this loop).
        __m256 x1[4];
        if constexpr (M == 1)
          for (int s = 0; s < 4; ++s) x1[s] = _mm256_loadu_ps(xb + 8 * s);
#pragma GCC unroll 4
        for (int r = 0; r < kTileRows; ++r) {
          const uint8_t* rb = blk + r * BB;
          __m256i v = _mm256_setzero_si256();
          if constexpr (KD == Kind::Q4) v = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rb)));
#pragma GCC unroll 4
          for (int s = 0; s < 4; ++s) {
            __m256 w;
            if constexpr (KD == Kind::Q4) {
              w = _mm256_cvtepi32_ps(_mm256_and_si256(v, mask[s]));
            } else if constexpr (KD == Kind::Q8) {
              w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(rb + 8 * s))));
            } else if constexpr (KD == Kind::F16) {
              w = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rb + 16 * s)));
            } else if constexpr (KD == Kind::BF16) {
              const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rb + 16 * s)));
              w = _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
            } else {
              w = _mm256_loadu_ps(reinterpret_cast<const float*>(rb) + 8 * s);
            }
            if constexpr (M == 1) {
              acc[0][r][s % NA] = _mm256_fmadd_ps(x1[s], w, acc[0][r][s % NA]);
            } else {
#pragma GCC unroll 4
              for (int i = 0; i < M; ++i)
                acc[i][r][s % NA] = _mm256_fmadd_ps(_mm256_loadu_ps(xb + i * xs + 8 * s), w, acc[i][r][s % NA]);
            }
          }
        }
      }
      __m128 sc = _mm_setzero_ps();
      if constexpr (quantized)
        sc = _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(a.scales + (t * a.groups + g) * kTileRows)));
      if constexpr (M == 1 && quantized) {
        const __m256 sc8 = _mm256_castps128_ps256(sc);
        for (int r = 0; r < kTileRows; ++r)
          tot1[r] = _mm256_fmadd_ps(_mm256_add_ps(acc[0][r][0], acc[0][r][NA - 1]),
                                    _mm256_permutevar8x32_ps(sc8, _mm256_set1_epi32(r)), tot1[r]);
        // The +8 offset, scaled per row: tot[0] collects scale * 8 * (sum of x over offset columns).
        if constexpr (KD == Kind::Q4) tot[0] = _mm_fmadd_ps(sc, _mm_set1_ps(8.0f * a.xsum[g]), tot[0]);
        continue;
      }
      for (int i = 0; i < M; ++i) {
        __m256 r4[kTileRows];
        for (int r = 0; r < kTileRows; ++r) r4[r] = NA == 2 ? _mm256_add_ps(acc[i][r][0], acc[i][r][NA - 1]) : acc[i][r][0];
        __m128 sums = simd::hsum4(r4[0], r4[1], r4[2], r4[3]);
        if constexpr (KD == Kind::Q4) sums = _mm_sub_ps(sums, _mm_set1_ps(8.0f * a.xsum[i * a.groups + g]));
        tot[i] = quantized ? _mm_fmadd_ps(sums, sc, tot[i]) : _mm_add_ps(sums, tot[i]);
      }
    }
    if constexpr (M == 1 && quantized) tot[0] = _mm_sub_ps(simd::hsum4(tot1[0], tot1[1], tot1[2], tot1[3]), tot[0]);
    store_tile<M>(a, t, tot, otot);
  }
}

// The sum of a 512-bit vector's two 256-bit halves.
FS_AVX512 inline __m256 fold512(__m512 v) {
  return _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}

// Rows of x one pass of the 512-bit GEMV takes: M x 4 accumulators + 2 masks + the scales and the
// weight vectors fit the 32 zmm registers up to 6.
constexpr int kGemvRows512 = 6;
// Up to this many rows of x the AVX-512 path runs GEMV passes rather than the tiled GEMM (one thread,
// OPT-1.3B shapes, int4 g128: 51 vs 26 GMAC/s at m = 8, 46 vs 43 at 32, even at 64).
constexpr int64_t kGemvMaxRows512 = 32;
// The AVX2 GEMV's passes of 3 rows beat the GEMM at m = 4 (2 + 2 rows: 28 vs 17 GMAC/s, same
// shapes), tie at 8 and lose beyond.
constexpr int64_t kGemvMaxRowsAvx2 = 6;

// The GEMV with 512-bit vectors, for quantized weights (AVX-512 F/BW/VL/DQ), on the same layout and
// the same prepared x as gemv_tiles. A row's 16 int4 bytes are broadcast to all four 128-bit lanes,
// so one AND with a per-lane mask yields 16 columns in order (step h: columns 16h..16h+15, nibbles
// 4h..4h+3 of the four words), still at bit 4j of their lane (x is scaled by 2^-(4j)); int8: 16
// codes widened to int32 per step. Each weight vector is multiplied by its row's group scale before
// the FMAs (exact: a 4-bit or 8-bit integer times an fp16 scale fits fp32's mantissa), so the
// accumulators need no per-group step and take up to kGemvRows512 rows of x in one pass over the
// weights: one dequantized vector feeds M FMAs. The int4 +8 (8 · scale · sum of x over the group's
// offset columns) and an asymmetric matrix's offsets are applied per group on 4-row vectors.
template <Kind KD, int M>
FS_AVX512 void gemv_tiles_avx512(const GemvArgs& a, int64_t t0, int64_t t1) {
  static_assert(KD == Kind::Q4 || KD == Kind::Q8);
  constexpr int64_t BB = block_bytes(KD);
  const int64_t xs = a.blocks * kBlockCols;
  const __m512i mask0 = _mm512_setr_epi32(0xf, 0xf, 0xf, 0xf, 0xf0, 0xf0, 0xf0, 0xf0, 0xf00, 0xf00, 0xf00, 0xf00,
                                          0xf000, 0xf000, 0xf000, 0xf000);
  const __m512i mask[2] = {mask0, _mm512_slli_epi32(mask0, 16)};
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* tile = a.codes + t * a.blocks * kTileRows * BB;
    __m512 acc[M][kTileRows];
    for (int i = 0; i < M; ++i)
      for (int r = 0; r < kTileRows; ++r) acc[i][r] = _mm512_setzero_ps();
    __m128 corr[M], otot[M];  // Σ_group 8 · scale · xsum (int4, subtracted); Σ_group offset · gsum
    for (int i = 0; i < M; ++i) corr[i] = otot[i] = _mm_setzero_ps();
    for (int64_t g = 0; g < a.groups; ++g) {
      const __m128 sc = _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(a.scales + (t * a.groups + g) * kTileRows)));
      const __m512 sc16 = _mm512_castps128_ps512(sc);
      if constexpr (KD == Kind::Q4)
        for (int i = 0; i < M; ++i) corr[i] = _mm_fmadd_ps(sc, _mm_set1_ps(8.0f * a.xsum[i * a.groups + g]), corr[i]);
      if (a.offsets) {
        const __m128 off = simd::load4_f16_or_f32(a.offsets, a.offsets_f16, (t * a.groups + g) * kTileRows);
        for (int i = 0; i < M; ++i) otot[i] = _mm_fmadd_ps(off, _mm_set1_ps(a.gsum[i * a.groups + g]), otot[i]);
      }
      const int64_t b0 = g * a.blocks_per_group, b1 = std::min(b0 + a.blocks_per_group, a.blocks);
      for (int64_t b = b0; b < b1; ++b) {
        const uint8_t* blk = tile + b * kTileRows * BB;
        for (int64_t line = 0; line < kTileRows * BB; line += 64)
          _mm_prefetch(reinterpret_cast<const char*>(blk + kPrefetchBytes + line), _MM_HINT_T0);
        const float* xb = a.x + b * kBlockCols;
#pragma GCC unroll 4
        for (int r = 0; r < kTileRows; ++r) {
          const uint8_t* rb = blk + r * BB;
          const __m512 scale = _mm512_permutexvar_ps(_mm512_set1_epi32(r), sc16);
          __m512i v = _mm512_setzero_si512();
          if constexpr (KD == Kind::Q4) v = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rb)));
          for (int h = 0; h < 2; ++h) {
            __m512 w;
            if constexpr (KD == Kind::Q4) w = _mm512_cvtepi32_ps(_mm512_and_si512(v, mask[h]));
            else w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rb + 16 * h))));
            w = _mm512_mul_ps(w, scale);
            for (int i = 0; i < M; ++i) acc[i][r] = _mm512_fmadd_ps(_mm512_loadu_ps(xb + i * xs + 16 * h), w, acc[i][r]);
          }
        }
      }
    }
    __m128 tot[M];
    for (int i = 0; i < M; ++i)
      tot[i] = _mm_sub_ps(simd::hsum4(fold512(acc[i][0]), fold512(acc[i][1]), fold512(acc[i][2]), fold512(acc[i][3])),
                          corr[i]);
    store_tile<M>(a, t, tot, otot);
  }
}

// In place on one padded row of x for the int4 GEMV: column c becomes x[c] * 2^-(4j) (exact) for
// the nibble position j it has in the layout, and xsum[g] collects the group's sum of the original
// x over the columns whose nibbles carry the +8 offset (all but columns 28..31 of each block).
FS_AVX2 void prepare_q4_x(float* x, int64_t k, int64_t blocks_per_group, float* xsum) {
  const __m256 pow0 = _mm256_setr_ps(1, 1, 1, 1, 0x1p-4f, 0x1p-4f, 0x1p-4f, 0x1p-4f);
  const __m256 offset_lanes_last = _mm256_castsi256_ps(_mm256_setr_epi32(-1, -1, -1, -1, 0, 0, 0, 0));
  const int64_t full = k / kBlockCols;
  for (int64_t b = 0; b < full; ++b) {
    float* xb = x + b * kBlockCols;
    __m256 sum = _mm256_setzero_ps();
    __m256 scale = pow0;
    for (int s = 0; s < 4; ++s) {
      const __m256 v = _mm256_loadu_ps(xb + 8 * s);
      sum = _mm256_add_ps(sum, s == 3 ? _mm256_and_ps(v, offset_lanes_last) : v);
      _mm256_storeu_ps(xb + 8 * s, _mm256_mul_ps(v, scale));
      scale = _mm256_mul_ps(scale, _mm256_set1_ps(0x1p-8f));
    }
    xsum[b / blocks_per_group] += simd::hsum(sum);
  }
  for (int64_t c = full * kBlockCols; c < k; ++c) {  // a column-wise group's last partial block
    const int shift = q4_shift(c);
    if (shift != 28) xsum[c / (blocks_per_group * kBlockCols)] += x[c];
    x[c] = std::ldexp(x[c], -shift);
  }
}

template <Kind KD>
void gemv_dispatch_m(const GemvArgs& a, int m, int64_t t0, int64_t t1) {
  switch (m) {
    case 1: return gemv_tiles<KD, 1>(a, t0, t1);
    case 2: return gemv_tiles<KD, 2>(a, t0, t1);
    case 3: return gemv_tiles<KD, 3>(a, t0, t1);
    default: FS_ASSERT(false, "gemv handles 1..3 rows");
  }
}

template <Kind KD>
void gemv_dispatch_m_avx512(const GemvArgs& a, int m, int64_t t0, int64_t t1) {
  switch (m) {
    case 1: return gemv_tiles_avx512<KD, 1>(a, t0, t1);
    case 2: return gemv_tiles_avx512<KD, 2>(a, t0, t1);
    case 3: return gemv_tiles_avx512<KD, 3>(a, t0, t1);
    case 4: return gemv_tiles_avx512<KD, 4>(a, t0, t1);
    case 5: return gemv_tiles_avx512<KD, 5>(a, t0, t1);
    case 6: return gemv_tiles_avx512<KD, 6>(a, t0, t1);
    default: FS_ASSERT(false, "the 512-bit gemv handles 1..6 rows per pass");
  }
}

// Quantized weights take the 512-bit GEMV where the CPU runs it; dense ones stay on AVX2.
void gemv(Kind kind, Isa isa, const GemvArgs& a, int m, int64_t t0, int64_t t1) {
  const bool avx512 = isa == Isa::Avx512Vnni;
  switch (kind) {
    case Kind::Q4: return avx512 ? gemv_dispatch_m_avx512<Kind::Q4>(a, m, t0, t1) : gemv_dispatch_m<Kind::Q4>(a, m, t0, t1);
    case Kind::Q8: return avx512 ? gemv_dispatch_m_avx512<Kind::Q8>(a, m, t0, t1) : gemv_dispatch_m<Kind::Q8>(a, m, t0, t1);
    case Kind::F16: return gemv_dispatch_m<Kind::F16>(a, m, t0, t1);
    case Kind::BF16: return gemv_dispatch_m<Kind::BF16>(a, m, t0, t1);
    case Kind::F32: return gemv_dispatch_m<Kind::F32>(a, m, t0, t1);
  }
}

// ---- GEMM -----------------------------------------------------------------------------------

constexpr int64_t kGemmTiles = 4;     // W rows per dequantized tile: 4 tiles = 16 rows
constexpr int64_t kGemmCols = 256;    // K columns per dequantized tile: 16 x 256 fp32 = 16 KiB (L1)
constexpr int kMicroRows = 3;         // x rows per microkernel call: 3 x 4 accumulators + 3 x + 1 w = 16 ymm

// Dequantizes blocks [b0, b0 + nb) of tile t into wbuf [4 rows][kGemmCols] as exact fp32.
template <Kind KD>
FS_AVX2 void dequant_tile(const PackedWeight& p, int64_t t, int64_t b0, int64_t nb, float* wbuf) {
  constexpr int64_t BB = block_bytes(KD);
  const uint8_t* tile = p.codes.get() + t * p.blocks * kTileRows * BB;
  const uint16_t* scales = reinterpret_cast<const uint16_t*>(p.scales.get());
  const void* offsets = p.offsets.get();  // null when symmetric
  const __m256i mask0 = _mm256_setr_epi32(0xf, 0xf, 0xf, 0xf, 0xf0, 0xf0, 0xf0, 0xf0);
  const __m256i mask[4] = {mask0, _mm256_slli_epi32(mask0, 8), _mm256_slli_epi32(mask0, 16),
                           _mm256_slli_epi32(mask0, 24)};
  // Lane multipliers 2^-(4j) that undo the nibble position, and which lanes carry the +8 offset.
  const __m256 pow0 = _mm256_setr_ps(1, 1, 1, 1, 0x1p-4f, 0x1p-4f, 0x1p-4f, 0x1p-4f);
  const __m256 pow[4] = {pow0, _mm256_mul_ps(pow0, _mm256_set1_ps(0x1p-8f)), _mm256_mul_ps(pow0, _mm256_set1_ps(0x1p-16f)),
                         _mm256_mul_ps(pow0, _mm256_set1_ps(0x1p-24f))};
  const __m256 offset_last = _mm256_setr_ps(-8, -8, -8, -8, 0, 0, 0, 0);
  for (int r = 0; r < kTileRows; ++r) {
    float* out = wbuf + r * kGemmCols;
    int64_t group = -1;
    __m256 sc[4] = {}, off = _mm256_setzero_ps(), off_last = _mm256_setzero_ps(), scale = _mm256_setzero_ps();
    __m256 offset = _mm256_setzero_ps();  // the group's offset (asymmetric), else 0
    for (int64_t b = b0; b < b0 + nb; ++b) {
      const uint8_t* rb = tile + (b * kTileRows + r) * BB;
      if constexpr (KD == Kind::Q4 || KD == Kind::Q8) {
        const int64_t g = std::min(b / p.blocks_per_group, p.groups - 1);
        if (g != group) {
          group = g;
          scale = _mm256_set1_ps(half_to_float(scales[(t * p.groups + g) * kTileRows + r]));
          for (int s = 0; s < 4; ++s) sc[s] = _mm256_mul_ps(scale, pow[s]);
          if (offsets) {
            const int64_t i = (t * p.groups + g) * kTileRows + r;
            offset = _mm256_set1_ps(p.offsets_f16 ? half_to_float(static_cast<const uint16_t*>(offsets)[i])
                                                  : static_cast<const float*>(offsets)[i]);
          }
          // The int4 +8 and the asymmetric offset fold into the FMA's addend (exact when symmetric).
          off = _mm256_fmadd_ps(scale, _mm256_set1_ps(-8.0f), offset);
          off_last = _mm256_fmadd_ps(scale, offset_last, offset);
        }
      }
      __m256i v = _mm256_setzero_si256();
      if constexpr (KD == Kind::Q4) v = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rb)));
      for (int s = 0; s < 4; ++s) {
        __m256 w;
        if constexpr (KD == Kind::Q4) {
          // (n * 2^4j) * (scale * 2^-4j) - 8 * scale = code * scale, exact in one FMA.
          w = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, mask[s])), sc[s], s == 3 ? off_last : off);
        } else if constexpr (KD == Kind::Q8) {
          w = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(rb + 8 * s)))),
                              scale, offset);
        } else if constexpr (KD == Kind::F16) {
          w = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rb + 16 * s)));
        } else if constexpr (KD == Kind::BF16) {
          const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rb + 16 * s)));
          w = _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
        } else {
          w = _mm256_loadu_ps(reinterpret_cast<const float*>(rb) + 8 * s);
        }
        _mm256_store_ps(out + (b - b0) * kBlockCols + 8 * s, w);
      }
    }
  }
}

// One row of x after a microkernel's vector loop: its 4 sums (one per tile row) plus the columns
// [k0, kv) the vectors did not cover, added into y (the first n_valid of the 4).
FS_AVX2 void finish_microkernel_row(__m128 sums, const float* xi, const float* w, int64_t k0, int64_t kv, float* yi,
                                    int64_t n_valid) {
  alignas(16) float s[4];
  _mm_store_ps(s, sums);
  for (int64_t k = k0; k < kv; ++k)
    for (int n = 0; n < kTileRows; ++n) s[n] += xi[k] * w[n * kGemmCols + k];
  for (int64_t n = 0; n < n_valid; ++n) yi[n] += s[n];
}

// y[i, n] += Σ_k x[i, k] w[n, k] for MR rows of x and the 4 rows of a dequantized tile, k < kv.
template <int MR>
FS_AVX2 void microkernel(const float* x, int64_t ldx, const float* w, int64_t kv, float* y, int64_t ldy,
                         int64_t n_valid) {
  __m256 acc[MR][kTileRows];
  for (int i = 0; i < MR; ++i)
    for (int n = 0; n < kTileRows; ++n) acc[i][n] = _mm256_setzero_ps();
  const int64_t k8 = kv / 8 * 8;
  for (int64_t k = 0; k < k8; k += 8) {
    __m256 xv[MR];
    for (int i = 0; i < MR; ++i) xv[i] = _mm256_loadu_ps(x + i * ldx + k);
#pragma GCC unroll 4
    for (int n = 0; n < kTileRows; ++n) {
      const __m256 wv = _mm256_load_ps(w + n * kGemmCols + k);
      for (int i = 0; i < MR; ++i) acc[i][n] = _mm256_fmadd_ps(xv[i], wv, acc[i][n]);
    }
  }
  for (int i = 0; i < MR; ++i)
    finish_microkernel_row(simd::hsum4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]), x + i * ldx, w, k8, kv,
                           y + i * ldy, n_valid);
}

// microkernel with 512-bit vectors: 16 columns per step, and 6 rows of x per call (6 x 4
// accumulators + 6 x + 1 w = 31 of the 32 zmm registers), twice the rows of the AVX2 kernel, so each
// dequantized weight vector feeds 6 FMAs instead of 3.
constexpr int kMicroRows512 = 6;

template <int MR>
FS_AVX512 void microkernel_avx512(const float* x, int64_t ldx, const float* w, int64_t kv, float* y, int64_t ldy,
                                  int64_t n_valid) {
  __m512 acc[MR][kTileRows];
  for (int i = 0; i < MR; ++i)
    for (int n = 0; n < kTileRows; ++n) acc[i][n] = _mm512_setzero_ps();
  const int64_t k16 = kv / 16 * 16;
  for (int64_t k = 0; k < k16; k += 16) {
    __m512 xv[MR];
    for (int i = 0; i < MR; ++i) xv[i] = _mm512_loadu_ps(x + i * ldx + k);
#pragma GCC unroll 4
    for (int n = 0; n < kTileRows; ++n) {
      const __m512 wv = _mm512_load_ps(w + n * kGemmCols + k);
      for (int i = 0; i < MR; ++i) acc[i][n] = _mm512_fmadd_ps(xv[i], wv, acc[i][n]);
    }
  }
  for (int i = 0; i < MR; ++i)
    finish_microkernel_row(simd::hsum4(fold512(acc[i][0]), fold512(acc[i][1]), fold512(acc[i][2]), fold512(acc[i][3])),
                           x + i * ldx, w, k16, kv, y + i * ldy, n_valid);
}

// MR (<= micro_rows) rows of x against one dequantized tile, on the ISA's microkernel.
template <bool kAvx512>
void run_microkernel(int64_t mr, const float* x, int64_t ldx, const float* w, int64_t kv, float* y, int64_t ldy,
                     int64_t n_valid) {
  if constexpr (kAvx512) {
    switch (mr) {
      case 6: return microkernel_avx512<6>(x, ldx, w, kv, y, ldy, n_valid);
      case 5: return microkernel_avx512<5>(x, ldx, w, kv, y, ldy, n_valid);
      case 4: return microkernel_avx512<4>(x, ldx, w, kv, y, ldy, n_valid);
      case 3: return microkernel_avx512<3>(x, ldx, w, kv, y, ldy, n_valid);
      case 2: return microkernel_avx512<2>(x, ldx, w, kv, y, ldy, n_valid);
      default: return microkernel_avx512<1>(x, ldx, w, kv, y, ldy, n_valid);
    }
  } else {
    if (mr == 3) return microkernel<3>(x, ldx, w, kv, y, ldy, n_valid);
    if (mr == 2) return microkernel<2>(x, ldx, w, kv, y, ldy, n_valid);
    return microkernel<1>(x, ldx, w, kv, y, ldy, n_valid);
  }
}

template <Kind KD, bool kAvx512>
FS_AVX2 void gemm_tiles(const PackedWeight& p, const float* x, int64_t m, const float* bias, float* y, int64_t t0,
                        int64_t t1) {
  constexpr int64_t micro_rows = kAvx512 ? kMicroRows512 : kMicroRows;
  const int64_t N = p.shape.rows, K = p.shape.cols;
  thread_local std::vector<float> storage;
  storage.resize(kGemmTiles * kTileRows * kGemmCols + 16);
  // 64-byte align the tile buffer inside the vector.
  float* wbuf = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(storage.data()) + 63) & ~uintptr_t{63});
  for (int64_t tb = t0; tb < t1; tb += kGemmTiles) {
    const int64_t nt = std::min(kGemmTiles, t1 - tb);
    const int64_t n0 = tb * kTileRows, n1 = std::min(N, (tb + nt) * kTileRows);
    for (int64_t i = 0; i < m; ++i)
      for (int64_t n = n0; n < n1; ++n) y[i * N + n] = bias ? bias[n] : 0.0f;
    for (int64_t b0 = 0; b0 < p.blocks; b0 += kGemmCols / kBlockCols) {
      const int64_t nb = std::min(kGemmCols / kBlockCols, p.blocks - b0);
      for (int64_t q = 0; q < nt; ++q) dequant_tile<KD>(p, tb + q, b0, nb, wbuf + q * kTileRows * kGemmCols);
      const int64_t k0 = b0 * kBlockCols, kv = std::min(nb * kBlockCols, K - k0);
      for (int64_t i0 = 0; i0 < m; i0 += micro_rows) {
        const int64_t mr = std::min<int64_t>(micro_rows, m - i0);
        for (int64_t q = 0; q < nt; ++q) {
          const int64_t row0 = (tb + q) * kTileRows;
          if (row0 >= N) break;
          const float* xq = x + i0 * K + k0;
          const float* wq = wbuf + q * kTileRows * kGemmCols;
          float* yq = y + i0 * N + row0;
          const int64_t valid = std::min(kTileRows, N - row0);
          run_microkernel<kAvx512>(mr, xq, K, wq, kv, yq, N, valid);
        }
      }
    }
  }
}

template <bool kAvx512>
void gemm_isa(Kind kind, const PackedWeight& p, const float* x, int64_t m, const float* bias, float* y, int64_t t0,
              int64_t t1) {
  switch (kind) {
    case Kind::Q4: return gemm_tiles<Kind::Q4, kAvx512>(p, x, m, bias, y, t0, t1);
    case Kind::Q8: return gemm_tiles<Kind::Q8, kAvx512>(p, x, m, bias, y, t0, t1);
    case Kind::F16: return gemm_tiles<Kind::F16, kAvx512>(p, x, m, bias, y, t0, t1);
    case Kind::BF16: return gemm_tiles<Kind::BF16, kAvx512>(p, x, m, bias, y, t0, t1);
    case Kind::F32: return gemm_tiles<Kind::F32, kAvx512>(p, x, m, bias, y, t0, t1);
  }
}

// Every weight kind: the tile is dequantized with AVX2 either way; AVX-512 runs the FMA microkernel.
void gemm(Kind kind, Isa isa, const PackedWeight& p, const float* x, int64_t m, const float* bias, float* y,
          int64_t t0, int64_t t1) {
  if (isa == Isa::Avx512Vnni) return gemm_isa<true>(kind, p, x, m, bias, y, t0, t1);
  gemm_isa<false>(kind, p, x, m, bias, y, t0, t1);
}

}  // namespace

void group_sums(const float* x, int64_t m, int64_t k, int64_t groups, std::vector<float>& out) {
  const int64_t group = k / groups;
  out.assign(static_cast<size_t>(m * groups), 0.0f);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t g = 0; g < groups; ++g) {
      float s = 0.0f;
      for (int64_t c = g * group; c < (g + 1) * group; ++c) s += x[i * k + c];
      out[static_cast<size_t>(i * groups + g)] = s;
    }
}

PackedWeight pack_weight(const WeightMatrix& w) {
  validate_weight(w, "linear weight");
  const Kind kind = kind_of(w);
  PackedWeight p;
  p.shape = w;
  p.tiles = (w.rows + kTileRows - 1) / kTileRows;
  p.blocks = (w.cols + kBlockCols - 1) / kBlockCols;
  const int64_t bb = block_bytes(kind);
  p.code_bytes = p.tiles * p.blocks * kTileRows * bb;
  p.codes = aligned_zeros(static_cast<size_t>(p.code_bytes));
  if (w.quantized()) {
    p.groups = w.groups_per_row();
    p.blocks_per_group = p.groups == 1 ? p.blocks : w.group / kBlockCols;
    p.scale_bytes = p.tiles * p.groups * kTileRows * 2;
    p.scales = aligned_zeros(static_cast<size_t>(p.scale_bytes));
    if (w.offsets) {
      const int64_t n = w.rows * p.groups;
      p.offsets_f16 = std::all_of(w.offsets, w.offsets + n, [](float o) { return half_to_float(float_to_half(o)) == o; });
      p.offset_bytes = p.tiles * p.groups * kTileRows * (p.offsets_f16 ? 2 : 4);
      p.offsets = aligned_zeros(static_cast<size_t>(p.offset_bytes));
    }
  } else {
    p.groups = 1;
    p.blocks_per_group = p.blocks;
  }
  const int64_t cols_padded = p.blocks * kBlockCols;
  const size_t esize = dtype_size(w.dtype);
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < w.rows; ++r) {
    const int64_t t = r / kTileRows, rr = r % kTileRows;
    for (int64_t c = 0; c < cols_padded; ++c) {
      const int64_t b = c / kBlockCols, in_block = c % kBlockCols;
      uint8_t* dst = p.codes.get() + ((t * p.blocks + b) * kTileRows + rr) * bb;
      if (kind == Kind::Q4) {
        const int8_t code = c < w.cols ? source_code(w, r, c) : 0;
        const int shift = q4_shift(c);
        const uint32_t nibble = shift == 28 ? static_cast<uint32_t>(code) & 0xfu : static_cast<uint32_t>(code + 8);
        const int64_t word = in_block % 4;  // columns 8*(j/2) + 4*(j%2) + i live in word i
        uint32_t bits;
        std::memcpy(&bits, dst + 4 * word, 4);
        bits |= nibble << shift;
        std::memcpy(dst + 4 * word, &bits, 4);
      } else if (kind == Kind::Q8) {
        if (c < w.cols) dst[in_block] = static_cast<uint8_t>(source_code(w, r, c));
      } else if (c < w.cols) {
        std::memcpy(dst + in_block * static_cast<int64_t>(esize),
                    static_cast<const uint8_t*>(w.data) + (r * w.cols + c) * static_cast<int64_t>(esize), esize);
      }
    }
    if (w.quantized()) {
      auto* sc = reinterpret_cast<uint16_t*>(p.scales.get());
      for (int64_t g = 0; g < p.groups; ++g) sc[(t * p.groups + g) * kTileRows + rr] = w.scales[r * p.groups + g];
      for (int64_t g = 0; w.offsets && g < p.groups; ++g) {
        const int64_t i = (t * p.groups + g) * kTileRows + rr;
        const float o = w.offsets[r * p.groups + g];
        if (p.offsets_f16) reinterpret_cast<uint16_t*>(p.offsets.get())[i] = float_to_half(o);
        else reinterpret_cast<float*>(p.offsets.get())[i] = o;
      }
    }
  }
  p.shape.data = p.codes.get();
  p.shape.scales = w.quantized() ? reinterpret_cast<const uint16_t*>(p.scales.get()) : nullptr;
  // Marks the uploaded matrix asymmetric; the kernels read p.offsets (fp16 or fp32) instead.
  p.shape.offsets = w.offsets ? reinterpret_cast<const float*>(p.offsets.get()) : nullptr;
  return p;
}

void linear(const PackedWeight& p, const float* x, int64_t m, const void* bias, DType bias_dtype, float* y,
            Isa isa, int threads) {
  FS_ASSERT(has_avx2(), "fast linear needs AVX2");
  FS_ASSERT(isa != Isa::Reference && isa_supported(isa), "fast linear: this CPU does not run the requested path");
  if (m <= 0) return;
  const Kind kind = kind_of(p.shape);
  const int64_t N = p.shape.rows, K = p.shape.cols, kp = p.blocks * kBlockCols;
  if (threads <= 0) threads = omp_get_max_threads();
  // Below ~64K multiply-adds a thread team costs more than it saves.
  const bool parallel = threads > 1 && m * N * K >= (int64_t{1} << 16);

  // Row tiles are handed out in chunks, dynamically: on a shared machine a thread that loses its
  // core for a while no longer holds up the whole call. ~16 chunks per thread keep each one a long
  // sequential stream (and a multiple of the GEMM's 4-tile blocks).
  const int64_t chunk = std::max<int64_t>(kGemmTiles, (p.tiles / (16 * threads) + kGemmTiles - 1) / kGemmTiles * kGemmTiles);
  const int64_t chunks = (p.tiles + chunk - 1) / chunk;

  thread_local std::vector<float> bias_f32;
  const float* bias_ptr = nullptr;
  if (bias) {
    bias_f32.assign(static_cast<size_t>(p.tiles * kTileRows), 0.0f);
    to_f32(bias, bias_dtype, N, bias_f32.data());
    bias_ptr = bias_f32.data();
  }

  // The GEMV streams the weights once per pass of rows (up to 3 on AVX2, up to kGemvRows512 on
  // AVX-512 for quantized weights; a chunk's later passes re-read its weights from L2): fewer
  // instructions per multiply-add than dequantizing tiles for the GEMM, up to kGemvMaxRows512 rows
  // on AVX-512 and kGemvMaxRowsAvx2 on AVX2 (quantized weights; dense ones take one pass of <= 3).
  const bool gemv512 = isa == Isa::Avx512Vnni && p.shape.quantized();
  const int64_t pass_max = gemv512 ? kGemvRows512 : 3;
  if (m <= (gemv512 ? kGemvMaxRows512 : p.shape.quantized() ? kGemvMaxRowsAvx2 : 3)) {
    // x padded to whole blocks; for int4 each column scaled by 2^-(4j) of its nibble position, and
    // the sum of x over each group's +8-offset columns (all but the two's complement nibble 7).
    thread_local std::vector<float> xs, xsum, gsum;
    xs.assign(static_cast<size_t>(m * kp), 0.0f);
    for (int64_t i = 0; i < m; ++i) std::memcpy(xs.data() + i * kp, x + i * K, static_cast<size_t>(K) * 4);
    if (kind == Kind::Q4) {
      xsum.assign(static_cast<size_t>(m * p.groups), 0.0f);
      for (int64_t i = 0; i < m; ++i) prepare_q4_x(xs.data() + i * kp, K, p.blocks_per_group, xsum.data() + i * p.groups);
    }
    if (p.asymmetric()) group_sums(x, m, K, p.groups, gsum);
    GemvArgs a;
    a.codes = p.codes.get();
    a.scales = reinterpret_cast<const uint16_t*>(p.scales.get());
    a.blocks = p.blocks;
    a.groups = p.groups;
    a.blocks_per_group = p.blocks_per_group;
    a.x = xs.data();
    a.xsum = xsum.data();
    if (p.asymmetric()) {
      a.offsets = p.offsets.get();
      a.offsets_f16 = p.offsets_f16;
      a.gsum = gsum.data();
    }
    a.bias = bias_ptr;
    a.y = y;
    a.rows = N;
    // Balanced passes: 8 rows go as 4 + 4, not 6 + 2.
    const int64_t passes = (m + pass_max - 1) / pass_max;
    const int64_t pass_rows = (m + passes - 1) / passes;
#pragma omp parallel for num_threads(threads) if (parallel) schedule(dynamic, 1)
    for (int64_t c = 0; c < chunks; ++c) {
      for (int64_t i0 = 0; i0 < m; i0 += pass_rows) {
        GemvArgs pass = a;
        pass.x += i0 * kp;
        if (kind == Kind::Q4) pass.xsum += i0 * p.groups;
        if (p.asymmetric()) pass.gsum += i0 * p.groups;
        pass.y += i0 * N;
        gemv(kind, isa, pass, static_cast<int>(std::min(pass_rows, m - i0)), c * chunk, std::min(p.tiles, (c + 1) * chunk));
      }
    }
    return;
  }
#pragma omp parallel for num_threads(threads) if (parallel) schedule(dynamic, 1)
  for (int64_t c = 0; c < chunks; ++c) gemm(kind, isa, p, x, m, bias_ptr, y, c * chunk, std::min(p.tiles, (c + 1) * chunk));
}

}  // namespace fineserve::cpu
