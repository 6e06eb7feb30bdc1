// AVX2 building blocks shared by the fast CPU kernels (internal to kernels/cpu/).
//
// Every function here is compiled for AVX2 + FMA + F16C through a target attribute, so the default
// build stays portable x86-64; callers must carry the same attribute (FS_AVX2) and be reached only
// after cpu::has_avx2() said yes.
#pragma once

#include <immintrin.h>

#include <cstdint>

#define FS_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace fineserve::cpu {

// True when the CPU runs AVX2, FMA and F16C (checked once).
bool has_avx2();

namespace simd {

// Four consecutive values from i on, stored as fp16 (f16) or fp32, as floats.
FS_AVX2 inline __m128 load4_f16_or_f32(const void* p, bool f16, int64_t i) {
  if (f16) return _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i)));
  return _mm_loadu_ps(static_cast<const float*>(p) + i);
}

// Sum of the 8 lanes.
FS_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The four lane sums of a, b, c, d as one 128-bit vector [sum a, sum b, sum c, sum d]: three hadds
// instead of four separate reductions.
FS_AVX2 inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// exp(x), within ~2 ulp of the correctly rounded result over the float range (Cephes expf:
// exp(x) = 2^n * exp(r), |r| <= ln2/2, with a degree-6 polynomial for exp(r)). Results that
// underflow (x < -87.3) are exactly 0, so exp(-inf) = 0 as softmax over masked logits needs.
FS_AVX2 inline __m256 exp(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.33654f), hi = _mm256_set1_ps(88.37626f);
  const __m256 underflow = _mm256_cmp_ps(x, lo, _CMP_GE_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // r = x - n*ln2 in two steps (ln2 split into an exactly representable head and a tail).
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  // 2^n built directly in the exponent field; n is in [-126, 128] after the clamp, one past the
  // field's range at either end, so scale twice by 2^(n/2) and 2^(n - n/2).
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i n1 = _mm256_srai_epi32(ni, 1);
  const __m256i n2 = _mm256_sub_epi32(ni, n1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
  const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
  const __m256 result = _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
  return _mm256_and_ps(result, underflow);
}

// erfc(|z|) with relative error below 1.2e-7 (Numerical Recipes' Chebyshev fit): computing the
// complement directly keeps GELU accurate for large negative inputs where 1 + erf cancels.
FS_AVX2 inline __m256 erfc_abs(__m256 z) {
  const __m256 a = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), z);
  const __m256 t = _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_fmadd_ps(_mm256_set1_ps(0.5f), a, _mm256_set1_ps(1.0f)));
  __m256 p = _mm256_set1_ps(0.17087277f);
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-0.82215223f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.48851587f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-1.13520398f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(0.27886807f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-0.18628806f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(0.09678418f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(0.37409196f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.00002368f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-1.26551223f));
  const __m256 arg = _mm256_sub_ps(p, _mm256_mul_ps(a, a));
  return _mm256_mul_ps(t, exp(arg));
}

}  // namespace simd
}  // namespace fineserve::cpu
