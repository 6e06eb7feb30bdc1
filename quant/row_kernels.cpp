// The quantizer's hot loops. Each has a portable reference version (plain C++, also the fallback
// for CPUs without AVX2) and an AVX2 + F16C version chosen at run time, so the default build
// stays portable x86-64. Tests check that both give the same codes and scales.
//
// Why no AVX-512 version: the loop is bound by the fp32 division (see quantize_groups_ref), whose
// throughput per element is the same for 256- and 512-bit vectors on current x86 cores, so a
// 512-bit copy would add code without adding speed.
#include "quant/row_kernels.h"

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <exception>
#include <limits>
#include <string>

#include <immintrin.h>

#include "kernels/base.h"
#include "kernels/cpu/convert.h"
#include "kernels/cpu/simd.h"
#include "kernels/half.h"

namespace fineserve::quant::detail {
namespace {

constexpr uint32_t kAbsMask = 0x7fffffffu;
constexpr uint32_t kLastFiniteFloat = 0x7f7fffffu;  // |w| bit patterns above it are Inf or NaN
constexpr float kInfinity = std::numeric_limits<float>::infinity();
constexpr uint16_t kHalfInf = 0x7c00;               // every finite positive fp16 is below it
// The float error sums are flushed into doubles about this often: float lanes vectorise twice
// as wide as double ones, and a few thousand terms keep the float sums accurate.
constexpr int64_t kFlushEvery = 1024;

// ---- portable reference versions ------------------------------------------------------------

// absmax of each group of `group` elements of one row, as the bit pattern of |w|.
//
// Why bit patterns: for non-negative IEEE floats the unsigned bit patterns order exactly like the
// values, so the absmax is an integer max of (bits & 0x7fffffff). An integer max vectorises
// without -ffast-math, and a NaN or an Inf shows up as a result >= 0x7f800000 instead of being
// dropped silently the way a float max drops NaN. 8 lanes: one AVX2 vector, so the reduction
// stays short for groups of 32. always_inline so that each target's wrapper vectorises it anew.
[[gnu::always_inline]] inline void group_absmax_body(const float* __restrict w, int64_t cols, int64_t group,
                                                     uint32_t* __restrict out) {
  constexpr int64_t kLanes = 8;
  const int64_t n_groups = cols / group;
  for (int64_t g = 0; g < n_groups; ++g) {
    const float* x = w + g * group;
    uint32_t lane[kLanes] = {};
    int64_t j = 0;
    for (; j + kLanes <= group; j += kLanes) {
      for (int64_t l = 0; l < kLanes; ++l) lane[l] = std::max(lane[l], std::bit_cast<uint32_t>(x[j + l]) & kAbsMask);
    }
    for (; j < group; ++j) lane[0] = std::max(lane[0], std::bit_cast<uint32_t>(x[j]) & kAbsMask);
    uint32_t m = 0;
    for (int64_t l = 0; l < kLanes; ++l) m = std::max(m, lane[l]);
    out[g] = m;
  }
}

// Two codes per byte, element 2j in the low nibble, each as code + 8 (see quant/quantizer.h).
// Codes are two's-complement bytes; (byte + 8) mod 16 equals code + 8 for -8 <= code <= 7.
[[gnu::always_inline]] inline void pack_int4_body(const uint8_t* __restrict codes, int64_t n,
                                                  uint8_t* __restrict packed) {
  for (int64_t j = 0; j < n / 2; ++j) {
    const unsigned lo = static_cast<unsigned>(codes[2 * j] + 8) & 0xfu;
    const unsigned hi = static_cast<unsigned>(codes[2 * j + 1] + 8) & 0xfu;
    packed[j] = static_cast<uint8_t>(lo | (hi << 4));
  }
}

// The fp16 scale of every group from its absmax bits: the nearest fp16 to absmax / qmax, stepped
// up until scale * qmax >= absmax so no weight clips (the smallest positive fp16 when absmax / qmax
// underflows fp16; 0 for an all-zero group), and that scale widened to fp32. Returns the first
// group whose absmax is NaN/Inf or needs a scale above 65504, or -1 when every group is fine.
int64_t compute_scales_ref(const uint32_t* absmax_bits, int64_t n_groups, int qmax, uint16_t* scales,
                           float* scale_f) {
  const float q = static_cast<float>(qmax);
  for (int64_t g = 0; g < n_groups; ++g) {
    const uint32_t bits = absmax_bits[g];
    if (bits > kLastFiniteFloat) return g;
    uint16_t s = 0;
    if (bits != 0) {
      const float absmax = std::bit_cast<float>(bits);
      s = float_to_half(absmax / q);
      if (s == 0) s = 1;  // below fp16's range: the smallest positive (subnormal) fp16, 2^-24
      // For positive fp16 values consecutive bit patterns are consecutive values, so ++s is "the
      // next fp16". half * qmax is exact in fp32 (11 + 7 significant bits): the test is exact.
      while (s < kHalfInf && half_to_float(s) * q < absmax) ++s;
      if (s >= kHalfInf) return g;
    }
    scales[g] = s;
    scale_f[g] = half_to_float(s);
  }
  return -1;
}

// Float sums of one row's elements, flushed into a RowSums.
struct ErrorAccumulator {
  float err = 0, norm = 0, dev = 0;
  void add(float x, float t, float q, float s) {
    const float d = x - q * s;  // q * s is exact: an 11-bit scale times a 7-bit code
    err += d * d;
    norm += x * x;
    dev = std::max(dev, std::fabs(t - q));
  }
  void flush(RowSums& sums) {
    sums.err_sq += err;
    sums.norm_sq += norm;
    sums.max_err_over_scale = std::max<double>(sums.max_err_over_scale, dev);
    err = norm = 0;
  }
};

// One element: t = w / s (the weight in units of the scale), its code q = clamp(nearbyint(t)), and
// the error. |t - q| is the error over the scale: |w - q*s| / s up to the rounding of t, and
// <= 1/2 exactly since q = nearbyint(t) and the scale leaves |t| <= qmax.
//
// Division, not a multiply by 1/s: a correctly rounded w / s never lands on a tie point k + 1/2
// unless the exact quotient is one, so nearbyint picks the truly nearest code and
// |w - code * s| <= s / 2 holds exactly; the reciprocal can be off by an ulp and break that.
// nearbyint rounds ties to even (the default rounding mode), as the AVX2 version does.
inline uint8_t quantize_one(float x, float s, float qmax, ErrorAccumulator& acc) {
  const float t = x / s;
  const float q = std::min(std::max(std::nearbyint(t), -qmax - 1.0f), qmax);
  acc.add(x, t, q, s);
  return static_cast<uint8_t>(static_cast<int>(q));  // modulo 256: the two's-complement byte
}

// codes = clamp(nearbyint(w / scale), -(qmax + 1), qmax) for every group of one row, plus the error sums.
RowSums quantize_groups_ref(const float* w, int64_t cols, int64_t group, const float* scale, float qmax,
                            uint8_t* codes) {
  RowSums sums;
  ErrorAccumulator acc;
  int64_t since_flush = 0;
  for (int64_t g = 0; g < cols / group; ++g) {
    const float s = scale[g];
    const float* x = w + g * group;
    uint8_t* c = codes + g * group;
    if (s == 0.0f) {  // an all-zero group: codes 0, no error, no norm
      std::fill(c, c + group, uint8_t{0});
      continue;
    }
    for (int64_t j = 0; j < group; ++j) c[j] = quantize_one(x[j], s, qmax, acc);
    if ((since_flush += group) >= kFlushEvery) {
      acc.flush(sums);
      since_flush = 0;
    }
  }
  acc.flush(sums);
  return sums;
}


// group_sq_error: 8 lanes (element j in lane j % 8), fused multiply-adds, and the lanes summed in
// the order horizontal_sum below uses, so the reference and the AVX2 version agree bit for bit and
// the search picks the same scale on every CPU.
constexpr int kErrLanes = 8;
inline float sum_lanes(const float* l) {
  return ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
}
inline float error_one(float x, float inv, float s, float qmax) {
  const float q = std::min(std::max(std::nearbyint(x * inv), -qmax - 1.0f), qmax);
  return std::fma(-q, s, x);
}

// One body for the plain error and the importance-weighted one (imp · d, then a fused multiply-add
// with d); the AVX2 body below does the same operations in the same lanes, so the two agree bit for
// bit. imp is ignored unless kWeighted.
template <bool kWeighted>
float sq_error_ref_body(const float* x, const float* imp, int64_t n, float s, float qmax) {
  const float inv = 1.0f / s;
  float lane[kErrLanes] = {};
  int64_t j = 0;
  for (; j + kErrLanes <= n; j += kErrLanes) {
    for (int l = 0; l < kErrLanes; ++l) {
      const float d = error_one(x[j + l], inv, s, qmax);
      lane[l] = std::fma(kWeighted ? imp[j + l] * d : d, d, lane[l]);
    }
  }
  float total = sum_lanes(lane);
  for (; j < n; ++j) {
    const float d = error_one(x[j], inv, s, qmax);
    total = std::fma(kWeighted ? imp[j] * d : d, d, total);
  }
  return total;
}

float group_sq_error_ref(const float* x, int64_t n, float s, float qmax) {
  return sq_error_ref_body<false>(x, nullptr, n, s, qmax);
}

float weighted_sq_error_ref(const float* x, const float* imp, int64_t n, float s, float qmax) {
  return sq_error_ref_body<true>(x, imp, n, s, qmax);
}

void group_absmax_ref(const float* w, int64_t cols, int64_t group, uint32_t* out) {
  group_absmax_body(w, cols, group, out);
}
void pack_int4_ref(const uint8_t* codes, int64_t n, uint8_t* packed) { pack_int4_body(codes, n, packed); }

// ---- AVX2 + F16C versions -------------------------------------------------------------------

__attribute__((target("avx2,f16c"))) void group_absmax_avx2(const float* w, int64_t cols, int64_t group,
                                                            uint32_t* out) {
  group_absmax_body(w, cols, group, out);  // GCC vectorises the lane loop with 32-byte vectors here
}

__attribute__((target("avx2,f16c"))) void pack_int4_avx2(const uint8_t* codes, int64_t n, uint8_t* packed) {
  pack_int4_body(codes, n, packed);
}

// A 32-bit lane mask narrowed to 16-bit lanes in order (packs saturates -1 to -1 and 0 to 0).
__attribute__((target("avx2"))) inline __m128i narrow_mask(__m256i m) {
  return _mm_packs_epi32(_mm256_castsi256_si128(m), _mm256_extracti128_si256(m, 1));
}

// compute_scales_ref for 8 groups at a time, bit for bit the same. Blocks holding a NaN/Inf or an
// overflowing scale, and the tail, go to the reference, which also finds the offending group.
__attribute__((target("avx2,f16c"))) int64_t compute_scales_avx2(const uint32_t* absmax_bits, int64_t n_groups,
                                                                 int qmax, uint16_t* scales, float* scale_f) {
  const __m256 q = _mm256_set1_ps(static_cast<float>(qmax));
  const __m256i last_finite = _mm256_set1_epi32(static_cast<int>(kLastFiniteFloat));
  const __m128i one = _mm_set1_epi16(1);
  const __m128i last_finite_half = _mm_set1_epi16(0x7bff);  // 65504
  int64_t g = 0;
  for (; g + 8 <= n_groups; g += 8) {
    const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(absmax_bits + g));
    // absmax bit patterns are < 2^31, so signed compares work on them.
    const __m256i non_finite = _mm256_cmpgt_epi32(bits, last_finite);
    if (!_mm256_testz_si256(non_finite, non_finite)) break;
    const __m256 absmax = _mm256_castsi256_ps(bits);
    const __m128i zero = narrow_mask(_mm256_cmpeq_epi32(bits, _mm256_setzero_si256()));
    __m128i h = _mm256_cvtps_ph(_mm256_div_ps(absmax, q), _MM_FROUND_TO_NEAREST_INT);
    h = _mm_andnot_si128(zero, _mm_max_epu16(h, one));  // at least the smallest fp16; 0 if all-zero
    // One step up where scale * qmax < absmax. One step always suffices: rounding to fp16 lands at
    // most half an fp16 ulp low, and the fp32 quotient is off by far less than that.
    const __m256 too_small = _mm256_cmp_ps(_mm256_mul_ps(_mm256_cvtph_ps(h), q), absmax, _CMP_LT_OQ);
    h = _mm_sub_epi16(h, narrow_mask(_mm256_castps_si256(too_small)));  // subtracting -1 adds 1
    const __m128i overflow = _mm_cmpgt_epi16(h, last_finite_half);      // h <= 0x7c00: signed is fine
    if (!_mm_testz_si128(overflow, overflow)) break;
    _mm_storeu_si128(reinterpret_cast<__m128i*>(scales + g), h);
    _mm256_storeu_ps(scale_f + g, _mm256_cvtph_ps(h));
  }
  const int64_t bad = compute_scales_ref(absmax_bits + g, n_groups - g, qmax, scales + g, scale_f + g);
  return bad < 0 ? bad : g + bad;
}

__attribute__((target("avx2"))) inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

__attribute__((target("avx2"))) inline float horizontal_max(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

// Adds the vector sums (and the scalar tail's) into the doubles and clears the sums; the running
// max needs no clearing.
__attribute__((target("avx2"))) inline void flush_avx2(__m256& err, __m256& norm, const __m256& dev,
                                                       ErrorAccumulator& tail, RowSums& sums) {
  sums.err_sq += horizontal_sum(err);
  sums.norm_sq += horizontal_sum(norm);
  sums.max_err_over_scale = std::max<double>(sums.max_err_over_scale, horizontal_max(dev));
  err = norm = _mm256_setzero_ps();
  tail.flush(sums);
}

// quantize_groups_ref, 32 elements per step: four 8-float vectors are quantized and their codes
// narrowed to 32 bytes with saturating packs (exact: -128 <= code <= 127). The error sums stay in
// registers across groups and are flushed to doubles every kFlushEvery elements.
__attribute__((target("avx2,f16c"))) RowSums quantize_groups_avx2(const float* w, int64_t cols, int64_t group,
                                                                  const float* scale, float qmax, uint8_t* codes) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int>(kAbsMask)));
  const __m256 hi = _mm256_set1_ps(qmax);
  const __m256 lo = _mm256_set1_ps(-qmax - 1.0f);  // the full two's-complement range
  // packs work within 128-bit halves; this puts the four vectors' dwords back in element order.
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  __m256 err = _mm256_setzero_ps(), norm = _mm256_setzero_ps(), dev = _mm256_setzero_ps();
  ErrorAccumulator tail;  // elements past the last full step of a group (column-wise odd K only)
  RowSums sums;

  int64_t since_flush = 0;
  for (int64_t g = 0; g < cols / group; ++g) {
    const float s = scale[g];
    const float* x = w + g * group;
    uint8_t* c = codes + g * group;
    if (s == 0.0f) {  // an all-zero group: codes 0, no error, no norm
      std::fill(c, c + group, uint8_t{0});
      continue;
    }
    const __m256 vs = _mm256_set1_ps(s);
    int64_t j = 0;
    for (; j + 32 <= group; j += 32) {
      __m256i q32[4];
      for (int u = 0; u < 4; ++u) {
        const __m256 v = _mm256_loadu_ps(x + j + 8 * u);
        const __m256 t = _mm256_div_ps(v, vs);
        const __m256 q = _mm256_min_ps(_mm256_max_ps(_mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), lo), hi);
        const __m256 d = _mm256_sub_ps(v, _mm256_mul_ps(q, vs));
        err = _mm256_add_ps(err, _mm256_mul_ps(d, d));
        norm = _mm256_add_ps(norm, _mm256_mul_ps(v, v));
        dev = _mm256_max_ps(dev, _mm256_and_ps(_mm256_sub_ps(t, q), abs_mask));
        q32[u] = _mm256_cvtps_epi32(q);
      }
      const __m256i q16 = _mm256_packs_epi16(_mm256_packs_epi32(q32[0], q32[1]), _mm256_packs_epi32(q32[2], q32[3]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + j), _mm256_permutevar8x32_epi32(q16, order));
    }
    for (; j < group; ++j) c[j] = quantize_one(x[j], s, qmax, tail);
    if ((since_flush += group) >= kFlushEvery) {
      flush_avx2(err, norm, dev, tail, sums);
      since_flush = 0;
    }
  }
  flush_avx2(err, norm, dev, tail, sums);
  return sums;
}


