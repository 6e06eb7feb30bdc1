// Helpers shared by the kernel tests: seeded random data, NaN poisoning, tolerant comparison.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "kernels/half.h"
#include "kernels/ops.h"

namespace fineserve::testing {

inline std::vector<float> random_floats(size_t n, uint32_t seed, float lo = -1.0f, float hi = 1.0f) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = d(rng);
  return v;
}

inline std::vector<uint16_t> to_half_bits(const std::vector<float>& v, bool bf16) {
  std::vector<uint16_t> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = bf16 ? float_to_bf16(v[i]) : float_to_half(v[i]);
  return out;
}

// Makes a quantized test weight asymmetric (kernels/ops.h: w = code * scale + offset): one random
// fp32 offset per (row, group) of the order of 4 group scales either way, some exactly 0, in
// `offsets` (w.offsets points at it). `dense` ([rows, cols], code * scale, when not null) gets each
// element's offset added: one rounding of code * scale + offset, as the reference does (code *
// scale is exact in fp32). With fp16_exact every offset is rounded to an fp16 value first (as GGUF
// Q4_1's mins are), which the CPU kernels store as fp16.
inline void make_asymmetric(WeightMatrix& w, std::vector<float>& offsets, std::vector<float>* dense, uint32_t seed,
                            bool fp16_exact = false) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> d(-4.0f, 4.0f);
  const int64_t groups = w.cols / w.group;
  offsets.resize(static_cast<size_t>(w.rows * groups));
  for (size_t i = 0; i < offsets.size(); ++i) {
    offsets[i] = i % 7 == 3 ? 0.0f : d(rng) * half_to_float(w.scales[i]);
    if (fp16_exact) offsets[i] = half_to_float(float_to_half(offsets[i]));
  }
  w.offsets = offsets.data();
  if (dense)
    for (int64_t r = 0; r < w.rows; ++r)
      for (int64_t c = 0; c < w.cols; ++c) (*dense)[static_cast<size_t>(r * w.cols + c)] += offsets[static_cast<size_t>(r * groups + c / w.group)];
}

inline void poison(std::vector<float>& v) { std::fill(v.begin(), v.end(), std::numeric_limits<float>::quiet_NaN()); }

// Expects |got[i] - want[i]| <= tol[i] (or atol + rtol |want[i]| when tol is empty) for every i,
// and every got[i] finite where want[i] is; reports the worst element.
inline void expect_close(const std::vector<float>& got, const std::vector<float>& want, double atol, double rtol,
                         const std::string& what, const std::vector<double>& tol = {}) {
  ASSERT_EQ(got.size(), want.size()) << what;
  double worst = 0;
  size_t worst_i = 0, bad = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double limit = tol.empty() ? atol + rtol * std::fabs(want[i]) : tol[i];
    const double err = std::fabs(static_cast<double>(got[i]) - want[i]);
    const bool ok = std::isfinite(want[i]) ? (std::isfinite(got[i]) && err <= limit)
                                           : (std::isnan(want[i]) ? std::isnan(got[i]) : got[i] == want[i]);
    if (!ok) {
      if (bad == 0 || !(err <= worst)) {
        worst = err;
        worst_i = i;
      }
      ++bad;
    }
  }
  EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << got.size() << " elements off; worst at " << worst_i
                     << ": got " << got[worst_i] << " want " << want[worst_i];
}

}  // namespace fineserve::testing
