// Integer linear path with int8 activations (see gemm_a8.h), on gemm.cpp's packed weight layout:
// tiles of 4 rows, blocks of 32 columns, a tile's blocks back to back (int4: 16 bytes per row and
// block, int8: 32).
//
// The weights are read as unsigned bytes and the activations as signed ones, the operand types of
// vpdpbusd / vpmaddubsw:
//  - int4: every nibble becomes code + 8 (0..15). gemm.cpp stores nibble 7 of each 32-bit word
//    (columns 28..31 of a block) in two's complement; XOR with 8 turns it into code + 8 as well
//    (for 4-bit values, code + 8 ≡ code ^ 8 mod 16). A byte's low nibble holds column 8p + i and its
//    high nibble column 8p + 4 + i, for byte 4i + p of the row's 16: the activations are stored in
//    that order (16 low-nibble columns, then 16 high-nibble columns), since a dot product does not
//    care about the order, only that both sides agree. Σ (code + 8) · x = Σ code · x + 8 Σ x: the
//    second term is removed in integers with the block's code sum.
//  - int8 on AVX-512: code + 128 (code XOR 0x80, 0..255, so code -128 is exact); Σ x · 128 removed
//    the same way. On AVX2, vpmaddubsw's int16 pair sums would overflow with 255 · 127 · 2, so
//    |code| (0..128) meets x with code's sign moved onto it (x never is -128: act_quant.h).
// Every integer sum is exact; per block it is converted once and multiplied by the activation
// scale, per group by the weight scale (fp32). An asymmetric matrix's offsets add
// Σ_group offset · gx, gx being the group's sum of the quantized activations (Σ_blocks scale_x ·
// code sum, known from quantization): one 4-row FMA per group and tile, when the tile's results
// are stored.
#include "kernels/cpu/gemm_a8.h"

// GCC 12's AVX-512 intrinsics headers start some wrappers (_mm512_broadcast_i32x4,
// _mm512_cvtepi32_ps, ...) from a deliberately undefined vector, which -Wuninitialized and
// -Wmaybe-uninitialized report inside the header once inlined at -O3 (GCC PR 105593).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "kernels/base.h"
#include "kernels/cpu/act_quant.h"
#include "kernels/cpu/convert.h"
#include "kernels/cpu/simd.h"
#include "kernels/cpu/validate.h"
#include "kernels/half.h"

namespace fineserve::cpu {
namespace {

constexpr int64_t kTileRows = 4;
constexpr int64_t kBlockCols = 32;
constexpr int64_t kPrefetchBytes = 2048;  // as gemm.cpp's GEMV: a few KiB ahead of the stream

// Column of a block stored at activation position j (0..31) for the int4 layout.
constexpr int64_t q4_column(int64_t j) {
  const int64_t b = j % 16;
  return 8 * (b % 4) + (j >= 16 ? 4 : 0) + b / 4;
}

// Activations of one call, quantized: [m][blocks * 32] codes in the weight layout's order, and
// per (token, block) the scale and the sum of the codes.
struct QuantizedActs {
  std::vector<int8_t> codes;
  std::vector<float> scale;
  std::vector<int32_t> sum;
};

// quantize_act_block for a full block of 32 with AVX2: the same operations in the same order (max
// of |x|, one division, one multiply per element, round to nearest even), so the same codes.
FS_AVX2 int32_t quantize_block_avx2(const float* x, int8_t* q, float* scale) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 v[4];
  __m256 amax = _mm256_setzero_ps();
  for (int s = 0; s < 4; ++s) {
    v[s] = _mm256_loadu_ps(x + 8 * s);
    amax = _mm256_max_ps(amax, _mm256_and_ps(v[s], abs_mask));
  }
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
  const float a = _mm_cvtss_f32(m4);
  const float inv = a > 0.0f ? 127.0f / a : 0.0f;
  *scale = a / 127.0f;
  const __m256 vinv = _mm256_set1_ps(inv);
  __m256i c[4];
  for (int s = 0; s < 4; ++s) c[s] = _mm256_cvtps_epi32(_mm256_mul_ps(v[s], vinv));  // MXCSR default: nearest even
  // int32 -> int8 (no saturation happens: |code| <= 127); packs work per 128-bit lane, the permute
  // puts the 32 codes back in order.
  const __m256i w16 = _mm256_packs_epi32(c[0], c[1]), w16b = _mm256_packs_epi32(c[2], c[3]);
  const __m256i b8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(w16, w16b), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), b8);
  const __m256i s32 = _mm256_add_epi32(_mm256_add_epi32(c[0], c[1]), _mm256_add_epi32(c[2], c[3]));
  __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s32), _mm256_extracti128_si256(s32, 1));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, _MM_SHUFFLE(1, 0, 3, 2)));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(s4);
}