// The body of group_sq_error_avx2 and weighted_sq_error_avx2 (imp ignored unless kWeighted),
// inlined into the per-row searches below so the candidate loop pays no call or dispatch per
// candidate (that overhead dominated at groups of 32).
template <bool kWeighted>
__attribute__((target("avx2,fma,f16c"), always_inline)) inline float sq_error_avx2_body(const float* x,
                                                                                       const float* imp, int64_t n,
                                                                                       float s, float qmax) {
  const float inv = 1.0f / s;
  const __m256 vinv = _mm256_set1_ps(inv), vs = _mm256_set1_ps(s);
  const __m256 hi = _mm256_set1_ps(qmax), lo = _mm256_set1_ps(-qmax - 1.0f);
  __m256 acc = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + kErrLanes <= n; j += kErrLanes) {
    const __m256 v = _mm256_loadu_ps(x + j);
    const __m256 q = _mm256_min_ps(
        _mm256_max_ps(_mm256_round_ps(_mm256_mul_ps(v, vinv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), lo), hi);
    const __m256 d = _mm256_fnmadd_ps(q, vs, v);
    acc = _mm256_fmadd_ps(kWeighted ? _mm256_mul_ps(_mm256_loadu_ps(imp + j), d) : d, d, acc);
  }
  float lane[kErrLanes];
  _mm256_storeu_ps(lane, acc);
  float total = sum_lanes(lane);
  for (; j < n; ++j) {
    const float d = error_one(x[j], inv, s, qmax);
    total = std::fma(kWeighted ? imp[j] * d : d, d, total);
  }
  return total;
}

