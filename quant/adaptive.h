// Choosing the group size of one weight matrix: FineQuant's adaptive rule, a fixed group, or an
// error target. See docs/quantization.md for the reading of the paper's rule and the choice of α.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "quant/quantizer.h"

namespace fineserve::quant {

enum class GroupMode { Adaptive, Fixed, MaxRelError };

struct GroupOptions {
  GroupMode mode = GroupMode::Adaptive;
  int bits = 4;
  double alpha = 0;            // Adaptive: the threshold on the range ratio (0 = kDefaultAlpha)
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
};

struct GroupDecision {
  int64_t group = 0;
  GroupMode mode = GroupMode::Adaptive;
  std::vector<GroupLevel> levels;  // the candidates examined, coarsest first
  bool target_met = true;          // MaxRelError: false when even the finest group misses it
  std::string reason;              // one line for the report: why this group
};

// The default α. Chosen by the experiment in bench/alpha_sweep (docs/quantization.md).
extern const double kDefaultAlpha;

// Range statistics at every allowed group size of the matrix, coarsest first (one pass).
std::vector<GroupLevel> range_levels(const MatrixView& w);

// Chooses the group size for one matrix. Throws fineserve::Error for a fixed group not allowed
// for the matrix's K.
GroupDecision choose_group(const MatrixView& w, const GroupOptions& options);

}  // namespace fineserve::quant
