// Choosing the group size of one weight matrix: the adaptive rule (default), the paper's α rule,
// a fixed group, or an error target. See docs/quantization.md.
//
// The adaptive rule ("gaussian"): at every allowed group size g, coarsest first, compare the matrix's
// relative quantization error with the one i.i.d. Gaussian weights give at the same bits and group
// (gaussian_rel_error); take the coarsest g where the matrix is within `tolerance` times the
// Gaussian's, else the finest allowed group. Groups whose Gaussian error itself exceeds `error_cap`
// are not candidates unless the matrix itself is within the cap there: at 8 bits every group passes
// (column-wise Gaussian error ~0.01), at 4 bits only 32 does (the default cap is the error of
// llama.cpp's Q4_0 layout on Gaussian weights; coarser int4 groups cost a small model far more
// accuracy than the 0.03-0.25 bits per weight they save), except for matrices lighter-tailed than
// Gaussian. A Gaussian matrix therefore stays at the coarsest group the cap allows at every K
// (column-wise at 8 bits, 32 at 4 bits), and a matrix whose outlier channels inflate its group
// scales refines until they no longer do.
// The α rule compares consecutive mean group ranges, a ratio whose Gaussian value itself depends on
// K (it is larger for smaller groups), so it can refine Gaussian matrices of small K.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "quant/quantizer.h"

namespace fineserve::quant {

enum class GroupMode { Adaptive, Alpha, Fixed, MaxRelError };

struct GroupOptions {
  GroupMode mode = GroupMode::Adaptive;
  int bits = 4;
  ScaleRule scale = ScaleRule::Search;  // how the chosen group's scales are picked (MaxRelError judges with it)
  double tolerance = 0;        // Adaptive: allowed error over the Gaussian's (0 = kDefaultTolerance)
  double error_cap = 0;        // Adaptive: the largest Gaussian error a candidate group may have (0 = kDefaultErrorCap)
  double alpha = 0;            // Alpha: the threshold on the range ratio (0 = kDefaultAlpha)
  int64_t group = 0;           // Fixed: the group size for every matrix (K when it is -1)
  double max_rel_error = 0;    // MaxRelError: the target relative Frobenius error
};

// One candidate group size the search looked at.
struct GroupLevel {
  int64_t group = 0;
  double mean_range = 0;   // mean over all (row, group) of the group's absmax
  double max_range = 0;    // max over all groups of the absmax (= the matrix absmax)
  double ratio = 0;        // mean_range of the previous (coarser) level / this level's (0 for the first)
  double rel_error = -1;   // relative Frobenius error at this group (-1 when not computed)
  double gaussian_rel_error = -1;  // Adaptive: the same for i.i.d. Gaussian weights (-1 when not computed)
};

struct GroupDecision {
  int64_t group = 0;
  GroupMode mode = GroupMode::Adaptive;
  std::vector<GroupLevel> levels;  // the candidates examined, coarsest first
  bool target_met = true;          // MaxRelError: false when even the finest group misses it
  std::string reason;              // one line for the report: why this group
};

// The default α of the paper's rule. Chosen by the experiment in bench/alpha_sweep (docs/quantization.md).
extern const double kDefaultAlpha;
// The adaptive rule's default tolerance over the Gaussian error (docs/quantization.md).
extern const double kDefaultTolerance;
// The adaptive rule's default cap on a candidate group's Gaussian error (docs/quantization.md).
extern const double kDefaultErrorCap;

const char* group_mode_name(GroupMode mode);  // "adaptive", "alpha", "fixed", "max-rel-error"

// The relative Frobenius error of i.i.d. standard Gaussian weights quantized at `bits` with groups
// of `group` under `rule`: measured once per (bits, group, rule) on a fixed pseudo-random sample of
// at least 2^17 weights (and 16 rows), then cached. Deterministic.
double gaussian_rel_error(int bits, int64_t group, ScaleRule rule);

// Range statistics and relative errors at every allowed group size, coarsest first (one pass).
// With importances ([cols], see quantize()), the errors are importance-weighted:
// sqrt(Σ imp_k (w - q)² / Σ imp_k w²), measured with the calibrated search.
std::vector<GroupLevel> error_levels(const MatrixView& w, int bits, ScaleRule rule, const float* importance = nullptr);

// Range statistics at every allowed group size of the matrix, coarsest first (one pass).
std::vector<GroupLevel> range_levels(const MatrixView& w);

// Chooses the group size for one matrix. Throws fineserve::Error for a fixed group not allowed
// for the matrix's K.
GroupDecision choose_group(const MatrixView& w, const GroupOptions& options);

}  // namespace fineserve::quant