__attribute__((target("avx2,fma,f16c"))) float group_sq_error_avx2(const float* x, int64_t n, float s, float qmax) {
  return sq_error_avx2_body<false>(x, nullptr, n, s, qmax);
}

__attribute__((target("avx2,fma,f16c"))) float weighted_sq_error_avx2(const float* x, const float* imp, int64_t n,
                                                                      float s, float qmax) {
  return sq_error_avx2_body<true>(x, imp, n, s, qmax);
}
// ---- dispatch ---------------------------------------------------------------------------------

bool cpu_has(Isa isa) {
  switch (isa) {
    case Isa::Baseline: return true;
    case Isa::Avx2: return fineserve::cpu::has_avx2();  // AVX2 + FMA + F16C, asked in a way every compiler knows
  }
  return false;
}

std::atomic<Isa>& current_isa() {
  static std::atomic<Isa> isa{best_isa()};
  return isa;
}

}  // namespace

Isa best_isa() { return cpu_has(Isa::Avx2) ? Isa::Avx2 : Isa::Baseline; }

Isa active_isa() { return current_isa().load(std::memory_order_relaxed); }

Isa set_isa(Isa isa) {
  FS_ASSERT(cpu_has(isa), "set_isa: this CPU lacks the requested instruction set");
  return current_isa().exchange(isa);
}