// fast: the AVX2 block quantizer for full blocks (the CPU must have AVX2).
void quantize_acts(const float* x, int64_t m, int64_t k, int64_t blocks, bool q4_order, bool fast, int threads,
                   QuantizedActs& q) {
  const int64_t kp = blocks * kBlockCols;
  q.codes.resize(static_cast<size_t>(m * kp));
  q.scale.resize(static_cast<size_t>(m * blocks));
  q.sum.resize(static_cast<size_t>(m * blocks));
  // Prefill quantizes thousands of rows: spread them over the threads.
#pragma omp parallel for num_threads(threads) if (threads > 1 && m >= 16) schedule(static)
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t c0 = b * kBlockCols, n = std::min(kBlockCols, k - c0);
      alignas(32) int8_t natural[kBlockCols] = {};
      const size_t ib = static_cast<size_t>(i * blocks + b);
      q.sum[ib] = fast && n == kBlockCols ? quantize_block_avx2(x + i * k + c0, natural, &q.scale[ib])
                                          : quantize_act_block(x + i * k + c0, n, natural, &q.scale[ib]);
      int8_t* dst = q.codes.data() + i * kp + c0;
      if (q4_order) {
        for (int64_t j = 0; j < kBlockCols; ++j) dst[j] = natural[q4_column(j)];
      } else {
        std::memcpy(dst, natural, kBlockCols);
      }
    }
  }
}

// gx[i][g] = Σ over group g's blocks of scale · code sum: the group's sum of the quantized x.
void group_act_sums(const QuantizedActs& q, int64_t m, int64_t blocks, int64_t groups, int64_t blocks_per_group,
                    std::vector<float>& gx) {
  gx.assign(static_cast<size_t>(m * groups), 0.0f);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t b = 0; b < blocks; ++b) {
      const size_t ib = static_cast<size_t>(i * blocks + b);
      gx[static_cast<size_t>(i * groups + std::min(b / blocks_per_group, groups - 1))] +=
          q.scale[ib] * static_cast<float>(q.sum[ib]);
    }
}

struct A8Args {
  const uint8_t* codes = nullptr;    // packed weight codes
  const uint16_t* scales = nullptr;  // fp16 [tiles][groups][4]
  int64_t blocks = 0, groups = 1, blocks_per_group = 0;
  const int8_t* xq = nullptr;        // [m][blocks * 32]
  const float* xs = nullptr;         // [m][blocks]
  const int32_t* xsum = nullptr;     // [m][blocks]
  const float* bias = nullptr;       // [tiles * 4] or null
  const void* offsets = nullptr;     // [tiles][groups][4] (asymmetric only) or null
  bool offsets_f16 = false;          // offsets are fp16, else fp32 (PackedWeight)
  const float* gx = nullptr;         // [m][groups]: with offsets, Σ_blocks of the group xs · xsum
  float* y = nullptr;                // [m][rows]
  int64_t rows = 0;
};

