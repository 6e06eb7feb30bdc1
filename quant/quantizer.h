// FineQuant's quantizer: symmetric, zero-centred, uniform, weight-only.
//
// For a group of weights g (a run of `group` consecutive elements along the input dimension K of
// one output row): codes = clamp(round(w / scale), -(qmax + 1), qmax) with qmax = 2^(bits-1) - 1,
// i.e. the full two's-complement range (int4 -8..7, int8 -128..127), and one fp16 scale per group,
// which may be negative. Dequantization: w ≈ code * scale. How the scale is chosen (ScaleRule):
//  - Absmax (quantizer version 1, `quantize --no-search`): scale = absmax(g) / qmax, rounded up in
//    fp16 so no weight clips; codes stay in -qmax..qmax and |w - code * scale| <= scale / 2.
//  - SignedAbsmax: scale = -extreme(g) / (qmax + 1), where extreme is the signed value of largest
//    magnitude: it maps to code -(qmax + 1), so all 2^bits levels are used and zero stays exact
//    (llama.cpp's Q4_0 rule). The opposite sign side may clip by at most one step.
//  - Search (default, version 2): the scale, among clipping ratios of both rules above (kClipRatios),
//    with the smallest squared error of the group; the absmax scale is one of the candidates, so a
//    group's error is never above the Absmax rule's. Data-free.
//
// Storage (backend-neutral, see kernels/ops.h WeightMatrix):
//  - 8 bits: int8 codes, one per byte, [rows, cols].
//  - 4 bits: two codes per byte, [rows, cols / 2]; element 2j in the low nibble, 2j+1 in the high
//    nibble, each stored as code + 8 (an unsigned 0..15; code -8 is nibble 0).
//  - 3 and 2 bits (experiments only, not written to checkpoints): int8 codes, one per byte.
//  - scales: fp16 bit patterns, [rows, cols / group].
#pragma once

#include <cstdint>
#include <vector>

#include "kernels/dtype.h"

namespace fineserve::quant {

constexpr int qmax_for_bits(int bits) { return (1 << (bits - 1)) - 1; }
constexpr int qmin_for_bits(int bits) { return -(1 << (bits - 1)); }  // the full range's low end
bool is_supported_bits(int bits);  // 8, 4, 3, 2

// Allowed group sizes for a reduction dimension k: k itself ("column-wise", one scale per output
// channel) or a power of two >= 32 that divides k. Returned coarsest first (k, then descending).
std::vector<int64_t> allowed_groups(int64_t k);
bool is_allowed_group(int64_t k, int64_t group);

// The fp16 scale for a group with this absmax (bit pattern); 0 for an all-zero group.
uint16_t scale_for_absmax(float absmax, int bits);

// How each group's scale is chosen (see the top of this file).
enum class ScaleRule { Absmax, SignedAbsmax, Search };
const char* scale_rule_name(ScaleRule rule);  // "absmax", "signed-absmax", "search"
// Search: the clipping ratios tried for both the symmetric (absmax / qmax) and the sign-aware
// (-extreme / (qmax + 1)) scale.
inline constexpr float kClipRatios[] = {1.0f, 0.95f, 0.9f, 0.85f, 0.8f, 0.75f};

// A matrix of source weights as the checkpoint holds it: [rows, cols] of F32, F16 or BF16,
// row-major, possibly unaligned.
struct MatrixView {
  const void* data = nullptr;
  DType dtype = DType::F16;
  int64_t rows = 0;
  int64_t cols = 0;
};

// Quantized weights in the storage format above.
struct QuantizedMatrix {
  int64_t rows = 0;
  int64_t cols = 0;
  int bits = 0;
  int64_t group = 0;
  std::vector<uint8_t> codes;    // see "Storage" above
  std::vector<uint16_t> scales;  // [rows, cols / group]
  // Empty (symmetric, what quantize() writes) or fp32 [rows, cols / group] for an asymmetric matrix:
  // w = scale · code + offset (GGUF Q4_1's minimum, GPTQ / AWQ's -scale · zero; quant/format.h).
  std::vector<float> offsets;
  double rel_error = 0;          // ||W - Q(W)||_F / ||W||_F (0 for an all-zero W)
  // With importances: sqrt(Σ imp_k (w - q)² / Σ imp_k w²) over all elements (k = the column);
  // without, rel_error.
  double weighted_rel_error = 0;
  double max_err_over_scale = 0;  // max over elements of |w - q| / |scale| (<= 0.5 for Absmax)
  ScaleRule rule = ScaleRule::Search;
};

// Quantizes a whole matrix, multi-threaded over rows. Throws fineserve::Error when the group is
// not allowed for cols or bits are unsupported.
//
// importance (optional, [cols], finite and >= 0): how much an error in each input column costs,
// e.g. the mean square of that input's activations on calibration text (`quantize --calibration`,
// quant/calibration/). The Search rule then minimises each group's importance-weighted squared
// error Σ imp_k (w_k - code_k · s)² over a finer set of clipping ratios, with least-squares refits
// of the scale (quant/row_kernels.h: choose_scales_weighted); an input that never carries signal
// stops costing precision, and one that carries a lot gets it. Null: the data-free search.
QuantizedMatrix quantize(const MatrixView& w, int bits, int64_t group, ScaleRule rule = ScaleRule::Search,
                         const float* importance = nullptr);

// Reference single-row quantizer (fp32 in, one int8 code per element out) and its inverse.
void quantize_row(const float* w, int64_t cols, int bits, int64_t group, int8_t* codes, uint16_t* scales,
                  ScaleRule rule = ScaleRule::Search);
void dequantize_row(const int8_t* codes, const uint16_t* scales, int64_t cols, int64_t group, float* w);

// Dequantizes `rows` rows stored as above (codes [rows, cols] int8 or [rows, cols / 2] packed int4,
// scales [rows, cols / group]; e.g. a checkpoint's tensors in place) to fp32 out[rows, cols].
void dequantize_rows(const uint8_t* codes, const uint16_t* scales, int64_t rows, int64_t cols, int bits, int64_t group,
                     float* out);
// Dequantizes a stored QuantizedMatrix to fp32 [rows, cols], offsets included.
std::vector<float> dequantize(const QuantizedMatrix& q);

// int4 packing (see "Storage"): n must be even.
void pack_int4(const int8_t* codes, int64_t n, uint8_t* packed);
void unpack_int4(const uint8_t* packed, int64_t n, int8_t* codes);

}  // namespace fineserve::quant
