// Activations quantized to int8 per token and per block of 32 columns, for the optional W4A8 / W8A8
// linear path (CpuOptions::int8_activations). One definition of the rounding, shared by the fast
// kernels and the reference, so both see the same codes:
//   scale = max|x| / 127, code = round_to_nearest_even(x * (127 / max|x|)) in [-127, 127],
// and an all-zero block gets scale 0 and codes 0. -128 is never produced: the AVX2 kernel's sign
// trick negates activation codes, which -128 would overflow.
#pragma once

#include <cmath>
#include <cstdint>

namespace fineserve::cpu {

inline constexpr int64_t kActBlock = 32;

// Quantizes x[0, n) (n <= kActBlock) into q[0, n); q[n, kActBlock) is left alone. Returns the sum
// of the codes and writes the scale.
inline int32_t quantize_act_block(const float* x, int64_t n, int8_t* q, float* scale) {
  float amax = 0.0f;
  for (int64_t i = 0; i < n; ++i) amax = std::fmax(amax, std::fabs(x[i]));
  const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
  *scale = amax / 127.0f;
  int32_t sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    // |x * inv| <= 127 up to one rounding, so the rounded code stays in [-127, 127].
    const int c = static_cast<int>(std::nearbyint(x[i] * inv));
    q[i] = static_cast<int8_t>(c);
    sum += c;
  }
  return sum;
}

}  // namespace fineserve::cpu