// Σ_g offsets[t][g][0..3] · gx[i][g]: the asymmetric part of a tile's 4 results for token i.
FS_AVX2 void add_offset_term(const A8Args& a, int64_t t, int64_t i, float* out4) {
  __m128 acc = _mm_loadu_ps(out4);
  const float* gx = a.gx + i * a.groups;
  for (int64_t g = 0; g < a.groups; ++g)
    acc = _mm_fmadd_ps(simd::load4_f16_or_f32(a.offsets, a.offsets_f16, (t * a.groups + g) * kTileRows), _mm_set1_ps(gx[g]), acc);
  _mm_storeu_ps(out4, acc);
}

// Writes a tile's 4 row results of token i (offsets and bias added, rows past N dropped).
inline void store_tile(const A8Args& a, int64_t t, int64_t i, float* out4) {
  if (a.offsets) add_offset_term(a, t, i, out4);
  const int64_t row0 = t * kTileRows;
  float* yi = a.y + i * a.rows + row0;
  for (int64_t r = 0; r < std::min(kTileRows, a.rows - row0); ++r) yi[r] = out4[r] + (a.bias ? a.bias[row0 + r] : 0.0f);
}

// ---- AVX-512 VNNI ---------------------------------------------------------------------------

// Tile t, tokens [i0, i0 + MR). One 512-bit load is a whole int4 tile-block (4 rows x 16 bytes):
// lane l of the int32 accumulators belongs to row l / 4.
template <int MR>
FS_AVX512 void q4_avx512(const A8Args& a, int64_t t, int64_t i0) {
  const uint8_t* tile = a.codes + t * a.blocks * kTileRows * 16;
  const int64_t kp = a.blocks * kBlockCols;
  const __m512i nibble = _mm512_set1_epi8(0x0f);
  const __m512i flip = _mm512_set1_epi32(static_cast<int>(0x80000000u));  // nibble 7 of each word
  const __m512i lane_row = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  __m512 tot[MR];
  for (int i = 0; i < MR; ++i) tot[i] = _mm512_setzero_ps();
  for (int64_t g = 0; g < a.groups; ++g) {
    __m512 accf[MR];
    for (int i = 0; i < MR; ++i) accf[i] = _mm512_setzero_ps();
    const int64_t b0 = g * a.blocks_per_group, b1 = std::min(b0 + a.blocks_per_group, a.blocks);
    for (int64_t b = b0; b < b1; ++b) {
      const uint8_t* blk = tile + b * kTileRows * 16;
      _mm_prefetch(reinterpret_cast<const char*>(blk + kPrefetchBytes), _MM_HINT_T0);
      const __m512i v = _mm512_xor_si512(_mm512_loadu_si512(blk), flip);
      const __m512i lo = _mm512_and_si512(v, nibble);
      const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) {
        const int64_t ti = (i0 + i) * a.blocks + b;
        const int8_t* xb = a.xq + (i0 + i) * kp + b * kBlockCols;
        // Each row's 32 products land in its 4 lanes: 8 Σ x per row is 2 Σ x per lane.
        __m512i acc = _mm512_set1_epi32(-2 * a.xsum[ti]);
        acc = _mm512_dpbusd_epi32(acc, lo, _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xb))));
        acc = _mm512_dpbusd_epi32(acc, hi, _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xb + 16))));
        accf[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), _mm512_set1_ps(a.xs[ti]), accf[i]);
      }
    }
    const __m128 sw4 = _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(a.scales + (t * a.groups + g) * kTileRows)));
    const __m512 sw = _mm512_permutexvar_ps(lane_row, _mm512_castps128_ps512(sw4));
    for (int i = 0; i < MR; ++i) tot[i] = _mm512_fmadd_ps(accf[i], sw, tot[i]);
  }
  for (int i = 0; i < MR; ++i) {
    const __m128 r01 = _mm_hadd_ps(_mm512_castps512_ps128(tot[i]), _mm512_extractf32x4_ps(tot[i], 1));
    const __m128 r23 = _mm_hadd_ps(_mm512_extractf32x4_ps(tot[i], 2), _mm512_extractf32x4_ps(tot[i], 3));
    alignas(16) float out[4];
    _mm_store_ps(out, _mm_hadd_ps(r01, r23));
    store_tile(a, t, i0 + i, out);
  }
}