void group_absmax_bits(const float* w, int64_t cols, int64_t group, uint32_t* out) {
  if (active_isa() == Isa::Avx2) return group_absmax_avx2(w, cols, group, out);
  group_absmax_ref(w, cols, group, out);
}

int64_t compute_scales(const uint32_t* absmax_bits, int64_t n_groups, int qmax, uint16_t* scales, float* scale_f) {
  if (active_isa() == Isa::Avx2) return compute_scales_avx2(absmax_bits, n_groups, qmax, scales, scale_f);
  return compute_scales_ref(absmax_bits, n_groups, qmax, scales, scale_f);
}

RowSums quantize_groups(const float* w, int64_t cols, int64_t group, const float* scale, float qmax,
                        uint8_t* codes) {
  if (active_isa() == Isa::Avx2) return quantize_groups_avx2(w, cols, group, scale, qmax, codes);
  return quantize_groups_ref(w, cols, group, scale, qmax, codes);
}

float group_sq_error(const float* w, int64_t n, float s, float qmax) {
  if (active_isa() == Isa::Avx2) return group_sq_error_avx2(w, n, s, qmax);
  return group_sq_error_ref(w, n, s, qmax);
}

namespace {
// The nearest fp16 to v, never 0 for a non-zero v (the smallest subnormal of v's sign instead).
inline uint16_t nonzero_half(float v) {
  uint16_t h = float_to_half(v);
  if ((h & 0x7fff) == 0) h = v < 0 ? uint16_t{0x8001} : uint16_t{1};
  return h;
}

// The search over one row's groups (see quantizer.h): the Absmax scale first (it keeps ties), then
// for every clipping ratio the sign-aware and the symmetric scale, each rounded to fp16. A template
// over the error function so the AVX2 instance inlines its error loop; both give the same bits.
template <float (*kError)(const float*, int64_t, float, float)>
[[gnu::always_inline]] inline void choose_scales_body(const float* w, int64_t cols, int64_t group, int qmax,
                                                      ScaleRule rule, uint16_t* scales, float* scale_f) {
  const float q = static_cast<float>(qmax);
  const float levels_below = q + 1.0f;  // the sign-aware scale maps the extreme to -(qmax + 1)
  for (int64_t g = 0; g < cols / group; ++g) {
    if (scales[g] == 0) continue;  // an all-zero group
    const float* x = w + g * group;
    float lo = x[0], hi = x[0];
    for (int64_t j = 1; j < group; ++j) {
      lo = x[j] < lo ? x[j] : lo;
      hi = x[j] > hi ? x[j] : hi;
    }
    const float extreme = -lo >= hi ? lo : hi;  // the signed value of largest magnitude
    const float absmax = std::fabs(extreme);
    if (rule == ScaleRule::SignedAbsmax) {
      scales[g] = nonzero_half(-extreme / levels_below);
      scale_f[g] = half_to_float(scales[g]);
      continue;
    }
    uint16_t best = scales[g];
    float best_err = kError(x, group, scale_f[g], q);
    for (const float r : kClipRatios) {
      for (const uint16_t h : {nonzero_half(-r * extreme / levels_below), nonzero_half(r * absmax / q)}) {
        if (h == best) continue;
        const float e = kError(x, group, half_to_float(h), q);
        if (e < best_err) {
          best_err = e;
          best = h;
        }
      }
    }
    scales[g] = best;
    scale_f[g] = half_to_float(best);
  }
}

void choose_scales_ref(const float* w, int64_t cols, int64_t group, int qmax, ScaleRule rule, uint16_t* scales,
                       float* scale_f) {
  choose_scales_body<group_sq_error_ref>(w, cols, group, qmax, rule, scales, scale_f);
}

__attribute__((target("avx2,fma,f16c"))) void choose_scales_avx2(const float* w, int64_t cols, int64_t group, int qmax,
                                                                 ScaleRule rule, uint16_t* scales, float* scale_f) {
  choose_scales_body<group_sq_error_avx2>(w, cols, group, qmax, rule, scales, scale_f);
}

}  // namespace

