// Internal to quant/: the vectorised per-row loops behind quantize() and the group-size search,
// and the parallel walk over a matrix in chunks of rows. Not part of the public API.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "quant/quantizer.h"

namespace fineserve::quant::detail {

// Error sums of one or more quantized rows.
struct RowSums {
  double err_sq = 0;              // sum of (w - code * scale)^2
  double norm_sq = 0;             // sum of w^2
  double max_err_over_scale = 0;  // max of |w - code * scale| / scale
  // With importances (quantize_row_f32's importance): sum of imp * (w - code * scale)^2 and of
  // imp * w^2; without, the same as err_sq and norm_sq.
  double weighted_err_sq = 0;
  double weighted_norm_sq = 0;
};

// The instruction sets the hot loops are compiled for; the best one the CPU has is used.
enum class Isa { Baseline, Avx2 };  // Avx2 also needs F16C
Isa best_isa();
Isa active_isa();
// Forces a code path (tests compare them); returns the previous one. Must be supported by the CPU.
Isa set_isa(Isa isa);

// The hot loops (row_kernels.cpp), dispatched to the active ISA.
// absmax of each group of one row as the bit pattern of |w| (>= 0x7f800000: NaN or Inf inside).
void group_absmax_bits(const float* w, int64_t cols, int64_t group, uint32_t* out);  // out: [cols / group]
// fp16 scales (and their fp32 values) from group absmax bits; returns the first group that is NaN/Inf
// or too large for an fp16 scale, -1 when all are fine.
int64_t compute_scales(const uint32_t* absmax_bits, int64_t n_groups, int qmax, uint16_t* scales, float* scale_f);
// Replaces the Absmax scales compute_scales gave one row's groups (which also validated their
// magnitudes) by those of `rule` (SignedAbsmax or Search; Absmax leaves them), in both arrays.
void choose_scales(const float* w, int64_t cols, int64_t group, int qmax, ScaleRule rule, uint16_t* scales,
                   float* scale_f);
// The calibrated search (quantize with importances): the same, but minimising the importance-
// weighted squared error Σ imp_j (w_j - code_j · s)² of each group, over a finer set of clipping
// ratios (kWeightedClipMax down in kWeightedClipSteps steps of kWeightedClipStep) for both scale
// forms, followed by up to kWeightedRefits least-squares refits of the scale. importance: [cols],
// finite and >= 0. The Absmax scale is the first candidate, so no group's weighted error is above
// its. Rules other than Search ignore the importances.
inline constexpr float kWeightedClipMax = 1.1f, kWeightedClipStep = 0.02f;
inline constexpr int kWeightedClipSteps = 26, kWeightedRefits = 3;
void choose_scales_weighted(const float* w, const float* importance, int64_t cols, int64_t group, int qmax,
                            ScaleRule rule, uint16_t* scales, float* scale_f);
// The squared error sum (w - clamp(round(w / s), -(qmax + 1), qmax) * s)^2 over one group, with
// w / s taken as w * (1 / s) (the search's fast estimate). Same result on every ISA.
float group_sq_error(const float* w, int64_t n, float s, float qmax);
// The same sum with each term weighted by importance[j] (the calibrated search's error, in fp32).
// Same result on every ISA.
float weighted_group_sq_error(const float* w, const float* importance, int64_t n, float s, float qmax);
// Codes for every group of one row given the fp16 scales widened to fp32 (0 = all-zero group):
// clamp(round(w / scale), -(qmax + 1), qmax).
// Codes here and below are int8 values stored as two's-complement bytes.
RowSums quantize_groups(const float* w, int64_t cols, int64_t group, const float* scale, float qmax,
                        uint8_t* codes);
void pack_int4_fast(const uint8_t* codes, int64_t n, uint8_t* packed);

// Scratch a thread reuses across rows.
struct RowScratch {
  std::vector<uint32_t> absmax;  // [cols / group]
  std::vector<float> scale;      // [cols / group]
};

// Quantizes one fp32 row: fp16 scales [cols / group] and one code per element [cols]. Throws
// fineserve::Error naming row_index and the column for NaN/Inf weights or magnitudes fp16 scales
// cannot represent. bits and group must already be valid.
RowSums quantize_row_f32(const float* w, int64_t cols, int bits, int64_t group, int64_t row_index, uint8_t* codes,
                         uint16_t* scales, RowScratch& scratch, ScaleRule rule = ScaleRule::Search,
                         const float* importance = nullptr);

// "768, 256, 128, 64, 32": the allowed groups of K for error messages.
std::string allowed_groups_text(int64_t k);

// Throws fineserve::Error naming the first NaN or Inf among group_start[0, group) (row, column col0 + j).
[[noreturn]] void throw_non_finite(const float* group_start, int64_t group, int64_t row, int64_t col0);

// Throws fineserve::Error unless w is a float matrix; FS_ASSERTs its shape and pointer.
void check_matrix(const MatrixView& w);

// A chunk of rows of a matrix converted to fp32.
struct RowChunk {
  int64_t index = 0;  // chunk number, 0 .. chunk_count - 1 (fixed by the shape, not the thread count)
  int64_t row0 = 0;
  int64_t rows = 0;
  const float* data = nullptr;  // [rows, cols]
};

int64_t chunk_count(const MatrixView& w);
// Calls fn on every chunk of rows of w, in parallel over chunks (OpenMP). Each thread converts its
// chunk into a thread-local fp32 buffer of about 256 KB, so memory stays flat however large w is.
// The first exception a chunk throws is rethrown here once every thread has stopped.
void for_each_row_chunk(const MatrixView& w, const std::function<void(const RowChunk&)>& fn);

}  // namespace fineserve::quant::detail