// int8: a tile-block is two 512-bit loads (rows 0-1, rows 2-3), lane l of each belonging to row
// l / 8 of its pair.
template <int MR>
FS_AVX512 void q8_avx512(const A8Args& a, int64_t t, int64_t i0) {
  const uint8_t* tile = a.codes + t * a.blocks * kTileRows * 32;
  const int64_t kp = a.blocks * kBlockCols;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const __m512i rows01 = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  const __m512i rows23 = _mm512_add_epi32(rows01, _mm512_set1_epi32(2));
  __m512 tot[MR][2];
  for (int i = 0; i < MR; ++i) tot[i][0] = tot[i][1] = _mm512_setzero_ps();
  for (int64_t g = 0; g < a.groups; ++g) {
    __m512 accf[MR][2];
    for (int i = 0; i < MR; ++i) accf[i][0] = accf[i][1] = _mm512_setzero_ps();
    const int64_t b0 = g * a.blocks_per_group, b1 = std::min(b0 + a.blocks_per_group, a.blocks);
    for (int64_t b = b0; b < b1; ++b) {
      const uint8_t* blk = tile + b * kTileRows * 32;
      _mm_prefetch(reinterpret_cast<const char*>(blk + kPrefetchBytes), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(blk + kPrefetchBytes + 64), _MM_HINT_T0);
      const __m512i u0 = _mm512_xor_si512(_mm512_loadu_si512(blk), flip);
      const __m512i u1 = _mm512_xor_si512(_mm512_loadu_si512(blk + 64), flip);
#pragma GCC unroll 4
      for (int i = 0; i < MR; ++i) {
        const int64_t ti = (i0 + i) * a.blocks + b;
        const __m512i xv = _mm512_broadcast_i64x4(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.xq + (i0 + i) * kp + b * kBlockCols)));
        // 128 Σ x per row over 8 lanes: 16 Σ x per lane.
        const __m512i corr = _mm512_set1_epi32(-16 * a.xsum[ti]);
        const __m512 s = _mm512_set1_ps(a.xs[ti]);
        accf[i][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(corr, u0, xv)), s, accf[i][0]);
        accf[i][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(corr, u1, xv)), s, accf[i][1]);
      }
    }
    const __m512 sw4 = _mm512_castps128_ps512(
        _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(a.scales + (t * a.groups + g) * kTileRows))));
    const __m512 sw01 = _mm512_permutexvar_ps(rows01, sw4), sw23 = _mm512_permutexvar_ps(rows23, sw4);
    for (int i = 0; i < MR; ++i) {
      tot[i][0] = _mm512_fmadd_ps(accf[i][0], sw01, tot[i][0]);
      tot[i][1] = _mm512_fmadd_ps(accf[i][1], sw23, tot[i][1]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    alignas(16) float out[4];
    _mm_store_ps(out, simd::hsum4(_mm512_castps512_ps256(tot[i][0]), _mm512_extractf32x8_ps(tot[i][0], 1),
                                  _mm512_castps512_ps256(tot[i][1]), _mm512_extractf32x8_ps(tot[i][1], 1)));
    store_tile(a, t, i0 + i, out);
  }
}

// ---- AVX2 -----------------------------------------------------------------------------------

