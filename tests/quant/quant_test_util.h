// Shared helpers for the quant/ tests: random matrices and an exact check of the quantizer's
// error bound.
#pragma once

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <random>
#include <span>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "kernels/half.h"
#include "models/checkpoint/safetensors.h"
#include "quant/quantizer.h"

namespace fineserve::quant::testing {

// i.i.d. N(0, sigma^2), rounded to fp16 values so that an F16 copy holds exactly the same numbers.
inline std::vector<float> gaussian(int64_t rows, int64_t cols, uint32_t seed, float sigma = 0.02f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, sigma);
  std::vector<float> w(static_cast<size_t>(rows * cols));
  for (float& x : w) x = half_to_float(float_to_half(dist(rng)));
  return w;
}

// Scales every element of the given input channels (columns) by `factor`.
inline void plant_outlier_channels(std::vector<float>& w, int64_t cols, const std::vector<int64_t>& channels,
                                   float factor) {
  const int64_t rows = static_cast<int64_t>(w.size()) / cols;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c : channels) w[static_cast<size_t>(r * cols + c)] *= factor;
  }
}

inline MatrixView view(const std::vector<float>& w, int64_t rows, int64_t cols) {
  return MatrixView{w.data(), DType::F32, rows, cols};
}

// The codes of row r as int8 values, whatever the storage.
inline std::vector<int8_t> row_codes(const QuantizedMatrix& q, int64_t r) {
  std::vector<int8_t> codes(static_cast<size_t>(q.cols));
  if (q.bits == 4) {
    unpack_int4(q.codes.data() + r * q.cols / 2, q.cols, codes.data());
  } else {
    for (int64_t c = 0; c < q.cols; ++c) codes[static_cast<size_t>(c)] = static_cast<int8_t>(q.codes[static_cast<size_t>(r * q.cols + c)]);
  }
  return codes;
}

// Every element: |code| <= qmax and |w - code * scale| <= scale / 2 with the stored fp16 scale,
// evaluated in double (exact here: w has 24 significant bits, code * scale at most 18). Also checks
// the scale is the smallest fp16 that does not clip the group. Returns the relative Frobenius error.
inline double check_bound(const std::vector<float>& w, const QuantizedMatrix& q) {
  const int qmax = qmax_for_bits(q.bits);
  const int64_t groups = q.cols / q.group;
  double err = 0, norm = 0;
  int failures = 0;
  for (int64_t r = 0; r < q.rows; ++r) {
    const std::vector<int8_t> codes = row_codes(q, r);
    for (int64_t g = 0; g < groups; ++g) {
      const uint16_t s_bits = q.scales[static_cast<size_t>(r * groups + g)];
      const double s = half_to_float(s_bits);
      double absmax = 0;
      for (int64_t j = g * q.group; j < (g + 1) * q.group; ++j) {
        const double x = w[static_cast<size_t>(r * q.cols + j)];
        const int code = codes[static_cast<size_t>(j)];
        const double d = x - code * s;
        absmax = std::max(absmax, std::fabs(x));
        err += d * d;
        norm += x * x;
        if (std::abs(code) > qmax || std::fabs(d) > s / 2) {
          if (++failures <= 5) {
            ADD_FAILURE() << "row " << r << " col " << j << ": w=" << x << " code=" << code << " scale=" << s
                          << " |err|/scale=" << std::fabs(d) / s;
          }
        }
      }
      if (absmax == 0) {
        EXPECT_EQ(s_bits, 0) << "all-zero group " << g << " of row " << r;
      } else {
        EXPECT_GE(s * qmax, absmax) << "the scale clips group " << g << " of row " << r;
        if (s_bits > 1) {
          EXPECT_LT(static_cast<double>(half_to_float(static_cast<uint16_t>(s_bits - 1))) * qmax, absmax)
              << "a smaller fp16 scale would not clip group " << g << " of row " << r;
        }
      }
    }
  }
  EXPECT_EQ(failures, 0);
  return norm > 0 ? std::sqrt(err / norm) : 0.0;
}

