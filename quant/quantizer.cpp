#include "quant/quantizer.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "kernels/base.h"
#include "kernels/half.h"
#include "quant/row_kernels.h"

namespace fineserve::quant {
namespace {

constexpr uint32_t kFloatInfBits = 0x7f800000u;  // |w| bit patterns at or above this are Inf or NaN
constexpr float kHalfMax = 65504.0f;

std::string num(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}

std::string magnitude_error(float absmax, int bits) {
  return "weight magnitude " + num(absmax) + " cannot be represented with fp16 scales (" + std::to_string(bits) +
         "-bit codes allow |w| <= " + num(static_cast<double>(kHalfMax) * qmax_for_bits(bits)) + ")";
}

void check_bits(int bits) {
  if (!is_supported_bits(bits)) {
    throw Error("unsupported bit width " + std::to_string(bits) + " (supported: 8, 4, 3, 2)");
  }
}

void check_group(int64_t cols, int64_t group) {
  if (!is_allowed_group(cols, group)) {
    throw Error("group " + std::to_string(group) + " is not allowed for K=" + std::to_string(cols) +
                ": a group is K or a power of two >= 32 dividing K (allowed: " +
                detail::allowed_groups_text(cols) + ")");
  }
}

}  // namespace

namespace detail {

std::string allowed_groups_text(int64_t k) {
  std::string out;
  for (int64_t g : allowed_groups(k)) out += (out.empty() ? "" : ", ") + std::to_string(g);
  return out.empty() ? "none" : out;
}

void throw_non_finite(const float* group_start, int64_t group, int64_t row, int64_t col0) {
  for (int64_t j = 0; j < group; ++j) {
    if (!std::isfinite(group_start[j])) {
      throw Error("weight at row " + std::to_string(row) + ", column " + std::to_string(col0 + j) + " is " +
                  (std::isnan(group_start[j]) ? "NaN" : "infinite"));
    }
  }
  FS_ASSERT(false, "absmax reported a non-finite value the group does not contain");
  std::abort();  // unreachable; FS_ASSERT(false) already aborted
}

RowSums quantize_row_f32(const float* w, int64_t cols, int bits, int64_t group, int64_t row_index, uint8_t* codes,
                         uint16_t* scales, RowScratch& scratch, ScaleRule rule, const float* importance) {
  const int64_t n_groups = cols / group;
  scratch.absmax.resize(static_cast<size_t>(n_groups));
  scratch.scale.resize(static_cast<size_t>(n_groups));
  group_absmax_bits(w, cols, group, scratch.absmax.data());

  const int qmax = qmax_for_bits(bits);
  const int64_t bad = compute_scales(scratch.absmax.data(), n_groups, qmax, scales, scratch.scale.data());
  if (bad >= 0) {
    const uint32_t absmax_bits = scratch.absmax[static_cast<size_t>(bad)];
    if (absmax_bits >= kFloatInfBits) throw_non_finite(w + bad * group, group, row_index, bad * group);
    throw Error(magnitude_error(std::bit_cast<float>(absmax_bits), bits) + " at row " + std::to_string(row_index) +
                ", columns " + std::to_string(bad * group) + ".." + std::to_string((bad + 1) * group - 1));
  }
  if (importance == nullptr) {
    choose_scales(w, cols, group, qmax, rule, scales, scratch.scale.data());
    RowSums sums = quantize_groups(w, cols, group, scratch.scale.data(), static_cast<float>(qmax), codes);
    sums.weighted_err_sq = sums.err_sq;
    sums.weighted_norm_sq = sums.norm_sq;
    return sums;
  }
  choose_scales_weighted(w, importance, cols, group, qmax, rule, scales, scratch.scale.data());
  RowSums sums = quantize_groups(w, cols, group, scratch.scale.data(), static_cast<float>(qmax), codes);
  for (int64_t j = 0; j < cols; ++j) {
    const double d = static_cast<double>(w[j]) -
                     static_cast<double>(static_cast<int8_t>(codes[j])) * scratch.scale[static_cast<size_t>(j / group)];
    sums.weighted_err_sq += static_cast<double>(importance[j]) * d * d;
    sums.weighted_norm_sq += static_cast<double>(importance[j]) * w[j] * w[j];
  }
  return sums;
}

}  // namespace detail

const char* scale_rule_name(ScaleRule rule) {
  switch (rule) {
    case ScaleRule::Absmax: return "absmax";
    case ScaleRule::SignedAbsmax: return "signed-absmax";
    case ScaleRule::Search: return "search";
  }
  return "?";
}

bool is_supported_bits(int bits) { return bits == 8 || bits == 4 || bits == 3 || bits == 2; }

std::vector<int64_t> allowed_groups(int64_t k) {
  std::vector<int64_t> groups;
  if (k <= 0) return groups;
  groups.push_back(k);
  for (int64_t p = static_cast<int64_t>(std::bit_floor(static_cast<uint64_t>(k))); p >= 32; p /= 2) {
    if (p < k && k % p == 0) groups.push_back(p);
  }
  return groups;
}

bool is_allowed_group(int64_t k, int64_t group) {
  if (k <= 0 || group <= 0) return false;
  if (group == k) return true;
  return group >= 32 && std::has_single_bit(static_cast<uint64_t>(group)) && k % group == 0;
}

uint16_t scale_for_absmax(float absmax, int bits) {
  check_bits(bits);
  if (!std::isfinite(absmax)) throw Error("weight magnitude is " + std::string(std::isnan(absmax) ? "NaN" : "infinite"));
  FS_ASSERT(absmax >= 0, "scale_for_absmax: absmax must be non-negative");
  // The same code as quantize() (a single group takes the portable path; see row_kernels.cpp).
  const uint32_t absmax_bits = std::bit_cast<uint32_t>(absmax) & 0x7fffffffu;  // -0 is 0
  uint16_t scale = 0;
  float scale_f = 0;
  if (detail::compute_scales(&absmax_bits, 1, qmax_for_bits(bits), &scale, &scale_f) >= 0) {
    throw Error(magnitude_error(absmax, bits));
  }
  return scale;
}

QuantizedMatrix quantize(const MatrixView& w, int bits, int64_t group, ScaleRule rule, const float* importance) {
  check_bits(bits);
  detail::check_matrix(w);
  check_group(w.cols, group);
  if (bits == 4 && w.cols % 2 != 0) {
    throw Error("4-bit codes pack two per byte: K=" + std::to_string(w.cols) + " must be even");
  }

  QuantizedMatrix q;
  q.rows = w.rows;
  q.cols = w.cols;
  q.bits = bits;
  q.group = group;
  q.rule = rule;
  const int64_t codes_per_row = bits == 4 ? w.cols / 2 : w.cols;
  const int64_t groups_per_row = w.cols / group;
  q.codes.resize(static_cast<size_t>(w.rows * codes_per_row));
  q.scales.resize(static_cast<size_t>(w.rows * groups_per_row));

  // Sums per chunk, added in chunk order afterwards: the result does not depend on the threads.
  std::vector<detail::RowSums> chunk_sums(static_cast<size_t>(detail::chunk_count(w)));
  detail::for_each_row_chunk(w, [&](const detail::RowChunk& chunk) {
    detail::RowScratch scratch;
    std::vector<uint8_t> codes(bits == 4 ? static_cast<size_t>(w.cols) : 0);  // unpacked, before packing
    detail::RowSums& sums = chunk_sums[static_cast<size_t>(chunk.index)];
    for (int64_t i = 0; i < chunk.rows; ++i) {
      const int64_t r = chunk.row0 + i;
      uint8_t* out = q.codes.data() + r * codes_per_row;
      const detail::RowSums row = detail::quantize_row_f32(chunk.data + i * w.cols, w.cols, bits, group, r,
                                                           bits == 4 ? codes.data() : out,
                                                           q.scales.data() + r * groups_per_row, scratch, rule,
                                                           importance);
      sums.err_sq += row.err_sq;
      sums.norm_sq += row.norm_sq;
      sums.weighted_err_sq += row.weighted_err_sq;
      sums.weighted_norm_sq += row.weighted_norm_sq;
      sums.max_err_over_scale = std::max(sums.max_err_over_scale, row.max_err_over_scale);
      if (bits == 4) detail::pack_int4_fast(codes.data(), w.cols, out);
    }
  });

  detail::RowSums total;
  for (const detail::RowSums& s : chunk_sums) {
    total.err_sq += s.err_sq;
    total.norm_sq += s.norm_sq;
    total.weighted_err_sq += s.weighted_err_sq;
    total.weighted_norm_sq += s.weighted_norm_sq;
    total.max_err_over_scale = std::max(total.max_err_over_scale, s.max_err_over_scale);
  }
  q.rel_error = total.norm_sq > 0 ? std::sqrt(total.err_sq / total.norm_sq) : 0.0;
  q.weighted_rel_error =
      total.weighted_norm_sq > 0 ? std::sqrt(total.weighted_err_sq / total.weighted_norm_sq) : 0.0;
  q.max_err_over_scale = total.max_err_over_scale;
  return q;
}

void quantize_row(const float* w, int64_t cols, int bits, int64_t group, int8_t* codes, uint16_t* scales,
                  ScaleRule rule) {
  check_bits(bits);
  check_group(cols, group);
  detail::RowScratch scratch;
  std::vector<uint8_t> bytes(static_cast<size_t>(cols));
  detail::quantize_row_f32(w, cols, bits, group, 0, bytes.data(), scales, scratch, rule);
  std::memcpy(codes, bytes.data(), bytes.size());  // two's-complement bytes -> int8
}

void dequantize_row(const int8_t* codes, const uint16_t* scales, int64_t cols, int64_t group, float* w) {
  FS_ASSERT(group > 0 && cols % group == 0, "dequantize_row: group must divide cols");
  for (int64_t g = 0; g < cols / group; ++g) {
    const float s = half_to_float(scales[g]);
    for (int64_t j = g * group; j < (g + 1) * group; ++j) w[j] = static_cast<float>(codes[j]) * s;
  }
}

void dequantize_rows(const uint8_t* codes, const uint16_t* scales, int64_t rows, int64_t cols, int bits, int64_t group,
                     float* out) {
  FS_ASSERT(is_supported_bits(bits) && is_allowed_group(cols, group), "dequantize: bad bits or group");
  const int64_t codes_per_row = bits == 4 ? cols / 2 : cols;
  const int64_t groups_per_row = cols / group;
  std::vector<int8_t> row_codes(static_cast<size_t>(cols));
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* row = codes + r * codes_per_row;
    if (bits == 4) {
      unpack_int4(row, cols, row_codes.data());
    } else {
      std::memcpy(row_codes.data(), row, static_cast<size_t>(cols));
    }
    dequantize_row(row_codes.data(), scales + r * groups_per_row, cols, group, out + r * cols);
  }
}