void choose_scales(const float* w, int64_t cols, int64_t group, int qmax, ScaleRule rule, uint16_t* scales,
                   float* scale_f) {
  if (rule == ScaleRule::Absmax) return;
  if (active_isa() == Isa::Avx2) return choose_scales_avx2(w, cols, group, qmax, rule, scales, scale_f);
  choose_scales_ref(w, cols, group, qmax, rule, scales, scale_f);
}

namespace {
// The calibrated search over one row's groups (row_kernels.h), a template over the weighted error
// so that the AVX2 instance inlines its loop; both error functions give the same bits, so the
// choices do not depend on the CPU.
template <float (*kError)(const float*, const float*, int64_t, float, float)>
[[gnu::always_inline]] inline void choose_scales_weighted_body(const float* w, const float* importance, int64_t cols,
                                                               int64_t group, int qmax, uint16_t* scales,
                                                               float* scale_f) {
  const float q = static_cast<float>(qmax);
  // (No lambdas here: they would not carry the AVX2 instance's target attribute.)
  for (int64_t g = 0; g < cols / group; ++g) {
    if (scales[g] == 0) continue;  // an all-zero group
    const float* x = w + g * group;
    const float* imp = importance + g * group;
    float lo = x[0], hi = x[0];
    for (int64_t j = 1; j < group; ++j) {
      lo = std::min(lo, x[j]);
      hi = std::max(hi, x[j]);
    }
    const float extreme = -lo >= hi ? lo : hi;
    const float absmax = std::fabs(extreme);
    uint16_t best = scales[g];  // the Absmax scale first: ties keep it
    float best_err = std::isfinite(scale_f[g]) ? kError(x, imp, group, scale_f[g], q) : kInfinity;
    for (int i = 0; i < kWeightedClipSteps; ++i) {
      const float r = kWeightedClipMax - kWeightedClipStep * static_cast<float>(i);
      for (const uint16_t h : {nonzero_half(-r * extreme / (q + 1.0f)), nonzero_half(r * absmax / q)}) {
        if (h == best || (h & 0x7fff) >= kHalfInf) continue;
        const float e = kError(x, imp, group, half_to_float(h), q);
        if (e < best_err) {
          best_err = e;
          best = h;
        }
      }
    }
    // Least-squares refit: for the codes the best scale gives, the scale minimising the weighted
    // error is Σ imp·w·code / Σ imp·code²; rounding anew with it can only be kept when it is better.
    for (int it = 0; it < kWeightedRefits; ++it) {
      const float s = half_to_float(best), inv = 1.0f / s;
      double num = 0, den = 0;
      for (int64_t j = 0; j < group; ++j) {
        const double c = std::min(std::max(std::nearbyint(x[j] * inv), -q - 1.0f), q);
        num += static_cast<double>(imp[j]) * x[j] * c;
        den += static_cast<double>(imp[j]) * c * c;
      }
      if (!(den > 0)) break;
      const uint16_t h = nonzero_half(static_cast<float>(num / den));
      if (h == best || (h & 0x7fff) >= kHalfInf) break;
      const float e = kError(x, imp, group, half_to_float(h), q);
      if (!(e < best_err)) break;
      best_err = e;
      best = h;
    }
    scales[g] = best;
    scale_f[g] = half_to_float(best);
  }
}

void choose_scales_weighted_ref(const float* w, const float* importance, int64_t cols, int64_t group, int qmax,
                                uint16_t* scales, float* scale_f) {
  choose_scales_weighted_body<weighted_sq_error_ref>(w, importance, cols, group, qmax, scales, scale_f);
}

__attribute__((target("avx2,fma,f16c"))) void choose_scales_weighted_avx2(const float* w, const float* importance,
                                                                          int64_t cols, int64_t group, int qmax,
                                                                          uint16_t* scales, float* scale_f) {
  choose_scales_weighted_body<weighted_sq_error_avx2>(w, importance, cols, group, qmax, scales, scale_f);
}
}  // namespace