// int4: two 256-bit loads per tile-block (rows 0-1, rows 2-3); vpmaddubsw + vpmaddwd make 4 int32
// lanes per row, and one vphaddd folds the two registers into [r0 r0 r2 r2 | r1 r1 r3 r3].
template <int MR>
FS_AVX2 void q4_avx2(const A8Args& a, int64_t t, int64_t i0) {
  const uint8_t* tile = a.codes + t * a.blocks * kTileRows * 16;
  const int64_t kp = a.blocks * kBlockCols;
  const __m256i nibble = _mm256_set1_epi8(0x0f);
  const __m256i flip = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i lane_row = _mm256_setr_epi32(0, 0, 2, 2, 1, 1, 3, 3);
  __m256 tot[MR];
  for (int i = 0; i < MR; ++i) tot[i] = _mm256_setzero_ps();
  for (int64_t g = 0; g < a.groups; ++g) {
    __m256 accf[MR];
    for (int i = 0; i < MR; ++i) accf[i] = _mm256_setzero_ps();
    const int64_t b0 = g * a.blocks_per_group, b1 = std::min(b0 + a.blocks_per_group, a.blocks);
    for (int64_t b = b0; b < b1; ++b) {
      const uint8_t* blk = tile + b * kTileRows * 16;
      _mm_prefetch(reinterpret_cast<const char*>(blk + kPrefetchBytes), _MM_HINT_T0);
      const __m256i v0 = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk)), flip);
      const __m256i v1 = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 32)), flip);
      const __m256i lo0 = _mm256_and_si256(v0, nibble), hi0 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), nibble);
      const __m256i lo1 = _mm256_and_si256(v1, nibble), hi1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), nibble);
#pragma GCC unroll 4
      for (int i = 0; i < MR; ++i) {
        const int64_t ti = (i0 + i) * a.blocks + b;
        const int8_t* xb = a.xq + (i0 + i) * kp + b * kBlockCols;
        const __m256i xl = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xb)));
        const __m256i xh = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xb + 16)));
        // Pair sums are at most 2 · 15 · 127 per vpmaddubsw, 4 · 15 · 127 after the add: no int16 overflow.
        const __m256i s0 = _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo0, xl), _mm256_maddubs_epi16(hi0, xh)), ones);
        const __m256i s1 = _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo1, xl), _mm256_maddubs_epi16(hi1, xh)), ones);
        // Each lane now holds half a row: 8 Σ x per row is 4 Σ x per lane.
        const __m256i h = _mm256_sub_epi32(_mm256_hadd_epi32(s0, s1), _mm256_set1_epi32(4 * a.xsum[ti]));
        accf[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(h), _mm256_set1_ps(a.xs[ti]), accf[i]);
      }
    }
    const __m128 sw4 = _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(a.scales + (t * a.groups + g) * kTileRows)));
    const __m256 sw = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(sw4), lane_row);
    for (int i = 0; i < MR; ++i) tot[i] = _mm256_fmadd_ps(accf[i], sw, tot[i]);
  }
  for (int i = 0; i < MR; ++i) {
    // [r0 r0 r2 r2] + [r1 r1 r3 r3] pairwise -> [r0 r2 r1 r3] -> [r0 r1 r2 r3].
    const __m128 h = _mm_hadd_ps(_mm256_castps256_ps128(tot[i]), _mm256_extractf128_ps(tot[i], 1));
    alignas(16) float out[4];
    _mm_store_ps(out, _mm_shuffle_ps(h, h, _MM_SHUFFLE(3, 1, 2, 0)));
    store_tile(a, t, i0 + i, out);
  }
}