std::vector<float> dequantize(const QuantizedMatrix& q) {
  FS_ASSERT(is_supported_bits(q.bits) && is_allowed_group(q.cols, q.group), "dequantize: bad bits or group");
  const int64_t codes_per_row = q.bits == 4 ? q.cols / 2 : q.cols;
  FS_ASSERT(q.codes.size() == static_cast<size_t>(q.rows * codes_per_row), "dequantize: codes size");
  FS_ASSERT(q.scales.size() == static_cast<size_t>(q.rows * (q.cols / q.group)), "dequantize: scales size");
  std::vector<float> w(static_cast<size_t>(q.rows * q.cols));
  dequantize_rows(q.codes.data(), q.scales.data(), q.rows, q.cols, q.bits, q.group, w.data());
  if (!q.offsets.empty()) {  // asymmetric: w = scale · code + offset
    FS_ASSERT(q.offsets.size() == q.scales.size(), "dequantize: offsets size");
    for (size_t i = 0; i < w.size(); ++i) w[i] += q.offsets[i / static_cast<size_t>(q.group)];
  }
  return w;
}

void pack_int4(const int8_t* codes, int64_t n, uint8_t* packed) {
  FS_ASSERT(n % 2 == 0, "pack_int4: n must be even");
  for (int64_t j = 0; j < n / 2; ++j) {
    const unsigned lo = static_cast<unsigned>(codes[2 * j] + 8) & 0xfu;
    const unsigned hi = static_cast<unsigned>(codes[2 * j + 1] + 8) & 0xfu;
    packed[j] = static_cast<uint8_t>(lo | (hi << 4));
  }
}

void unpack_int4(const uint8_t* packed, int64_t n, int8_t* codes) {
  FS_ASSERT(n % 2 == 0, "unpack_int4: n must be even");
  for (int64_t j = 0; j < n / 2; ++j) {
    codes[2 * j] = static_cast<int8_t>((packed[j] & 0xf) - 8);
    codes[2 * j + 1] = static_cast<int8_t>((packed[j] >> 4) - 8);
  }
}

}  // namespace fineserve::quant