void choose_scales_weighted(const float* w, const float* importance, int64_t cols, int64_t group, int qmax,
                            ScaleRule rule, uint16_t* scales, float* scale_f) {
  if (rule != ScaleRule::Search) return choose_scales(w, cols, group, qmax, rule, scales, scale_f);
  if (active_isa() == Isa::Avx2) return choose_scales_weighted_avx2(w, importance, cols, group, qmax, scales, scale_f);
  choose_scales_weighted_ref(w, importance, cols, group, qmax, scales, scale_f);
}

float weighted_group_sq_error(const float* w, const float* importance, int64_t n, float s, float qmax) {
  if (active_isa() == Isa::Avx2) return weighted_sq_error_avx2(w, importance, n, s, qmax);
  return weighted_sq_error_ref(w, importance, n, s, qmax);
}

void pack_int4_fast(const uint8_t* codes, int64_t n, uint8_t* packed) {
  if (active_isa() == Isa::Avx2) return pack_int4_avx2(codes, n, packed);
  pack_int4_ref(codes, n, packed);
}

void check_matrix(const MatrixView& w) {
  if (!is_float(w.dtype)) {
    throw Error("cannot quantize a " + std::string(dtype_name(w.dtype)) +
                " matrix: source weights must be F32, F16 or BF16");
  }
  FS_ASSERT(w.rows >= 0 && w.cols >= 0, "negative matrix shape");
  FS_ASSERT(w.data != nullptr || w.rows * w.cols == 0, "null matrix data");
}