// int8: one 256-bit load per row and block; |code| · (x with code's sign) through vpmaddubsw (pair
// sums at most 2 · 128 · 127, no overflow), two vphaddd levels give [r0 r1 r2 r3 | r0 r1 r2 r3].
template <int MR>
FS_AVX2 void q8_avx2(const A8Args& a, int64_t t, int64_t i0) {
  const uint8_t* tile = a.codes + t * a.blocks * kTileRows * 32;
  const int64_t kp = a.blocks * kBlockCols;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 tot[MR];
  for (int i = 0; i < MR; ++i) tot[i] = _mm256_setzero_ps();
  for (int64_t g = 0; g < a.groups; ++g) {
    __m256 accf[MR];
    for (int i = 0; i < MR; ++i) accf[i] = _mm256_setzero_ps();
    const int64_t b0 = g * a.blocks_per_group, b1 = std::min(b0 + a.blocks_per_group, a.blocks);
    for (int64_t b = b0; b < b1; ++b) {
      const uint8_t* blk = tile + b * kTileRows * 32;
      _mm_prefetch(reinterpret_cast<const char*>(blk + kPrefetchBytes), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(blk + kPrefetchBytes + 64), _MM_HINT_T0);
      __m256i w[kTileRows], aw[kTileRows];
      for (int r = 0; r < kTileRows; ++r) {
        w[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 32 * r));
        aw[r] = _mm256_abs_epi8(w[r]);  // -128 becomes 0x80: 128 read as unsigned
      }
#pragma GCC unroll 4
      for (int i = 0; i < MR; ++i) {
        const int64_t ti = (i0 + i) * a.blocks + b;
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.xq + (i0 + i) * kp + b * kBlockCols));
        __m256i s[kTileRows];
        for (int r = 0; r < kTileRows; ++r)
          s[r] = _mm256_madd_epi16(_mm256_maddubs_epi16(aw[r], _mm256_sign_epi8(xv, w[r])), ones);
        const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(s[0], s[1]), _mm256_hadd_epi32(s[2], s[3]));
        accf[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(h), _mm256_set1_ps(a.xs[ti]), accf[i]);
      }
    }
    const __m128 sw4 = _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(a.scales + (t * a.groups + g) * kTileRows)));
    const __m256 sw = _mm256_set_m128(sw4, sw4);
    for (int i = 0; i < MR; ++i) tot[i] = _mm256_fmadd_ps(accf[i], sw, tot[i]);
  }
  for (int i = 0; i < MR; ++i) {
    alignas(16) float out[4];
    _mm_store_ps(out, _mm_add_ps(_mm256_castps256_ps128(tot[i]), _mm256_extractf128_ps(tot[i], 1)));
    store_tile(a, t, i0 + i, out);
  }
}

// ---- dispatch -------------------------------------------------------------------------------

using TileKernel = void (*)(const A8Args&, int64_t, int64_t);

// The kernel for `mr` tokens of a pass.
template <bool Q4, bool Avx512>
TileKernel kernel_for(int mr) {
  if constexpr (Avx512 && Q4) {
    switch (mr) {
      case 1: return q4_avx512<1>;
      case 2: return q4_avx512<2>;
      case 3: return q4_avx512<3>;
      case 4: return q4_avx512<4>;
      case 5: return q4_avx512<5>;
      case 6: return q4_avx512<6>;
      case 7: return q4_avx512<7>;
      default: return q4_avx512<8>;
    }
  } else if constexpr (Avx512) {
    switch (mr) {
      case 1: return q8_avx512<1>;
      case 2: return q8_avx512<2>;
      case 3: return q8_avx512<3>;
      default: return q8_avx512<4>;
    }
  } else if constexpr (Q4) {
    switch (mr) {
      case 1: return q4_avx2<1>;
      case 2: return q4_avx2<2>;
      case 3: return q4_avx2<3>;
      default: return q4_avx2<4>;
    }
  } else {
    switch (mr) {
      case 1: return q8_avx2<1>;
      case 2: return q8_avx2<2>;
      case 3: return q8_avx2<3>;
      default: return q8_avx2<4>;
    }
  }
}

// Largest register block (tokens per pass over a tile) of each kernel.
constexpr int max_block(bool q4, bool avx512) { return avx512 && q4 ? 8 : 4; }

}  // namespace