// The squared error of every (row, group), in double, from the stored codes and scales.
inline std::vector<double> group_errors(const std::vector<float>& w, const QuantizedMatrix& q) {
  const int64_t groups = q.cols / q.group;
  std::vector<double> err(static_cast<size_t>(q.rows * groups), 0.0);
  for (int64_t r = 0; r < q.rows; ++r) {
    const std::vector<int8_t> codes = row_codes(q, r);
    for (int64_t g = 0; g < groups; ++g) {
      const double s = half_to_float(q.scales[static_cast<size_t>(r * groups + g)]);
      for (int64_t j = g * q.group; j < (g + 1) * q.group; ++j) {
        const double d = w[static_cast<size_t>(r * q.cols + j)] - codes[static_cast<size_t>(j)] * s;
        err[static_cast<size_t>(r * groups + g)] += d * d;
      }
    }
  }
  return err;
}

// `searched` (any rule) against `absmax` (ScaleRule::Absmax) of the same weights: every code within
// the full range -(qmax + 1)..qmax, and with `never_worse` no group's squared error above the absmax
// one (up to the search's float estimate, ~1e-5 relative). Returns the relative Frobenius error of
// `searched`.
inline double check_search(const std::vector<float>& w, const QuantizedMatrix& absmax, const QuantizedMatrix& searched,
                           bool never_worse = true) {
  EXPECT_EQ(absmax.rule, ScaleRule::Absmax);
  const int qmax = qmax_for_bits(searched.bits), qmin = qmin_for_bits(searched.bits);
  int bad_codes = 0;
  for (int64_t r = 0; r < searched.rows; ++r) {
    for (int8_t c : row_codes(searched, r)) bad_codes += c < qmin || c > qmax;
  }
  EXPECT_EQ(bad_codes, 0) << "codes outside " << qmin << ".." << qmax;
  const std::vector<double> a = group_errors(w, absmax), s = group_errors(w, searched);
  int worse = 0;
  double err = 0, norm = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    err += s[i];
    if (never_worse && s[i] > a[i] * (1 + 1e-5) + 1e-30 && ++worse <= 5)
      ADD_FAILURE() << "group " << i << ": searched error " << s[i] << " > absmax error " << a[i];
  }
  for (float x : w) norm += static_cast<double>(x) * x;
  EXPECT_NEAR(searched.rel_error, norm > 0 ? std::sqrt(err / norm) : 0.0, 1e-4 * searched.rel_error + 1e-12);
  return norm > 0 ? std::sqrt(err / norm) : 0.0;
}

// A source checkpoint for convert_checkpoint in dir / "src": an empty config.json and two i.i.d.
// Gaussian fp32 [rows, cols] matrices, names[0] = layers.0.q_proj (values a, seed) and names[1] =
// layers.0.v_proj (values b, seed + 1).
struct TwoMatrixSource {
  std::vector<std::string> names{"layers.0.q_proj.weight", "layers.0.v_proj.weight"};
  std::vector<float> a, b;
};

inline TwoMatrixSource write_two_matrix_source(const std::filesystem::path& dir, int64_t rows, int64_t cols,
                                               uint32_t seed) {
  TwoMatrixSource s;
  s.a = gaussian(rows, cols, seed);
  s.b = gaussian(rows, cols, seed + 1);
  std::filesystem::create_directories(dir / "src");
  std::ofstream(dir / "src" / "config.json") << "{}\n";
  ckpt::CheckpointWriter w(dir / "src", s.names, {}, 1ull << 30);
  w.add(s.names[0], DType::F32, {rows, cols}, std::as_bytes(std::span(s.a)));
  w.add(s.names[1], DType::F32, {rows, cols}, std::as_bytes(std::span(s.b)));
  w.finish();
  return s;
}

}  // namespace fineserve::quant::testing