namespace {
// About 256 KB of fp32 per chunk: stays in L2 while a chunk is scanned more than once, and gives
// the threads many chunks to balance.
constexpr int64_t kChunkElements = 64 * 1024;

int64_t rows_per_chunk(int64_t cols) { return std::max<int64_t>(1, kChunkElements / std::max<int64_t>(cols, 1)); }
}  // namespace

int64_t chunk_count(const MatrixView& w) {
  if (w.rows == 0 || w.cols == 0) return 0;
  const int64_t per = rows_per_chunk(w.cols);
  return (w.rows + per - 1) / per;
}

void for_each_row_chunk(const MatrixView& w, const std::function<void(const RowChunk&)>& fn) {
  check_matrix(w);
  const int64_t n_chunks = chunk_count(w);
  if (n_chunks == 0) return;
  const int64_t per = rows_per_chunk(w.cols);
  const size_t row_bytes = static_cast<size_t>(w.cols) * dtype_size(w.dtype);

  std::atomic<bool> failed{false};
  std::exception_ptr first_error;
#pragma omp parallel
  {
    std::vector<float> buffer;  // thread-local: one chunk of rows in fp32
#pragma omp for schedule(dynamic, 1)
    for (int64_t c = 0; c < n_chunks; ++c) {
      if (failed.load(std::memory_order_relaxed)) continue;  // an exception cannot leave the loop
      try {
        RowChunk chunk;
        chunk.index = c;
        chunk.row0 = c * per;
        chunk.rows = std::min(per, w.rows - chunk.row0);
        buffer.resize(static_cast<size_t>(chunk.rows * w.cols));
        cpu::to_f32(static_cast<const char*>(w.data) + static_cast<size_t>(chunk.row0) * row_bytes, w.dtype,
                    chunk.rows * w.cols, buffer.data());
        chunk.data = buffer.data();
        fn(chunk);
      } catch (...) {
#pragma omp critical(fs_quant_chunk_error)
        {
          if (!first_error) first_error = std::current_exception();
        }
        failed.store(true, std::memory_order_relaxed);
      }
    }
  }
  if (first_error) std::rethrow_exception(first_error);
}

}  // namespace fineserve::quant::detail