void linear_int8_act(const PackedWeight& p, const float* x, int64_t m, const void* bias, DType bias_dtype, float* y,
                     Isa isa, int threads) {
  FS_ASSERT(p.shape.quantized(), "linear_int8_act needs int4 / int8 codes");
  FS_ASSERT(isa != Isa::Reference && isa_supported(isa), "linear_int8_act: the CPU lacks this ISA");
  if (m <= 0) return;
  const bool q4 = p.shape.bits == 4, avx512 = isa == Isa::Avx512Vnni;
  const int64_t K = p.shape.cols, N = p.shape.rows;
  if (threads <= 0) threads = omp_get_max_threads();
  thread_local QuantizedActs q;
  quantize_acts(x, m, K, p.blocks, q4, true, threads, q);

  A8Args a;
  a.codes = p.codes.get();
  a.scales = reinterpret_cast<const uint16_t*>(p.scales.get());
  a.blocks = p.blocks;
  a.groups = p.groups;
  a.blocks_per_group = p.blocks_per_group;
  a.xq = q.codes.data();
  a.xs = q.scale.data();
  a.xsum = q.sum.data();
  thread_local std::vector<float> gx;
  if (p.asymmetric()) {
    group_act_sums(q, m, p.blocks, p.groups, p.blocks_per_group, gx);
    a.offsets = p.offsets.get();
    a.offsets_f16 = p.offsets_f16;
    a.gx = gx.data();
  }
  thread_local std::vector<float> bias_f32;
  if (bias) {
    bias_f32.resize(static_cast<size_t>(N));
    to_f32(bias, bias_dtype, N, bias_f32.data());
    a.bias = bias_f32.data();
  }
  a.y = y;
  a.rows = N;

  const int mb = max_block(q4, avx512);
  const TileKernel full = q4 ? (avx512 ? kernel_for<true, true>(mb) : kernel_for<true, false>(mb))
                             : (avx512 ? kernel_for<false, true>(mb) : kernel_for<false, false>(mb));
  const int rest = static_cast<int>(m % mb);
  const TileKernel tail = rest == 0 ? nullptr
                                    : q4 ? (avx512 ? kernel_for<true, true>(rest) : kernel_for<true, false>(rest))
                                         : (avx512 ? kernel_for<false, true>(rest) : kernel_for<false, false>(rest));
  const bool parallel = threads > 1 && m * N * K >= (int64_t{1} << 16);
  // As gemm.cpp: tiles in dynamic chunks, ~16 per thread, each chunk one sequential weight stream.
  // Within a chunk the tokens go in register blocks on the outside: one block's quantized
  // activations (mb x K bytes) stay in L1 while the chunk's tiles pass under them, and the chunk's
  // weights (<= 1/16 of the matrix per thread) stay in L2 from one token block to the next. The
  // other order streamed every token's activations from L2 once per 4-row tile.
  const int64_t chunk = std::max<int64_t>(1, p.tiles / (16 * threads));
  const int64_t chunks = (p.tiles + chunk - 1) / chunk;
  const int64_t m_full = m - rest;
#pragma omp parallel for num_threads(threads) if (parallel) schedule(dynamic, 1)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t t0 = c * chunk, t1 = std::min(p.tiles, (c + 1) * chunk);
    for (int64_t i0 = 0; i0 < m_full; i0 += mb)
      for (int64_t t = t0; t < t1; ++t) full(a, t, i0);
    if (tail)
      for (int64_t t = t0; t < t1; ++t) tail(a, t, m_full);
  }
}

namespace ref {

void linear_int8_act(const WeightMatrix& w, const float* x, int64_t m, const void* bias, DType bias_dtype, float* y) {
  validate_weight(w, "linear weight");
  FS_ASSERT(w.quantized(), "linear_int8_act needs int4 / int8 codes");
  const int64_t N = w.rows, K = w.cols, blocks = (K + kBlockCols - 1) / kBlockCols;
  QuantizedActs q;
  quantize_acts(x, m, K, blocks, false, false, 1, q);
  std::vector<float> b(static_cast<size_t>(N), 0.0f);
  if (bias) to_f32(bias, bias_dtype, N, b.data());
  const int64_t blocks_per_group = w.group == K ? blocks : w.group / kBlockCols;
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t n = 0; n < N; ++n) {
      double total = 0;
      for (int64_t g = 0; g < w.groups_per_row(); ++g) {
        double group_sum = 0;
        for (int64_t blk = g * blocks_per_group; blk < std::min(blocks, (g + 1) * blocks_per_group); ++blk) {
          int64_t dot = 0;
          for (int64_t c = blk * kBlockCols; c < std::min(K, (blk + 1) * kBlockCols); ++c) {
            int code;
            if (w.bits == 8) {
              code = static_cast<const int8_t*>(w.data)[n * K + c];
            } else {
              const uint8_t byte = static_cast<const uint8_t*>(w.data)[(n * K + c) / 2];
              code = static_cast<int>(c % 2 == 0 ? byte & 0xf : byte >> 4) - 8;
            }
            dot += static_cast<int64_t>(code) * q.codes[static_cast<size_t>(i * blocks * kBlockCols + c)];
          }
          group_sum += static_cast<double>(q.scale[static_cast<size_t>(i * blocks + blk)]) * static_cast<double>(dot);
        }
        total += static_cast<double>(half_to_float(w.scales[n * w.groups_per_row() + g])) * group_sum;
        if (w.offsets) {  // asymmetric: offset times the group's sum of the quantized x
          double gx = 0;
          for (int64_t blk = g * blocks_per_group; blk < std::min(blocks, (g + 1) * blocks_per_group); ++blk)
            gx += static_cast<double>(q.scale[static_cast<size_t>(i * blocks + blk)]) *
                  q.sum[static_cast<size_t>(i * blocks + blk)];
          total += static_cast<double>(w.offsets[n * w.groups_per_row() + g]) * gx;
        }
      }
      y[i * N + n] = static_cast<float>(total + b[static_cast<size_t>(n)]);
    }
  }
}

}  // namespace ref

Int8Weight quantize_dense_int8(const WeightMatrix& w) {
  validate_weight(w, "linear weight");
  FS_ASSERT(!w.quantized(), "quantize_dense_int8 takes a dense weight");
  Int8Weight q;
  q.w = w;
  q.w.bits = 8;
  q.w.dtype = DType::I8;
  q.w.group = w.cols % 64 == 0 ? 64 : w.cols % 32 == 0 ? 32 : w.cols;
  const int64_t groups = w.cols / q.w.group;
  q.codes.resize(static_cast<size_t>(w.rows * w.cols));
  q.scales.resize(static_cast<size_t>(w.rows * groups));
  std::vector<float> row(static_cast<size_t>(w.cols));
  for (int64_t r = 0; r < w.rows; ++r) {
    to_f32(static_cast<const uint8_t*>(w.data) + r * w.cols * static_cast<int64_t>(dtype_size(w.dtype)), w.dtype, w.cols,
           row.data());
    for (int64_t g = 0; g < groups; ++g) {
      const float* v = row.data() + g * q.w.group;
      float amax = 0.0f;
      for (int64_t c = 0; c < q.w.group; ++c) amax = std::max(amax, std::fabs(v[c]));
      const uint16_t sh = float_to_half(amax / 127.0f);
      const float s = half_to_float(sh);
      q.scales[static_cast<size_t>(r * groups + g)] = sh;
      for (int64_t c = 0; c < q.w.group; ++c) {
        const float code = s > 0.0f ? std::nearbyint(v[c] / s) : 0.0f;
        q.codes[static_cast<size_t>(r * w.cols + g * q.w.group + c)] = static_cast<int8_t>(std::clamp(code, -127.0f, 127.0f));
      }
    }
  }
  q.w.data = q.codes.data();
  q.w.scales = q.scales.data();
  return q;
}

}  // namespace fineserve::cpu
